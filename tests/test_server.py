"""`graphtune server`: its up-front checks (one line each), and a team's use of it end to end.

The end-to-end test starts a real server (sqlite store and artifact folder under tmp_path), runs a small
experiment against it from one process and reads the leaderboard from another, finds the artifacts in the
server's destination (uploaded through the server), and stops it with SIGTERM: exit status 0, every process
of the server gone. A fixture kills whatever is left if the test fails halfway.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pandas as pd
import psutil
import pytest
from click.testing import CliRunner

from graphtune.cli import cli
from graphtune.cli.server import DEFAULT_STORE, check_backend_store, default_store, local_artifact_notice
from graphtune.errors import ConfigError, GraphTuneNotice

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv running the tests holds graphtune and mlflow
# one epoch of the tiny baseline on every 4th window, one budget point: the tracking, not the model, is tested
SMALL = ["--model", "baseline", "--epochs", "1", "--fractions", "1.0", "--set", "prepare.stride=4",
         "--set", "train.batch_size=128", "--params", str(REPO / "params.yaml")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error_line(*args: str) -> str:
    """`graphtune server ARGS` that must fail before starting anything: its one line on stderr."""
    r = CliRunner().invoke(cli, ["server", *args])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphtune: error: "), r.output
    return lines[0]


def test_a_sqlite_store_in_a_missing_folder_is_refused(tmp_path):
    line = _error_line("--backend-store-uri", f"sqlite:///{tmp_path}/nope/mlflow.db", "--port", str(_free_port()))
    assert f"the folder {tmp_path}/nope does not exist" in line
    assert not (tmp_path / "nope").exists()


def test_stores_mlflow_cannot_keep_runs_in_are_refused(tmp_path):
    line = _error_line("--backend-store-uri", "postgres://me:s3cret@db/mlflow")
    assert "write postgresql://" in line and "s3cret" not in line
    assert "tracking server's address" in _error_line("--backend-store-uri", "http://127.0.0.1:5000")
    assert "plain file store" in _error_line("--backend-store-uri", f"file://{tmp_path}")
    assert "in-memory" in _error_line("--backend-store-uri", "sqlite://")


def test_a_database_whose_driver_is_missing_is_refused_with_what_to_install():
    import importlib.util

    if importlib.util.find_spec("MySQLdb") is not None:
        pytest.skip("mysqlclient is installed here: the server would start")
    with socket.socket() as database:  # something listens where the URI points: the missing driver is next
        database.bind(("127.0.0.1", 0))
        database.listen()
        port = database.getsockname()[1]
        line = _error_line("--backend-store-uri", f"mysql://me:s3cret@127.0.0.1:{port}/mlflow")
    assert "s3cret" not in line and f"mysql://me:***@127.0.0.1:{port}/mlflow" in line
    assert "driver MySQLdb is not installed" in line and "pip install mysqlclient" in line


def test_a_database_server_nobody_answers_at_is_refused_before_its_driver_is_needed():
    port = _free_port()  # nothing listens there: connection refused, at once
    line = _error_line("--backend-store-uri", f"postgresql://me:s3cret@127.0.0.1:{port}/mlflow")
    assert f"cannot reach the database server 127.0.0.1:{port}" in line and "s3cret" not in line


def test_a_sqlite_file_that_is_not_an_mlflow_store_is_refused(tmp_path):
    (tmp_path / "other.db").write_bytes(b"not a database at all, just some bytes" * 100)
    line = _error_line("--backend-store-uri", f"sqlite:///{tmp_path}/other.db")
    assert "not a usable sqlite database" in line


def test_bad_artifact_destinations_are_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in _error_line("--backend-store-uri", f"sqlite:///{tmp_path}/m.db",
                                                    "--artifacts-destination", str(tmp_path / "file"))
    line = _error_line("--backend-store-uri", f"sqlite:///{tmp_path}/m.db", "--artifacts-destination", "nosuch://b/x")
    assert "no artifact storage for nosuch://" in line and "s3://" in line


def test_a_port_something_listens_on_is_refused(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = _error_line("--backend-store-uri", f"sqlite:///{tmp_path}/m.db", "--port", str(port))
    assert f"something already listens on 127.0.0.1:{port}" in line


def test_an_out_of_range_port_is_a_one_line_usage_error():
    done = subprocess.run([BIN / "graphtune", "server", "--port", "70000"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == ["graphtune: error: Invalid value for '--port': 70000 is not in the "
                                                "range 1<=x<=65535. (see 'graphtune server --help')"]


def test_the_default_store_is_the_tracking_sections_database_never_a_server(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # what clients of this server export
    assert default_store("") == DEFAULT_STORE
    assert default_store("sqlite:///team.db") == "sqlite:///team.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mine.db")
    assert default_store("") == f"sqlite:///{tmp_path}/mine.db"
    monkeypatch.chdir(tmp_path)
    assert check_backend_store("sqlite:///rel.db", "--backend-store-uri") == f"sqlite:///{tmp_path}/rel.db"
    with pytest.raises(ConfigError, match="does not exist"):
        check_backend_store("sqlite:///sub/rel.db", "--backend-store-uri")


@pytest.mark.slow  # a new MLflow sqlite store: its migrations take seconds
def test_a_store_with_local_artifact_folders_gets_a_notice_when_served_beyond_this_machine(tmp_path):
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(tracking_uri=store).create_experiment("made-locally", artifact_location=(tmp_path / "a").as_uri())
    with pytest.warns(GraphTuneNotice, match="'made-locally'.*local folder"):
        local_artifact_notice(store, "0.0.0.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        local_artifact_notice(store, "127.0.0.1")  # every client is on this machine: nothing to say


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.read().decode()


@pytest.fixture
def server(tmp_path):
    """A running `graphtune server` on a free port; at teardown every process it started is gone, whatever
    the test did (it may already have stopped the server, as the end-to-end test does)."""
    port = _free_port()
    (tmp_path / "store").mkdir()
    env = {**os.environ, "GIT_PYTHON_REFRESH": "quiet", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log_path = tmp_path / "server.log"
    log = log_path.open("w")
    proc = subprocess.Popen([BIN / "graphtune", "server", "--backend-store-uri",
                             f"sqlite:///{tmp_path}/store/mlflow.db", "--artifacts-destination",
                             str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    family = [psutil.Process(proc.pid)]
    try:
        deadline = time.monotonic() + 90
        while True:
            family += [p for p in family[0].children(recursive=True) if p not in family]
            try:
                if _get(f"http://127.0.0.1:{port}/health").strip() == "OK":
                    break
            except OSError:
                pass
            assert proc.poll() is None, f"the server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no answer within 90 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.25)
        family += [p for p in family[0].children(recursive=True) if p not in family]
        yield {"proc": proc, "family": family, "port": port, "url": f"http://127.0.0.1:{port}",
               "artifacts": tmp_path / "artifacts", "log": log_path}
    finally:
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family, timeout=10)
        log.close()


@pytest.mark.slow
def test_a_team_logs_to_and_reads_from_one_server(server, tmp_path):
    url = server["url"]
    client_env = {**os.environ, "MLFLOW_TRACKING_URI": url, "GIT_PYTHON_REFRESH": "quiet",
                  "MLFLOW_DISABLE_TELEMETRY": "true"}
    assert f"clients: export MLFLOW_TRACKING_URI={url}" in server["log"].read_text()

    # one member runs an experiment
    done = subprocess.run([BIN / "graphtune", "experiment", *SMALL, "--experiment-name", "shared-board", "--set",
                           f"prepare.processed_dir={tmp_path}/processed", "--output-dir", str(tmp_path / "out")],
                          cwd=REPO, env=client_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_id = re.search(r"\brun ([0-9a-f]{32})\b", done.stdout).group(1)
    config_hash = re.search(r"config ([0-9a-f]{16})\)", done.stdout).group(1)
    score = json.loads((tmp_path / "out" / "results.json").read_text())["score"]

    # another reads the board, from another process and another folder, through the same server
    (tmp_path / "elsewhere").mkdir()
    board = subprocess.run([BIN / "graphtune", "compare", "--experiment-name", "shared-board", "--params",
                            str(REPO / "params.yaml"), "--output-dir", str(tmp_path / "board")],
                           cwd=tmp_path / "elsewhere", env=client_env, capture_output=True, text=True, timeout=300)
    assert board.returncode == 0, board.stdout[-3000:] + board.stderr[-3000:]
    rows = pd.read_csv(tmp_path / "board" / "leaderboard.csv", dtype={"config_hash": str})
    ours = rows[rows["config_hash"] == config_hash]
    assert len(ours) == 1 and ours.iloc[0]["model"] == "baseline" and ours.iloc[0]["n_runs"] == 1
    assert ours.iloc[0]["score_mean"] == pytest.approx(score)

    # the artifacts went through the server into its destination: <experiment id>/<run id>/artifacts/...
    files = [p.relative_to(server["artifacts"]) for p in server["artifacts"].rglob("*") if p.is_file()]
    assert any(p.parts[1] == run_id and p.name == "results.json" for p in files), files
    assert any(p.name == "source_model.pt" and p.parts[1] != run_id for p in files), files  # the stage's checkpoint
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=10) as response:
        info = json.loads(response.read())["run"]["info"]
    assert info["status"] == "FINISHED" and info["artifact_uri"].startswith("mlflow-artifacts:/")
    assert not (tmp_path / "elsewhere" / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()

    # stopped as a supervisor would: SIGTERM to graphtune reaches MLflow and uvicorn; every process ends
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, server["log"].read_text()[-3000:]
    gone, alive = psutil.wait_procs(server["family"], timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    with pytest.raises(OSError):
        _get(f"{url}/health")
