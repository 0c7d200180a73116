"""`graphtune experiment --nproc 2`: one experiment on two torchrun workers (gloo, CPU). Rank 0 alone tracks and
writes; the results match one process's with the same global batch to float rounding (the baseline model has no
dropout and no BatchNorm, so nothing else differs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
ARGS = ["experiment", "--params", str(REPO / "params.yaml"), "--model", "baseline", "--epochs", "1",
        "--fractions", "0.3", "--set", "prepare.stride=4", "--set", "train.batch_size=64", "--seed", "0"]


def _run(tmp_path, *args):
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "GIT_PYTHON_REFRESH": "quiet",
                        "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "graphtune", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_two_processes_match_one_and_only_rank_0_tracks(tmp_path):
    two = _run(tmp_path, *ARGS, "--nproc", "2", "--output-dir", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    one = _run(tmp_path, *ARGS, "--output-dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    got = json.loads((tmp_path / "two" / "results.json").read_text())
    want = json.loads((tmp_path / "one" / "results.json").read_text())
    for g, w in zip(got["stages"], want["stages"]):
        for split in ("val", "test"):
            for key in ("mae", "rmse"):
                assert g[split][key] == pytest.approx(w[split][key], rel=1e-4), (g["city"], split, key)
    assert got["config_hash"] != want["config_hash"]  # world_size is part of the configuration
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    parents = client.search_runs(["1"], "tags.`graphtune.kind` = 'experiment'")
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents)  # one per command, not per rank
    stages = client.search_runs(["1"], "tags.`graphtune.kind` = 'stage'")
    assert len(stages) == 4


def test_nproc_below_one_is_one_line(tmp_path):
    done = _run(tmp_path, *ARGS, "--nproc", "0", "--no-tracking")
    assert done.returncode == 2 and "--nproc" in done.stderr and len(done.stderr.strip().splitlines()) == 1
