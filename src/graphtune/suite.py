"""Experiment suites: a grid of option values over any graphtune command, one real run per job, a summary.

A suite file (YAML) names a command, the options every job gets, and a grid whose cartesian product gives
the jobs:

    name: lr-sweep                # the suite folder: outputs/suites/<name> (`--output-dir` overrides)
    description: ...              # optional, free text
    command: experiment           # any graphtune command; nested ones as words: "gpd collect"
    options:                      # given to every job; names as the command's options, without "--"
      datasets: metr-la-west      #   a list becomes "a,b" (comma-separated), or repeats a repeatable option
      set: [prepare.stride=4]     #   (e.g. --set); a flag takes true/false
    grid:                         # one job per combination; the last axis varies fastest
      lrs: [0.001, 0.003, 0.01]   #   axes are options too; a repeatable one (set) adds to what options give
      seed: [0, 1]
    summary:                      # optional: how to read a finished job's result, and what to plot
      file: results.json          #   a file the job writes in its output folder: .json or .csv
      metrics:                    #   column name -> where the value is:
        test_mae: stages.-1.test.mae  # JSON: a dotted path; list items by index, -1 = the last
      x: lrs                      #   a grid axis (default: the first)
      y: test_mae                 #   a metric (default: the first)
      series: seed                #   optional: one line per value of this grid axis (a list of axes: one
                                  #   line per combination of their values)

For a CSV file, each metric names a column and takes its value in the file's last row (for `experiment`'s
results.csv: the last stage). Relative paths in options (params files, data folders) are read from the
working directory, where every job runs.

Everything is checked before anything runs, each problem as one line naming the file: the YAML itself,
the command (the known ones listed), every option name (against the command's own click options) and
every job's full command line (click parses it without running it: types, choices, required options),
empty grid axes, grid values that give two jobs the same configuration, and the summary fields.

A job is one run of `python -m graphtune <command> <options> --output-dir <suite>/jobs/<id>/out` in a
subprocess that inherits the environment (MLFLOW_TRACKING_URI included): a tracked run like any other.
The job's output folder is `out/`, not the job folder itself, because commands replace their output
folder atomically and refuse one holding files they did not write (the job's log and record). A command
without --output-dir writes where its options say; its jobs then have no summary file.

Job ids are `<axis>=<value>-...-<8 hex>`: the readable part from the grid values, the hex the start of the
sha256 of the command and all its options (names canonical, values as passed, sorted): the same
configuration has the same id in every suite file and every run.

The suite folder:

    plan.json          the expanded jobs (written once, when the suite first runs)
    events.jsonl       append-only: suite start/end, and every job's start (with its pid), end or failure
    jobs/<id>/log.txt  the job's stdout and stderr
    jobs/<id>/out/     the job's output folder
    jobs/<id>/job.json the finished record: written (atomically) only when the job exited 0
    summary_all.csv    one row per finished or failed job: job, the grid values, status, wall_s, metrics
    summary.md         the same as a Markdown table
    summary.png        y against x, one line per series value; where other grid axes vary, each point is
                       the mean over them, a band shows their min-max and every job is a faint dot (a
                       numeric x spanning 20x or more is drawn on a log scale)
    suite.lock         held (flock) while a suite runs: two runs never share a folder

A folder that already holds a plan is never started again: `--resume` runs the jobs without a finished
record, after checking that the grid gives the same job ids as plan.json (new and gone ids are named
otherwise). The folder of a job that did not finish (killed, failed, interrupted) is cleared first: only
what the suite created there (log.txt, out/ and the command's temporary folder next to it, a stray record
temp file); anything else in it refuses the resume, and nothing is deleted.

`--jobs N` runs up to N jobs side by side. While no job of the suite has ended yet, the first runs alone:
whatever the jobs share and create on first use is then created once (a new MLflow sqlite store is set up
by migrations that fail when two processes run them at once: "duplicate column name").

Processes. Every job runs in its own session (process group), so a terminal's Ctrl-C reaches the suite
only; on SIGINT or SIGTERM the suite sends SIGTERM to each running job's group (the commands then mark
their MLflow runs failed), waits up to 15 s, kills what is left, writes no record for them and exits
non-zero. On Linux each job also gets PR_SET_PDEATHSIG = SIGTERM (prctl, in preexec_fn): if the suite
itself is killed with SIGKILL, which it cannot catch, the kernel sends the job SIGTERM, so no job runs on
orphaned; only the jobs running at that moment are lost, and `--resume` reruns them (it refuses while
such a job is still ending: its pid is in events.jsonl). Sharing the suite's process group instead would
not help: `kill -9 <pid>` signals one process, not its group. The signal follows the death of the thread
that started the job, so jobs are started and polled from the suite's main thread, never from a pool.
The job's own children are not covered by the parent-death signal: they end with the job as usual.
"""

from __future__ import annotations

import csv
import ctypes
import errno
import fcntl
import hashlib
import io
import itertools
import json
import math
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import yaml

from graphtune.errors import ConfigError, GraphTuneNotice, OutputError

