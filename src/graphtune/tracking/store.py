"""The tracking store: which one (URIs), and reading it (runs, checkpoints, searches). Imports mlflow.

Stores. The default is `sqlite:///mlflow.db` (MLflow 3 refuses to open its plain file store).
For a sqlite store the artifacts live next to the database, in `<db folder>/mlartifacts/<experiment>`,
not in MLflow's default `./mlruns` of whatever folder the process happens to start in. An http(s)
URI talks to an `mlflow server`, which decides where artifacts go.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# MLflow asks GitPython for the source commit of every run; without a git executable GitPython
# would warn (or raise) on import. "quiet" keeps it silent; a caller's own setting wins.
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from graphtune.errors import ConfigError  # noqa: E402
from graphtune.tracking.tags import _sqlite_path, resolve_tracking_uri  # noqa: E402,F401  (re-exported)


def _artifact_location(uri: str, experiment_name: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a sqlite file; the server decides otherwise."""
    db = _sqlite_path(uri)
    if db is None:
        return None
    folder = re.sub(r"[^\w.\-]", "_", experiment_name)
    return (db.parent / "mlartifacts" / folder).as_uri()


@contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (start_run, search_runs) at `uri`, and back afterwards.

    mlflow.set_tracking_uri also writes $MLFLOW_TRACKING_URI; that variable is put back exactly as
    it was (or removed), so that a later Tracker() resolves the store the caller configured rather
    than whatever MLflow's global held last.
    """
    previous = mlflow.get_tracking_uri()
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


@contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """Set one environment variable (an MLflow switch read at call time) for the block only."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _new_client(uri: str) -> MlflowClient:
    with warnings.catch_warnings():
        # MLflow's sqlite store trips a SQLAlchemy deprecation warning on creation: nothing a
        # GraphTune user can act on, and shown by the CLI's "default" warning filter otherwise.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"mlflow\.")
        return MlflowClient(tracking_uri=uri)


def _is_missing(exc: MlflowException) -> bool:
    """Whether MLflow answered "no such run" (sqlite and REST stores say it in one of two ways)."""
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def _client_for_reading(tracking_uri: str | None) -> tuple[MlflowClient, str]:
    """A client on an existing store; a sqlite file that does not exist is a ConfigError, not a new store."""
    uri = resolve_tracking_uri(tracking_uri)
    db = _sqlite_path(uri)
    if db is not None and not db.is_file():
        raise ConfigError(f"tracking store {uri}: no such sqlite file {db}")
    return _new_client(uri), uri


