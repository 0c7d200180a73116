"""GraphTune: a reproducible benchmark and toolkit for moving sensor-graph forecasters between cities.

    from graphtune import prepare_dataset, build_model, load_partial_state, list_models, profile_model

Importing the package has no side effects (no logging set-up, no tracking, no file access).
"""

from graphtune.data import DatasetBundle, prepare_dataset, synthetic_bundle, write_processed
from graphtune.errors import ConfigError, DataError, GraphTuneError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "DatasetBundle",
    "GraphTuneError",
    "prepare_dataset",
    "synthetic_bundle",
    "write_processed",
]
