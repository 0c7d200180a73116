"""Register by name, build by name (the timm `_registry.py` pattern), with every option range-checked.

    @register_model("gwnet", options={"hidden": integer(min=1), "dropout": number(min=0, max=1, max_open=True)})
    def gwnet(bundle, *, hidden=32, dropout=0.3):   # the builder's keyword defaults ARE the model's defaults
        return GraphWaveNet(...)

    model = build_model("gwnet", bundle, hidden=64)

A builder receives the DatasetBundle of the city it is built for (node count, graph,
coordinates, steps per day, T_in/T_out, training statistics) and explicit keyword
arguments; it returns a ForecastModel (graphtune.models.base) whose forward maps
x (B, T_in, N, C) -> (B, T_out, N) in scaled units.

Every keyword option declares its check (graphtune.checks) at registration, and its default must
pass it, so `check_model_kwargs` can reject `experiment.model_kwargs` before any run opens.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from graphtune.checks import Check, boolean, mapping
from graphtune.errors import ConfigError
from graphtune.models.base import ForecastModel
from graphtune.registry import Registry


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its builder and the check of each keyword option."""

    builder: Callable[..., ForecastModel]
    options: dict[str, Check]  # the builder's own options
    seasonal: bool = True  # whether the `seasonal` option (graphtune.models.seasonal) applies to it


# Options every learnable model takes besides its builder's, handled here (never by a builder):
#   seasonal  predict a correction of each node's time-of-day profile (models.seasonal.SeasonalResidual);
#             False by default: speeds follow their history closely, hourly counts are dominated by the day
SHARED_OPTIONS: dict[str, tuple[Check, object]] = {"seasonal": (boolean(), False)}


MODELS: Registry[ModelSpec] = Registry("model", option="experiment.model", providers=("graphtune.models",))


def register_model(name: str, options: dict[str, Check] | None = None, *, seasonal: bool = True):
    """Decorator that registers `builder(bundle, **kwargs) -> ForecastModel` under `name`.

    `options` maps each keyword option of the builder to its check; None = the builder has no options.
    `seasonal`: whether the shared `seasonal` option applies (False for the reference forecasts, which are
    a profile or a copy of the input themselves). Builders cannot take a shared option's name.
    Registration fails with ValueError when an option lacks a check (or a default), a check names no
    option, or a default fails its own check: programming errors, caught when the module is imported.
    """
    options = dict(options or {})

    def decorator(builder: Callable[..., ForecastModel]):
        where = f"model {name!r} ({builder.__module__}.{builder.__qualname__})"
        params = list(inspect.signature(builder).parameters.values())[1:]  # the first one is the bundle
        for p in params:
            if p.name in SHARED_OPTIONS:
                raise ValueError(f"{where}: option {p.name!r} is shared by every model and handled by build_model")
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ValueError(f"{where}: *{p.name} cannot be checked; name every option")
            if p.default is p.empty:
                raise ValueError(f"{where}: option {p.name!r} has no default")
            if p.name not in options:
                raise ValueError(f"{where}: option {p.name!r} declares no check in register_model(options=...)")
            try:
                options[p.name](p.default, p.name)
            except ConfigError as err:
                raise ValueError(f"{where}: the default fails its own check: {err}") from None
        extra = sorted(set(options) - {p.name for p in params})
        if extra:
            raise ValueError(f"{where}: checks for option(s) the builder does not take: {', '.join(extra)}")
        MODELS.register(name, ModelSpec(builder, options, seasonal), owner=builder.__module__)
        return builder

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return MODELS.names()


def _builder(name: str) -> Callable[..., ForecastModel]:
    return MODELS.get(name).builder


def model_defaults(name: str) -> dict:
    """The default keyword arguments of model `name`: its builder's, then the shared options it takes."""
    spec = MODELS.get(name)
    params = inspect.signature(spec.builder).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    return defaults | ({k: default for k, (_, default) in SHARED_OPTIONS.items()} if spec.seasonal else {})


def model_options(name: str) -> dict[str, Check]:
    """The check of every keyword option of model `name` (each has a human `description`), shared ones included."""
    spec = MODELS.get(name)
    return dict(spec.options) | ({k: check for k, (check, _) in SHARED_OPTIONS.items()} if spec.seasonal else {})


def check_model_kwargs(name: str, kwargs, option: str = "experiment.model_kwargs") -> dict:
    """Check `kwargs` for model `name` before anything is built; returns the defaults updated with them.

    Raises ConfigError (one line) for an unknown model, an unknown option (listing the known ones), or a
    value out of its range, named `<option>.<key>`, e.g. `experiment.model_kwargs.hidden`.
    """
    checks = model_options(name)
    mapping()(kwargs, option)
    unknown = sorted(set(kwargs) - set(checks))
    if unknown:
        raise ConfigError(
            f"{option}: model {name!r} has no option(s) {', '.join(unknown)}; "
            f"its options are: {', '.join(sorted(checks)) or 'none'}"
        )
    for key, value in kwargs.items():
        checks[key](value, f"{option}.{key}")
    return {**model_defaults(name), **kwargs}


def build_model(name: str, bundle, **kwargs) -> ForecastModel:
    """Build model `name` for `bundle`'s city.

    Unknown names, unknown options and values out of range fail with check_model_kwargs's ConfigError
    before the builder runs; options are named as the params entry they come from,
    `experiment.model_kwargs.<key>`. With `seasonal=True` the built model predicts a correction of each
    node's time-of-day profile (graphtune.models.seasonal), its tensors then under `core.`.
    """
    check_model_kwargs(name, kwargs)
    seasonal = bool(kwargs.pop("seasonal", False))
    model = _builder(name)(bundle, **kwargs)
    if not isinstance(model, ForecastModel):  # the loops rely on its hooks (takes_targets, after_transfer)
        raise TypeError(f"model {name!r}: the builder returned a {type(model).__name__}, not a ForecastModel")
    if seasonal:
        from graphtune.models.seasonal import ProfileLookup, SeasonalResidual, seasonal_profile

        lookup = ProfileLookup(seasonal_profile(bundle), bundle.t_out, bundle.steps_per_day)
        model = SeasonalResidual(model, lookup)
    return model
