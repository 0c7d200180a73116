"""`graphtune runs clean`: end KILLED the tracked runs whose process died (graphtune.tracking.liveness)."""

from __future__ import annotations

import click

from graphtune.cli import cli, user_errors


@cli.group()
def runs():
    """Tracked runs in the MLflow store: clean up after processes that died without ending theirs."""


@runs.command()
@click.option("--stale-after", "--stale_after", type=float, default=None, metavar="SECONDS",
              help="also end runs of OTHER hosts whose last heartbeat is older than this (default: only this "
              "host's runs whose process is gone; another host's live run keeps beating and is never ended).")
@click.option("--tracking-uri", "--tracking_uri", default=None,
              help="MLflow tracking store (default: $MLFLOW_TRACKING_URI, then sqlite:///mlflow.db).")
@user_errors
def clean(stale_after, tracking_uri):
    """End KILLED every RUNNING GraphTune run whose owning process is gone, with the reason as a tag."""
    from graphtune.errors import ConfigError
    from graphtune.tracking.liveness import reap
    from graphtune.tracking.store import _client_for_reading

    if stale_after is not None and stale_after <= 0:
        raise ConfigError(f"--stale-after: expected a positive number of seconds, got {stale_after:g}")
    client, uri = _client_for_reading(tracking_uri)
    ended = reap(client, stale_after_s=stale_after)
    for run_id, reason in ended:
        click.echo(f"ended {run_id} KILLED: {reason}")
    click.echo(f"{len(ended)} dead run(s) ended in {uri}")
