"""The DVC pipeline on a fresh copy of the project: end to end, a no-op rerun, and a partial rerun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv running the tests holds graphtune and dvc


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


@pytest.mark.slow
def test_dvc_repro_end_to_end_then_noop_then_partial(tmp_path):
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    project = tmp_path / "project"
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, project / name)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["experiment"]["model"] = "baseline"  # the tiny model, one epoch: the pipeline, not the model, is tested
    params["train"]["epochs"] = [1]
    params["train"]["lrs"] = [0.003]
    params["prepare"]["stride"] = 4
    # a user city added as the README says: its files, an entry under cities:, a line in the prepare foreach
    shutil.copytree(REPO / "data" / "sample" / "metr-la-week", project / "data" / "raw" / "toy")
    params["cities"] = {"toy": {"directory": "data/raw/toy", "series": "metr-la-week.h5", "graph": "adj_mx.pkl",
                                "locations": "graph_sensor_locations.csv", "series_options": {"key": "df"},
                                "units": "mph", "null_value": 0.0}}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    pipeline = yaml.safe_load((project / "dvc.yaml").read_text())
    pipeline["stages"]["prepare"]["foreach"]["toy"] = "data/raw/toy"
    (project / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    (project / "dvc.lock").unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "GIT_PYTHON_REFRESH": "quiet",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "MLFLOW_DISABLE_TELEMETRY": "true",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    _run(["git", "init", "-q"], project, env)
    _run(["git", "add", "-A"], project, env)
    _run(["git", "commit", "-qm", "copy"], project, env)

    first = _run(["dvc", "repro"], project, env)
    for stage in ("prepare@metr-la-week", "prepare@metr-la-west", "prepare@metr-la-east", "prepare@toy",
                  "experiment", "compare"):
        assert f"Running stage '{stage}'" in first
    results = json.loads((project / "outputs" / "experiment" / "results.json").read_text())
    assert [s["city"] for s in results["stages"]] == ["metr-la-west", "metr-la-east"]
    assert (project / "outputs" / "compare" / "leaderboard.md").is_file()
    assert (project / "data" / "processed" / "metr-la-east" / "meta.json").is_file()

    second = _run(["dvc", "repro"], project, env)
    assert "Running stage" not in second and "up to date" in second

    # every input that changes a stage's output makes it stale
    def stale_after(edit) -> set[str]:
        original = (project / "params.yaml").read_text()
        changed = yaml.safe_load(original)
        edit(changed)
        (project / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
        try:
            return set(json.loads(_run(["dvc", "status", "--json"], project, env).strip().splitlines()[-1]))
        finally:
            (project / "params.yaml").write_text(original)

    assert _run(["dvc", "status", "--json"], project, env).strip().splitlines()[-1] == "{}"
    stride = stale_after(lambda p: p["prepare"].update(stride=2))
    assert "experiment" in stride and not any(s.startswith("prepare@") for s in stride)
    entry = stale_after(lambda p: p["cities"]["toy"].update(units="km/h"))
    assert {"experiment", "prepare@toy"} <= entry
    null_value = stale_after(lambda p: p["cities"]["toy"].update(null_value=-1.0))
    assert "prepare@toy" in null_value

    _run(["git", "add", "-A"], project, env)
    _run(["git", "commit", "-qm", "pipeline ran"], project, env)
    partial = _run(["dvc", "exp", "run", "-S", "transfer.fractions=[0.5,1.0]"], project, env)
    assert "Running stage 'experiment'" in partial and "Running stage 'compare'" in partial
    assert "Running stage 'prepare" not in partial

