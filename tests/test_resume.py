"""Resume after kill -9: the interrupted experiment continues under its own parent run and ends with the results
of an uninterrupted run (time and memory aside); runs that cannot be resumed are refused with one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
# Three budget points on the second city, every one kept (the scheduler never stops the curve), so a kill after the
# first point's journal entry lands in the middle of stage 1.
ARGS = ["experiment", "--params", str(REPO / "params.yaml"), "--datasets", "metr-la-west,metr-la-east",
        "--model", "gwnet", "--set", "experiment.model_kwargs={residual_channels: 8, dilation_channels: 8, "
        "skip_channels: 16, end_channels: 32}", "--epochs", "1,1", "--fractions", "0.1,0.3,1.0",
        "--set", "transfer.min_gain_rate=-1000", "--set", "prepare.stride=3", "--seed", "3"]
# measured again when work is redone, so never equal between two runs
MEASURED = {"train_time_s", "val_time_s", "fit_time_s", "wall_time_s", "epoch_time_s", "peak_rss_mb", "peak_gpu_mb",
            "time_s", "eff_norm", "budget_penalty", "stage_score", "cost_share", "score", "S_uep", "s_uep"}


def _env(tmp_path) -> dict:
    return os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "GIT_PYTHON_REFRESH": "quiet",
                         "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _graphtune(tmp_path, *args, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "graphtune", *args], cwd=REPO, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _strip(obj):
    """results.json without what is measured (time, memory) and what the time enters (the efficiency parts)."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in MEASURED}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _kill_after_first_point(tmp_path) -> None:
    """Start the experiment and SIGKILL it as soon as stage 1's first budget point is in the journal."""
    proc = subprocess.Popen([sys.executable, "-m", "graphtune", *ARGS, "--output-dir", str(tmp_path / "killed")],
                            cwd=REPO, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if list(tmp_path.glob("mlartifacts/*/*/artifacts/resume/stage1/point0.pt")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the experiment ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_kill_9_then_resume_last_equals_an_uninterrupted_run(tmp_path):
    _kill_after_first_point(tmp_path)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (parent,) = client.search_runs(["1"], "tags.`graphtune.kind` = 'experiment'")
    assert parent.info.status == "RUNNING"  # what kill -9 leaves behind, until someone looks

    resumed = _graphtune(tmp_path, *ARGS, "--resume", "last", "--output-dir", str(tmp_path / "resumed"))
    assert "resumed: 1 stage(s) and 1 budget point(s) already finished" in resumed.stdout
    _graphtune(tmp_path, *ARGS, "--output-dir", str(tmp_path / "whole"))

    got = json.loads((tmp_path / "resumed" / "results.json").read_text())
    want = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert _strip(got) == _strip(want)
    assert got["stages"][1]["curve_fraction"] == [0.1, 0.3, 1.0]

    runs = client.search_runs(["1"], "tags.`graphtune.kind` = 'experiment'")
    assert len(runs) == 2  # the resumed run continued under its own parent run: no third one
    again = client.get_run(parent.info.run_id)
    assert again.info.status == "FINISHED" and again.data.tags["graphtune.resumed"] == "1"
    assert "graphtune.error" not in again.data.tags
    everything = client.search_runs(["1"])
    assert not [r for r in everything if r.info.status == "RUNNING"]
    stages = [r for r in everything if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["graphtune.stage"] for r in stages) == ["0", "1"]  # stage 1's run was continued
    assert all(r.info.status == "FINISHED" for r in stages)
    budgets = [r for r in everything if r.data.tags.get("graphtune.kind") == "budget"
               and r.data.tags.get("mlflow.parentRunId") in {s.info.run_id for s in stages}]
    # each of the three fractions finished once; a point that was running at the kill (if the kill came while
    # one was) stays KILLED
    finished = sorted(r.data.tags["graphtune.fraction"] for r in budgets if r.info.status == "FINISHED")
    assert finished == ["0.1", "0.3", "1.0"]
    assert {r.info.status for r in budgets if r.info.status != "FINISHED"} <= {"KILLED"}

    # a finished run, another configuration and an unknown id are each refused with one line
    done = _graphtune(tmp_path, *ARGS, "--resume", parent.info.run_id, "--output-dir", str(tmp_path / "x"), check=False)
    assert done.returncode == 2 and "finished; there is nothing to resume" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_resume_refusals_are_one_line_before_any_work(tmp_path):
    fast = ["experiment", "--params", str(REPO / "params.yaml"), "--model", "baseline", "--epochs", "1",
            "--set", "prepare.stride=4"]
    done = _graphtune(tmp_path, *fast, "--resume", "last", "--no-tracking", check=False)
    assert done.returncode == 2 and "drop --no-tracking" in done.stderr
    done = _graphtune(tmp_path, *fast, "--force", check=False)
    assert done.returncode == 2 and "--force: only means something with --resume" in done.stderr
    done = _graphtune(tmp_path, *fast, "--resume", "last", check=False)
    assert done.returncode == 2 and "no unfinished run of this configuration" in done.stderr
    done = _graphtune(tmp_path, *fast, "--resume", "0123456789abcdef", check=False)
    assert done.returncode == 2 and "no run with id" in done.stderr
    for d in (done,):
        assert len(d.stderr.strip().splitlines()) == 1 and "Traceback" not in d.stderr
    assert not list(tmp_path.glob("mlartifacts/*/*/artifacts"))  # nothing ran
