"""Forecasting models, registered by name. Importing this package registers every model module."""

from graphtune.models import baseline, bigst, dcrnn, dgcrn, gwnet, hypernet  # noqa: F401  (registration)
from graphtune.models.registry import (build_model, check_model_kwargs, list_models, model_defaults, model_options,
                                       register_model)
from graphtune.models.transfer import TransferReport, load_partial_state, transferable_share

__all__ = [
    "register_model",
    "build_model",
    "list_models",
    "model_defaults",
    "model_options",
    "check_model_kwargs",
    "load_partial_state",
    "transferable_share",
    "TransferReport",
]
