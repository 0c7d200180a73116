"""The `dvc-queue` executor of `graphtune suite run`: every job of a suite as a DVC experiment in DVC's queue.

`graphtune suite run FILE --executor dvc-queue --jobs N` runs the same jobs as the local executor
(graphtune.suite) into the same suite folder (plan.json, events.jsonl, jobs/<id>/{log.txt,out/,job.json},
summary_all.csv/.md/.png), so `graphtune suite summary` and `--resume` (with either executor) work the same.
What differs is who runs a job and where:

    1. every job is queued with `dvc exp run --queue .graphtune-suite/dvc.yaml:job --name <experiment>`;
    2. `dvc queue start --jobs N` starts N celery workers, each running one queued experiment at a time;
    3. the suite waits, reading its own events.jsonl (the jobs write their start and end there) and
       DVC's queue status (a failure before the job even started shows only there); then it writes the
       summary and stops the workers (`dvc queue stop`, then it waits for their processes to end).

Why DVC's queue and not Ray. The project already pins dvc 3.x, which ships the queue (celery with a
filesystem broker: no server, no new dependency), and every job then also is a DVC experiment: `dvc exp
show` lists it with its grid values, `dvc exp apply` brings its stage files back. Ray would add a large
dependency (and its own object store and dashboard) for what is, on one machine, a process pool; its
cluster mode would also need the data and the code shipped to the workers. The price of DVC's queue is
its model, below: a job runs in a copy of a git commit, not in the working directory.

How a queued experiment gets its command. DVC stashes the workspace's changes to tracked files (and
staged files) as a commit, and later replays it, in a worker, in a fresh copy under
`.dvc/tmp/exps/tmpXXXX` where it runs `dvc repro` of the queued target; untracked files are not in that
copy (only `--copy-paths` brings some in, from the workspace at the time the job starts). So the suite
writes, for each job, `.graphtune-suite/dvc.yaml` (a stage `job`, always_changed, wdir the folder the suite
runs in, cmd `<this python> -m graphtune.suite_queue .graphtune-suite/job.yaml <job id>`) and
`.graphtune-suite/job.yaml` (the suite name, the job id, its grid values, its full command line and the
absolute suite folder), stages both (`git add -f`), queues the experiment, and after the last one unstages
and deletes them (`git reset -- .graphtune-suite`): they live only in the experiments' commits, never in
the repository's history or its workspace, where a `dvc repro` would otherwise find the stage. The job's
parameters travel in job.yaml rather than as `-S job=...` overrides: -S goes through Hydra's override
grammar, where the commas of a job id start a sweep; the stage lists suite, job and grid as its params, so
`dvc exp show` shows them.

Where its outputs go: straight into the suite folder, by absolute path (jobs/<id>/out, log.txt, job.json
and events.jsonl lines, written by the job's wrapper below), as with the local executor. The experiment's
commit holds only the two files above and the stage's dvc.lock; the results are not pulled back through
`dvc exp apply`, which would rewrite the workspace.

What the copy needs, and what the wrapper (`python -m graphtune.suite_queue JOB_FILE JOB_ID`, the stage's
command) adds before it runs `python -m graphtune <command> ...` in the copy:
  * a git repository with at least one commit and DVC initialised (else one-line refusal, nothing written);
  * data tracked by DVC (a `dvc add`-ed city, a stage's outputs) is not in a fresh copy (DVC checks out
    only the queued stage's dependencies): the wrapper runs `dvc checkout --allow-missing` first, so the
    job sees what the workspace would after `dvc checkout` (from the shared cache; what is not cached
    stays missing, and graphtune then reads raw files as usual);
  * when graphtune itself is imported from inside this repository (an editable install of the project),
    the job imports the copy's graphtune (PYTHONPATH), i.e. the code as it was when the suite was queued;
    job.json's "code" names the folder it came from;
  * MLflow: a relative sqlite store would land in the copy, which DVC deletes; the suite resolves
    $MLFLOW_TRACKING_URI (default sqlite:///mlflow.db) against its own folder and gives the workers the
    absolute URI (artifacts go beside the sqlite file). A relative tracking.tracking_uri in ./params.yaml is
    refused.
Untracked files (a params file you have not added to git) are not in the copy: commit or `git add` them.

All N workers start at once: unlike the local executor, no first job runs alone. Jobs share less here
(each has its own copy, so nothing a command creates in the working folder on first use is shared), a new
sqlite store is created under an flock by graphtune's tracker (tracking/runs.py), and a staged start would
take two `dvc queue start`s, the second of which can miss a busy worker (its check is a one-second celery
broadcast over the filesystem broker) and start a duplicate of it.

How failures surface. A job that exits non-zero: its wrapper writes a `failed` event (with the exit code)
and exits with it, so DVC marks the experiment failed too. A failure before the job started (DVC could not
set up the copy, a missing dependency) exists only in DVC's queue: the suite sees the experiment `Failed`
without a start event, appends `dvc queue logs <experiment>` to the job's log.txt and records a `failed`
event. Either way the others still run, the summary is written and the suite exits 1 (JobsFailed), as
locally; `--resume` reruns them.

The queue is the repository's, shared with anything else queued there, so the suite refuses (one line)
to start while DVC's queue holds queued or running experiments or has workers: they would run with the
suite's jobs (or the suite's jobs in workers with another environment). Experiment names are
`<suite>-<8 hex of the job id>-<6 hex of this run>`: unique, so a rerun never collides with an experiment
an earlier run created.

Processes. The jobs run in DVC's workers, not under the suite: on SIGINT/SIGTERM the suite removes its
experiments still queued (`dvc queue remove`), sends SIGTERM to the wrappers of running jobs (their pids
are in events.jsonl; a wrapper stops its job's process group as the local executor does: SIGTERM, 15 s,
SIGKILL), stops the workers and exits non-zero; `--resume` reruns the stopped jobs. `dvc queue kill NAME`
stops a job too: it sends SIGINT to the worker's process group, the wrapper's among them; with --force it
SIGKILLs DVC's process running the stage, and the wrapper, which has PR_SET_PDEATHSIG = SIGTERM, then
stops its job. The suite reports such a job as failed ("stopped from outside the suite"). If the suite
itself is SIGKILLed, the workers carry on with the queued jobs and their records still land in the folder;
`--resume` refuses while they are queued or running (the job id is on the wrapper's command line).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from graphtune.errors import ConfigError, GraphTuneError, OutputError
from graphtune.suite import (EVENTS, LOG, PLAN, RECORD, Interrupted, Job, JobsFailed, Outcome, Suite, _catch_signals,
                             _clear_job, _Events, _json_bytes, _lock, _names, _now, _parent_death_signal,
                             _restore_signals, _signal_group, _write_atomic, job_folder, preflight, read_record,
                             write_summary)

GEN_DIR = ".graphtune-suite"  # beside where the suite runs: the stage's dvc.yaml and its job.yaml
GEN_DVC = "dvc.yaml"
GEN_JOB = "job.yaml"
STAGE = "job"
_MARK = "# Written by `graphtune suite run --executor dvc-queue`"
_QUEUE_LOCK = "graphtune-suite-queue.lock"  # in .dvc/tmp: one suite queues into a repository at a time
_STOP_WAIT_S = 15.0  # a wrapper's SIGTERM -> SIGKILL grace for its job, as the local executor's
_POLL_S = 0.5
_STATUS_EVERY_S = 2.0
_WORKER_EXIT_S = 60.0
_GONE_POLLS = 3  # an experiment missing from the queue this many polls in a row was removed by hand


# ----------------------------------------------------------------------------- the repository
@dataclass(frozen=True)
class QueueRepo:
    """Where the suite queues: its working folder, the DVC root above it, the git root above that."""

    cwd: Path
    dvc_root: Path
    git_root: Path
    baseline: str  # the commit the experiments start from (HEAD)
    celery_dir: Path  # DVC's queue folder: the workers' pid files


def check_repo(cwd: str | os.PathLike | None = None) -> QueueRepo:
    """The git+DVC repository around `cwd`, or one-line ConfigError: DVC's queue runs jobs in a copy of a
    git commit, so it needs git, DVC and at least one commit. Reads only."""
    cwd = Path(cwd or os.getcwd()).resolve()
    where = "--executor dvc-queue"
    try:
        from dvc.exceptions import NotDvcRepoError
        from dvc.repo import Repo
        from scmrepo.git import Git
    except ImportError:
        raise ConfigError(f"{where}: DVC is not installed in this Python environment ({sys.executable}); "
                          f"install the project's requirements (dvc)") from None
    try:
        root = Repo.find_root(str(cwd))
    except NotDvcRepoError:
        raise ConfigError(f"{where}: {cwd} is not inside a git repository with DVC initialised; DVC's queue runs "
                          f"every job in a copy of a git commit (git init, dvc init, git commit; or use "
                          f"--executor local)") from None
    with Repo(root) as repo:
        scm = repo.scm
        if not isinstance(scm, Git):
            raise ConfigError(f"{where}: the DVC repository {root} is not in a git repository (dvc init --no-scm); "
                              f"DVC's queue runs every job in a copy of a git commit (or use --executor local)")
        if scm.no_commits:
            raise ConfigError(f"{where}: the git repository {scm.root_dir} has no commit yet; DVC's queue runs every "
                              f"job in a copy of a commit: commit first")
        return QueueRepo(cwd=cwd, dvc_root=Path(root).resolve(), git_root=Path(scm.root_dir).resolve(),
                         baseline=scm.get_rev(), celery_dir=Path(repo.experiments.celery_queue.wdir))


def _dvc_bin() -> str:
    """The folder of this Python's `dvc` executable: DVC spawns its workers as `dvc ...` from PATH."""
    folder = Path(sys.executable).parent
    if not (folder / "dvc").exists():
        raise ConfigError(f"--executor dvc-queue: no `dvc` beside {sys.executable}; DVC's queue starts its workers "
                          f"as `dvc` from PATH, which must be this environment's")
    return str(folder)


