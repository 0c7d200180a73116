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
    warnings.simplefilter("default")


@cli.command()
@click.option("--city", "cities", multiple=True,
              help="city to prepare (repeatable or comma-separated); default: prepare.cities from the params file.")
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help=SET_HELP)
@click.option("--data-source", type=click.Choice(["local", "url", "hf", "auto"]), default=None,
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


def main():
    cli(prog_name="graphtune")
