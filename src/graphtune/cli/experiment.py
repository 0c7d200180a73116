"""`graphtune experiment`, `pretrain` and `finetune`: options -> params -> graphtune.transfer.experiment."""

from __future__ import annotations

import click

from graphtune.cli import cli, load_params, params_option, set_option, user_errors


def _split_list(value: str | None, cast=str, option: str = "") -> list | None:
    """A comma-separated option -> list; None or "" (an MLproject default) -> None (take params.yaml)."""
    if value is None or str(value).strip() == "":
        return None
    items = [v.strip() for v in str(value).split(",") if v.strip()]
    try:
        return [cast(v) for v in items]
    except ValueError:
        raise click.BadParameter(f"expected a comma-separated list of {cast.__name__} values, got {value!r}",
                                 param_hint=option or None) from None


def _options(*options):
    """One decorator applying `options` in the order listed (as --help shows them)."""
    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


_model_option = click.option("--model", default=None, help="registered model name (graphtune models); "
                             "default: experiment.model.")

# Options shared by `experiment`, `pretrain` and `finetune` (empty string = take params.yaml).
_experiment_options = _options(
    params_option,
    set_option,
    click.option("--epochs", default=None, help="epochs per stage, comma-separated: one value for every stage, "
                 "two for [pretraining, transfer stages], or one per stage (default: train.epochs)."),
    click.option("--lrs", default=None, help="learning rates per stage, comma-separated (default: train.lrs)."),
    click.option("--seed", default=None, help="random seed, an integer (default: experiment.seed)."),
    click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (default: experiment.device)."),
    click.option("--output-dir", "--output_dir", default=None,
                 help="where results.json, results.csv and the plots go: this one folder, or a folder per run "
                 "when the path ends in {run} (default: experiment.output_dir, outputs/runs/{run}; "
                 "outputs/runs/latest links the newest)."),
    click.option("--experiment-name", "--experiment_name", default=None, help="MLflow experiment (default: "
                 "tracking.experiment_name)."),
    click.option("--system-metrics", "--system_metrics", type=click.Choice(["", "true", "false"]), default=None,
                 help="true: log MLflow's CPU/memory/GPU system metrics on the parent run "
                 "(default: tracking.system_metrics)."),
    click.option("--no-tracking", is_flag=True, help="run without MLflow (outputs are still written)."),
    click.option("--resume", default=None, metavar="RUN_ID|last",
                 help="continue an interrupted run (killed, preempted, failed) of the same configuration and seed "
                 "under its own parent run, from its last finished stage and budget point; 'last' = the newest "
                 "such run of this configuration."),
    click.option("--force", is_flag=True, help="with --resume: continue a run recorded at another code commit "
                 "(the override is recorded on the run)."),
    click.option("--nproc", type=click.IntRange(min=1), default=None,
                 help="train on N processes of this machine (torchrun, DistributedDataParallel: gloo on CPU, NCCL "
                 "on CUDA); train.batch_size stays the global batch. Several machines: start torchrun yourself "
                 "(README, 'Running at scale')."),
)

_transfer_options = _options(
    click.option("--strategy", default=None, help="adaptation strategy, a registered name (full, "
                 "freeze-transferred, scratch, ...; default: experiment.strategy)."),
    click.option("--fractions", default=None, help="budget curve: fractions of the target's training data in "
                 "(0, 1], comma-separated (default: transfer.fractions)."),
    click.option("--fewshot-mode", "--fewshot_mode", default=None,
                 help="subset, steps or both (default: transfer.fewshot_mode)."),
    click.option("--target-days", "--target_days", default=None,
                 help="budget points as days of target data, comma-separated, e.g. 1,3: each trains on the most "
                 "recent days of the training split; replaces --fractions (default: transfer.target_days)."),
)


