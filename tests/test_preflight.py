"""The tracking store is checked before any data is read: one line within seconds, never a hang or a traceback."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graphtune.errors import ConfigError
from graphtune.tracking.preflight import check_store

REPO = Path(__file__).resolve().parents[1]


def test_an_unreachable_server_fails_in_one_line_within_seconds(tmp_path):
    env = dict(os.environ, MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "graphtune", "experiment", "--params", str(REPO / "params.yaml"),
                           "--model", "baseline", "--set", f"prepare.processed_dir={tmp_path}/processed",
                           "--output-dir", str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - began
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "tracking store http://127.0.0.1:9: not reachable" in lines[0], done.stderr
    assert elapsed < 60  # measured on a shared machine: the check itself takes seconds; it used to hang > 240 s
    assert not (tmp_path / "processed").exists() and not (tmp_path / "out").exists()  # no data was read


def test_a_store_under_a_file_is_refused_before_data_is_read(tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    uri = f"sqlite:///{tmp_path}/blocker/mlflow.db"
    with pytest.raises(ConfigError, match=r"cannot create the database folder .*blocker is a file, not a folder"):
        check_store(uri)


def test_a_foreign_or_corrupt_sqlite_file_is_refused(tmp_path):
    con = sqlite3.connect(tmp_path / "other.db")
    con.execute("CREATE TABLE notes (x)")
    con.commit()
    con.close()
    with pytest.raises(ConfigError, match="is a sqlite file but not an MLflow store"):
        check_store(f"sqlite:///{tmp_path}/other.db")
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(ConfigError, match="is not a usable sqlite database"):
        check_store(f"sqlite:///{tmp_path}/junk.db")


def test_a_schema_from_another_mlflow_is_refused(tmp_path):
    from graphtune.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with Tracker(uri, "x").run("r"):
        pass
    assert check_store(uri) == uri  # a store this MLflow made is fine
    con = sqlite3.connect(tmp_path / "mlflow.db")
    con.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")
    con.commit()
    con.close()
    with pytest.raises(ConfigError, match=r"its schema \(ffffffffffff\) was written by another MLflow"):
        check_store(uri)
