"""`graphtune compare`: the leaderboard from the tracking store."""

from __future__ import annotations

from pathlib import Path

import click

from graphtune.cli import cli, load_params, params_option, set_option, user_errors


@cli.command()
@params_option
@set_option
@click.option("--experiment-name", "--experiment_name", "experiment_names", multiple=True,
              help="MLflow experiment(s) to read (repeatable; default: compare.experiment_names).")
@click.option("--filter", "filter_string", default=None, help="an MLflow search filter on the parent runs, e.g. "
              "\"params.`experiment.model` = 'gwnet'\" (default: compare.filter).")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="keep runs with this tag (repeatable).")
@click.option("--parent-run", "--parent_run", default=None, help="only this experiment run (a parent run id).")
@click.option("--output-dir", "--output_dir", default=None,
              help="where leaderboard.csv/.md/.png go (default: compare.output_dir).")
@click.option("--tracking-uri", "--tracking_uri", default=None,
              help="MLflow tracking store (default: tracking.tracking_uri, "
              "$MLFLOW_TRACKING_URI, then sqlite:///mlflow.db).")
@click.option("--board", type=click.Choice(["transfer", "series"]), default="transfer", show_default=True,
              help="transfer: experiment runs (the benchmark's board); series: CSV series task runs (their own "
              "board; default experiment `series`).")
@user_errors
def compare(params_path, overrides, experiment_names, filter_string, tags, parent_run, output_dir, tracking_uri,
            board):
    """Leaderboard across models and strategies from the MLflow tracking store (CSV, Markdown, PNG)."""
    from graphtune.compare import format_table, leaderboard, write_leaderboard
    from graphtune.errors import ConfigError

    params = load_params(params_path, overrides)
    cfg = params.compare
    if board == "series":
        from graphtune.series.board import format_series_table, series_leaderboard, write_series_board

        table = series_leaderboard(tracking_uri or params.tracking.tracking_uri or None,
                                   [e for e in experiment_names if e] or ["series"])
        paths = write_series_board(table, output_dir or str(Path(cfg.output_dir) / "series"))
        click.echo(format_series_table(table))
        click.echo("written: " + ", ".join(str(p) for p in paths.values()))
        return
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


