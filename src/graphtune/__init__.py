"""GraphTune: a reproducible benchmark and toolkit for moving sensor-graph forecasters between cities.

    from graphtune import prepare_dataset, build_model, load_partial_state, list_models, profile_model

    bundle = prepare_dataset("metr-la-west")            # the embedded real sample, no download
    model = build_model("gwnet", bundle)
    target = prepare_dataset("metr-la-east")
    report = load_partial_state(build_model("gwnet", target), model.state_dict())
    print(report.share, profile_model(model, bundle)["flops"])

Importing the package has no side effects (no logging set-up, no tracking, no file access) and is
cheap: each name below is imported from its module on first use (PEP 562), so `graphtune --help`
never loads torch, pandas or mlflow. MLflow is imported only by graphtune.tracking, when an
experiment is tracked.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

# public name -> the module that defines it
_API = {
    "ConfigError": "graphtune.errors",
    "DataError": "graphtune.errors",
    "GraphTuneError": "graphtune.errors",
    "DatasetBundle": "graphtune.data.bundle",
    "get_city": "graphtune.data.cities",
    "list_cities": "graphtune.data.cities",
    "prepare_dataset": "graphtune.data.prepare",
    "write_processed": "graphtune.data.prepare",
    "synthetic_bundle": "graphtune.data.synthetic",
    "evaluate": "graphtune.engine",
    "fit": "graphtune.engine",
    "build_model": "graphtune.models.registry",
    "list_models": "graphtune.models.registry",
    "model_defaults": "graphtune.models.registry",
    "register_model": "graphtune.models.registry",
    "load_partial_state": "graphtune.transfer.state",
    "profile_model": "graphtune.profiling",
    "comparable_score": "graphtune.transfer.score",
    "score_experiment": "graphtune.transfer.score",
    "run_experiment": "graphtune.transfer.stages",
    "register_strategy": "graphtune.transfer.strategies",
    "Strategy": "graphtune.transfer.strategies",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'graphtune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
