"""Resuming an interrupted experiment (`graphtune experiment --resume RUN_ID|last`): which run, whether it may
be continued, and what it had finished.

A process killed with SIGKILL (the OOM killer, a preempted node, `kill -9`) leaves its experiment half done.
While it ran, the experiment wrote a journal into its parent run's artifacts, each entry written after the
work it records was complete:

    resume/stage<k>.pt              a finished stage: its StageResult, the id of its stage run and, when
                                    tracking.log_checkpoints is off, its trained model (otherwise the stage
                                    run's own `source_model.pt` checkpoint is reused)
    resume/stage<k>/point<i>.pt     a finished budget point of stage k: its entry, its fit's record, its
                                    measured time and memory, and the fine-tuned weights

Resuming reopens the same parent run (and the stage run that was interrupted), takes every finished stage
and budget point as recorded, and continues with the next one. Every stage and point is seeded on its own,
so on CPU the resumed results equal an uninterrupted run's (time and memory aside, which are measured
again for the work that is redone).

A run is refused, with one line, when it is finished, still alive (RUNNING with a live owner, or RUNNING on
another host: `graphtune runs clean --stale-after` ends it if its process is gone), not an experiment run,
or of another configuration or seed. A run recorded at another code commit is refused unless `--force`,
which records the override on the run (`graphtune.resume_forced`).

An entry that cannot be read (a kill in the middle of writing it) ends the journal there: what follows is
run again. Work that was in progress when the process died (its budget run, its epochs) is redone; the
budget run of the interrupted attempt stays KILLED, as it was.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import fields
from pathlib import Path

import torch

from graphtune.errors import ConfigError
from graphtune.transfer.stages import PointRecord, ResumeState, StageResult
from graphtune.transfer.strategies import SourceModel

JOURNAL = "resume"  # the artifact folder of the parent run
TAG_RESUMED = "graphtune.resumed"  # how many times the run was resumed
TAG_FORCED = "graphtune.resume_forced"  # "<recorded commit> -> <this commit>" when --force overrode a difference


def stage_entry(index: int) -> str:
    return f"{JOURNAL}/stage{index}.pt"


def point_entry(index: int, position: int) -> str:
    return f"{JOURNAL}/stage{index}/point{position}.pt"


def find_run(ref: str, *, config_hash: str, config: dict, seed: int, commit: str, force: bool,
             tracking_uri: str, experiment_name: str) -> tuple[dict, str | None]:
    """The parent run to resume (its run_record) and the forced commit override (None when the commits agree).

    ref: a run id, or "last": the newest unfinished experiment run of this configuration and seed whose
    process is gone, in `experiment_name`. Raises ConfigError (one line) when it cannot be resumed.
    """
    from graphtune.tracking.store import find_runs, run_record
    from graphtune.tracking.tags import TAG_CONFIG_HASH, TAG_KIND, TAG_SEED

    if ref == "last":
        runs = find_runs(f"tags.`{TAG_KIND}` = 'experiment' AND tags.`{TAG_CONFIG_HASH}` = '{config_hash}' "
                         f"AND tags.`{TAG_SEED}` = '{seed}' AND attributes.status != 'FINISHED'",
                         tracking_uri, experiment_name)
        runs = [r for r in runs if _liveness(r) is None]
        if not runs:
            raise ConfigError(f"--resume last: no unfinished run of this configuration ({config_hash}, seed {seed}) "
                              f"in experiment {experiment_name!r} of {tracking_uri}")
        run = runs[0]
    else:
        run = run_record(ref, tracking_uri)
        if run is None or run["lifecycle"] != "active":
            raise ConfigError(f"--resume: no run with id {ref!r} in the tracking store {tracking_uri}")
    rid = run["run_id"]
    tags = run["tags"]
    if tags.get(TAG_KIND) != "experiment":
        raise ConfigError(f"--resume: run {rid} is a {tags.get(TAG_KIND, 'non-GraphTune')} run; give the id of the "
                          "experiment (parent) run")
    if run["status"] == "FINISHED":
        raise ConfigError(f"--resume: run {rid} finished; there is nothing to resume (start a new run instead)")
    alive = _liveness(run)
    if alive:
        raise ConfigError(f"--resume: run {rid} is still running ({alive}); stop it first, or end a dead one with "
                          "graphtune runs clean --stale-after SECONDS")
    if tags.get(TAG_SEED) != str(seed):
        raise ConfigError(f"--resume: run {rid} has seed {tags.get(TAG_SEED)}, this command seed {seed}; "
                          f"pass --seed {tags.get(TAG_SEED)}")
    if tags.get(TAG_CONFIG_HASH) != config_hash:
        raise ConfigError(f"--resume: run {rid} has another configuration ({tags.get(TAG_CONFIG_HASH)}, this command "
                          f"{config_hash}; differs in {_differences(tags, config)}); resume it with the "
                          "options it was started with")
    recorded = tags.get("git.commit", "unknown")
    if recorded != commit:
        if not force:
            raise ConfigError(f"--resume: run {rid} was recorded at code commit {recorded[:12]}, this is "
                              f"{commit[:12]}; its finished stages came from other code (--force resumes anyway "
                              "and records it)")
        return run, f"{recorded} -> {commit}"
    return run, None


def _liveness(run: dict) -> str | None:
    """Why `run` counts as alive ("pid 123 on this host", "on host h"), None when its process is gone."""
    from graphtune.tracking.liveness import TAG_HOST, TAG_PID, owner_alive

    if run["status"] != "RUNNING":
        return None
    tags = run["tags"]
    alive = owner_alive(tags)
    if alive is False:
        return None
    if alive is None:
        return f"RUNNING on host {tags.get(TAG_HOST, 'unknown')}"
    return f"pid {tags.get(TAG_PID)} on this host"


def _differences(tags: dict, config: dict) -> str:
    """The top-level configuration keys in which a run's recorded configuration differs from `config`."""
    from graphtune.tracking.tags import TAG_CONFIG

    try:
        recorded = json.loads(tags.get(TAG_CONFIG, ""))
    except ValueError:
        return "an unreadable recorded configuration"
    current = json.loads(json.dumps(config, sort_keys=True, default=str))
    keys = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
    return ", ".join(keys) or "its hash only"


