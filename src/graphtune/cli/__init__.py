"""The `graphtune` command line: parses options, loads params.yaml, calls library functions.

    data.py        prepare, fetch, cities
    experiment.py  experiment, pretrain, finetune
    gpd.py         gpd collect, gpd diffuse
    compare.py     compare
    models.py      models
    suite.py       suite run, suite summary
    compress.py    compress
    series.py      series train, finetune, infer, export
    runs.py        runs clean
    server.py      server (a shared MLflow tracking server)

Every command reads its own params.yaml section; options given on the command line win. User errors (bad
files, options, names) print one line on stderr and exit with status 2. Commands import the library inside
their functions, so `graphtune --help` loads neither torch nor mlflow.
"""

from __future__ import annotations

import sys
import warnings
from functools import wraps

import click

from graphtune.errors import GraphTuneError

PARAMS_HELP = "params file whose sections give the defaults (missing options come from it)."
SET_HELP = "override a params.yaml entry, e.g. --set prepare.stride=2 (repeatable)."


def user_errors(fn):
    """Turn GraphTuneError into a one-line message and exit code 2 (no traceback)."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GraphTuneError as err:
            click.echo(f"graphtune: error: {err}", err=True)
            sys.exit(2)

    return wrapper


def load_params(params_path: str, overrides: tuple[str, ...] = (), *, optional: bool = False):
    """The params file with `--set` overrides applied.

    A file named with --params must exist (ConfigError otherwise). `optional` commands (listings) fall back
    to the built-in defaults when the default params.yaml is absent, e.g. outside a project folder.
    """
    from pathlib import Path

    from graphtune.config import load_params as load

    ctx = click.get_current_context(silent=True)
    explicit = ctx is not None and ctx.get_parameter_source("params_path") == click.core.ParameterSource.COMMANDLINE
    if optional and not explicit and not Path(params_path).is_file():
        return load(None, overrides)
    return load(params_path, overrides)


def city_names(values: tuple[str, ...]) -> list[str]:
    """A repeatable, comma-separated option (--city a,b --city c) -> its names in order."""
    return [name for value in values for name in value.split(",") if name]


def params_option(fn):
    return click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)(fn)


def set_option(fn):
    return click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help=SET_HELP)(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="graphtune")
def cli():
    """GraphTune: how cheaply, and with which strategy, does a sensor-graph forecaster move to another city?"""
    from graphtune.errors import format_warning

    warnings.simplefilter("default")
    warnings.formatwarning = format_warning  # GraphTune's notices: one line `graphtune: notice: ...` on stderr


def main():
    """Entry point: usage errors (bad option values, unknown commands) also print one line and exit 2."""
    import os

    # OpenMP threads sleep instead of spinning between parallel regions, as the benchmarks run: on a shared
    # machine a spinning pool takes the cores other processes need. Set it yourself to override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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


from graphtune.cli import (  # noqa: E402,F401  (each module adds its commands)
    compare, compress, data, experiment, gpd, models, runs, series, server, suite,
)
