"""`graphtune series train | finetune | infer | export`: options -> SeriesOptions -> graphtune.series.commands."""

from __future__ import annotations

import click

from graphtune.cli import cli, user_errors


def _series_options(fn):
    options = [
        click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False)),
        click.option("--task", type=click.Choice(["classify", "regress"]), default=None,
                     help="classify (needs --bin-rule) or regress the label (default: classify when --bin-rule is "
                     "given, else regress)."),
        click.option("--bin-rule", "--bin_rule", default=None, metavar="RULE",
                     help='binary label: "nonzero", "gt THR", "lt THR" or "quantile Q" (Q fitted on train only).'),
        click.option("--context-len", "--context_len", type=int, default=12, show_default=True,
                     help="input steps L; a window is L + 1 long."),
        click.option("--label-src-ch", "--label_src_ch", type=int, default=0, show_default=True,
                     help="the channel (0-based, in FILES order) the label comes from."),
        click.option("--label-offset", "--label_offset", type=int, default=1, show_default=True,
                     help="steps after the last input step that the label is read at."),
        click.option("--drop-label-from-x", "--drop_label_from_x", is_flag=True,
                     help="remove the label channel from the input."),
        click.option("--split", type=click.Choice(["holdout", "group", "rolling"]), default="holdout",
                     show_default=True, help="holdout: chronological with a gap; group: whole series per split; "
                     "rolling: rolling-origin folds (mean and spread)."),
        click.option("--folds", type=int, default=3, show_default=True, help="folds of --split rolling."),
        click.option("--eval-split", "--eval_split", type=click.Choice(["train", "val", "test"]), default="test",
                     show_default=True, help="the split the final metrics and preds.csv are computed on."),
        click.option("--plot-split", "--plot_split", type=click.Choice(["train", "val", "test"]), default=None,
                     help="the split the plots are drawn from (default: --eval-split)."),
        click.option("--backbone", default="conv", show_default=True, help="ttm (PatchTSMixer) or conv."),
        click.option("--backbone-opt", "--backbone_opt", "backbone_opts", multiple=True, metavar="KEY=VALUE",
                     help="a backbone option, e.g. --backbone-opt d_model=32 (repeatable)."),
        click.option("--pretrained-dir", "--pretrained_dir", default=None,
                     help="ttm: a local checkpoint folder (save_pretrained format); never downloaded."),
        click.option("--alpha", type=float, default=0.5, show_default=True,
                     help="classify loss: alpha * BCE + (1 - alpha) * (1 - soft-F1); 1 = plain BCE."),
        click.option("--pos-weight", "--pos_weight", default="global", show_default=True,
                     help="BCE positive weight: global (negatives / positives on train), none, or a number."),
        click.option("--thresh-default", "--thresh_default", type=float, default=0.5, show_default=True,
                     help="the decision threshold tau reported besides best_tau (chosen on validation)."),
        click.option("--loss", type=click.Choice(["mse", "mae"]), default="mse", show_default=True,
                     help="regress loss."),
        click.option("--epochs", type=int, default=10, show_default=True,
                     help="training epochs (infer: ignored); the best validation epoch is kept."),
        click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate."),
        click.option("--batch-size", "--batch_size", type=int, default=1024, show_default=True,
                     help="windows per step (and per evaluation batch)."),
        click.option("--weight-decay", "--weight_decay", type=float, default=0.0, show_default=True,
                     help="Adam weight decay."),
        click.option("--amp", is_flag=True, help="mixed precision (bfloat16 on CPU, float16 on CUDA)."),
        click.option("--compile", "compile_mode", type=click.Choice(["off", "reduce-overhead"]), default="off",
                     show_default=True, help="torch.compile; falls back to eager with a notice where it cannot."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="random seed: the same seed gives the same metrics on CPU."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--desc", default="", help="a suffix for the artifact folder's name."),
        click.option("--artifacts-dir", "--artifacts_dir", default="artifacts", show_default=True,
                     help="where the run's artifact folder is written."),
        click.option("--reference/--no-reference", default=True, show_default=True,
                     help="fit the scikit-learn reference on the same windows."),
        click.option("--experiment-name", "--experiment_name", default="series", show_default=True,
                     help="MLflow experiment."),
        click.option("--no-tracking", is_flag=True, help="run without MLflow (artifacts are still written)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


_ckpt_option = click.option("--ckpt", default=None, help="a series artifact folder (model.pt.best, else model.pt) "
                            "or a model file (required; checked with the other inputs).")


def _run(mode: str, ckpt, kwargs: dict) -> None:
    from graphtune.errors import ConfigError
    from graphtune.series.commands import SeriesOptions, run_series

    backbone_options = {}
    for item in kwargs.pop("backbone_opts"):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--backbone-opt {item!r}: expected KEY=VALUE")
        import yaml

        backbone_options[key] = yaml.safe_load(value)
    no_tracking = kwargs.pop("no_tracking")
    files = []
    for item in kwargs.pop("files"):  # MLproject passes one comma-separated argument; a real file name stays whole
        from pathlib import Path

        files.extend([item] if Path(item).exists() or "," not in item else [f for f in item.split(",") if f])
    opts = SeriesOptions(files=files, mode=mode, ckpt=ckpt, backbone_options=backbone_options,
                         compile=kwargs.pop("compile_mode"), **kwargs)
    run_series(opts, echo=click.echo, tracking=not no_tracking)


@cli.group()
def series():
    """The CSV series task: classify or regress the next step from channel CSVs (rows = series, columns = steps)."""


@series.command()
@_series_options
@user_errors
def train(**kwargs):
    """Train a backbone on FILES (one CSV per channel, stacked in order) and evaluate it."""
    _run("train", None, kwargs)


@series.command()
@_ckpt_option
@_series_options
@user_errors
def finetune(ckpt, **kwargs):
    """Continue training a checkpoint on FILES."""
    _run("finetune", ckpt, kwargs)


@series.command()
@_ckpt_option
@_series_options
@user_errors
def infer(ckpt, **kwargs):
    """Evaluate a checkpoint on FILES: predictions and metrics, nothing trained."""
    _run("infer", ckpt, kwargs)


@series.command()
@click.option("--city", required=True, help="a city of the city table (graphtune cities).")
@click.option("--out", required=True, help="the folder the channel CSVs are written to.")
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="params file (cities).")
@user_errors
def export(city, out, params_path):
    """Write a city as channel CSVs: speed (its readings), neighbour_mean, time_of_day."""
    from pathlib import Path

    from graphtune.cli import load_params
    from graphtune.series.data import export_city

    params = load_params(params_path, (), optional=True)
    paths = export_city(city, out, params)
    click.echo(f"{city}: " + ", ".join(str(Path(p)) for p in paths))
