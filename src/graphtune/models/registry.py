"""Register by name, build by name (the timm `_registry.py` pattern).

    @register_model("gwnet")
    def gwnet(bundle, hidden=32, ...):   # the builder's keyword defaults ARE the model's defaults
        return GraphWaveNet(...)

    model = build_model("gwnet", bundle, hidden=64)

A builder receives the DatasetBundle of the city it is built for (node count, graph,
coordinates, steps per day, T_in/T_out, training statistics) and explicit keyword
arguments; it returns an nn.Module whose forward maps x (B, T_in, N, C) -> (B, T_out, N)
in scaled units.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch.nn as nn

from graphtune.errors import ConfigError

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator that registers `builder(bundle, **kwargs) -> nn.Module` under `name`."""

    def decorator(builder: Callable[..., nn.Module]):
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is already registered (by {_BUILDERS[name].__module__})")
        _BUILDERS[name] = builder
        builder.model_name = name
        return builder

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_BUILDERS)


def _builder(name: str) -> Callable[..., nn.Module]:
    if name not in _BUILDERS:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _BUILDERS[name]


def model_defaults(name: str) -> dict:
    """The default keyword arguments of model `name` (read from its builder's signature)."""
    params = inspect.signature(_builder(name)).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def build_model(name: str, bundle, **kwargs) -> nn.Module:
    """Build model `name` for `bundle`'s city. Unknown names or keyword arguments fail with what exists."""
    builder = _builder(name)
    known = model_defaults(name)
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ConfigError(
            f"model {name!r} has no option(s) {', '.join(unknown)}; its options are: {', '.join(sorted(known))}"
        )
    model = builder(bundle, **kwargs)
    model.model_name = name
    return model
