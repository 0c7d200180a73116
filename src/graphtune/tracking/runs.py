"""Writing runs: the Tracker (nested runs, statuses, batched params/metrics/tags, artifacts). Imports mlflow.

Nested runs are in-process (`mlflow.start_run(nested=True)`), each started in the parent's
experiment. Params, metrics and tags go through `MlflowClient.log_batch` against the run's id: one
call per dict instead of one per value (100 metrics on a sqlite store: 0.09 s batched, 2.9 s
one call each, as each call is a committed transaction).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

from graphtune.tracking.store import (_artifact_location, _env, _global_tracking_uri, _new_client, _sqlite_path,
                                      load_checkpoint, resolve_tracking_uri)
from graphtune.tracking.tags import (DEFAULT_EXPERIMENT, EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, MAX_KEY, MAX_PARAM_VALUE,
                                     MAX_TAG_VALUE, TAG_ERROR, git_info)

import mlflow  # noqa: E402  (after graphtune.tracking.store, which sets GIT_PYTHON_REFRESH first)
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunStatus, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.environment_variables import MLFLOW_RUN_ID  # noqa: E402

from graphtune.errors import ConfigError, GraphTuneNotice  # noqa: E402
from graphtune.tracking.liveness import Heartbeat, owner_tags, reap  # noqa: E402

# Characters MLflow accepts in param/metric keys on every OS (colons only outside Windows).
_BAD_KEY_CHARS = re.compile(r"[^\w./\- ]")


class Terminated(SystemExit):
    """SIGTERM arrived during a tracked run (a `timeout`, a CI cancel, `kill`).

    Raised from the signal handler that the outermost Tracker.run installs (when the process has
    no SIGTERM handler of its own), so the stack unwinds, every open run ends KILLED, and the
    process then exits with the conventional code 128 + 15 = 143, as it would have without us.
    """

    def __str__(self) -> str:
        return f"SIGTERM (exit code {self.code})"


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)


def flatten(d: Mapping, prefix: str = "") -> dict:
    """Nested mappings (and dataclass instances) -> one flat dict with "."-joined keys.

    flatten({"model": {"hidden": 32, "k": [1, 2]}, "lr": 0.01})
    == {"model.hidden": 32, "model.k": [1, 2], "lr": 0.01}

    Leaves (lists included) are kept as they are; an empty mapping stays a leaf ({}), so that a
    section that is present but empty is still visible among the params.
    """
    flat: dict = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def _key(key: Any) -> str:
    """A key MLflow accepts: forbidden characters -> "_", at most MLflow's key length."""
    return _BAD_KEY_CHARS.sub("_", str(key))[:MAX_KEY]


