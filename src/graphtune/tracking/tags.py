"""The `graphtune.*` tags, MLflow's limits and which store a URI names: plain constants and pure functions,
no mlflow import (tracking/preflight.py checks a store before mlflow is loaded).

graphtune.compare reads runs by these keys without importing mlflow; graphtune.tracking.runs writes them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow 3's own default; the file store is refused
DEFAULT_EXPERIMENT = "graphtune"  # what compare.leaderboard reads by default

# MLflow's limits (mlflow.utils.validation); longer values are rejected, so we truncate first.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250

# phase: a step that builds sources (gpd collect, diffuse); compress: a `graphtune compress` run (not on the board)
RUN_KINDS = ("experiment", "stage", "budget", "phase", "compress", "series")  # series: a CSV series task run
TAG_KIND = "graphtune.kind"
TAG_MODEL = "graphtune.model"
TAG_STRATEGY = "graphtune.strategy"
TAG_DATASETS = "graphtune.datasets"
TAG_SEED = "graphtune.seed"
TAG_STAGE = "graphtune.stage"
TAG_CITY = "graphtune.city"
TAG_FRACTION = "graphtune.fraction"
TAG_ERROR = "graphtune.error"  # "TypeName: message" of the exception that ended a run FAILED/KILLED
# What groups and ranks experiment runs (graphtune.transfer.experiment writes them, graphtune.compare reads them).
TAG_CONFIG_HASH = "graphtune.config_hash"  # hash of the resolved configuration except the seed: a leaderboard row
TAG_CONFIG = "graphtune.config"  # that configuration as compact JSON (what the `differs` column is read from)
TAG_RUN_TYPE = "graphtune.run_type"  # transfer | pretrain: which board
TAG_SCORE_VERSION = "graphtune.score_version"  # runs of another score definition are not ranked together
TAG_TARGETS = "graphtune.targets"  # the cities the comparable score covers
TAG_REFERENCE_KEY = "graphtune.reference_key"  # identity of the HA / persistence reference rows a run logs
TAG_SOURCE = "graphtune.source"  # the pretrain run id or checkpoint a fine-tuning run started from
# MLflow 3's experiment type, read by its UI: "custom_model_development" opens an experiment on its runs
# (the UI's "Model training" page) instead of the GenAI overview of traces.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def graphtune_tags(
    kind: str,
    *,
    model: str,
    strategy: str,
    datasets: str | list[str] | tuple[str, ...],
    seed: int,
    stage: int | None = None,
    city: str | None = None,
    fraction: float | None = None,
) -> dict[str, str]:
    """The standard `graphtune.*` tags of one run (see the module docstring for which run gets which)."""
    if kind not in RUN_KINDS:
        raise ValueError(f"run kind must be one of {RUN_KINDS}, got {kind!r}")
    if not isinstance(datasets, str):
        datasets = ",".join(datasets)
    tags = {
        TAG_KIND: kind,
        TAG_MODEL: model,
        TAG_STRATEGY: strategy,
        TAG_DATASETS: datasets,
        TAG_SEED: str(seed),
    }
    if stage is not None:
        tags[TAG_STAGE] = str(int(stage))
    if city is not None:
        tags[TAG_CITY] = city
    if fraction is not None:
        tags[TAG_FRACTION] = repr(float(fraction))  # repr: 0.1 stays "0.1", never "0.10000000000000001"
    return tags


def git_info(path: str | os.PathLike = ".") -> dict[str, str]:
    """{"git.commit": HEAD sha or "unknown", "git.dirty": "true" | "false" | "unknown"} for `path`.

    "unknown" when `path` is not inside a git checkout, the checkout has no commit yet, or git is
    not installed. Dirty means `git status --porcelain` lists anything (untracked files included).
    """

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args],
                cwd=path,
                capture_output=True,
                text=True,
                timeout=10,  # a network filesystem can stall git; a tag is not worth waiting longer
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--verify", "HEAD")
    if not commit:
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    status = git("status", "--porcelain")
    dirty = "unknown" if status is None else str(bool(status)).lower()
    return {"git.commit": commit, "git.dirty": dirty}


def resolve_tracking_uri(tracking_uri: str | os.PathLike | None = None) -> str:
    """The store to use: the argument, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.

    A relative sqlite path is made absolute (against the current folder, now), so that the same
    store is used however the process changes folder later. A bare path ending in .db/.sqlite is
    taken as a sqlite file. MLflow's plain file store (a folder or a file: URI) is refused.
    """
    uri = str(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    if uri.startswith("sqlite:///"):
        path, _, query = uri[len("sqlite:///") :].partition("?")
        if path and path != ":memory:" and not path.startswith("/"):
            path = str(Path(path).resolve())
        return f"sqlite:///{path}" + (f"?{query}" if query else "")
    if "://" not in uri and uri != "databricks" and uri.endswith((".db", ".sqlite")):
        return f"sqlite:///{Path(uri).resolve()}"
    if ("://" not in uri and uri != "databricks") or uri.startswith("file:"):
        from graphtune.errors import ConfigError

        raise ConfigError(
            f"tracking URI {uri!r}: MLflow's plain file store is not supported; "
            "expected a database URI such as sqlite:///mlflow.db or an http(s):// server"
        )
    return uri


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a resolved sqlite URI, None for any other store or an in-memory one."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].partition("?")[0]
    return None if path in ("", ":memory:") else Path(path)