def _client_with_run(run_id: str, tracking_uri: str | None) -> MlflowClient | None:
    """A client on the store that holds `run_id` (of any status); None when the run, or a sqlite store, does not
    exist (and no empty store is created just to look into it)."""
    db = _sqlite_path(resolve_tracking_uri(tracking_uri))
    if db is not None and not db.is_file():
        return None
    client, _ = _client_for_reading(tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException as exc:
        if _is_missing(exc):
            return None
        raise
    return client


def run_exists(run_id: str, tracking_uri: str | None = None) -> bool:
    """Whether `run_id` is a run (of any status) in the store; False if a sqlite store does not exist."""
    return _client_with_run(run_id, tracking_uri) is not None


def load_checkpoint(run_id: str, name: str = "best.pt", tracking_uri: str | None = None) -> dict:
    """Download the artifact `name` of `run_id` and torch.load it onto the CPU.

    A run id the store does not know, or a run without that artifact, is a ConfigError naming it.
    """
    import torch

    uri = resolve_tracking_uri(tracking_uri)
    client = _client_with_run(run_id, uri)
    if client is None:
        raise ConfigError(f"checkpoint run id {run_id!r}: no such run in tracking store {uri}")
    with tempfile.TemporaryDirectory() as tmp, _env("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"):
        try:
            local = client.download_artifacts(run_id, name, tmp)
        except (MlflowException, OSError):
            have = sorted(info.path for info in client.list_artifacts(run_id))
            raise ConfigError(
                f"checkpoint {name!r}: run {run_id} has no such artifact (it has: {', '.join(have) or 'none'})"
            ) from None
        # weights_only: a state dict is tensors and plain containers; never unpickle arbitrary code.
        return torch.load(local, map_location="cpu", weights_only=True)


def search_runs(
    tracking_uri: str | None = None,
    experiment_names: str | list[str] | tuple[str, ...] | None = None,
    filter_string: str = "",
    parent_run_id: str | None = None,
) -> pd.DataFrame:
    """mlflow.search_runs over the named experiments (all active ones if None) of a store.

    Columns as MLflow gives them: run_id, status, start_time, ..., "metrics.<key>",
    "params.<key>", "tags.<key>". `parent_run_id` keeps the runs nested directly under that run.
    An experiment name the store does not have is a ConfigError listing the ones it has.
    """
    client, uri = _client_for_reading(tracking_uri)
    existing = [e.name for e in client.search_experiments()]  # active experiments only
    if experiment_names is None:
        names = existing
    else:
        names = [experiment_names] if isinstance(experiment_names, str) else list(experiment_names)
        missing = [n for n in names if n not in existing]
        if missing:
            raise ConfigError(
                f"experiment {missing[0]!r}: not in tracking store {uri} (it has: {', '.join(existing) or 'none'})"
            )
    if not names:
        return pd.DataFrame()
    filters = [filter_string.strip()] if filter_string and filter_string.strip() else []
    if parent_run_id:
        filters.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    with _global_tracking_uri(uri):
        return mlflow.search_runs(
            experiment_names=names,
            filter_string=" AND ".join(filters),
            output_format="pandas",
        )


def registered_model_run(uri: str, tracking_uri: str | None = None) -> str:
    """The run that logged the registered model `models:/NAME/VERSION` (or `models:/NAME@ALIAS`).

    GraphTune logs each stage's model in the stage run, next to its checkpoint, so the run id leads to
    the checkpoint. An unknown name, version or alias is a ConfigError naming it.
    """
    body = uri[len("models:/"):]
    by_alias = "@" in body
    name, _, version = body.partition("@") if by_alias else body.rpartition("/")
    if not name or not version:
        raise ConfigError(f"--from: {uri!r} is not a registered model URI; expected models:/NAME/VERSION or "
                          "models:/NAME@ALIAS")
    client, store = _client_for_reading(tracking_uri)
    try:
        found = (client.get_model_version_by_alias(name, version) if by_alias
                 else client.get_model_version(name, version))
    except MlflowException:
        raise ConfigError(f"--from: no registered model {uri} in the tracking store {store}") from None
    if not found.run_id:
        raise ConfigError(f"--from: {uri} was not logged by a run, so it has no GraphTune checkpoint")
    return found.run_id


# ----------------------------------------------------------------------------- reading a run back (resume)
def run_record(run_id: str, tracking_uri: str | None = None) -> dict | None:
    """{"run_id", "status", "name", "experiment_id", "start_time", "tags", "metrics"} of a run; None when the
    store (a sqlite file that does not exist) or the run is not there."""
    client = _client_with_run(run_id, tracking_uri)
    if client is None:
        return None
    run = client.get_run(run_id)
    return {"run_id": run.info.run_id, "status": run.info.status, "name": run.info.run_name,
            "experiment_id": run.info.experiment_id, "start_time": run.info.start_time,
            "lifecycle": run.info.lifecycle_stage, "tags": dict(run.data.tags), "metrics": dict(run.data.metrics)}


def find_runs(filter_string: str, tracking_uri: str | None = None, experiment_name: str | None = None,
              experiment_ids: list[str] | None = None) -> list[dict]:
    """run_record()s of the active runs matching `filter_string` (MLflow's search syntax), newest first, in the
    named experiment (or the given ids); [] when the store or the experiment does not exist."""
    uri = resolve_tracking_uri(tracking_uri)
    db = _sqlite_path(uri)
    if db is not None and not db.is_file():
        return []
    client = _new_client(uri)
    if experiment_ids is None:
        experiment = client.get_experiment_by_name(experiment_name) if experiment_name else None
        if experiment is None:
            return []
        experiment_ids = [experiment.experiment_id]
    runs = client.search_runs(experiment_ids, filter_string=filter_string, order_by=["attributes.start_time DESC"],
                              max_results=10_000)
    return [{"run_id": r.info.run_id, "status": r.info.status, "name": r.info.run_name,
             "experiment_id": r.info.experiment_id, "start_time": r.info.start_time,
             "lifecycle": r.info.lifecycle_stage, "tags": dict(r.data.tags), "metrics": dict(r.data.metrics)}
            for r in runs]


def download_folder(run_id: str, path: str, dst: str | os.PathLike, tracking_uri: str | None = None) -> str | None:
    """Download the artifact folder `path` of `run_id` into `dst`; its local path, None when the run has none."""
    client = _client_with_run(run_id, tracking_uri)
    if client is None or not client.list_artifacts(run_id, path):
        return None
    with _env("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"):
        return client.download_artifacts(run_id, path, str(dst))


def set_status(run_id: str, status: str, tracking_uri: str | None = None) -> None:
    """End `run_id` with `status` (FINISHED, KILLED, ...), whatever it is now."""
    _new_client(resolve_tracking_uri(tracking_uri)).set_terminated(run_id, status)