PLAN = "plan.json"
EVENTS = "events.jsonl"
LOCK = "suite.lock"
JOBS = "jobs"
LOG = "log.txt"
RECORD = "job.json"
JOB_OUT = "out"
SUMMARY_CSV = "summary_all.csv"
SUMMARY_MD = "summary.md"
SUMMARY_PNG = "summary.png"
DEFAULT_ROOT = Path("outputs") / "suites"
LAUNCHER: list[str] | None = None  # what a job's arguments follow; None: this Python, `-m graphtune` (tests swap it)

_KEYS = ("name", "command", "options", "grid", "summary", "description")
_SUMMARY_KEYS = ("file", "metrics", "x", "y", "series")
_FIXED_COLUMNS = ("job", "status", "wall_s")
_OUTPUT_OPTION = "output-dir"  # given by the suite to every job of a command that has it
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9.,=+_-]+")
_SHOWN = 5  # ids a message names before counting the rest
_STOP_WAIT_S = 15.0
_POLL_S = 0.05


class JobsFailed(Exception):
    """Some jobs exited non-zero; the rest ran and the summary is written. One line naming them and their logs."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the suite; the running jobs were stopped and left unfinished."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


# ----------------------------------------------------------------------------- the suite file
@dataclass(frozen=True)
class Job:
    """One expanded job: its id, its grid values (as passed), its options and its command line."""

    id: str
    params: dict[str, str]  # grid axis -> the value as passed on the command line
    options: dict[str, object]  # canonical option name -> str, list[str] (repeatable) or bool (flag)
    args: tuple[str, ...]  # command words and options, without the output folder

    def argv(self, suite_dir: Path, has_output_dir: bool) -> list[str]:
        extra = ["--" + _OUTPUT_OPTION, str(job_output(suite_dir, self.id))] if has_output_dir else []
        return [*self.args, *extra]

    def as_dict(self) -> dict:
        return {"id": self.id, "params": self.params, "options": self.options, "args": list(self.args)}


@dataclass(frozen=True)
class Summary:
    file: str
    metrics: dict[str, str]  # column name -> dotted JSON path or CSV column
    x: str | None
    y: str | None
    series: tuple[str, ...]  # grid axes: one line per combination of their values (empty: one line)


@dataclass
class Suite:
    path: Path
    name: str
    command: tuple[str, ...]
    options: dict[str, object]  # as in the file (validated)
    grid: dict[str, list]  # axis -> values (validated, non-empty)
    summary: Summary | None
    has_output_dir: bool
    jobs: list[Job] = field(default_factory=list)

    def folder(self, output_dir: str | os.PathLike | None = None) -> Path:
        return Path(output_dir) if output_dir else DEFAULT_ROOT / self.name


def load_suite(path: str | os.PathLike, root) -> Suite:
    """Read and check a suite file against the click group `root` (graphtune's `cli`); expand its jobs.

    Raises ConfigError, one line starting with the file's name, on any problem. Reads nothing else.
    """
    path = Path(path)
    doc = _read_yaml(path)
    where = f"{path}: "
    unknown = sorted(set(doc) - set(_KEYS))
    if unknown:
        raise ConfigError(f"{where}unknown key(s) {', '.join(map(str, unknown))}; allowed: {', '.join(_KEYS)}")
    name = doc.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}name: expected a folder name (letters, digits, '.', '_', '-'), got {name!r}")
    words, command = _find_command(root, doc.get("command"), where)
    table = _option_table(command)
    options = _mapping(doc.get("options"), "options", where)
    grid = _mapping(doc.get("grid"), "grid", where)
    for axis, values in grid.items():
        if not isinstance(values, list):
            raise ConfigError(f"{where}grid.{axis}: expected a list of values, got {values!r}")
        if not values:
            raise ConfigError(f"{where}grid.{axis}: empty list; give at least one value")
    fixed = {}  # canonical name -> (param, value), from options
    for key, value in options.items():
        param, canon, value = _resolve(table, words, key, value, f"options.{key}", where)
        if canon in fixed:
            raise ConfigError(f"{where}options.{key}: --{canon} is already given (twice under another name)")
        fixed[canon] = (param, value)
    axes = {}  # axis -> (param, canonical name)
    for axis in grid:
        param, canon, _ = _resolve(table, words, axis, grid[axis][0], f"grid.{axis}", where)
        clash = [a for a, (_, c) in axes.items() if c == canon]
        if not param.multiple and (canon in fixed or clash):
            other = f"options.{next(k for k in options if _canonical_of(table, k) == canon)}" if canon in fixed \
                else f"grid.{clash[0]}"
            raise ConfigError(f"{where}grid.{axis}: --{canon} is also set by {other}; set it in one place")
        axes[axis] = (param, canon)
    suite = Suite(path=path, name=name, command=words, options=options, grid=grid,
                  summary=_summary(doc.get("summary"), grid, command, words, where),
                  has_output_dir=_OUTPUT_OPTION in table)
    suite.jobs = _expand(suite, command, table, fixed, axes, where)
    return suite


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: suite file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the suite file ({getattr(err, 'strerror', None) or err})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(problem).split())}{at}") from None
    if not isinstance(doc, dict):
        got = "an empty file" if doc is None else f"a {type(doc).__name__}"
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(_KEYS[:5])}; got {got}")
    return doc


def _mapping(value, key: str, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise ConfigError(f"{where}{key}: expected a mapping of option names to values, got {value!r}")
    return value


def command_names(root) -> list[str]:
    """Every runnable command under `root` as its words ("gpd collect"), sorted; suites themselves excluded."""
    import click

    names = []

    def walk(group, prefix):
        for name, cmd in group.commands.items():
            if not prefix and name == "suite":
                continue
            if isinstance(cmd, click.Group):
                walk(cmd, prefix + [name])
            else:
                names.append(" ".join(prefix + [name]))

    walk(root, [])
    return sorted(names)


def _find_command(root, command, where: str):
    import click

    known = command_names(root)
    if not isinstance(command, str) or not command.split():
        raise ConfigError(f"{where}command: expected a graphtune command, one of: {', '.join(known)}")
    words = command.split()
    if words[0] == "graphtune":
        words = words[1:]
    cmd = root
    for word in words:
        cmd = cmd.commands.get(word) if isinstance(cmd, click.Group) else None
        if cmd is None:
            break
    if cmd is None or isinstance(cmd, click.Group) or " ".join(words) not in known:
        raise ConfigError(f"{where}command: unknown graphtune command {' '.join(words)!r}; known: {', '.join(known)}")
    return tuple(words), cmd


def _option_table(command) -> dict:
    """Option name without dashes (every spelling: --output-dir and --output_dir) -> the click option."""
    import click

    table = {}
    for param in command.params:
        if isinstance(param, click.Option):
            for opt in (*param.opts, *param.secondary_opts):
                if opt.startswith("--"):
                    table[opt[2:]] = param
    return table


def _canonical(param) -> str:
    """The option's first long name, without dashes: the one job ids and command lines use."""
    return next(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))[2:]