def _worker_env() -> dict[str, str]:
    """The environment the workers (and so every job) inherit: this Python's bin folder first on PATH and an
    absolute MLflow store, since jobs run in copies that DVC deletes afterwards."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PATH"] = _dvc_bin() + os.pathsep + env.get("PATH", "")
    from graphtune.tracking.tags import resolve_tracking_uri

    try:
        env["MLFLOW_TRACKING_URI"] = resolve_tracking_uri()  # a relative sqlite path made absolute, here
    except GraphTuneError:
        pass  # a store a job would refuse anyway: the job says so, as it would locally
    return env


def _check_params_store(cwd: Path) -> None:
    """A relative sqlite tracking.tracking_uri in ./params.yaml would be read inside the copy: refused."""
    try:
        doc = yaml.safe_load((cwd / "params.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return
    uri = ((doc or {}).get("tracking") or {}).get("tracking_uri") if isinstance(doc, dict) else None
    if not isinstance(uri, str) or not uri:
        return
    path = uri[len("sqlite:///"):].partition("?")[0] if uri.startswith("sqlite:///") else \
        uri if "://" not in uri and uri.endswith((".db", ".sqlite")) else None
    if path and path != ":memory:" and not path.startswith("/"):
        raise ConfigError(f"{cwd / 'params.yaml'}: tracking.tracking_uri {uri!r} is relative, and a queued job runs "
                          f"in a copy that DVC deletes; give an absolute path (or leave it empty and set "
                          f"MLFLOW_TRACKING_URI)")


def _status(repo: QueueRepo, workers: bool = False):
    """Experiment name -> DVC's queue status (Queued, Running, Success, Failed), as `dvc queue status` shows
    it; with `workers`, also the number of live workers (a celery broadcast: about a second)."""
    from dvc.repo import Repo

    with Repo(str(repo.dvc_root)) as dvc:
        queue = dvc.experiments.celery_queue
        status = {e["name"]: e["status"] for e in queue.status() if e.get("name")}
        return (status, len(queue.worker_status())) if workers else status


def check_queue_idle(repo: QueueRepo) -> None:
    """One-line OutputError while DVC's queue has work or workers: they would mix with the suite's jobs."""
    status, workers = _status(repo, workers=True)
    busy = sorted(n for n, s in status.items() if s in ("Queued", "Running"))
    if busy:
        raise OutputError(f"--executor dvc-queue: DVC's experiment queue in {repo.dvc_root} already holds "
                          f"{len(busy)} queued or running experiment(s) ({_names(busy)}); the suite would run them "
                          f"with its jobs: wait for them or remove them (dvc queue status, dvc queue remove/kill)")
    if workers:
        raise OutputError(f"--executor dvc-queue: {workers} DVC queue worker(s) are running in {repo.dvc_root}; "
                          f"they would run the suite's jobs with their own environment: `dvc queue stop` first")


def _dvc(repo: QueueRepo, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`dvc ARGS` of this environment, in its own session: a terminal's Ctrl-C reaches the suite only, which
    then stops in order, and never cuts short DVC's stash-and-restore of the workspace in `exp run --queue`.
    Its output goes through a file, not a pipe: the workers `dvc queue start` leaves running inherit its
    descriptors, and a pipe would stay open (the call would not return) until they exit."""
    with tempfile.TemporaryFile() as output:
        proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo.cwd, env=env or _worker_env(),
                              stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                              start_new_session=True)
        output.seek(0)
        proc.stdout, proc.stderr = output.read().decode(errors="replace"), ""
    return proc