def _apply_options(params, *, datasets=None, model=None, epochs=None, lrs=None, seed=None, device=None,
                   output_dir=None, experiment_name=None, system_metrics=None, strategy=None, fractions=None,
                   fewshot_mode=None, target_days=None) -> list[str]:
    """Apply command-line options on top of params; return the transfer-only options given explicitly."""
    exp, train, transfer = params.experiment, params.train, params.transfer
    if datasets is not None:
        exp.datasets = datasets
    if model:
        exp.model = model
    if (e := _split_list(epochs, int, "--epochs")) is not None:
        train.epochs = e
    if (lr := _split_list(lrs, float, "--lrs")) is not None:
        train.lrs = lr
    if seed is not None and str(seed).strip():
        try:
            exp.seed = int(seed)
        except ValueError:
            raise click.BadParameter(f"expected an integer, got {seed!r}", param_hint="--seed") from None
    if device:
        exp.device = device
    if output_dir:
        exp.output_dir = output_dir
    if experiment_name:
        params.tracking.experiment_name = experiment_name
    if system_metrics:
        params.tracking.system_metrics = system_metrics == "true"
    explicit = []
    if strategy:
        exp.strategy = strategy
        explicit.append("--strategy")
    if (f := _split_list(fractions, float, "--fractions")) is not None:
        transfer.fractions = f
        explicit.append("--fractions")
    if fewshot_mode:
        transfer.fewshot_mode = fewshot_mode
        explicit.append("--fewshot-mode")
    if (d := _split_list(target_days, float, "--target-days")) is not None:
        transfer.target_days = d
        explicit.append("--target-days")
    return explicit


def _launch(nproc):
    """`--nproc N` (N > 1) from a plain shell: run this very command as N torchrun workers and exit with their
    status; inside a worker (or with N = 1) do nothing."""
    import os
    import sys

    if not nproc or nproc == 1 or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return
    from graphtune import distributed

    sys.exit(distributed.launch(sys.argv[1:], nproc))


def _run(params, explicit, overrides, no_tracking, source_ref="", model="", resume=None, force=False):
    from graphtune import distributed
    from graphtune.errors import ConfigError
    from graphtune.transfer.experiment import execute, plan_experiment

    if force and not resume:
        raise ConfigError("--force: only means something with --resume")
    explicit = explicit + [o.split("=")[0] for o in overrides if o.startswith("transfer.")]
    plan = plan_experiment(params, explicit_transfer=explicit, source_ref=source_ref,
                           tracking_uri=params.tracking.tracking_uri or None, explicit_model=model or "")
    distributed.init_from_env()  # a torchrun worker joins its group (nothing happens in a plain run)
    try:
        result, run_id = execute(plan, echo=click.echo, tracking=not no_tracking, resume=resume or None, force=force)
    finally:
        distributed.shutdown()
    return result, run_id


@cli.command()
@click.option("--datasets", default=None, help="ordered cities, comma-separated: stage 0 pretrains on the first, "
              "each later one is a transfer target (default: experiment.datasets).")
@_model_option
@_experiment_options
@_transfer_options
@user_errors
def experiment(datasets, params_path, overrides, no_tracking, resume, force, nproc, **options):
    """The whole transfer experiment: pretrain, then zero-shot + budget curve per target city, S_uep."""
    _launch(nproc)
    params = load_params(params_path, overrides)
    explicit = _apply_options(params, datasets=_split_list(datasets), **options)
    _run(params, explicit, overrides, no_tracking, model=options["model"], resume=resume, force=force)


@cli.command()
@click.option("--city", required=True, help="the city to pretrain on.")
@_model_option
@_experiment_options
@user_errors
def pretrain(city, params_path, overrides, no_tracking, resume, force, nproc, **options):
    """Stage 0 alone: train a model on one city and log it (checkpoint artifact) for later fine-tuning."""
    _launch(nproc)
    params = load_params(params_path, overrides)
    explicit = _apply_options(params, datasets=[city], **options)
    _, run_id = _run(params, explicit, overrides, no_tracking, resume=resume, force=force)
    if run_id:
        click.echo(f"pretrained model logged in run {run_id}: graphtune finetune --from {run_id} --datasets CITY")


@cli.command()
@click.option("--from", "source_ref", required=True,
              help="the source model: a pretrain run id in the tracking store, a registered model "
              "(models:/NAME/VERSION or models:/NAME@alias), or a checkpoint file (source_model.pt). "
              "Its model and model options are the run's.")
@click.option("--datasets", required=True, help="target cities, comma-separated, transferred to in order.")
@click.option("--model", default=None, help="the source's model, if you name it (a check: fine-tuning continues the "
              "source's model and model options).")
@_experiment_options
@_transfer_options
@user_errors
def finetune(source_ref, datasets, params_path, overrides, no_tracking, resume, force, nproc, **options):
    """Transfer a pretrained model to target cities: zero-shot, then the budget curve, per city."""
    _launch(nproc)
    params = load_params(params_path, overrides)
    targets = _split_list(datasets) or []  # stages 1..n: the per-stage lists are read as in the experiment
    _apply_options(params, datasets=targets, **options)
    _run(params, [], overrides, no_tracking, source_ref=source_ref, model=options["model"], resume=resume, force=force)


