"""`graphtune prepare`, `fetch` and `cities`: the data commands."""

from __future__ import annotations

import click

from graphtune.cli import cli, city_names, load_params, params_option, set_option, user_errors


@cli.command()
@click.option("--city", "cities", multiple=True,
              help="city to prepare (repeatable or comma-separated); default: prepare.cities from the params file.")
@params_option
@set_option
@click.option("--data-source", "--data_source", type=click.Choice(["", "local", "url", "hf", "auto"]), default=None,
              help="where raw files come from: local files, registered URLs, the Hugging Face hub, or auto "
                   "(local first, then the sources). Default: prepare.data_source.")
@click.option("--processed-dir", "--processed_dir", default=None,
              help="output folder (default: prepare.processed_dir).")
@user_errors
def prepare(cities, params_path, overrides, data_source, processed_dir):
    """Write data/processed/<city>/ (arrays + meta.json) from a city's raw files: the DVC prepare stage."""
    from graphtune.data.prepare import write_processed

    params = load_params(params_path, overrides)
    if data_source:
        params.prepare.data_source = data_source
    if processed_dir:
        params.prepare.processed_dir = processed_dir
    names = city_names(cities) or params.prepare.cities
    for city in names:
        out = write_processed(city, params.prepare, cities=params.cities)
        click.echo(f"prepared {city} -> {out}: {_prepared_summary(out / 'meta.json')}")


def _prepared_summary(meta_path) -> str:
    """What `prepare` found, from the meta.json it wrote: shape, interval, missing share, graph facts."""
    import json

    from graphtune.data.cities import percent

    meta = json.loads(meta_path.read_text())
    steps, nodes = meta["shape"]
    graph = meta["graph"]
    return (f"{steps} steps x {nodes} nodes, {meta['interval_minutes']:g} min, {percent(meta['missing_share'])} of "
            f"readings missing, {graph['edges']} edges, {graph['isolated']} isolated nodes, "
            f"{graph['components']} connected component{'s' if graph['components'] != 1 else ''}")


@cli.command()
@click.option("--city", "cities", multiple=True, required=True,
              help="city whose raw files to fetch into its folder (repeatable or comma-separated).")
@click.option("--data-source", "--data_source", type=click.Choice(["url", "hf", "auto"]), default="auto",
              show_default=True,
              help="url: the registered (or overridden) URL; hf: the Hugging Face dataset repo; "
                   "auto: keep a verified local copy, else try the URL, then the hub.")
@params_option
@set_option
@user_errors
def fetch(cities, data_source, params_path, overrides):
    """Download a city's raw files into its folder (e.g. data/raw/metr-la/), verified by sha256.

    Then version them with DVC: `dvc add data/raw/<city>` and `dvc push` to your remote.
    """
    from pathlib import Path

    from graphtune.data.cities import get_city
    from graphtune.data.fetch import resolve_file

    params = load_params(params_path, overrides)
    for city in city_names(cities):
        spec = get_city(city, params.cities)
        folder = Path(spec.directory)
        for role, remote in spec.files().items():
            path = resolve_file(remote, local_dir=folder, data_source=data_source, cache_dir=folder,
                                url_override=params.prepare.url_overrides.get(remote.name))
            click.echo(f"{city} {role}: {path}")
        click.echo(f"version it with: dvc add {folder}")


@cli.command("cities")
@params_option
@user_errors
def cities_cmd(params_path):
    """List every city (registered and from the params file): nodes, steps, interval, units, missing share, edges.

    Values come from a city's fact block, else from its processed meta.json once prepared; "?" when unknown."""
    from graphtune.data.cities import city_table

    params = load_params(params_path, optional=True)
    rows = city_table(params.cities, processed_dir=params.prepare.processed_dir)
    header = {"name": "city", "nodes": "nodes", "steps": "steps", "interval": "interval", "units": "units",
              "missing": "missing", "edges": "edges", "description": "description"}
    width = max(len(row["name"]) for row in [header, *rows])
    units = max(len(row["units"]) for row in [header, *rows])
    for row in [header, *rows]:
        click.echo(f"{row['name']:{width}s}  {row['nodes']:>6s}  {row['steps']:>6s}  {row['interval']:>8s}  "
                   f"{row['units']:{units}s}  {row['missing']:>7s}  {row['edges']:>6s}  {row['description']}")
