"""`graphtune suite run` and `graphtune suite summary`: a grid of options over any command (graphtune.suite)."""

from __future__ import annotations

import sys

import click

from graphtune.cli import cli, user_errors

_OUTPUT_HELP = "the suite folder (default: outputs/suites/<name from the suite file>)."


@cli.group()
def suite():
    """Experiment suites: one job per grid point of a YAML file, each a real tracked run; a summary table and plot."""


@suite.command("run")
@click.argument("file")
@click.option("--output-dir", "--output_dir", default=None, help=_OUTPUT_HELP)
@click.option("--jobs", "-j", "parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="jobs run side by side: local processes, or DVC queue workers with --executor dvc-queue.")
@click.option("--executor", type=click.Choice(["local", "dvc-queue"]), default="local", show_default=True,
              help="local: subprocesses of this command; dvc-queue: each job a DVC experiment in the repository's "
              "queue (`dvc exp run --queue`, `dvc queue start --jobs N`), run in a copy of the git workspace "
              "(needs a git+DVC repository with a commit; see graphtune/suite_queue.py).")
@click.option("--resume", is_flag=True, help="continue a suite folder: run only the jobs without a finished record "
              "(the grid must give the same jobs as its plan.json).")
@click.option("--dry-run", "--dry_run", is_flag=True, help="print the jobs (finished or to run) and write nothing.")
@user_errors
def run(file, output_dir, parallel, executor, resume, dry_run):
    """Run the jobs of suite FILE (YAML: name, command, options, grid, summary; see graphtune/suite.py).

    Each job is `graphtune COMMAND --option value ...` in its own process with its own output folder,
    <suite folder>/jobs/<job id>/out; its log and, once it exited 0, its record job.json sit beside it.
    summary_all.csv, summary.md and summary.png are rewritten at the end. A failed job is reported and the
    others still run; Ctrl-C or SIGTERM stops the running jobs, which --resume reruns.
    """
    from graphtune.suite import Interrupted, JobsFailed, load_suite, plan_lines, preflight, run_suite

    spec = load_suite(file, cli)
    out = spec.folder(output_dir)
    if dry_run:
        if executor == "dvc-queue":
            from graphtune.suite_queue import check_repo

            check_repo()  # the repository checks, which read only
        todo = preflight(spec, out, resume=resume)
        click.echo(f"suite {spec.name}: {len(spec.jobs)} jobs, {len(spec.jobs) - len(todo)} finished, {len(todo)} "
                   f"to run; folder {out} (dry run: nothing written)")
        for line in plan_lines(spec, out):
            click.echo(line)
        return
    try:
        if executor == "dvc-queue":
            from graphtune.suite_queue import run_suite_queue

            run_suite_queue(spec, out, resume=resume, jobs=parallel, echo=click.echo)
        else:
            run_suite(spec, out, resume=resume, jobs=parallel, echo=click.echo)
    except JobsFailed as err:
        click.echo(f"graphtune: error: {err}", err=True)
        sys.exit(1)
    except Interrupted as err:
        click.echo(f"graphtune: {err}", err=True)
        sys.exit(128 + err.signum)


@suite.command("summary")
@click.argument("file")
@click.option("--output-dir", "--output_dir", default=None, help=_OUTPUT_HELP)
@user_errors
def summary(file, output_dir):
    """Rewrite summary_all.csv, summary.md and summary.png of suite FILE from its finished records; runs nothing."""
    from graphtune.errors import ConfigError
    from graphtune.suite import PLAN, check_same_jobs, load_suite, read_record, write_summary

    spec = load_suite(file, cli)
    out = spec.folder(output_dir)
    if not (out / PLAN).is_file():
        raise ConfigError(f"{out}: no suite has run there (no {PLAN}); run `graphtune suite run {file}` first")
    check_same_jobs(spec, out)
    paths = write_summary(spec, out)
    done = sum(read_record(out, job.id) is not None for job in spec.jobs)
    click.echo(f"suite {spec.name}: {done} of {len(spec.jobs)} jobs finished; written: "
               + ", ".join(str(p) for p in paths.values()))
