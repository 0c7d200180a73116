"""The `graphtune` command line: parses options, loads params.yaml, calls library functions.

Every command reads its own params.yaml section; options given on the command line win.
User errors (bad files, options, names) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import sys
import warnings
from functools import wraps

import click

from graphtune.errors import GraphTuneError

PARAMS_HELP = "params file whose sections give the defaults (missing options come from it)."
SET_HELP = "override a params.yaml entry, e.g. --set prepare.stride=2 (repeatable)."


def _user_errors(fn):
    """Turn GraphTuneError into a one-line message and exit code 2 (no traceback)."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GraphTuneError as err:
            click.echo(f"graphtune: error: {err}", err=True)
            sys.exit(2)

    return wrapper


def _params(params_path: str, overrides: tuple[str, ...]):
    from graphtune.config import load_params

    return load_params(params_path, overrides)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="graphtune")
def cli():
    """GraphTune: how cheaply, and with which strategy, does a sensor-graph forecaster move to another city?"""
    from graphtune.errors import format_warning

    warnings.simplefilter("default")
    warnings.formatwarning = format_warning  # GraphTune's notices: one line `graphtune: notice: ...` on stderr


@cli.command()
@click.option("--city", "cities", multiple=True,
              help="city to prepare (repeatable or comma-separated); default: prepare.cities from the params file.")
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help=SET_HELP)
@click.option("--data-source", type=click.Choice(["", "local", "url", "hf", "auto"]), default=None,
              help="where raw files come from: local files, registered URLs, the Hugging Face hub, or auto "
                   "(local first, then the sources). Default: prepare.data_source.")
@click.option("--processed-dir", default=None, help="output folder (default: prepare.processed_dir).")
@_user_errors
def prepare(cities, params_path, overrides, data_source, processed_dir):
    """Write data/processed/<city>/ (arrays + meta.json) from a city's raw files: the DVC prepare stage."""
    from graphtune.data.prepare import write_processed

    params = _params(params_path, overrides)
    kwargs = params.prepare.dataset_kwargs()
    if data_source:
        kwargs["data_source"] = data_source
    if processed_dir:
        kwargs["processed_dir"] = processed_dir
    names = [c for item in cities for c in item.split(",") if c] or params.prepare.cities
    for city in names:
        out = write_processed(city, cities=params.cities, **kwargs)
        click.echo(f"prepared {city} -> {out}")


@cli.command()
@click.option("--city", "cities", multiple=True, required=True,
              help="city whose raw files to fetch into its folder (repeatable or comma-separated).")
@click.option("--data-source", type=click.Choice(["url", "hf", "auto"]), default="auto", show_default=True,
              help="url: the registered (or overridden) URL; hf: the Hugging Face dataset repo; "
                   "auto: keep a verified local copy, else try the URL, then the hub.")
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help=SET_HELP)
@_user_errors
def fetch(cities, data_source, params_path, overrides):
    """Download a city's raw files into its folder (e.g. data/raw/metr-la/), verified by sha256.

    Then version them with DVC: `dvc add data/raw/<city>` and `dvc push` to your remote.
    """
    from pathlib import Path

    from graphtune.data.cities import get_city
    from graphtune.data.fetch import resolve_file

    params = _params(params_path, overrides)
    for city in [c for item in cities for c in item.split(",") if c]:
        spec = get_city(city, params.cities)
        folder = Path(spec.directory)
        for role, remote in spec.files().items():
            path = resolve_file(remote, local_dir=folder, data_source=data_source, cache_dir=folder,
                                url_override=params.prepare.url_overrides.get(remote.name))
            click.echo(f"{city} {role}: {path}")
        click.echo(f"version it with: dvc add {folder}")


@cli.command("cities")
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
def cities_cmd(params_path):
    """List the registered cities and those added in the params file, with their fact blocks."""
    from pathlib import Path

    from graphtune.config import load_params
    from graphtune.data.cities import get_city, list_cities

    params = load_params(params_path if Path(params_path).is_file() else None)
    for name in list_cities(params.cities):
        spec = get_city(name, params.cities)
        facts = spec.facts
        shape = "x".join(map(str, facts.get("shape", []))) or "?"
        click.echo(f"{name:14s} {shape:>10s}  {facts.get('interval_minutes', '?')} min  {spec.description}")


# ----------------------------------------------------------------------------- experiments
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


