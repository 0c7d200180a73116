"""No stuck runs: who owns a RUNNING run, whether that process still lives, and ending the dead ones KILLED.

A process killed with SIGKILL (the OOM killer, a preempted node, `kill -9`) ends nothing: its MLflow runs
stay RUNNING forever and the UI shows them as live. So every run GraphTune opens records its owner,

    graphtune.host        the machine's host name
    graphtune.pid         the process id
    graphtune.pid_start   the process's start time (seconds since the epoch), so a recycled pid is not
                          mistaken for the owner

and every top-level run logs a `graphtune.heartbeat` metric (the time, every HEARTBEAT_S seconds) while
it is open. `reap(client)` then ends RUNNING runs whose owner is gone:

- owned by this host: dead when no process has that pid with that start time; ended KILLED at once;
- owned by another host: never judged by pid (it is not ours to see); ended only when `stale_after_s` is
  given and the run's last heartbeat (or its start, if none) is older than that. A live run elsewhere
  keeps beating, so it is never ended by mistake.

It runs on every GraphTune start against a store (this host's dead runs only, quickly: `Tracker.run`)
and by `graphtune runs clean [--stale-after SECONDS]`. Each ended run gets a `graphtune.error` tag with
the reason. Runs without the owner tags (opened by other tools) are never touched.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import suppress

TAG_HOST = "graphtune.host"
TAG_PID = "graphtune.pid"
TAG_PID_START = "graphtune.pid_start"
HEARTBEAT = "graphtune.heartbeat"
HEARTBEAT_S = float(os.environ.get("GRAPHTUNE_HEARTBEAT_S", "60"))  # seconds between heartbeats


def host() -> str:
    return socket.gethostname()


def process_start(pid: int) -> float | None:
    """The start time of process `pid` (seconds since the epoch), None when there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError, ValueError):
        return None


_OWNER: dict[int, dict[str, str]] = {}  # per process id: a forked child computes its own


def owner_tags() -> dict[str, str]:
    """This process's owner tags (computed once per process: every run, nested ones too, carries them)."""
    pid = os.getpid()
    if pid not in _OWNER:
        _OWNER[pid] = {TAG_HOST: host(), TAG_PID: str(pid), TAG_PID_START: f"{process_start(pid) or 0:.3f}"}
    return dict(_OWNER[pid])


def owner_alive(tags: dict) -> bool | None:
    """True/False for a run owned by this host; None when it belongs to another host (or has no owner tags)."""
    if tags.get(TAG_HOST) != host() or TAG_PID not in tags:
        return None
    try:
        pid, started = int(tags[TAG_PID]), float(tags.get(TAG_PID_START, "0"))
    except ValueError:
        return None
    actual = process_start(pid)
    return actual is not None and (started == 0 or abs(actual - started) < 1.0)


class Heartbeat:
    """A daemon thread logging `graphtune.heartbeat` = time.time() to one run every `every` seconds."""

    def __init__(self, client, run_id: str, every: float = HEARTBEAT_S):
        self.client, self.run_id, self.every = client, run_id, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"graphtune-heartbeat-{run_id[:8]}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._log()
        if self.every > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _log(self) -> None:
        from mlflow.entities import Metric

        with suppress(Exception):  # a busy or vanished store never breaks the run it watches
            now = time.time()
            self.client.log_batch(self.run_id, metrics=[Metric(HEARTBEAT, now, int(now * 1000), 0)])

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            self._log()


def _last_heartbeat(run) -> float:
    """Seconds since the epoch of the run's latest sign of life: its heartbeat metric, else its start."""
    beat = run.data.metrics.get(HEARTBEAT)
    return float(beat) if beat is not None else run.info.start_time / 1000.0


def reap(client, *, stale_after_s: float | None = None, experiment_ids: list[str] | None = None,
         now: float | None = None) -> list[tuple[str, str]]:
    """End KILLED every RUNNING GraphTune run whose owner is gone (see the module docstring).

    Returns [(run_id, reason)] of the runs ended."""
    from mlflow.entities import ViewType

    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not experiment_ids:
        return []
    now = time.time() if now is None else now
    runs = client.search_runs(experiment_ids, filter_string="attributes.status = 'RUNNING'",
                              run_view_type=ViewType.ACTIVE_ONLY, max_results=50_000)
    ended = []
    for run in runs:
        tags = run.data.tags
        if TAG_HOST not in tags:
            continue  # not ours to judge
        alive = owner_alive(tags)
        if alive is False:
            reason = f"process died: pid {tags.get(TAG_PID)} on {tags[TAG_HOST]} is gone"
        elif alive is None and stale_after_s is not None and now - _last_heartbeat(run) > stale_after_s:
            reason = (f"no heartbeat for {now - _last_heartbeat(run):.0f} s (> {stale_after_s:g} s) from pid "
                      f"{tags.get(TAG_PID)} on {tags[TAG_HOST]}")
        else:
            continue
        with suppress(Exception):
            client.set_tag(run.info.run_id, "graphtune.error", f"Killed: {reason}")
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append((run.info.run_id, reason))
    return ended