def _json_default(obj: Any) -> Any:
    """json.dumps fallback for the values a training loop produces (numpy, torch, paths, dataclasses)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    return str(obj)


def _to_text(value: Any, limit: int, json_containers: bool = False) -> str:
    """A param/tag value as MLflow stores it: str(value) truncated to MLflow's limit.

    json_containers: mappings and lists as compact JSON instead (tags such as dvc.data_hashes,
    which tools read back); params keep str(), e.g. "[0.1, 0.5]", as they are read by people.
    """
    if json_containers and isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, default=_json_default, separators=(",", ":"))[:limit]
    return str(value)[:limit]


def _to_float(key: str, value: Any) -> float | None:
    """A metric value as a float; None for a missing (None) value, which is not logged.

    Every non-finite value (NaN, inf, -inf) becomes NaN and is logged as NaN: a metric with nothing
    to measure or a diverged loss is a result worth seeing, and MLflow's SQL stores keep NaN as NaN
    but write inf as +/-1.797e308 (float max), which then reads back as a real number. Anything that
    is not a number (a string, a tensor with more than one element) is a bug in the caller and raises.
    """
    if value is None:
        return None
    try:
        number = float(value)  # bool, int, numpy scalar, 0-d / 1-element tensor
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r}: expected a number, got {type(value).__name__} {value!r}") from None
    return number if math.isfinite(number) else math.nan


def _now_ms() -> int:
    return int(time.time() * 1000)


@contextmanager
def _noop() -> Iterator[None]:
    yield


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into a Terminated exception for the block (main thread, default handler only)."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Tracker:
    """Runs, params, metrics and artifacts of one experiment, in one MLflow store.

        tracker = Tracker()                        # sqlite:///mlflow.db unless $MLFLOW_TRACKING_URI
        with tracker.run("gwnet-finetune-s0", tags=graphtune_tags("experiment", ...), params=cfg):
            with tracker.run("stage1-pems-bay", nested=True, tags=...):
                tracker.log_history(history, prefix="train/")
            tracker.log_metrics({"S_uep": 0.71})

    Logging methods write to the innermost run opened by this tracker and raise RuntimeError
    outside any run (`log_metrics_to` takes an explicit run id instead).

    tracking_uri     None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (see resolve_tracking_uri).
    experiment_name  created on first use; one experiment for all runs, so the leaderboard sees them.
    system_metrics   MLflow's sampler on top-level runs (a thread reading psutil/pynvml every 10 s,
                     or $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL); off by default because the
                     experiment already measures its own time and peak memory.
    enabled          False: every method does nothing and `run` yields None, so library code can
                     take a tracker unconditionally; nothing is read or written.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str = DEFAULT_EXPERIMENT,
        system_metrics: bool = False,
        enabled: bool = True,
    ) -> None:
        if enabled and not experiment_name:
            raise ConfigError("tracking experiment name: expected a non-empty string")
        self.enabled = enabled
        # Resolved now (a relative sqlite path is pinned to today's folder); a disabled tracker
        # never touches a store, so a bad URI only matters if it is ever used to load something.
        self.tracking_uri = resolve_tracking_uri(tracking_uri) if enabled else tracking_uri
        self.experiment_name = experiment_name
        self.system_metrics = system_metrics
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._run_ids: list[str] = []  # innermost last
        self._reaped = False  # this host's dead runs are ended once per Tracker, at its first run

    # -- store ---------------------------------------------------------------------------------

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            db = _sqlite_path(self.tracking_uri)
            if db is None:
                self._client = _new_client(self.tracking_uri)
            else:
                db.parent.mkdir(parents=True, exist_ok=True)  # sqlite creates the file, not its folder
                # A new store's tables are created (migrated) on first use; two processes doing it at once
                # collide and one fails. One at a time: an flock on the database's folder while the store opens.
                import fcntl

                fd = os.open(db.parent, os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    client = _new_client(self.tracking_uri)
                    client.get_experiment_by_name(DEFAULT_EXPERIMENT)  # opens the store: tables exist after this
                    self._client = client
                finally:
                    os.close(fd)
        return self._client

    @property
    def active_run_id(self) -> str | None:
        """The innermost run this tracker has open, None outside any run (or when disabled)."""
        return self._run_ids[-1] if self._run_ids else None

    def experiment_id(self) -> str:
        """The id of `experiment_name`, created on first use (artifacts beside a sqlite store).

        The experiment is tagged as a model-training one (EXPERIMENT_KIND_TAG), MLflow's documented experiment
        type; a kind the user chose in the UI is kept. (MLflow 3.17's UI still opens on its GenAI/Model training
        switch: see the README.) Once a run tree is open, this is the experiment of its outermost run, which
        `mlflow run` (MLFLOW_RUN_ID) or an enclosing run may have placed elsewhere: the whole tree stays in one.
        """
        if self._experiment_id is not None:
            return self._experiment_id
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            try:
                self._experiment_id = self.client.create_experiment(
                    self.experiment_name,
                    artifact_location=_artifact_location(self.tracking_uri, self.experiment_name),
                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
                )
                return self._experiment_id
            except MlflowException:
                # Another process created it between our lookup and our create.
                experiment = self.client.get_experiment_by_name(self.experiment_name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage != "active":
            raise ConfigError(
                f"tracking experiment {self.experiment_name!r} is deleted in {self.tracking_uri}; "
                "restore it (mlflow experiments restore) or choose another experiment name"
            )
        self._tag_kind(experiment)
        self._experiment_id = experiment.experiment_id
        return self._experiment_id

    def _tag_kind(self, experiment) -> None:
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # e.g. created by `mlflow run` before we opened it
            self.client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)

    def _tree_experiment(self, first: bool, nested: bool) -> str | None:
        """The experiment a new run goes in: its tree's. A tree's first run resumed from MLFLOW_RUN_ID (as
        `mlflow run` starts one) or nested under someone else's active run is in that run's experiment (None:
        MLflow resumes the run where it is); otherwise in `experiment_name`'s."""
        if not first:
            return self._experiment_id
        enclosing = mlflow.active_run() if nested else None
        if enclosing is not None:
            return enclosing.info.experiment_id
        if not nested and MLFLOW_RUN_ID.get():
            return None
        return self.experiment_id()

    def _current(self, what: str) -> str:
        if not self._run_ids:
            raise RuntimeError(f"Tracker.{what} called outside Tracker.run")
        return self._run_ids[-1]

    # -- runs ----------------------------------------------------------------------------------

    @contextmanager
    def run(
        self,
        name: str,
        *,
        tags: dict | None = None,
        params: dict | None = None,
        nested: bool = False,
        description: str | None = None,
        resume: str | None = None,
    ) -> Iterator[str | None]:
        """Open a run (nested under this tracker's current run if `nested`) and yield its id.

        resume: the id of an existing, ended run to continue instead of opening a new one (`experiment
        --resume`): it is set RUNNING again in its own experiment, takes this process's owner tags (so the
        reaper judges the live process, not the dead one) and `tags`; its earlier `graphtune.error` is
        removed. `params` are not logged again (MLflow params are immutable; the run already has them).

        The run ends FINISHED when the block completes, FAILED when an exception leaves it,
        KILLED on KeyboardInterrupt or SIGTERM (turned into `Terminated` while this tracker has a
        run open, unless the process handles SIGTERM itself); the exception propagates, and a
        `graphtune.error` tag records it. Any run opened inside this one and left open is ended
        with the same status first, so no run is ever left RUNNING.

        A top-level (not nested) run gets the `git.*` tags (the caller's tags win) and, with
        `system_metrics`, MLflow's CPU/memory/GPU sampling. A nested run opened while this tracker
        has none open nests under MLflow's active run, if any.
        """
        if not self.enabled:
            yield None
            return
        first = not self._run_ids  # this tracker's first open run (it may still nest under another's)
        if not nested and not first:
            raise RuntimeError(f"Tracker.run({name!r}) inside the open run {self._run_ids[-1]}: pass nested=True")
        # The code version belongs on top-level runs; nested ones inherit it through their parent.
        all_tags = {} if nested else dict(git_info(Path(__file__).resolve().parent))
        all_tags.update(owner_tags())  # host, pid, pid start: `graphtune runs clean` can tell a dead owner
        all_tags.update(tags or {})
        all_tags = {_key(k): _to_text(v, MAX_TAG_VALUE, json_containers=True) for k, v in all_tags.items()}

        with ExitStack() as scope:
            if first:  # for the whole tree of runs: MLflow's fluent API on our store, SIGTERM unwinds
                scope.enter_context(_global_tracking_uri(self.tracking_uri))
                scope.enter_context(_sigterm_unwinds())
                if not self._reaped:  # runs left RUNNING by a dead process of this host end KILLED first
                    self._reaped = True
                    for dead, reason in reap(self.client):
                        warnings.warn(f"tracking: ended run {dead} KILLED ({reason})", GraphTuneNotice,
                                      stacklevel=3)
            if resume is not None:
                with suppress(MlflowException):  # the error of the attempt that ended it no longer holds
                    self.client.delete_tag(resume, TAG_ERROR)
            active = mlflow.start_run(
                run_id=resume,
                # nested runs would otherwise land in "0"; a resumed run stays in its own experiment
                experiment_id=None if resume else self._tree_experiment(first, nested),
                run_name=name,
                nested=nested,
                tags=all_tags,
                description=description,
                # True: on for this run; None: MLflow's own env switch decides; nested runs never
                # sample (the parent's monitor already covers the whole process).
                log_system_metrics=False if nested else (True if self.system_metrics else None),
            )
            run_id = active.info.run_id
            beat = Heartbeat(self.client, run_id).__enter__() if first else None  # top-level runs beat
            if first and active.info.experiment_id != self._experiment_id:  # adopted: tag it as ours would be
                self._experiment_id = active.info.experiment_id
                self._tag_kind(self.client.get_experiment(self._experiment_id))
            self._run_ids.append(run_id)
            status = RunStatus.FINISHED
            try:
                if params and resume is None:
                    self.log_params(params)
                yield run_id
            except (KeyboardInterrupt, Terminated) as exc:
                status = RunStatus.KILLED
                self._record_error(run_id, exc)
                raise
            except BaseException as exc:
                status = RunStatus.FAILED
                self._record_error(run_id, exc)
                raise
            finally:
                if beat is not None:
                    beat.__exit__(None, None, None)  # no beat after the run has ended
                self._run_ids.pop()
                self._end(run_id, RunStatus.to_string(status))

    def _record_error(self, run_id: str, exc: BaseException) -> None:
        message = str(exc).strip().splitlines()
        text = type(exc).__name__ + (f": {message[0]}" if message else "")
        # Never let a failure to write the tag (store gone) hide the exception being raised.
        with suppress(Exception):
            self.client.set_tag(run_id, TAG_ERROR, text[:MAX_TAG_VALUE])

    def _end(self, run_id: str, status: str) -> None:
        """End `run_id` with `status`, ending first any run opened inside it and left open."""
        if self.client.get_run(run_id).info.status != "RUNNING":
            return  # someone ended it already (mlflow.end_run in user code); keep their status
        # Our run is still RUNNING, so it is still on MLflow's active-run stack, and whatever lies
        # above it there was started after it: end those first, with the same status.
        # Against a server MLflow prints two "View run ... at <url>" lines per ended run: keep
        # them for top-level runs only (one link per experiment, not one per stage and budget).
        nested = bool(self._run_ids)
        with _env("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true") if nested else _noop():
            while (active := mlflow.active_run()) is not None and active.info.run_id != run_id:
                mlflow.end_run(status)
            if mlflow.active_run() is not None:
                mlflow.end_run(status)
            else:
                self.client.set_terminated(run_id, status)

    # -- logging -------------------------------------------------------------------------------

    def log_params(self, params: dict) -> None:
        """Log a (nested) dict as params: keys "."-joined, values stringified and truncated; one batch."""
        if not self.enabled:
            return
        run_id = self._current("log_params")
        entries = [Param(_key(k), _to_text(v, MAX_PARAM_VALUE)) for k, v in flatten(params).items()]
        self.client.log_batch(run_id, params=entries)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Log a (nested) dict of numbers at `step` (0 if None); None is skipped, NaN and inf are logged as NaN."""
        if not self.enabled:
            return
        run_id = self._current("log_metrics")
        # log_batch chunks itself into MLflow's limit of 1000 metrics per request.
        self.client.log_batch(run_id, metrics=self._metric_entries(metrics, step))

    def log_metrics_to(self, run_id: str | None, metrics: dict, step: int | None = None) -> None:
        """log_metrics into a given run of this store, open or already ended (e.g. a stage run whose
        final score needs every later stage). None as run id (from a disabled tracker) does nothing."""
        if not self.enabled or run_id is None:
            return
        self.client.log_batch(run_id, metrics=self._metric_entries(metrics, step))

    def _metric_entries(self, metrics: dict, step: int | None) -> list[Metric]:
        timestamp = _now_ms()
        entries = []
        for key, value in flatten(metrics).items():
            number = _to_float(key, value)
            if number is not None:
                entries.append(Metric(_key(key), number, timestamp, int(step or 0)))
        return entries

    def log_steps(self, rows) -> None:
        """(step, metrics dict) pairs -> metrics at their steps, all in one batch (one store transaction)."""
        if not self.enabled:
            return
        run_id = self._current("log_steps")
        self.client.log_batch(run_id, metrics=[m for step, metrics in rows for m in self._metric_entries(metrics, step)])

    def log_history(self, history: list[dict], prefix: str = "") -> None:
        """Per-epoch dicts -> metrics with step = the row's "epoch" (else its index), all in one batch.

        log_history([{"epoch": 0, "loss": 0.9}, {"epoch": 1, "loss": 0.7}], prefix="train/")
        logs train/loss at steps 0 and 1.
        """
        self.log_steps((int(row.get("epoch", index)), {f"{prefix}{k}": v for k, v in row.items() if k != "epoch"})
                       for index, row in enumerate(history))

    def set_tags(self, tags: dict) -> None:
        """Set tags on the current run; mappings and lists are stored as compact JSON."""
        if not self.enabled:
            return
        run_id = self._current("set_tags")
        entries = [RunTag(_key(k), _to_text(v, MAX_TAG_VALUE, json_containers=True)) for k, v in tags.items()]
        self.client.log_batch(run_id, tags=entries)

    def log_dict(self, obj: Any, artifact_file: str, *, run_id: str | None = None) -> None:
        """Write `obj` as an artifact: YAML for a .yaml/.yml name, indented JSON otherwise (into `run_id`,
        open or ended, when given; else the current run)."""
        if not self.enabled:
            return
        run_id = run_id or self._current("log_dict")
        text = json.dumps(obj, indent=2, default=_json_default)
        if artifact_file.endswith((".yaml", ".yml")):
            import yaml

            text = yaml.safe_dump(json.loads(text), sort_keys=False)
        self.client.log_text(run_id, text, artifact_file)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None, *,
                     run_id: str | None = None) -> None:
        """Copy a file (or a folder's contents) into the artifacts of `run_id` (default: the current run),
        under `artifact_path`."""
        if not self.enabled:
            return
        run_id = run_id or self._current("log_artifact")
        local = Path(path)
        if local.is_dir():
            self.client.log_artifacts(run_id, str(local), artifact_path)
        elif local.is_file():
            self.client.log_artifact(run_id, str(local), artifact_path)
        else:
            raise FileNotFoundError(f"artifact to log does not exist: {local}")

    def log_figure(self, fig: Any, artifact_file: str) -> None:
        """Save a matplotlib figure as a PNG artifact (`artifact_file` may contain folders)."""
        if not self.enabled:
            return
        if not artifact_file.endswith(".png"):
            raise ValueError(f"log_figure writes PNG files; got artifact name {artifact_file!r}")
        folder, _, filename = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / filename
            fig.savefig(local, format="png", dpi=120, bbox_inches="tight")  # as plots.DPI: sharp, 15-40 kB
            self.log_artifact(local, folder or None)

    def log_checkpoint(self, state_dict: dict, name: str = "best.pt", *, run_id: str | None = None) -> None:
        """torch.save `state_dict` and log it as the artifact `name` (read back with load_checkpoint) of `run_id`
        (default: the current run)."""
        if not self.enabled:
            return
        import torch

        folder, _, filename = name.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / filename
            torch.save(state_dict, local)
            self.log_artifact(local, folder or None, run_id=run_id)

    def log_dataset(self, name: str, uri: str, digest: str, context: str) -> None:
        """Record a dataset the current run used as an MLflow dataset input (the UI's Dataset column): its name,
        where it lives, a digest of its contents and the context (e.g. "source", "target", "training")."""
        if not self.enabled:
            return
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        dataset = MetaDataset(LocalArtifactDatasetSource(uri), name=name, digest=digest)._to_mlflow_entity()
        self.client.log_inputs(self._current("log_dataset"), datasets=[
            DatasetInput(dataset=dataset, tags=[InputTag(key="mlflow.data.context", value=context)])])

    def log_model(self, model, example_inputs, name: str = "model") -> str | None:
        """Log `model` as an MLflow PyTorch model in the current run, with a signature inferred from
        `example_inputs` and its output; returns its models:/ URI (it can then be registered).

        Pickle serialisation: the models' forward passes have data-dependent steps (scheduled sampling) that
        torch.export's "pt2" format cannot trace; loading needs graphtune installed, like any pickled module.
        """
        if not self.enabled:
            return None
        self._current("log_model")  # never a run-less model in MLflow's global store
        import logging

        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        was_training = model.training
        model.eval()
        with torch.no_grad():
            output = model(example_inputs)
        model.train(was_training)
        signature = infer_signature(example_inputs.detach().cpu().numpy(), output.detach().cpu().numpy())
        logger = logging.getLogger("mlflow.pytorch")
        level = logger.level
        logger.setLevel(logging.ERROR)  # its pickle advice is about loading untrusted files, not ours
        try:
            info = mlflow.pytorch.log_model(model, name=name, signature=signature, serialization_format="pickle",
                                            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        finally:
            logger.setLevel(level)
        return info.model_uri

    def load_checkpoint(self, run_id: str, name: str = "best.pt") -> dict:
        """The checkpoint `name` of `run_id` in this tracker's store (works when disabled too)."""
        return load_checkpoint(run_id, name, tracking_uri=self.tracking_uri)