def _experiment_options(fn):
    """Options shared by `experiment`, `pretrain` and `finetune` (empty string = take params.yaml)."""
    options = [
        click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP),
        click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help=SET_HELP),
        click.option("--model", default=None, help="registered model name (graphtune models); "
                     "default: experiment.model."),
        click.option("--epochs", default=None, help="epochs per stage, comma-separated; one value applies to all "
                     "stages (default: train.epochs)."),
        click.option("--lrs", default=None, help="learning rates per stage, comma-separated (default: train.lrs)."),
        click.option("--seed", default=None, help="random seed, an integer (default: experiment.seed)."),
        click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (default: experiment.device)."),
        click.option("--output-dir", default=None, help="where results.json, results.csv and the plots go "
                     "(default: experiment.output_dir)."),
        click.option("--experiment-name", default=None, help="MLflow experiment (default: "
                     "tracking.experiment_name)."),
        click.option("--system-metrics", type=click.Choice(["", "true", "false"]), default=None,
                     help="true: log MLflow's CPU/memory/GPU system metrics on the parent run "
                     "(default: tracking.system_metrics)."),
        click.option("--no-tracking", is_flag=True, help="run without MLflow (outputs are still written)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _transfer_options(fn):
    options = [
        click.option("--strategy", default=None, help="adaptation strategy: full, freeze-transferred or scratch "
                     "(default: experiment.strategy)."),
        click.option("--fractions", default=None, help="budget curve: fractions of the target's training data in "
                     "(0, 1], comma-separated (default: transfer.fractions)."),
        click.option("--fewshot-mode", default=None, help="subset, steps or both (default: transfer.fewshot_mode)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _apply_options(params, *, datasets=None, model=None, epochs=None, lrs=None, seed=None, device=None,
                   output_dir=None, experiment_name=None, system_metrics=None, strategy=None, fractions=None,
                   fewshot_mode=None) -> list[str]:
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
    return explicit


def _stage_values(values, stages: list[int]) -> list:
    """The entries of a per-stage list for `stages` when the list has one per experiment stage (else as is)."""
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if len(values) == 1 or len(values) <= max(stages, default=0):
        return values
    return [values[i] for i in stages]


def _run(params, explicit, overrides, no_tracking, source_ref=""):
    from graphtune.transfer.experiment import execute, plan_experiment

    explicit = explicit + [o.split("=")[0] for o in overrides if o.startswith("transfer.")]
    plan = plan_experiment(params, explicit_transfer=explicit, source_ref=source_ref,
                           tracking_uri=params.tracking.tracking_uri or None)
    result, run_id = execute(params, plan, echo=click.echo, tracking=not no_tracking)
    return result, run_id


@cli.command()
@click.option("--datasets", default=None, help="ordered cities, comma-separated: stage 0 pretrains on the first, "
              "each later one is a transfer target (default: experiment.datasets).")
@_experiment_options
@_transfer_options
@_user_errors
def experiment(datasets, params_path, overrides, no_tracking, strategy, fractions, fewshot_mode, **options):
    """The whole transfer experiment: pretrain, then zero-shot + budget curve per target city, S_uep."""
    params = _params(params_path, overrides)
    explicit = _apply_options(params, datasets=_split_list(datasets), strategy=strategy, fractions=fractions,
                              fewshot_mode=fewshot_mode, **options)
    _run(params, explicit, overrides, no_tracking)


@cli.command()
@click.option("--city", required=True, help="the city to pretrain on.")
@_experiment_options
@_user_errors
def pretrain(city, params_path, overrides, no_tracking, **options):
    """Stage 0 alone: train a model on one city and log it (checkpoint artifact) for later fine-tuning."""
    params = _params(params_path, overrides)
    train = params.train  # pretraining is stage 0: its entries of the per-stage lists
    train.epochs, train.lrs = _stage_values(train.epochs, [0]), _stage_values(train.lrs, [0])
    explicit = _apply_options(params, datasets=[city], **options)
    _, run_id = _run(params, explicit, overrides, no_tracking)
    if run_id:
        click.echo(f"pretrained model logged in run {run_id}: graphtune finetune --from {run_id} --datasets CITY")


@cli.command()
@click.option("--from", "source_ref", required=True,
              help="a pretrain run id in the tracking store, or a checkpoint file (source_model.pt).")
@click.option("--datasets", required=True, help="target cities, comma-separated, transferred to in order.")
@_experiment_options
@_transfer_options
@_user_errors
def finetune(source_ref, datasets, params_path, overrides, no_tracking, strategy, fractions, fewshot_mode,
             **options):
    """Transfer a pretrained model to target cities: zero-shot, then the budget curve, per city."""
    params = _params(params_path, overrides)
    targets = _split_list(datasets) or []
    train = params.train  # the targets are stages 1..n of the per-stage lists (stage 0 was the pretraining)
    stages = list(range(1, len(targets) + 1))
    train.epochs, train.lrs = _stage_values(train.epochs, stages), _stage_values(train.lrs, stages)
    _apply_options(params, datasets=targets, strategy=strategy, fractions=fractions, fewshot_mode=fewshot_mode,
                   **options)
    _run(params, [], overrides, no_tracking, source_ref=source_ref)


@cli.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help=SET_HELP)
@click.option("--experiment-name", "experiment_names", multiple=True,
              help="MLflow experiment(s) to read (repeatable; default: compare.experiment_names).")
@click.option("--filter", "filter_string", default=None, help="an MLflow search filter on the parent runs, e.g. "
              "\"params.`experiment.model` = 'gwnet'\" (default: compare.filter).")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="keep runs with this tag (repeatable).")