def _canonical_of(table: dict, key: str) -> str | None:
    return _canonical(table[key]) if key in table else None


def _resolve(table: dict, words, key: str, value, label: str, where: str):
    """(click option, canonical name, value as passed) of one options/grid entry, or ConfigError."""
    command = " ".join(words)
    if key not in table:
        known = sorted({"--" + _canonical(p) for p in table.values()} - {"--" + _OUTPUT_OPTION})
        raise ConfigError(f"{where}{label}: '{command}' has no option --{key}; its options: {', '.join(known)}")
    param = table[key]
    canon = _canonical(param)
    if canon == _OUTPUT_OPTION:
        raise ConfigError(f"{where}{label}: the suite gives every job its own output folder "
                          f"(<suite folder>/{JOBS}/<job id>/{JOB_OUT}); remove --{key}")
    if param.is_flag:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}{label}: --{key} of '{command}' is a flag: expected true or false, got {value!r}")
        if key in [o[2:] for o in param.secondary_opts]:
            value = not value  # --no-x: true is --x: false
        return param, canon, value
    return param, canon, _cli_value(value, param.multiple, f"{where}{label}")


def _cli_value(value, multiple: bool, label: str):
    """A YAML value as passed on the command line: a string, or for a repeatable option a list of strings."""
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{label}: empty list")
        items = [_scalar(v, label) for v in value]
        return items if multiple else ",".join(items)
    text = _scalar(value, label)
    return [text] if multiple else text


def _scalar(value, label: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # shortest exact form: 0.001, 1e-05
    if isinstance(value, (int, str)):
        return str(value)
    raise ConfigError(f"{label}: expected a number or a string (or a list of them), got {value!r}")


def _summary(doc, grid: dict, command, words, where: str) -> Summary | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}summary: expected a mapping with keys {', '.join(_SUMMARY_KEYS)}, got {doc!r}")
    unknown = sorted(set(doc) - set(_SUMMARY_KEYS))
    if unknown:
        raise ConfigError(f"{where}summary: unknown key(s) {', '.join(map(str, unknown))}; "
                          f"allowed: {', '.join(_SUMMARY_KEYS)}")
    if _OUTPUT_OPTION not in _option_table(command):
        raise ConfigError(f"{where}summary: '{' '.join(words)}' has no --{_OUTPUT_OPTION}, so a job's results "
                          f"cannot be found; remove the summary section")
    file = doc.get("file")
    parts = Path(file).parts if isinstance(file, str) and file else ()
    if not parts or Path(file).is_absolute() or ".." in parts or Path(file).suffix.lower() not in (".json", ".csv"):
        raise ConfigError(f"{where}summary.file: expected a .json or .csv file inside the job's output folder "
                          f"(a relative path), got {file!r}")
    metrics = doc.get("metrics")
    if isinstance(metrics, list) and all(isinstance(m, str) for m in metrics):
        metrics = {m: m for m in metrics}
    if not isinstance(metrics, dict) or not metrics:
        raise ConfigError(f"{where}summary.metrics: expected a mapping of column names to "
                          f"{'JSON paths' if file.endswith('.json') else 'CSV columns'}, got {metrics!r}")
    for key, spec in metrics.items():
        if not isinstance(key, str) or not key or key in _FIXED_COLUMNS or key in grid:
            raise ConfigError(f"{where}summary.metrics: {key!r} is not a usable column name "
                              f"(it must differ from {', '.join(_FIXED_COLUMNS)} and the grid axes)")
        if not isinstance(spec, str) or not spec or (file.endswith(".json") and "" in spec.split(".")):
            raise ConfigError(f"{where}summary.metrics.{key}: expected a dotted path such as stages.-1.test.mae "
                              f"(JSON) or a column name (CSV), got {spec!r}")
    axes = list(grid)
    x, y, series = doc.get("x", axes[0] if axes else None), doc.get("y", next(iter(metrics))), doc.get("series")
    if x is not None and x not in grid:
        raise ConfigError(f"{where}summary.x: expected a grid axis ({', '.join(axes) or 'the grid is empty'}), "
                          f"got {x!r}")
    if y not in metrics:
        raise ConfigError(f"{where}summary.y: expected one of the metrics ({', '.join(metrics)}), got {y!r}")
    series = () if series is None else (series,) if isinstance(series, str) else series
    if (not isinstance(series, (list, tuple)) or not all(isinstance(a, str) for a in series)
            or len(set(series)) != len(series) or any(a not in grid or a == x for a in series)):
        raise ConfigError(f"{where}summary.series: expected a grid axis other than x, or a list of them "
                          f"({', '.join(a for a in axes if a != x) or 'none'}), got {doc.get('series')!r}")
    return Summary(file=file, metrics=dict(metrics), x=x, y=y, series=tuple(series))