def load_journal(run_id: str, tracking_uri: str, *, first_stage: int, n_stages: int) -> tuple[ResumeState, dict]:
    """What run `run_id` finished (a ResumeState) and the stage run ids {stage index: run id} of its stages, from
    its journal and its nested stage runs. Stages are taken in order; the first missing or unreadable entry
    ends what is taken."""
    from graphtune.tracking import load_checkpoint
    from graphtune.tracking.store import download_folder, find_runs, run_record
    from graphtune.tracking.tags import TAG_KIND, TAG_STAGE

    state = ResumeState()
    record = run_record(run_id, tracking_uri)
    stage_runs = {}
    for child in reversed(find_runs(f"tags.`mlflow.parentRunId` = '{run_id}' AND tags.`{TAG_KIND}` = 'stage'",
                                    tracking_uri, experiment_ids=[record["experiment_id"]])):
        stage_runs[int(child["tags"][TAG_STAGE])] = child["run_id"]  # oldest first: the newest attempt wins
    with tempfile.TemporaryDirectory() as tmp:
        local = download_folder(run_id, JOURNAL, tmp, tracking_uri)
        folder = Path(local) if local else Path(tmp) / "none"
        for index in range(first_stage, n_stages):
            entry = _read(folder / f"stage{index}.pt")
            if entry is None:
                points = []
                for position in range(10_000):
                    data = _read(folder / f"stage{index}" / f"point{position}.pt")
                    if data is None:
                        break
                    points.append(PointRecord.from_payload(data))
                if points:
                    state.points[index] = points
                break
            result = _stage_result(entry["result"])
            stage_run = entry.get("stage_run") or stage_runs.get(index)
            checkpoint = entry.get("source")
            if checkpoint is None:  # the stage run's own checkpoint (tracking.log_checkpoints)
                from graphtune.transfer.experiment import CHECKPOINT

                checkpoint = load_checkpoint(stage_run, CHECKPOINT, tracking_uri=tracking_uri)
            state.stages[index] = (result, SourceModel(**checkpoint))
            if stage_run:
                stage_runs[index] = stage_run
    return state, stage_runs


def _read(path: Path) -> dict | None:
    """A journal entry, None when it is absent or cut short (a kill while it was written)."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (a truncated file is an entry that was never finished)
        return None
    return data if isinstance(data, dict) else None


def _stage_result(data: dict) -> StageResult:
    names = {f.name for f in fields(StageResult)}
    return StageResult(**{k: v for k, v in data.items() if k in names})