@click.option("--parent-run", default=None, help="only this experiment run (a parent run id).")
@click.option("--output-dir", default=None, help="where leaderboard.csv/.md/.png go (default: compare.output_dir).")
@click.option("--tracking-uri", default=None, help="MLflow tracking store (default: tracking.tracking_uri, "
              "$MLFLOW_TRACKING_URI, then sqlite:///mlflow.db).")
@_user_errors
def compare(params_path, overrides, experiment_names, filter_string, tags, parent_run, output_dir, tracking_uri):
    """Leaderboard across models and strategies from the MLflow tracking store (CSV, Markdown, PNG)."""
    from graphtune.compare import format_table, leaderboard, write_leaderboard
    from graphtune.errors import ConfigError

    params = _params(params_path, overrides)
    cfg = params.compare
    tag_filter = {}
    for item in tags:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--tag {item!r}: expected KEY=VALUE")
        tag_filter[key] = value
    board = leaderboard(tracking_uri or params.tracking.tracking_uri or None,
                        experiment_names=[e for e in experiment_names if e] or cfg.experiment_names or None,
                        filter_string=cfg.filter if filter_string is None else filter_string,
                        tags=tag_filter or None, parent_run_id=parent_run)
    paths = write_leaderboard(board, output_dir or cfg.output_dir)  # "" (an MLproject default) -> params
    click.echo(format_table(board))
    click.echo("written: " + ", ".join(str(p) for p in paths.values()))


@cli.command("models")
@click.option("--profile", "profile_city", default=None,
              help="also build every model for this city and print parameters, FLOPs and transfer share.")
@click.option("--to", "target_city", default=None, help="with --profile: the city to measure transfer to.")
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
@_user_errors
def models_cmd(profile_city, target_city, params_path):
    """List the registered models and their default options (with --profile: their costs)."""
    from pathlib import Path

    from graphtune.config import load_params
    from graphtune.models import list_models, model_defaults

    if not profile_city:
        for name in list_models():
            opts = ", ".join(f"{k}={v}" for k, v in model_defaults(name).items())
            click.echo(f"{name:10s} {opts}")
        return
    from graphtune.transfer.experiment import load_bundles
    from graphtune.profiling import profile_models

    params = load_params(params_path if Path(params_path).is_file() else None)
    bundles = load_bundles(params, [profile_city] + ([target_city] if target_city else []))
    rows = profile_models(bundles[0], bundles[1] if target_city else None)
    header = f"{'model':10s} {'params':>10s} {'MB':>7s} {'GFLOPs/batch':>13s} {'thop GMACs':>11s}"
    click.echo(header + (f" {'transfer to ' + target_city:>24s}" if target_city else ""))
    for r in rows:
        thop = "-" if r["thop_macs"] is None else f"{r['thop_macs'] / 1e9:.3f}"
        line = f"{r['model']:10s} {r['params_total']:>10,d} {r['size_mb']:>7.2f} {r['flops'] / 1e9:>13.3f} {thop:>11s}"
        if target_city:
            line += f" {r['transfer_share']:>24.1%}"
        click.echo(line)


def main():
    """Entry point: usage errors (bad option values, unknown commands) also print one line and exit 2."""
    try:
        cli.main(prog_name="graphtune", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as err:
        click.echo(err.ctx.get_help() if err.ctx else str(err))
        sys.exit(2)
    except click.UsageError as err:
        hint = f" (see 'graphtune {err.ctx.info_name} --help')" if err.ctx and err.ctx.info_name != "graphtune" else ""
        click.echo(f"graphtune: error: {err.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as err:
        click.echo(f"graphtune: error: {err.format_message()}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("graphtune: aborted", err=True)
        sys.exit(1)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
