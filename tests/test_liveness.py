"""No stuck runs: a run whose process was SIGKILLed is ended KILLED (by `graphtune runs clean` and by the next
GraphTune start against the store); a live run, here or on another host, is never ended by mistake."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from graphtune.cli import cli
from graphtune.tracking import Tracker
from graphtune.tracking.liveness import HEARTBEAT, TAG_HOST, TAG_PID, TAG_PID_START, owner_alive, reap

HOLDER = """
import sys, time
from graphtune.tracking import Tracker
t = Tracker(sys.argv[1], "liveness")
with t.run("holder") as run_id:
    with t.run("child", nested=True):
        print(run_id, flush=True)
        time.sleep(600)
"""


def _hold_a_run(uri: str) -> tuple[subprocess.Popen, str]:
    """A process that opens a run (and a nested one) and sleeps inside them; returns it and the run id."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, uri], stdout=subprocess.PIPE, text=True)
    run_id = proc.stdout.readline().strip()
    assert run_id, "the holder process did not start its run"
    return proc, run_id


def _kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _runs(client: MlflowClient):
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_runs_clean_ends_a_killed_process_runs_and_keeps_live_ones(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    dead, dead_id = _hold_a_run(uri)
    live, live_id = _hold_a_run(uri)
    try:
        _kill9(dead)
        assert {r.info.status for r in _runs(client)} == {"RUNNING"}  # what kill -9 leaves behind
        r = CliRunner().invoke(cli, ["runs", "clean", "--tracking-uri", uri])
        assert r.exit_code == 0, r.output
        assert "2 dead run(s) ended" in r.output  # the killed holder's run and its nested run
        by_id = {run.info.run_id: run for run in _runs(client)}
        assert by_id[dead_id].info.status == "KILLED"
        assert by_id[dead_id].data.tags["graphtune.error"].startswith(f"Killed: process died: pid {dead.pid}")
        assert by_id[live_id].info.status == "RUNNING"  # its process lives
        assert HEARTBEAT in by_id[live_id].data.metrics
        assert {run.info.status for run in by_id.values() if run.data.tags[TAG_PID] == str(dead.pid)} == {"KILLED"}
    finally:
        live.kill()
        live.wait(timeout=30)


def test_the_next_start_against_the_store_ends_dead_runs_with_a_notice(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    dead, dead_id = _hold_a_run(uri)
    _kill9(dead)
    with pytest.warns(UserWarning, match=f"ended run {dead_id} KILLED \\(process died"):
        with Tracker(uri, "liveness").run("next"):
            pass
    assert MlflowClient(tracking_uri=uri).get_run(dead_id).info.status == "KILLED"


def test_another_host_is_ended_only_when_its_heartbeat_is_stale(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("elsewhere")
    now = time.time()
    fresh = client.create_run(exp, tags={TAG_HOST: "another-host", TAG_PID: "1", TAG_PID_START: "0"})
    old = client.create_run(exp, tags={TAG_HOST: "another-host", TAG_PID: "1", TAG_PID_START: "0"})
    client.log_metric(fresh.info.run_id, HEARTBEAT, now - 30)
    client.log_metric(old.info.run_id, HEARTBEAT, now - 3600)
    assert owner_alive(fresh.data.tags) is None  # not this host's to judge by pid
    assert reap(client) == []  # without --stale-after another host's runs are left alone
    ended = reap(client, stale_after_s=600, now=now)
    assert [run_id for run_id, _ in ended] == [old.info.run_id]
    assert "no heartbeat for 3600 s" in ended[0][1]
    assert client.get_run(fresh.info.run_id).info.status == "RUNNING"
    foreign = client.create_run(exp)  # a run another tool opened: no owner tags, never touched
    reap(client, stale_after_s=1, now=now + 10_000)
    assert client.get_run(foreign.info.run_id).info.status == "RUNNING"


def test_a_recycled_pid_is_not_mistaken_for_the_owner():
    from graphtune.tracking.liveness import host, process_start

    me = {TAG_HOST: host(), TAG_PID: str(os.getpid()), TAG_PID_START: f"{process_start(os.getpid()):.3f}"}
    assert owner_alive(me) is True
    assert owner_alive(me | {TAG_PID_START: f"{process_start(os.getpid()) - 3600:.3f}"}) is False
