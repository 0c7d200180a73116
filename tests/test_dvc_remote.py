"""A shared DVC remote: one clone pushes a city's raw files and its processed folder, a fresh clone pulls them.

The city is added as data/raw/README.md says (its files in data/raw/toy, `dvc add`), its processed folder is
built by the pipeline's own stage (`dvc repro prepare@toy`, seconds; nothing else of the pipeline runs), and
the remote is a local folder, as `dvc remote add -d shared /mnt/shared/...` would be. The second clone is a
plain `git clone` of the first: it has the remote's configuration and the .dvc/lock records, no data, and
no DVC cache, so whatever arrives came from the remote.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from test_pipeline import _env, _run, copy_project

REPO = Path(__file__).resolve().parents[1]
CITY = "toy"
TOY = {"directory": "data/raw/toy", "series": "metr-la-week.h5", "graph": "adj_mx.pkl",
       "locations": "graph_sensor_locations.csv", "series_options": {"key": "df"}, "units": "mph", "null_value": 0.0}
DATA = (f"data/raw/{CITY}", f"data/processed/{CITY}")
TARGETS = [f"data/raw/{CITY}.dvc", f"prepare@{CITY}"]


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by path relative to it."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """The first clone, with the city added and prepared and both pushed: (tmp, env, first clone, remote)."""
    tmp = tmp_path_factory.mktemp("dvc-remote")
    env = _env(tmp)
    upstream = tmp / "upstream"  # the team's repository: today's project, as git holds it
    copy_project(REPO, upstream)
    _run(["git", "init", "-q"], upstream, env)
    _run(["git", "add", "-A"], upstream, env)
    _run(["git", "commit", "-qm", "project"], upstream, env)
    first, remote = tmp / "first", tmp / "remote"
    _run(["git", "clone", "-q", str(upstream), str(first)], tmp, env)

    _run(["dvc", "remote", "add", "-d", "shared", str(remote)], first, env)
    shutil.copytree(REPO / "data" / "sample" / "metr-la-week", first / "data" / "raw" / CITY)
    params = yaml.safe_load((first / "params.yaml").read_text())
    params["cities"] = {CITY: TOY}
    (first / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    pipeline = yaml.safe_load((first / "dvc.yaml").read_text())
    pipeline["stages"]["prepare"]["foreach"][CITY] = f"data/raw/{CITY}"
    (first / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    _run(["dvc", "add", f"data/raw/{CITY}"], first, env)
    assert f"Running stage 'prepare@{CITY}'" in _run(["dvc", "repro", f"prepare@{CITY}"], first, env)
    _run(["git", "add", "-A"], first, env)
    _run(["git", "commit", "-qm", f"add city {CITY}, prepared, shared remote"], first, env)
    _run(["dvc", "push", *TARGETS], first, env)
    return tmp, env, first, remote


@pytest.mark.slow
def test_a_fresh_clone_pulls_the_city_byte_for_byte(pushed):
    tmp, env, first, remote = pushed
    assert any(p.is_file() for p in remote.rglob("*"))
    second = tmp / "second"
    _run(["git", "clone", "-q", str(first), str(second)], tmp, env)
    assert not any((second / d).exists() for d in DATA) and not (second / ".dvc" / "cache").exists()
    assert str(remote) in _run(["dvc", "remote", "list"], second, env)  # the remote came with git

    _run(["dvc", "pull", *TARGETS], second, env)
    for folder in DATA:
        theirs, ours = _digests(first / folder), _digests(second / folder)
        assert ours and ours == theirs, folder
    assert _digests(second / "data" / "raw" / CITY) == _digests(REPO / "data" / "sample" / "metr-la-week")
    assert {"series.npy", "adj.npy", "meta.json"} <= set(_digests(second / "data" / "processed" / CITY))
    # what arrived is what the lock records: nothing to rerun, nothing changed
    assert "up to date" in _run(["dvc", "status", *TARGETS], second, env)


@pytest.mark.slow
def test_a_whole_repo_push_includes_the_raw_city(pushed):
    """`dvc push` with no target, as data/raw/README.md says, sends the city's raw files too."""
    tmp, env, first, _ = pushed
    whole = tmp / "whole"
    _run(["dvc", "remote", "add", "--local", "whole", str(whole)], first, env)
    _run(["dvc", "push", "-r", "whole"], first, env)
    raw = yaml.safe_load((first / "data" / "raw" / f"{CITY}.dvc").read_text())["outs"][0]["md5"]
    processed = subprocess.run(["git", "show", "HEAD:dvc.lock"], cwd=first, capture_output=True, text=True).stdout
    processed = yaml.safe_load(processed)["stages"][f"prepare@{CITY}"]["outs"][0]["md5"]
    assert (whole / "files" / "md5" / processed[:2] / processed[2:]).is_file()  # the stage's output: pushed
    assert (whole / "files" / "md5" / raw[:2] / raw[2:]).is_file()  # the raw folder's listing: not today
