"""MLflow tracking: the only package in GraphTune that imports mlflow.

    tags.py     the `graphtune.*` tag keys, MLflow's limits, git info, which store a URI names: no mlflow
    store.py    reading a store: run_exists, load_checkpoint, search_runs
    runs.py     writing runs: the Tracker

Run structure (what `graphtune.compare` and the MLflow UI rely on)::

    experiment run          graphtune.kind=experiment   one per (configuration, seed)
      stage run             graphtune.kind=stage        stage 0 = pretrain on the first city,
                                                        stage k = transfer to city k
        budget run          graphtune.kind=budget       one per fine-tuning budget fraction

Every run carries `graphtune.model`, `graphtune.strategy`, `graphtune.datasets` and `graphtune.seed`
tags (build them with `graphtune_tags`), and the experiment's `graphtune.config_hash`,
`graphtune.run_type` and `graphtune.score_version`; stage and budget runs add `graphtune.stage` and
`graphtune.city`, budget runs `graphtune.fraction`. Experiment runs also carry `graphtune.config`,
`graphtune.targets`, `graphtune.reference_key` and, when fine-tuned from a source, `graphtune.source`
(the TAG_* constants of tags.py). Top-level runs also get `git.commit` and `git.dirty` automatically;
`dvc.data_hashes` and `device` are passed in by the caller.

Names are imported from their module on first use (PEP 562): `from graphtune.tracking.tags import ...`
loads no mlflow, `from graphtune.tracking import Tracker` does (a few seconds).
"""

from __future__ import annotations

import importlib

_MODULES = {
    "tags": ("DEFAULT_TRACKING_URI", "DEFAULT_EXPERIMENT", "MAX_PARAM_VALUE", "MAX_TAG_VALUE", "MAX_KEY", "RUN_KINDS",
             "TAG_KIND", "TAG_MODEL", "TAG_STRATEGY", "TAG_DATASETS", "TAG_SEED", "TAG_STAGE", "TAG_CITY",
             "TAG_FRACTION", "TAG_ERROR", "TAG_CONFIG_HASH", "TAG_CONFIG", "TAG_RUN_TYPE", "TAG_SCORE_VERSION",
             "TAG_TARGETS", "TAG_REFERENCE_KEY", "TAG_SOURCE", "EXPERIMENT_KIND_TAG", "EXPERIMENT_KIND",
             "graphtune_tags", "git_info", "resolve_tracking_uri"),
    "store": ("run_exists", "load_checkpoint", "search_runs"),
    "runs": ("Tracker", "Terminated", "flatten"),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'graphtune.tracking' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
