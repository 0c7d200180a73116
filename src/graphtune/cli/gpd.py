"""`graphtune gpd collect` and `graphtune gpd diffuse`: options -> params -> graphtune.generative.commands."""

from __future__ import annotations

import click

from graphtune.cli import cli, load_params, params_option, set_option, user_errors


def _gpd_options(fn):
    for option in reversed([
        params_option, set_option,
        click.option("--seed", type=int, default=None, help="random seed (default: experiment.seed)."),
        click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (default: experiment.device)."),
        click.option("--output-dir", "--output_dir", default=None,
                     help="the folder of params/ and generator/ (default: gpd.output_dir)."),
        click.option("--no-tracking", is_flag=True, help="run without MLflow (outputs are still written)."),
    ]):
        fn = option(fn)
    return fn


def _params(params_path, overrides, seed, device, output_dir):
    params = load_params(params_path, overrides)
    if seed is not None:
        params.experiment.seed = seed
    if device:
        params.experiment.device = device
    if output_dir:
        params.gpd.output_dir = output_dir
    return params


@cli.group()
def gpd():
    """GPD: node models of source cities, a diffusion model over their parameters (then: experiment --strategy gpd)."""


@gpd.command()
@click.option("--sources", default=None, help="source cities, comma-separated (default: gpd.sources).")
@_gpd_options
@user_errors
def collect(sources, params_path, overrides, seed, device, output_dir, no_tracking):
    """Train every node model of the source cities and write the parameter dataset (params.npz, meta.json)."""
    from graphtune.cli import city_names
    from graphtune.generative.commands import run_collect

    params = _params(params_path, overrides, seed, device, output_dir)
    if sources:
        params.gpd.sources = city_names((sources,))
    run_collect(params, echo=click.echo, tracking=not no_tracking)


@gpd.command()
@click.option("--conditioning", default=None, help="denoiser conditioning variant: pre-bias, pre, pre-adaptive, "
              "post-adaptive or adaln (default: gpd.conditioning).")
@_gpd_options
@user_errors
def diffuse(conditioning, params_path, overrides, seed, device, output_dir, no_tracking):
    """Train the conditional denoiser on the parameter dataset and write generator.pt."""
    from graphtune.generative.commands import run_diffuse

    params = _params(params_path, overrides, seed, device, output_dir)
    if conditioning:
        params.gpd.conditioning = conditioning
    run_diffuse(params, echo=click.echo, tracking=not no_tracking)
