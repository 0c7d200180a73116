"""GraphTune: a reproducible benchmark and toolkit for moving sensor-graph forecasters between cities.

    from graphtune import prepare_dataset, build_model, load_partial_state, list_models, profile_model

    bundle = prepare_dataset("metr-la-west")            # the embedded real sample, no download
    model = build_model("gwnet", bundle)
    target = prepare_dataset("metr-la-east")
    report = load_partial_state(build_model("gwnet", target), model.state_dict())
    print(report.share, profile_model(model, bundle)["flops"])

Importing the package has no side effects (no logging set-up, no tracking, no file access);
MLflow is imported only by graphtune.tracking, when an experiment is tracked.
"""

from graphtune.data import DatasetBundle, get_city, list_cities, prepare_dataset, synthetic_bundle, write_processed
from graphtune.engine import evaluate, fit
from graphtune.errors import ConfigError, DataError, GraphTuneError
from graphtune.models import build_model, list_models, load_partial_state, model_defaults, register_model
from graphtune.profiling import profile_model
from graphtune.score import score_experiment
from graphtune.stages import run_experiment

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "DatasetBundle",
    "GraphTuneError",
    "build_model",
    "evaluate",
    "fit",
    "get_city",
    "list_cities",
    "list_models",
    "load_partial_state",
    "model_defaults",
    "prepare_dataset",
    "profile_model",
    "register_model",
    "run_experiment",
    "score_experiment",
    "synthetic_bundle",
    "write_processed",
]
