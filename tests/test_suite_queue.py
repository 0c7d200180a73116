"""`graphtune suite run --executor dvc-queue`: real `graphtune compress` jobs through DVC's experiment queue
in a scratch git+DVC repository, and the one-line refusals where DVC's queue cannot run.

The scratch repository holds this checkout's graphtune package (src/graphtune, committed) and params.yaml;
the suite runs with PYTHONPATH on that src/, as an editable install of the project would, so a job must
import graphtune from DVC's copy of the commit, not from the workspace.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from graphtune.cli import cli

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv running the tests holds graphtune and dvc

SUITE = {"name": "queue", "command": "compress",
         "options": {"model": "lenet-300-100", "dataset": "digits", "epochs": 1, "experiment-name": "queue"},
         "grid": {"ratio": [0.5, 0.7]},
         "summary": {"file": "results.json", "metrics": {"accuracy": "final.accuracy"}, "x": "ratio"}}


def _env(repo: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the default: ./mlflow.db
    return {**env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(repo / "src"),
            "GIT_PYTHON_REFRESH": "quiet", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def _run(cmd: list[str], cwd: Path, env: dict, ok: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _scratch_repo(repo: Path, env: dict) -> None:
    """A git+DVC repository with one commit: graphtune's package and params.yaml; outputs ignored."""
    shutil.copytree(REPO / "src" / "graphtune", repo / "src" / "graphtune",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(REPO / "params.yaml", repo / "params.yaml")
    (repo / ".gitignore").write_text("outputs/\nmlflow.db\nmlartifacts/\n")
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "scratch"], repo, env)


def _live_processes_in(folder: Path) -> dict[int, str]:
    """Processes (not zombies) whose working folder is inside `folder`, with their command lines: DVC queue
    workers, DVC's experiment runs and jobs of the scratch repository."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwd = os.readlink(proc / "cwd")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (cwd == str(folder) or cwd.startswith(f"{folder}/")) and state not in ("Z", "X"):
            found[int(proc.name)] = cmdline
    return found


def _stop_leftovers(repo: Path, env: dict) -> None:
    """After a failed test: `dvc queue stop --kill`, then SIGKILL whatever of the scratch repository still runs
    (every process there was started by the test), so that no worker outlives it."""
    if not _live_processes_in(repo):
        return
    subprocess.run([sys.executable, "-m", "dvc", "queue", "stop", "--kill"], cwd=repo, env=env, capture_output=True,
                   timeout=60)
    deadline = time.monotonic() + 15
    while _live_processes_in(repo) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _live_processes_in(repo):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_dvc_queue_runs_two_jobs_in_two_workers_into_the_suite_folder(tmp_path):
    """Two real jobs, two workers: records, events, summary, MLflow runs in the workspace's store, code from
    DVC's copy, a clean git state afterwards and no worker left running; then summary and --resume."""
    repo = tmp_path / "repo"
    repo.mkdir()
    env = _env(repo)
    _scratch_repo(repo, env)
    file = tmp_path / "queue.yaml"
    file.write_text(yaml.safe_dump(SUITE, sort_keys=False))
    argv = [sys.executable, "-m", "graphtune", "suite", "run", str(file), "--executor", "dvc-queue"]
    try:
        started = time.monotonic()
        r = _run([*argv, "--jobs", "2"], repo, env)
        wall = time.monotonic() - started
        assert _live_processes_in(repo) == {}  # the suite stopped its workers and waited for them
        assert f"2 to run through DVC's queue in {repo} (2 workers)" in r.stdout, r.stdout
        assert r.stdout.count(": finished in ") == 2 and "summary: " in r.stdout, r.stdout
        _check_folder(repo, env)
        s = _run([sys.executable, "-m", "graphtune", "suite", "summary", str(file)], repo, env)
        assert "2 of 2 jobs finished" in s.stdout
        again = _run([*argv, "--resume"], repo, env)
        assert "2 finished, 0 to run" in again.stdout
        _check_a_failing_job(repo, env, tmp_path / "fail.yaml")
        assert _live_processes_in(repo) == {}
    finally:
        _stop_leftovers(repo, env)
    print(f"dvc-queue suite of 2 jobs: {wall:.1f} s")