def _git(repo: QueueRepo, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], cwd=repo.cwd, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, start_new_session=True)
    except FileNotFoundError:
        raise ConfigError("--executor dvc-queue: no `git` program on PATH; the executor stages its generated "
                          "stage with it") from None


def _last_error(proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return " ".join((errors or lines or [f"exit {proc.returncode}"])[-1].split())


# ----------------------------------------------------------------------------- the generated stage
def _check_gen_dir(repo: QueueRepo) -> Path:
    """The folder of the generated stage: absent, or left by an earlier suite run (ours: cleared); anything
    else there, or the folder committed to git, refuses."""
    gen = repo.cwd / GEN_DIR
    tracked = _git(repo, "ls-tree", "-r", "--name-only", "HEAD", "--", GEN_DIR).stdout.strip()
    if tracked:
        raise OutputError(f"{gen}: committed to git ({tracked.splitlines()[0]}); the dvc-queue executor writes its "
                          f"stage there: remove it from the repository")
    if gen.is_symlink() or (gen.exists() and not gen.is_dir()):
        raise OutputError(f"{gen}: not a folder the dvc-queue executor wrote; move it")
    if gen.is_dir():
        names = set(os.listdir(gen))
        ours = (gen / GEN_DVC).is_file() and (gen / GEN_DVC).read_text().startswith(_MARK)
        if names - {GEN_DVC, GEN_JOB, "dvc.lock"} or (names and not ours):
            raise OutputError(f"{gen}: holds files the dvc-queue executor did not write "
                              f"({', '.join(sorted(names)[:5])}); move them")
    return gen


def _remove_gen_dir(repo: QueueRepo, gen: Path) -> None:
    """Unstage and delete the generated stage: the workspace and the index as before the suite."""
    if gen.exists():
        _git(repo, "reset", "-q", "--", GEN_DIR)
        shutil.rmtree(gen)


def _stage_text(suite: Suite, job: Job) -> str:
    """The job's stage; the job id is on the wrapper's command line, where a later `--resume` looks for it
    (a job still running from an earlier suite run is never started twice)."""
    up = "/".join([".."] * len(Path(GEN_DIR).parts))
    cmd = shlex.join([sys.executable, "-m", "graphtune.suite_queue", f"{GEN_DIR}/{GEN_JOB}", job.id])
    stage = {"stages": {STAGE: {"cmd": cmd, "wdir": up, "always_changed": True,
                                "params": [{f"{GEN_DIR}/{GEN_JOB}": ["suite", "job", "grid"]}]}}}
    return (f"{_MARK} for suite {suite.name} (graphtune/suite_queue.py):\n"
            f"# one queued job. It lives in the experiment's commit only; the workspace copy is removed once queued.\n"
            + yaml.safe_dump(stage, sort_keys=False))


def _job_doc(suite: Suite, job: Job, out: Path, repo: QueueRepo, experiment: str) -> dict:
    return {"suite": suite.name, "job": job.id, "grid": dict(job.params),
            "run": {"folder": str(out), "argv": job.argv(out, suite.has_output_dir), "record": job.as_dict(),
                    "experiment": experiment, "workspace": str(repo.cwd), "git_root": str(repo.git_root),
                    "dvc_root": str(repo.dvc_root)}}


def experiment_name(suite: Suite, job: Job, token: str) -> str:
    """`<suite>-<8 hex of the job id>-<run token>`: a valid git ref name, unique per suite run."""
    return f"{re.sub(r'[.]{2,}', '.', suite.name)}-{job.id[-8:]}-{token}"


def _queue_jobs(suite: Suite, todo: list[Job], out: Path, repo: QueueRepo, token: str, events: _Events,
                echo, stop: list[int]) -> dict[str, str]:
    """Queue every job as an experiment (until a signal); job id -> experiment name. On a failure the ones
    already queued are removed again and GraphTuneError names DVC's error."""
    gen = _check_gen_dir(repo)
    _remove_gen_dir(repo, gen)  # what a killed earlier run left
    names: dict[str, str] = {}
    try:
        gen.mkdir()
        for i, job in enumerate(todo, 1):
            if stop:
                break
            name = experiment_name(suite, job, token)
            (gen / GEN_DVC).write_text(_stage_text(suite, job))
            (gen / GEN_JOB).write_text(yaml.safe_dump(_job_doc(suite, job, out, repo, name), sort_keys=False))
            added = _git(repo, "add", "-f", "--", f"{GEN_DIR}/{GEN_DVC}", f"{GEN_DIR}/{GEN_JOB}")
            if added.returncode:
                raise OutputError(f"--executor dvc-queue: git add {GEN_DIR} failed: {_last_error(added)}")
            proc = _dvc(repo, "exp", "run", "--queue", f"{GEN_DIR}/{GEN_DVC}:{STAGE}", "--name", name)
            if proc.returncode:
                raise OutputError(f"--executor dvc-queue: `dvc exp run --queue` of job {job.id} failed: "
                                  f"{_last_error(proc)}")
            names[job.id] = name
            events.write(event="queued", job=job.id, experiment=name)
            echo(f"[{i}/{len(todo)}] {job.id}: queued as DVC experiment {name}")
    except BaseException:
        if names:
            _dvc(repo, "queue", "remove", *names.values())
        raise
    finally:
        _remove_gen_dir(repo, gen)
    return names


# ----------------------------------------------------------------------------- the workers
def _worker_pids(repo: QueueRepo, count: int) -> list[int]:
    """The live processes of workers 1..count (DVC writes dvc-exp-worker-<n>.pid in its queue folder)."""
    pids = []
    for n in range(1, count + 1):
        try:
            pid = int((repo.celery_dir / f"dvc-exp-worker-{n}.pid").read_text().strip())
        except (OSError, ValueError):
            continue
        if _alive(pid, b"queue-worker"):
            pids.append(pid)
    return pids


def _alive(pid: int, marker: bytes) -> bool:
    """Whether `pid` runs (not a zombie) with `marker` in its command line (a reused pid is someone else)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return marker in cmdline and state not in ("Z", "X")


def _stop_workers(repo: QueueRepo, count: int, echo) -> None:
    """`dvc queue stop` (workers finish a running task first), then wait for their processes to end; one
    that is still there after _WORKER_EXIT_S gets SIGTERM (they are the workers this suite started)."""
    _dvc(repo, "queue", "stop")
    deadline = time.monotonic() + _WORKER_EXIT_S
    while _worker_pids(repo, count) and time.monotonic() < deadline:
        time.sleep(_POLL_S)
    for pid in _worker_pids(repo, count):
        echo(f"DVC queue worker {pid} did not stop; sending SIGTERM")
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


# ----------------------------------------------------------------------------- running a suite
def run_suite_queue(suite: Suite, out: Path, *, resume: bool = False, jobs: int = 1,
                    echo: Callable[[str], None] = print) -> Outcome:
    """Run the suite's unfinished jobs through DVC's experiment queue with `jobs` workers, then write the
    summary. Raises as graphtune.suite.run_suite: GraphTuneError (one line) before anything is written when
    the repository, the queue or the folder is not usable, JobsFailed after all ran, Interrupted on a signal.
    """
    out = Path(out).resolve()
    repo = check_repo()
    _check_params_store(repo.cwd)
    _check_gen_dir(repo)
    env = _worker_env()
    preflight(suite, out, resume=resume)  # everything checked before the folder is touched
    queue_lock = [_lock_queue(repo)]  # held while jobs are queued; released once the workers are up
    try:
        check_queue_idle(repo)
        out.mkdir(parents=True, exist_ok=True)
        lock = _lock(out)
        try:
            todo = preflight(suite, out, resume=resume)  # again, now that no other suite run can change it
            finished, failed, paths = _run_in_folder(suite, out, todo, jobs, repo, env, echo,
                                                     lambda: _release(queue_lock))
        finally:
            os.close(lock)
    finally:
        _release(queue_lock)
    if failed:
        logs = ", ".join(f"{i} ({how}; log {job_folder(out, i) / LOG})" for i, how in failed)
        raise JobsFailed(f"{len(failed)} of {len(todo)} jobs failed: {logs}; rerun them with --resume "
                         f"--executor dvc-queue")
    return Outcome(out, [j.id for j in todo], finished, [], paths)


def _lock_queue(repo: QueueRepo) -> int:
    path = repo.dvc_root / ".dvc" / "tmp" / _QUEUE_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError(f"--executor dvc-queue: another suite is queueing jobs in {repo.dvc_root}; wait for it "
                          f"to end") from None
    return fd


def _release(held: list[int]) -> None:
    while held:
        os.close(held.pop())


def _run_in_folder(suite: Suite, out: Path, todo: list[Job], jobs: int, repo: QueueRepo, env: dict, echo,
                   release_queue):
    """The plan (first time only), the events around the run, the summary: as graphtune.suite.run_suite."""
    if not (out / PLAN).exists():
        plan = {"suite": suite.name, "file": str(suite.path), "command": " ".join(suite.command),
                "created": _now(), "jobs": [job.as_dict() for job in suite.jobs]}
        _write_atomic(out / PLAN, _json_bytes(plan))
    (out / "jobs").mkdir(exist_ok=True)
    events = _Events(out / EVENTS)
    try:
        total, done = len(suite.jobs), len(suite.jobs) - len(todo)
        echo(f"suite {suite.name}: {total} jobs, {done} finished, {len(todo)} to run through DVC's queue in "
             f"{repo.dvc_root} ({jobs} worker{'s' if jobs > 1 else ''}); folder {out}")
        token = secrets.token_hex(3)
        events.write(event="suite-start", pid=os.getpid(), jobs=[j.id for j in todo], parallel=jobs,
                     executor="dvc-queue", repo=str(repo.dvc_root), baseline=repo.baseline, token=token)
        follow = _Follow(out, repo, events, echo, len(todo))
        if todo:
            _run_queued(suite, todo, jobs, env, token, follow, release_queue)
        events.write(event="suite-end", finished=len(follow.finished), failed=[i for i, _ in follow.failed])
    finally:
        events.close()
    paths = write_summary(suite, out)
    echo("summary: " + ", ".join(str(p) for p in paths.values()))
    return follow.finished, follow.failed, paths


class _Follow:
    """What the suite knows of its queued jobs, from the events their wrappers append to events.jsonl and
    from DVC's queue status; it echoes each start and end as the local executor does."""

    def __init__(self, out: Path, repo: QueueRepo, events: _Events, echo, n: int):
        self.out, self.repo, self.events, self.echo, self.n = out, repo, events, echo, n
        self.offset = (out / EVENTS).stat().st_size  # earlier runs' events are not this run's
        self.names: dict[str, str] = {}  # job id -> experiment
        self.started: dict[str, int] = {}  # job id -> wrapper pid
        self.ended: dict[str, str] = {}  # job id -> finished / failed / interrupted
        self.dvc: dict[str, str] = {}  # job id -> Success / Failed / Gone, once DVC is done with it
        self.missing: dict[str, int] = {}
        self.errors = 0  # DVC status reads that failed in a row
        self.finished: list[str] = []
        self.failed: list[tuple[str, str]] = []  # job id, how
        self.stopping = False

    def done(self) -> bool:
        return len(self.dvc) == len(self.names)

    def read_events(self) -> None:
        """The wrappers' new events: starts and ends (a line still being written is read next time)."""
        try:
            with open(self.out / EVENTS, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("job") in self.names:
                self._on_event(event)

    def _on_event(self, event: dict) -> None:
        job_id, kind, folder = event["job"], event.get("event"), job_folder(self.out, event["job"])
        if kind == "start":
            if isinstance(event.get("pid"), int):
                self.started[job_id] = event["pid"]
            self.echo(f"[{len(self.started)}/{self.n}] {job_id}: started ({self.names[job_id]})")
            return
        if kind not in ("finished", "failed", "interrupted") or job_id in self.ended:
            return
        self.ended[job_id] = kind
        wall = event.get("wall_s") or 0.0
        if kind == "finished" and read_record(self.out, job_id) is not None:
            self.finished.append(job_id)
            self.echo(f"    {job_id}: finished in {wall:.1f} s")
        elif kind == "interrupted" and self.stopping:
            self.echo(f"    {job_id}: stopped")
        else:
            rc = event.get("returncode")
            how = ("no record written" if kind == "finished" else "stopped from outside the suite: dvc queue kill"
                   if kind == "interrupted" else event.get("reason") or (
                       f"killed by {signal.Signals(-rc).name}" if isinstance(rc, int) and rc < 0
                       and -rc in signal.valid_signals() else f"exit {rc}"))
            self.failed.append((job_id, how))
            self.echo(f"    {job_id}: FAILED ({how}) after {wall:.1f} s; log {folder / LOG}")

    def read_dvc(self) -> dict[str, str]:
        """DVC's status of the suite's experiments (name -> status); the jobs DVC is done with are noted."""
        try:
            status = _status(self.repo)
        except Exception as err:  # noqa: BLE001  DVC's queue files mid-update: asked again at the next poll
            self.errors += 1
            if self.errors >= 30:
                raise OutputError(f"--executor dvc-queue: cannot read DVC's queue status in {self.repo.dvc_root} "
                                  f"({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
            return {}
        self.errors = 0
        for job_id, name in self.names.items():
            state = status.get(name)
            if job_id in self.dvc:
                continue
            if state in ("Success", "Failed"):
                self.dvc[job_id] = state
            elif state is None:
                self.missing[job_id] = self.missing.get(job_id, 0) + 1
                if self.missing[job_id] >= _GONE_POLLS:
                    self.dvc[job_id] = "Gone"  # removed from the queue by hand
            else:
                self.missing.pop(job_id, None)
        return {name: status[name] for name in self.names.values() if name in status}

    def dvc_failures(self) -> None:
        """Jobs DVC is done with whose wrapper wrote no end: DVC failed around them (or one was removed by
        hand). DVC's log goes into the job's log.txt, and a `failed` event makes the summary list it."""
        for job_id in [j for j in self.dvc if j not in self.ended]:
            name, state = self.names[job_id], self.dvc[job_id]
            if job_id in self.started and _alive(self.started[job_id], job_id.encode()):
                continue  # the wrapper is still writing its end
            folder = job_folder(self.out, job_id)
            if state == "Gone":
                reason, text = "removed from DVC's queue", f"experiment {name} was removed from DVC's queue\n"
            else:
                logs = _dvc(self.repo, "queue", "logs", name)
                text = logs.stdout
                errors = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("ERROR")]
                reason = "dvc: " + " ".join((errors[-1] if errors else f"experiment {name} {state}").split())[:200]
            if job_id not in self.started:
                try:
                    _clear_job(folder)  # nothing of the job ran: at most an earlier run's leftovers are there
                except GraphTuneError:
                    pass  # someone's files there: the log is appended beside them
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / LOG, "a") as f:
                f.write(f"\n---- dvc queue logs {name} ({state}) ----\n{text}")
            self.events.write(event="failed", job=job_id, returncode=None, reason=reason, experiment=name)
            self.ended[job_id] = "failed"
            self.failed.append((job_id, reason))
            self.echo(f"    {job_id}: FAILED ({reason}); log {folder / LOG}")


def _run_queued(suite: Suite, todo: list[Job], jobs: int, env: dict, token: str, follow: _Follow,
                release_queue) -> None:
    """Queue `todo`, start the workers, follow the jobs to their end (or a signal), stop the workers."""
    repo = follow.repo
    stop: list[int] = []
    previous = _catch_signals(stop)
    workers = 0
    try:
        follow.names = _queue_jobs(suite, todo, follow.out, repo, token, follow.events, follow.echo, stop)
        if stop:
            raise _Stop
        workers = jobs
        _start_workers(repo, jobs, env)
        release_queue()  # the workers are up: another suite now refuses on them, not on the lock
        last_status = 0.0
        while not follow.done():
            if stop:
                raise _Stop
            if time.monotonic() - last_status >= _STATUS_EVERY_S:
                follow.read_dvc()  # before the events: an end written before DVC was done is read below
                last_status = time.monotonic()
            follow.read_events()
            follow.dvc_failures()
            time.sleep(_POLL_S)
        follow.read_events()
        unsaved = [follow.names[j] for j in follow.finished if follow.dvc.get(j) == "Failed"]
        if unsaved:  # the job ran to the end, DVC failed afterwards (saving the experiment's commit)
            follow.echo(f"note: DVC could not save experiment(s) {', '.join(unsaved)} after their jobs finished "
                        f"(dvc queue logs NAME); their results are in the suite folder")
    except BaseException as err:  # a signal, or the suite cannot follow its jobs: stop them all, in order
        follow.stopping = True
        try:
            _interrupt(follow)
        finally:
            if workers:
                _stop_workers(repo, jobs, follow.echo)
                workers = 0
        follow.read_events()
        if not isinstance(err, _Stop):
            raise
    finally:
        if workers:
            _stop_workers(repo, jobs, follow.echo)
        _restore_signals(previous)
    if stop:
        name = signal.Signals(stop[0]).name
        raise Interrupted(stop[0], f"suite interrupted ({name}): {len(follow.finished)} of {len(todo)} jobs finished "
                          f"in this run; the stopped ones are rerun by `graphtune suite run {suite.path} --resume "
                          f"--executor dvc-queue --output-dir {follow.out}`")


class _Stop(Exception):
    """A signal arrived: leave the waiting loop for the orderly stop."""


def _start_workers(repo: QueueRepo, count: int, env: dict) -> None:
    proc = _dvc(repo, "queue", "start", "--jobs", str(count), env=env)
    if proc.returncode:
        raise OutputError(f"--executor dvc-queue: `dvc queue start --jobs {count}` failed: {_last_error(proc)}")


def _interrupt(follow: _Follow) -> None:
    """Remove the suite's experiments still queued, SIGTERM the wrappers of running jobs (each stops its job),
    wait for DVC to be done with them; what still runs after that is killed by `dvc queue kill --force`."""
    repo = follow.repo
    queued = [name for name, state in follow.read_dvc().items() if state == "Queued"]
    if queued:
        _dvc(repo, "queue", "remove", *queued)
    deadline = time.monotonic() + _STOP_WAIT_S + 15
    signalled: set[int] = set()
    running: list[str] = []
    while time.monotonic() < deadline:
        follow.read_events()
        for job_id, pid in follow.started.items():
            if job_id not in follow.ended and pid not in signalled and _alive(pid, job_id.encode()):
                os.kill(pid, signal.SIGTERM)
                signalled.add(pid)
        running = [name for name, state in follow.read_dvc().items() if state == "Running"]
        if not running and not follow.errors:
            return
        time.sleep(_POLL_S)
    follow.echo(f"DVC experiments still running after the stop: {', '.join(running)}; dvc queue kill --force")
    if running:
        _dvc(repo, "queue", "kill", "--force", *running)


# ----------------------------------------------------------------------------- the job wrapper
def job_main(job_file: str, job_id: str) -> int:
    """The generated stage's command, run by DVC in the experiment's copy: run one suite job into the suite
    folder (log.txt, out/, job.json on exit 0, start/end events), exit with the job's status."""
    pid = os.getpid()
    _own_parent_death_signal()
    try:
        doc = yaml.safe_load(Path(job_file).read_text())
        run = doc["run"]
        out, argv = Path(run["folder"]), [str(a) for a in run["argv"]]
        if doc["job"] != job_id:
            raise ValueError(f"it is job {doc['job']}, not {job_id}")
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as err:
        print(f"graphtune.suite_queue: {job_file}: unusable job file ({err})", file=sys.stderr)
        return 2
    folder = job_folder(out, job_id)
    try:
        _clear_job(folder)
    except GraphTuneError as err:
        print(f"graphtune.suite_queue: {err}", file=sys.stderr)
        return 2
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    code = _snapshot_code(run)
    if code is not None:
        env["PYTHONPATH"] = str(code) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    stop: list[int] = []
    previous = _catch_signals(stop)
    events = _Events(out / EVENTS)
    started, started_at = time.monotonic(), _now()
    with open(folder / LOG, "wb") as log:
        print(f"graphtune suite job {job_id} (experiment {run.get('experiment')}): log {folder / LOG}", flush=True)
        events.write(event="start", job=job_id, pid=pid, experiment=run.get("experiment"))
        checkout = subprocess.run([sys.executable, "-m", "dvc", "checkout", "--allow-missing", "--quiet"],
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.write(f"[dvc checkout in the experiment's copy: exit {checkout.returncode}; graphtune from "
                  f"{code or 'the installed package'}]\n".encode())
        log.flush()
        rc = None
        if not stop:
            proc = subprocess.Popen([sys.executable, "-m", "graphtune", *argv], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    preexec_fn=_parent_death_signal(pid))
            while proc.poll() is None and not stop:
                time.sleep(0.1)
            if stop:
                _signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=_STOP_WAIT_S)
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait()
            rc = proc.returncode
    _restore_signals(previous)
    wall = round(time.monotonic() - started, 3)
    if stop:
        events.write(event="interrupted", job=job_id, returncode=rc, wall_s=wall)
        events.close()
        return 128 + stop[0]
    if rc == 0:
        record = {**run["record"], "job": job_id, "status": "finished", "returncode": 0, "wall_s": wall,
                  "started": started_at, "finished": _now(), "executor": "dvc-queue",
                  "experiment": run.get("experiment"), "baseline": os.environ.get("DVC_EXP_BASELINE_REV"),
                  "code": str(code) if code is not None else "installed"}
        _write_atomic(folder / RECORD, _json_bytes(record))
        events.write(event="finished", job=job_id, wall_s=wall)
    else:
        events.write(event="failed", job=job_id, returncode=rc, wall_s=wall)
    events.close()
    print(f"graphtune suite job {job_id}: exit {rc} after {wall:.1f} s", flush=True)
    return 0 if rc == 0 else (128 - rc if rc < 0 else rc)


def _own_parent_death_signal() -> None:
    """SIGTERM to this wrapper when DVC's process running the stage dies (e.g. `dvc queue kill`)."""
    setup = _parent_death_signal(os.getppid())
    if setup is not None:
        setup()


def _snapshot_code(run: dict) -> Path | None:
    """The copy's own graphtune, when the installed one is imported from inside the queued repository (an
    editable install of the project): the folder to put first on PYTHONPATH. None: use the installed one."""
    import graphtune

    installed = Path(graphtune.__file__).resolve().parent.parent
    try:
        git_root, workspace = Path(run["git_root"]), Path(run["workspace"])
        inside = installed.relative_to(git_root)
        depth = len(workspace.relative_to(git_root).parts)
    except (KeyError, TypeError, ValueError):
        return None
    copy_root = Path.cwd()
    for _ in range(depth):
        copy_root = copy_root.parent
    code = copy_root / inside
    return code if (code / "graphtune" / "__init__.py").is_file() and code != installed else None


__all__ = ["QueueRepo", "check_repo", "check_queue_idle", "experiment_name", "run_suite_queue", "job_main"]

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m graphtune.suite_queue JOB_FILE JOB_ID (the stage `graphtune suite run "
                 "--executor dvc-queue` writes)")
    sys.exit(job_main(sys.argv[1], sys.argv[2]))