def _expand(suite: Suite, command, table: dict, fixed: dict, axes: dict, where: str) -> list[Job]:
    """The cartesian product of the grid (file order, the last axis fastest) as jobs; every command line
    parsed by the command's own click parser, without running it."""
    names = list(suite.grid)
    jobs, seen = [], {}
    for combo in itertools.product(*(suite.grid[a] for a in names)):
        options = {canon: value for canon, (_, value) in fixed.items()}
        params = {}
        for axis, raw in zip(names, combo):
            param, canon = axes[axis]
            _, _, value = _resolve(table, suite.command, axis, raw, f"grid.{axis}", where)
            params[axis] = _param_text(raw, f"{where}grid.{axis}")
            options[canon] = options.get(canon, []) + value if param.multiple else value
        options = {k: v for k, v in options.items() if v is not False or table[k].secondary_opts}
        job_id = _job_id(suite.command, options, params)
        if job_id in seen:
            raise ConfigError(f"{where}grid: jobs {seen[job_id]} and {params} have the same configuration "
                              f"(a value is listed twice)")
        seen[job_id] = params
        args = _args(suite.command, options, table)
        _check_parses(command, args, suite, job_id, where)
        jobs.append(Job(id=job_id, params=params, options=options, args=tuple(args)))
    return jobs


def _job_id(words, options: dict, params: dict) -> str:
    digest = hashlib.sha256(json.dumps({"command": list(words), "options": options}, sort_keys=True,
                                       separators=(",", ":")).encode()).hexdigest()[:8]
    labels = [_UNSAFE.sub("_", f"{axis}={value}")[:32] for axis, value in params.items()]
    prefix = "-".join(labels)[:80].strip("-_.") or "job"
    return f"{prefix}-{digest}"


def _args(words, options: dict, table: dict) -> list[str]:
    args = list(words)
    for canon, value in options.items():
        param = table[canon]
        if param.is_flag:
            if value:
                args.append("--" + canon)
            elif param.secondary_opts:
                args.append(param.secondary_opts[0])
        elif isinstance(value, list):
            for item in value:
                args += ["--" + canon, item]
        else:
            args += ["--" + canon, value]
    return args


def _check_parses(command, args: list[str], suite: Suite, job_id: str, where: str) -> None:
    import click

    words = len(suite.command)
    probe = args[words:] + (["--" + _OUTPUT_OPTION, "probe"] if suite.has_output_dir else [])
    try:
        ctx = command.make_context(suite.command[-1], probe)
    except click.ClickException as err:
        raise ConfigError(f"{where}job {job_id}: {' '.join(err.format_message().split())}") from None
    ctx.close()


# ----------------------------------------------------------------------------- the suite folder
def job_folder(suite_dir: Path, job_id: str) -> Path:
    return Path(suite_dir) / JOBS / job_id


def job_output(suite_dir: Path, job_id: str) -> Path:
    return job_folder(suite_dir, job_id) / JOB_OUT


