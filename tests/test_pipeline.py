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


def copy_project(src: Path, dst: Path) -> None:
    """A fresh copy of the project at `src`, as `git clone` + `dvc pull` would give: every git-tracked file,
    and the data of every DVC-tracked path (a `*.dvc` file's outs), taken from `src`'s workspace. A city a
    user added as the README says (`dvc add data/raw/my-city`) is git-ignored, so git alone would miss it."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=src, capture_output=True, check=True).stdout
    names = [n for n in files.decode().split("\0") if n]
    for name in names:
        if (src / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
    for name in (n for n in names if n.endswith(".dvc")):
        for out in (yaml.safe_load((src / name).read_text()) or {}).get("outs", []):
            tracked = (src / name).parent / out["path"]
            target = dst / tracked.relative_to(src)
            if tracked.is_dir():
                shutil.copytree(tracked, target, dirs_exist_ok=True)
            elif tracked.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(tracked, target)


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "GIT_PYTHON_REFRESH": "quiet",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "MLFLOW_DISABLE_TELEMETRY": "true",
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


@pytest.mark.slow
def test_dvc_repro_end_to_end_then_noop_then_partial(tmp_path):
    """A user's checkout with a city added exactly as the README says, copied fresh, runs the pipeline."""
    env = _env(tmp_path)
    user = tmp_path / "user"
    copy_project(REPO, user)
    _run(["git", "init", "-q"], user, env)
    _run(["git", "add", "-A"], user, env)
    _run(["git", "commit", "-qm", "clone"], user, env)
    params = yaml.safe_load((user / "params.yaml").read_text())
    params["experiment"]["model"] = "baseline"  # the tiny model, one epoch: the pipeline, not the model, is tested
    params["train"]["epochs"] = [1]
    params["train"]["lrs"] = [0.003]
    params["prepare"]["stride"] = 4
    # GPD's stages at their smallest: one collection epoch on every 12th window, a few denoiser steps
    params["gpd"].update(collect_epochs=1, collect_stride=12, iterations=4, eval_every=2, diffusion_steps=10,
                         ddim_steps=2, d_model=16, depth=1)
    # the README's three steps: the city's files in data/raw/toy, an entry under cities: and a line in the
    # prepare foreach, then `dvc add data/raw/toy`
    shutil.copytree(REPO / "data" / "sample" / "metr-la-week", user / "data" / "raw" / "toy")
    params["cities"] = {"toy": {"directory": "data/raw/toy", "series": "metr-la-week.h5", "graph": "adj_mx.pkl",
                                "locations": "graph_sensor_locations.csv", "series_options": {"key": "df"},
                                "units": "mph", "null_value": 0.0}}
    (user / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    pipeline = yaml.safe_load((user / "dvc.yaml").read_text())
    pipeline["stages"]["prepare"]["foreach"]["toy"] = "data/raw/toy"
    (user / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    _run(["dvc", "add", "data/raw/toy"], user, env)
    _run(["git", "add", "-A"], user, env)
    _run(["git", "commit", "-qm", "add city toy"], user, env)
    assert (user / "data" / "raw" / "toy.dvc").is_file()
    assert "data/raw/toy" not in subprocess.run(["git", "ls-files"], cwd=user, capture_output=True,
                                                text=True).stdout.replace("data/raw/toy.dvc", "")

    project = tmp_path / "project"
    copy_project(user, project)  # what the DVC test of `make test` does with the user's checkout
    assert (project / "data" / "raw" / "toy" / "metr-la-week.h5").is_file()
    (project / "dvc.lock").unlink(missing_ok=True)
    _run(["git", "init", "-q"], project, env)
    _run(["git", "add", "-A"], project, env)
    _run(["git", "commit", "-qm", "copy"], project, env)

    first = _run(["dvc", "repro"], project, env)
    for stage in ("prepare@metr-la-week", "prepare@metr-la-west", "prepare@metr-la-east", "prepare@toy",
                  "experiment", "gpd-collect", "gpd-diffuse", "gpd-transfer", "compare"):
        assert f"Running stage '{stage}'" in first
    results = json.loads((project / "outputs" / "experiment" / "results.json").read_text())
    assert [s["city"] for s in results["stages"]] == ["metr-la-west", "metr-la-east"]
    assert (project / "outputs" / "compare" / "leaderboard.md").is_file()
    assert (project / "data" / "processed" / "metr-la-east" / "meta.json").is_file()
    gpd = json.loads((project / "outputs" / "gpd" / "experiment" / "results.json").read_text())
    assert gpd["strategy"] == "gpd" and [s["city"] for s in gpd["stages"]] == ["metr-la-r1"]
    assert (project / "outputs" / "gpd" / "params" / "params.npz").is_file()

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

