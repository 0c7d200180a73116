"""Forecasting models, registered by name. Importing this package registers every model module in it:
a new model is one file here that ends in its @register_model builder."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):  # each model file registers itself on import
    importlib.import_module(f"{__name__}.{_module.name}")
from graphtune.models.registry import (build_model, check_model_kwargs, list_models, model_defaults, model_options,
                                       register_model)

__all__ = [
    "register_model",
    "build_model",
    "list_models",
    "model_defaults",
    "model_options",
    "check_model_kwargs",
]