def _check_a_failing_job(repo: Path, env: dict, file: Path) -> None:
    """A job that exits 2: the suite exits 1 naming it and its log; the summary lists it as failed; DVC
    marks its experiment failed too."""
    doc = {**SUITE, "name": "queue-fail", "options": {**SUITE["options"], "no-tracking": True},
           "grid": {"ratio": [1.5]}}
    file.write_text(yaml.safe_dump(doc, sort_keys=False))
    r = _run([sys.executable, "-m", "graphtune", "suite", "run", str(file), "--executor", "dvc-queue"], repo, env,
             ok=False)
    out = repo / "outputs" / "suites" / "queue-fail"
    job_id = json.loads((out / "plan.json").read_text())["jobs"][0]["id"]
    log = out / "jobs" / job_id / "log.txt"
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr == (f"graphtune: error: 1 of 1 jobs failed: {job_id} (exit 2; log {log}); rerun them with "
                        f"--resume --executor dvc-queue\n")
    assert "expected a compression ratio in [0, 1)" in log.read_text()
    assert not (out / "jobs" / job_id / "job.json").exists()
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e.get("returncode")) for e in events if e.get("job") == job_id][-1] == ("failed", 2)
    with open(out / "summary_all.csv", newline="") as f:
        assert [(row["job"], row["status"]) for row in csv.DictReader(f)] == [(job_id, "failed")]
    experiment = next(e["experiment"] for e in events if e["event"] == "queued")
    status = _run([sys.executable, "-m", "dvc", "queue", "status"], repo, env).stdout
    assert any(line.split()[1:2] == [experiment] and line.split()[-1] == "Failed" for line in status.splitlines()
               if line.strip()), status


def _check_folder(repo: Path, env: dict) -> None:
    out = repo / "outputs" / "suites" / "queue"
    plan = json.loads((out / "plan.json").read_text())
    ids = [job["id"] for job in plan["jobs"]]
    assert len(ids) == 2
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "suite-start" and events[0]["executor"] == "dvc-queue"
    assert events[-1]["event"] == "suite-end" and events[-1]["finished"] == 2 and events[-1]["failed"] == []
    queued = {e["job"]: e["experiment"] for e in events if e["event"] == "queued"}
    assert sorted(queued) == sorted(ids)
    starts = [i for i, e in enumerate(events) if e["event"] == "start"]
    ends = [i for i, e in enumerate(events) if e["event"] == "finished"]
    assert len(starts) == 2 and len(ends) == 2 and max(starts) < min(ends)  # two workers: both ran at once
    assert len({events[i]["pid"] for i in starts}) == 2

    for job_id in ids:
        record = json.loads((out / "jobs" / job_id / "job.json").read_text())
        assert record["status"] == "finished" and record["returncode"] == 0 and record["executor"] == "dvc-queue"
        assert record["experiment"] == queued[job_id] and record["args"][:1] == ["compress"]
        # the job imported graphtune from the experiment's copy under .dvc/tmp/exps, not from repo/src
        assert record["code"].startswith(str(repo / ".dvc" / "tmp" / "exps")) and record["code"].endswith("src")
        results = json.loads((out / "jobs" / job_id / "out" / "results.json").read_text())
        assert 0.0 < results["final"]["accuracy"] <= 1.0
        log = (out / "jobs" / job_id / "log.txt").read_text()
        assert "dvc checkout in the experiment's copy: exit 0" in log and "compressed:" in log
    with open(out / "summary_all.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ids and {r["status"] for r in rows} == {"finished"}
    assert [r["ratio"] for r in rows] == ["0.5", "0.7"] and all(0 < float(r["accuracy"]) <= 1 for r in rows)
    assert (out / "summary.md").is_file() and (out / "summary.png").stat().st_size > 1000

    # both jobs are MLflow runs in the workspace's store (a relative default, made absolute), not in a copy
    with sqlite3.connect(repo / "mlflow.db") as db:
        runs = db.execute("select status from runs").fetchall()
    assert sorted(runs) == [("FINISHED",), ("FINISHED",)]
    # each job is a DVC experiment of the commit; the workspace and the index are as before the suite
    refs = _run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo, env).stdout.split()
    assert sorted(ref.rsplit("/", 1)[-1] for ref in refs) == sorted(queued.values())
    assert _run(["git", "status", "--porcelain"], repo, env).stdout == ""
    assert not (repo / ".graphtune-suite").exists()


def test_dvc_queue_refuses_in_one_line_where_it_cannot_run(tmp_path, monkeypatch):
    """No git/DVC, DVC without a commit: exit 2, one line, nothing written; --dry-run checks the same."""
    file = tmp_path / "queue.yaml"
    file.write_text(yaml.safe_dump(SUITE, sort_keys=False))
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.chdir(plain)
    for extra in ([], ["--dry-run"]):
        r = CliRunner().invoke(cli, ["suite", "run", str(file), "--executor", "dvc-queue", *extra])
        assert r.exit_code == 2, r.output
        assert r.output.startswith(f"graphtune: error: --executor dvc-queue: {plain} is not inside a git "
                                   f"repository with DVC initialised") and r.output.count("\n") == 1, r.output
    assert os.listdir(plain) == []

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    env = _env(fresh)
    _run(["git", "init", "-q"], fresh, env)
    _run(["dvc", "init", "-q"], fresh, env)
    before = sorted(p.name for p in fresh.iterdir())
    monkeypatch.chdir(fresh)
    r = CliRunner().invoke(cli, ["suite", "run", str(file), "--executor", "dvc-queue"])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "has no commit yet" in r.output
    assert sorted(p.name for p in fresh.iterdir()) == before  # no outputs/ folder