def read_record(suite_dir: Path, job_id: str) -> dict | None:
    """The finished record of a job, None when it has none (not run, failed, killed, interrupted)."""
    try:
        record = json.loads((job_folder(suite_dir, job_id) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(record, dict) and record.get("job") == job_id and record.get("status") == "finished":
        return record
    return None


def read_events(suite_dir: Path) -> list[dict]:
    """The event log; a line cut short by a kill is skipped."""
    try:
        text = (Path(suite_dir) / EVENTS).read_text()
    except OSError:
        return []
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def _write_atomic(path: Path, data: bytes) -> None:
    """Write a file completely or not at all: a hidden temporary file beside it, fsync, then os.replace.
    (graphtune.fileio replaces whole folders; the suite folder keeps growing, so its files go one by one.)"""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _folder_state(out: Path) -> str:
    """"absent", "empty" or "plan"; OutputError for anything that is not a suite folder of ours."""
    if not out.exists() and not out.is_symlink():
        return "absent"
    if not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; choose another --output-dir")
    if (out / PLAN).is_file():
        return "plan"
    foreign = sorted(set(os.listdir(out)) - {LOCK})
    if foreign:
        more = f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else ""
        raise OutputError(f"{out}: holds files GraphTune did not write ({', '.join(foreign[:_SHOWN])}{more}) "
                          f"and no {PLAN}; choose another --output-dir or move them")
    return "empty"


def _plan_ids(out: Path) -> list[str]:
    try:
        plan = json.loads((out / PLAN).read_text())
        return [job["id"] for job in plan["jobs"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise OutputError(f"{out / PLAN}: unreadable suite plan; GraphTune will not guess what ran there") from None


def check_same_jobs(suite: Suite, out: Path) -> None:
    """ConfigError when the suite file no longer gives the jobs of the folder's plan.json (new and gone ids)."""
    old = _plan_ids(out)
    new_ids = [j.id for j in suite.jobs]
    added = [i for i in new_ids if i not in set(old)]
    gone = [i for i in old if i not in set(new_ids)]
    if added or gone:
        raise ConfigError(f"{suite.path}: the grid or options changed since {out / PLAN} was written: "
                          f"new jobs {_names(added)}; gone jobs {_names(gone)} "
                          f"(restore the file, or run the new suite into another --output-dir)")


def _names(ids: list[str]) -> str:
    if not ids:
        return "none"
    more = f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else ""
    return ", ".join(ids[:_SHOWN]) + more


def _ours(name: str) -> bool:
    """What the suite (or the command, inside the output folder the suite gave it) creates in a job folder."""
    return (name in (LOG, RECORD, JOB_OUT) or (name.startswith(f".{JOB_OUT}.") and name.endswith(".tmp"))
            or (name.startswith(f".{RECORD}.") and name.endswith(".tmp")))


def _check_clearable(folder: Path) -> None:
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir():
        raise OutputError(f"{folder}: not a folder the suite created; move it, then --resume")
    foreign = sorted(n for n in os.listdir(folder) if not _ours(n))
    job_out = folder / JOB_OUT
    if job_out.is_symlink() or (job_out.exists() and not job_out.is_dir()):
        foreign.append(JOB_OUT)  # a link or a file where the job's output folder goes: never the suite's
    if foreign:
        raise OutputError(f"{folder}: holds files the suite did not write ({', '.join(foreign[:_SHOWN])}); "
                          f"move them, then --resume")


def _clear_job(folder: Path) -> None:
    """Empty the folder of an unfinished job: only the entries `_ours` names, each looked at right before."""
    _check_clearable(folder)
    if not folder.exists():
        return
    for name in sorted(os.listdir(folder)):
        path = folder / name
        if not _ours(name):
            continue
        mode = os.lstat(path).st_mode
        if stat.S_ISDIR(mode):
            shutil.rmtree(path)  # the job's output folder, or the command's temporary one beside it
        elif stat.S_ISREG(mode):
            path.unlink()


def _alive_job(suite_dir: Path, job_id: str, events: list[dict]) -> int | None:
    """The pid of a process still running this job from an earlier suite run (killed suite), else None."""
    starts = [e for e in events if e.get("job") == job_id and e.get("event") == "start"]
    if not starts or not isinstance(starts[-1].get("pid"), int):
        return None
    pid = starts[-1]["pid"]
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None
    return pid if os.fsencode(job_id) in cmdline and state not in ("Z", "X") else None


# ----------------------------------------------------------------------------- running
@dataclass
class Outcome:
    suite_dir: Path
    ran: list[str]
    finished: list[str]
    failed: list[tuple[str, int]]
    summary: dict[str, Path]


@dataclass
class _Running:
    job: Job
    proc: subprocess.Popen
    log: object
    started: float
    started_at: str


def plan_lines(suite: Suite, out: Path) -> list[str]:
    """One line per job: finished or to run, its id, its command line."""
    lines = []
    for job in suite.jobs:
        done = "finished" if read_record(out, job.id) else "to run  "
        lines.append(f"{done}  {job.id}  graphtune {' '.join(_quote(a) for a in job.argv(out, suite.has_output_dir))}")
    return lines


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def preflight(suite: Suite, out: Path, *, resume: bool) -> list[Job]:
    """Check the folder without writing anything; return the jobs to run. Raises GraphTuneError (one line)."""
    state = _folder_state(out)
    if state == "plan" and not resume:
        raise OutputError(f"{out}: already holds a suite ({PLAN}); add --resume to run its unfinished jobs, "
                          f"or choose another --output-dir")
    if state != "plan" and resume:
        raise ConfigError(f"{out}: nothing to resume (no {PLAN}); run without --resume")
    if state == "plan":
        check_same_jobs(suite, out)
    todo = [job for job in suite.jobs if read_record(out, job.id) is None]
    events = read_events(out) if state == "plan" else []
    for job in todo:
        _check_clearable(job_folder(out, job.id))
        pid = _alive_job(out, job.id, events)
        if pid is not None:
            raise OutputError(f"{job_folder(out, job.id)}: its job is still running (pid {pid}) from an earlier "
                              f"suite run; wait for it to end, then --resume")
    return todo


def run_suite(suite: Suite, out: Path, *, resume: bool = False, jobs: int = 1, echo: Callable[[str], None] = print,
              launcher: list[str] | None = None) -> Outcome:
    """Run the suite's unfinished jobs, up to `jobs` at a time, then write the summary.

    Raises JobsFailed after running every job when some failed (the summary is written), Interrupted on
    SIGINT/SIGTERM (the running jobs are stopped, nothing else is written), GraphTuneError before any job
    starts on a problem with the folder. `launcher`: the program a job's arguments follow (default:
    LAUNCHER, else this Python with `-m graphtune`).
    """
    out = Path(out)
    preflight(suite, out, resume=resume)  # everything checked before the folder is touched
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        todo = preflight(suite, out, resume=resume)  # again, now that no other suite run can change it
        if not (out / PLAN).exists():
            plan = {"suite": suite.name, "file": str(suite.path), "command": " ".join(suite.command),
                    "created": _now(), "jobs": [job.as_dict() for job in suite.jobs]}
            _write_atomic(out / PLAN, _json_bytes(plan))
        (out / JOBS).mkdir(exist_ok=True)
        events = _Events(out / EVENTS)
        try:
            total, done = len(suite.jobs), len(suite.jobs) - len(todo)
            echo(f"suite {suite.name}: {total} jobs, {done} finished, {len(todo)} to run"
                 + (f" ({jobs} at a time)" if jobs > 1 and len(todo) > 1 else "") + f"; folder {out}")
            events.write(event="suite-start", pid=os.getpid(), jobs=[j.id for j in todo], parallel=jobs)
            first_alone = jobs > 1 and len(todo) == len(suite.jobs)  # nothing ran yet: see _run_jobs
            finished, failed = _run_jobs(suite, out, todo, jobs, echo, launcher, events, first_alone)
            events.write(event="suite-end", finished=len(finished), failed=[i for i, _ in failed])
        finally:
            events.close()
        paths = write_summary(suite, out)
        echo("summary: " + ", ".join(str(p) for p in paths.values()))
    finally:
        os.close(lock)
    if failed:
        logs = ", ".join(f"{i} (exit {rc}; log {job_folder(out, i) / LOG})" for i, rc in failed)
        raise JobsFailed(f"{len(failed)} of {len(todo)} jobs failed: {logs}; rerun them with --resume")
    return Outcome(out, [j.id for j in todo], finished, failed, paths)


def _lock(out: Path) -> int:
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError(f"{out}: another `graphtune suite run` is using this folder; wait for it to end") from None
    return fd


class _Events:
    """events.jsonl, append-only: one os.write per event, so a kill leaves whole lines (or a cut last one)."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def write(self, **fields) -> None:
        os.write(self.fd, (json.dumps({"time": _now(), **fields}, sort_keys=True) + "\n").encode())

    def close(self) -> None:
        os.close(self.fd)


def _run_jobs(suite: Suite, out: Path, todo: list[Job], parallel: int, echo, launcher, events: _Events,
              first_alone: bool = False):
    """Run `todo`, up to `parallel` at a time, until done or a signal. `first_alone`: the first job runs by
    itself, the others start when it ends, since it creates what all jobs share on first use: a new MLflow
    sqlite store is set up by MLflow's migrations, which fail when two processes run them at once."""
    launcher = list(launcher or LAUNCHER or [sys.executable, "-m", "graphtune"])
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # the log fills as the job runs
    pending = deque(todo)
    running: list[_Running] = []
    finished: list[str] = []
    failed: list[tuple[str, int]] = []
    stop: list[int] = []
    n, started = len(todo), 0
    previous = _catch_signals(stop)
    try:
        while (pending or running) and not stop:
            while pending and not stop and len(running) < (1 if first_alone and not finished + failed else parallel):
                job = pending.popleft()
                started += 1
                running.append(_start(job, out, suite, launcher, env, events, echo, f"[{started}/{n}]"))
            for r in [r for r in running if r.proc.poll() is not None]:
                running.remove(r)
                _finish(r, out, events, echo, finished, failed)
            if running:
                time.sleep(_POLL_S)
    finally:
        for r in [r for r in running if r.proc.poll() is not None]:  # ended before the stop: recorded as usual
            running.remove(r)
            _finish(r, out, events, echo, finished, failed)
        if running:
            _stop(running, events, echo)
        _restore_signals(previous)
    if stop:
        name = signal.Signals(stop[0]).name
        where = "" if out == suite.folder() else f" --output-dir {out}"
        raise Interrupted(stop[0], f"suite interrupted ({name}): {len(finished)} of {n} jobs finished in this run; "
                          f"the stopped ones are rerun by `graphtune suite run {suite.path} --resume{where}`")
    return finished, failed


def _catch_signals(stop: list[int]):
    """SIGINT/SIGTERM only set a flag that the loop reads: nothing is ever interrupted half-way."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        stop.append(signum)

    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(previous) -> None:
    for s, h in (previous or {}).items():
        signal.signal(s, h)


def _parent_death_signal(parent: int):
    """preexec_fn for a job: SIGTERM when the suite dies (Linux prctl); None where there is no prctl."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, in the parent: the child only calls it
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def setup():
        prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the suite died before the line above: no signal would come
            os.kill(os.getpid(), signal.SIGTERM)

    return setup


def _start(job: Job, out: Path, suite: Suite, launcher, env, events: _Events, echo, tag: str) -> _Running:
    folder = job_folder(out, job.id)
    _clear_job(folder)  # a job killed or failed before: what the suite created there
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / LOG, "wb")
    argv = launcher + job.argv(out, suite.has_output_dir)
    started, started_at = time.monotonic(), _now()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=_parent_death_signal(os.getpid()))
    except OSError as err:  # the launcher itself cannot start: a failed job, with the reason in its log
        log.write(f"cannot start {argv[0]}: {err}\n".encode())
        proc = _NotStarted()
    events.write(event="start", job=job.id, pid=proc.pid)
    echo(f"{tag} {job.id}: started")
    return _Running(job, proc, log, started, started_at)


class _NotStarted:
    """Stands for a job whose program could not be started: it has already failed with exit 127."""

    pid = None
    returncode = 127

    def poll(self) -> int:
        return self.returncode

    def wait(self, timeout=None) -> int:
        return self.returncode


def _finish(r: _Running, out: Path, events: _Events, echo, finished: list, failed: list) -> None:
    r.log.close()
    rc, wall = r.proc.returncode, round(time.monotonic() - r.started, 3)
    job = r.job
    if rc == 0:
        record = {**job.as_dict(), "job": job.id, "status": "finished", "returncode": 0, "wall_s": wall,
                  "started": r.started_at, "finished": _now()}
        _write_atomic(job_folder(out, job.id) / RECORD, _json_bytes(record))
        events.write(event="finished", job=job.id, wall_s=wall)
        finished.append(job.id)
        echo(f"    {job.id}: finished in {wall:.1f} s")
    else:
        events.write(event="failed", job=job.id, returncode=rc, wall_s=wall)
        failed.append((job.id, rc))
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 and -rc in signal.valid_signals() else f"exit {rc}"
        echo(f"    {job.id}: FAILED ({how}) after {wall:.1f} s; log {job_folder(out, job.id) / LOG}")


def _stop(running: list[_Running], events: _Events, echo) -> None:
    """SIGTERM to every running job's process group, up to _STOP_WAIT_S for them to end, then SIGKILL."""
    for r in running:
        _signal_group(r.proc, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_WAIT_S
    for r in running:
        try:
            r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(r.proc, signal.SIGKILL)  # the leader is not reaped yet: its group id is still its own
            r.proc.wait()
        r.log.close()
        events.write(event="interrupted", job=r.job.id, returncode=r.proc.returncode)
        echo(f"    {r.job.id}: stopped")
    running.clear()


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, signum)  # start_new_session: the job leads its own group
    except (ProcessLookupError, PermissionError):
        pass


# ----------------------------------------------------------------------------- the summary
def summary_rows(suite: Suite, out: Path) -> tuple[list[str], list[dict]]:
    """Columns and rows of summary_all.csv: one row per finished or failed job, in plan order."""
    metrics = suite.summary.metrics if suite.summary else {}
    columns = ["job", *suite.grid, "status", "wall_s", *metrics]
    last = {}
    for event in read_events(out):
        if event.get("event") in ("start", "finished", "failed", "interrupted") and isinstance(event.get("job"), str):
            last[event["job"]] = event
    rows, missing = [], {}
    for job in suite.jobs:
        record = read_record(out, job.id)
        event = last.get(job.id, {})
        if record is not None:
            row = {"job": job.id, **job.params, "status": "finished", "wall_s": record.get("wall_s")}
            row |= _read_metrics(suite, out, job, missing)
        elif event.get("event") == "failed":
            row = {"job": job.id, **job.params, "status": "failed", "wall_s": event.get("wall_s")}
        else:
            continue
        rows.append(row)
    for what, ids in missing.items():
        warnings.warn(f"{suite.path}: summary: {what} in {len(ids)} finished job(s) ({_names(ids)}); "
                      f"those cells are empty", GraphTuneNotice, stacklevel=3)
    return columns, rows


def _read_metrics(suite: Suite, out: Path, job: Job, missing: dict) -> dict:
    summary = suite.summary
    if summary is None:
        return {}
    path = job_output(out, job.id) / summary.file
    try:
        text = path.read_text()
        if summary.file.lower().endswith(".json"):
            doc = json.loads(text)
            values = {name: _json_path(doc, spec) for name, spec in summary.metrics.items()}
        else:
            rows = list(csv.DictReader(io.StringIO(text)))
            last = rows[-1] if rows else {}
            values = {name: _number(last.get(spec)) for name, spec in summary.metrics.items()}
    except (OSError, ValueError) as err:
        missing.setdefault(f"{summary.file} unreadable ({type(err).__name__})", []).append(job.id)
        return {}
    for name, value in values.items():
        if value is None:
            missing.setdefault(f"no {summary.metrics[name]} in {summary.file}", []).append(job.id)
    return values


def _json_path(doc, spec: str):
    node = doc
    for part in spec.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and re.fullmatch(r"-?\d+", part) and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node if isinstance(node, (int, float, str)) and not isinstance(node, bool) else None


def _number(value):
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _cell(value, digits: int | None = None) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}" if digits else repr(value)
    return str(value)


def write_summary(suite: Suite, out: Path) -> dict[str, Path]:
    """summary_all.csv, summary.md and (with a metric to plot against a grid axis) summary.png, each written
    atomically from the finished records and the event log; nothing is run."""
    out = Path(out)
    columns, rows = summary_rows(suite, out)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    paths = {"csv": out / SUMMARY_CSV, "md": out / SUMMARY_MD}
    _write_atomic(paths["csv"], buf.getvalue().encode())
    _write_atomic(paths["md"], _markdown(suite, columns, rows).encode())
    if suite.summary and suite.summary.x:
        paths["png"] = out / SUMMARY_PNG
        _write_atomic(paths["png"], _plot(suite, rows))
    return paths


def _markdown(suite: Suite, columns: list[str], rows: list[dict]) -> str:
    n = len(suite.jobs)
    done = sum(r["status"] == "finished" for r in rows)
    bad = sum(r["status"] == "failed" for r in rows)
    lines = [f"# Suite {suite.name}", "",
             f"`graphtune {' '.join(suite.command)}` over {', '.join(suite.grid) or 'no grid'}: {n} jobs, "
             f"{done} finished, {bad} failed, {n - done - bad} not run.", ""]
    if suite.summary:
        lines += ["Metrics from each job's `" + suite.summary.file + "`: "
                  + ", ".join(f"{k} = `{v}`" for k, v in suite.summary.metrics.items()) + ".", ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = [_cell(row.get(c), 4 if c not in suite.grid and c != "job" else None).replace("|", "\\|")
                 for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _as_float(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _plot(suite: Suite, rows: list[dict]) -> bytes:
    """y against x, one line per series value. Other grid axes are averaged: the line is their mean, the band
    their min-max, and every job is a faint dot, so the spread is never hidden."""
    from graphtune.plots import _new_figure

    s = suite.summary
    x_values = list(dict.fromkeys(_param_text(v, s.x) for v in suite.grid[s.x]))
    numeric = all(_as_float(v) is not None for v in x_values)
    if numeric:
        x_values.sort(key=float)
    position = {v: (float(v) if numeric else i) for i, v in enumerate(x_values)}
    series = list(itertools.product(*[list(dict.fromkeys(_param_text(v, a) for v in suite.grid[a]))
                                       for a in s.series])) if s.series else [None]
    others = [a for a in suite.grid if a != s.x and a not in s.series]
    fig = _new_figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    points, widest = 0, 1
    for value in series:
        mine = [r for r in rows if r["status"] == "finished"
                and (value is None or all(r[a] == v for a, v in zip(s.series, value)))
                and isinstance(r.get(s.y), (int, float)) and math.isfinite(r[s.y])]
        xs, mean, lo, hi = [], [], [], []
        for xv in x_values:
            ys = [r[s.y] for r in mine if r[s.x] == xv]
            if ys:
                xs.append(position[xv])
                mean.append(sum(ys) / len(ys))
                lo.append(min(ys))
                hi.append(max(ys))
                widest = max(widest, len(ys))
        points += len(mine)
        if not xs:
            continue
        label = ", ".join(f"{a}={v}" for a, v in zip(s.series, value)) if value is not None else None
        line, = ax.plot(xs, mean, marker="o", label=label)
        if others:
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
            ax.scatter([position[r[s.x]] for r in mine], [r[s.y] for r in mine], color=line.get_color(), s=10,
                       alpha=0.4)
    if numeric and all(position[v] > 0 for v in x_values) and max(position.values()) / min(position.values()) >= 20:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(x_values)), x_values)
    ax.set_xlabel(s.x)
    ax.set_ylabel(s.y)
    note = f"{points} of {len(suite.jobs)} jobs"
    if others and widest > 1:
        note += f"; mean over {', '.join(others)} (band: min-max, dots: jobs)"
    ax.set_title(f"{suite.name}: {s.y} against {s.x}\n{note}", fontsize=9)
    if points == 0:
        ax.text(0.5, 0.5, "no finished job has this metric yet", ha="center", va="center", transform=ax.transAxes)
    if s.series and points:
        ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _param_text(value, label: str) -> str:
    """A grid value as summaries show it: as passed on the command line, a list comma-separated."""
    if isinstance(value, list):
        return ",".join(_scalar(v, label) for v in value)
    return _scalar(value, label)


__all__ = ["Job", "Suite", "Summary", "Outcome", "JobsFailed", "Interrupted", "load_suite",
           "command_names", "plan_lines", "preflight", "run_suite", "write_summary", "summary_rows",
           "check_same_jobs", "read_record", "read_events", "job_folder", "job_output"]
