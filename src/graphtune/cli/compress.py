"""`graphtune compress`: options -> params.compress -> graphtune.compression.commands.run_compress."""

from __future__ import annotations

import click

from graphtune.cli import cli, load_params, params_option, set_option, user_errors


@cli.command()
@click.option("--model", default=None, help="lenet-300-100, vgg, resnet-bottleneck, or a forecasting model with "
              "prunable groups (gwnet, hypernet) (default: compress.model).")
@click.option("--dataset", default=None, help="digits, a CIFAR python-format folder, or a city for a forecasting "
              "model (default: compress.dataset).")
@click.option("--ratio", type=float, default=None, help="C: share of each prunable group's channels removed, in "
              "[0, 1) (default: compress.ratio).")
@click.option("--rounds", type=int, default=None, help="k: rounds to reach C; 1 = one-shot (default: compress.rounds).")
@click.option("--method", default=None, help="lbyl or prune-only (default: compress.method).")
@click.option("--lbyl-variant", "--lbyl_variant", default=None,
              help="derivation, or reference to reproduce upstream's code (default: compress.lbyl_variant).")
@click.option("--lambda1", type=float, default=None, help="LBYL's BN-offset weight (default: compress.lambda1).")
@click.option("--lambda2", type=float, default=None, help="LBYL's ridge weight (default: compress.lambda2).")
@click.option("--checkpoint", default=None, help="a base.pt or model.pt that graphtune compress wrote (default: "
              "train the base model here).")
@click.option("--epochs", type=int, default=None, help="epochs to train the base model (default: compress.epochs).")
@click.option("--seed", type=int, default=None, help="random seed (default: experiment.seed).")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (default: experiment.device).")
@click.option("--output-dir", "--output_dir", default=None, help="folder of the per-round CSV, model.pt, base.pt "
              "and results.json (default: compress.output_dir).")
@click.option("--experiment-name", "--experiment_name", default=None,
              help="MLflow experiment (default: tracking.experiment_name).")
@click.option("--no-tracking", is_flag=True, help="run without MLflow (outputs are still written).")
@params_option
@set_option
@user_errors
def compress(model, dataset, ratio, rounds, method, lbyl_variant, lambda1, lambda2, checkpoint, epochs, seed, device,
             output_dir, experiment_name, no_tracking, params_path, overrides):
    """Compress a trained model with no data: prune channels in k rounds, restoring them in closed form (LBYL)."""
    from graphtune.compression.commands import run_compress

    params = load_params(params_path, overrides)
    c = params.compress
    for name, value in {"model": model, "dataset": dataset, "ratio": ratio, "rounds": rounds, "method": method,
                        "lbyl_variant": lbyl_variant, "lambda1": lambda1, "lambda2": lambda2,
                        "checkpoint": checkpoint, "epochs": epochs, "output_dir": output_dir}.items():
        if value is not None:
            setattr(c, name, value)
    if seed is not None:
        params.experiment.seed = seed
    if device:
        params.experiment.device = device
    if experiment_name:
        params.tracking.experiment_name = experiment_name
    run_compress(params, echo=click.echo, tracking=not no_tracking)
