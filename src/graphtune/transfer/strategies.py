"""Adaptation strategies: the interface the stage loop calls at every budget point, and the built-in three.

At each point (the zero-shot point, then each budget fraction) the stage loop hands a strategy a
`StrategyContext` and fine-tunes the model it returns:

    ctx.sources        the trained source models (SourceModel: model name, options, state, city, nodes,
                       scaler), oldest first; empty for a strategy that loads nothing
    ctx.target         the target city as this point may see it (DatasetBundle.restrict): its graph,
                       coordinates, prompt window and sampled windows, nothing else of the training split
    ctx.model, ctx.model_kwargs   the registered model the run is about
    ctx.seed, ctx.device, ctx.fraction (0.0 = zero-shot)

    adapt(ctx) -> Adapted(model, report)

The model may be any ForecastModel: the one built for the target with weights loaded, a pruned one, one
wrapped with adapters. Its parameters' `requires_grad` say what fine-tuning may change. The report says
what was loaded and what was created, the trainable share and the data the point exposed.

A strategy is one class that registers itself:

    @register_strategy("my-strategy")
    class MyStrategy(Strategy):
        loads_source = True          # False: nothing from a source; the loop then runs no pretraining
        uses_prompt_window = True    # may read transfer.prompt_days of target readings at zero-shot
        def adapt(self, ctx): ...

The stage loop and the CLI look strategies up by name (`experiment.strategy`); neither changes when one
is added. Capabilities to come (generated parameters, data-free compression, adapters) add theirs here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from graphtune.data.bundle import DatasetBundle
from graphtune.errors import ConfigError
from graphtune.models import build_model
from graphtune.models.base import ForecastModel
from graphtune.registry import Registry
from graphtune.transfer.state import TransferReport, load_partial_state


@dataclass
class SourceModel:
    """A trained model a transfer starts from: its state, the nodes it was trained on and the scaling it learned in."""

    model: str
    model_kwargs: dict
    state: dict
    city: str
    sensor_ids: list[str]
    scaler: dict  # {"mean", "std"} of the data the state was trained on: the zero-shot scaler of a target
    generator: dict | None = None  # a strategy's own source artefact, e.g. gpd's trained denoiser (see below)

    def checkpoint(self) -> dict:
        out = {"model": self.model, "model_kwargs": dict(self.model_kwargs), "state": self.state,
               "city": self.city, "sensor_ids": list(self.sensor_ids), "scaler": dict(self.scaler)}
        return out | ({"generator": self.generator} if self.generator is not None else {})


@dataclass(frozen=True)
class StrategyContext:
    """Everything a strategy may use at one budget point (see the module docstring)."""

    sources: tuple[SourceModel, ...]
    target: DatasetBundle
    model: str
    model_kwargs: dict
    seed: int
    device: str
    fraction: float  # 0.0 = the zero-shot point

    @property
    def source(self) -> SourceModel:
        """The latest source model (a chain of stages passes one on); ConfigError when there is none."""
        if not self.sources:
            raise ConfigError(f"experiment.strategy: the strategy needs a source model for {self.target.name}; "
                              "none was trained or given")
        return self.sources[-1]

    @property
    def same_nodes(self) -> bool:
        """Whether the latest source was trained on exactly the target's nodes, in the same order."""
        return bool(self.sources) and list(self.source.sensor_ids) == list(self.target.sensor_ids)

    def build(self) -> ForecastModel:
        """The run's model built for the target view, from the seeded initialisation every point shares."""
        torch.manual_seed(self.seed)
        return build_model(self.model, self.target, **self.model_kwargs)


@dataclass
class StrategyReport:
    """What a strategy did at one point."""

    loaded: list[str] = field(default_factory=list)  # state entries taken from a source
    created: list[str] = field(default_factory=list)  # learnable tensors made for the target (initialised, generated)
    skipped: dict[str, str] = field(default_factory=dict)  # source entries not used, with the reason
    loaded_params: int = 0  # learnable parameter elements loaded from a source
    total_params: int = 0  # learnable parameter elements of the returned model
    trainable_params: int = 0  # of those, the ones fine-tuning may change
    extra: dict = field(default_factory=dict)  # a strategy's own account (e.g. compress: ratio, widths, time)

    @property
    def transferred(self) -> bool:
        return bool(self.loaded)

    @property
    def share(self) -> float:
        """Share of the model's learnable parameters that came from a source (1.0 for a model without any)."""
        return self.loaded_params / self.total_params if self.total_params else 1.0

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def summary(self, same_nodes: bool) -> dict:
        """The stage result's `transfer` entry."""
        return {"share": self.share, "copied": len(self.loaded), "created": len(self.created),
                "skipped": dict(self.skipped), "same_nodes": same_nodes, "transferred": self.transferred,
                "trainable_share": self.trainable_share} | dict(self.extra)


@dataclass
class Adapted:
    model: ForecastModel
    report: StrategyReport
    model_kwargs: dict | None = None  # the options that rebuild `model` when they differ from ctx.model_kwargs
    #                                   (compress: the pruned widths); the stage's checkpoint records them


class Strategy:
    """Base of every strategy: subclass, set the declarations, implement `adapt`, register it.

    A strategy whose sources are not a pretraining stage of experiment.model (gpd: node models of several
    source cities and a denoiser trained on them) sets `builds_sources` and implements the four hooks below;
    the experiment runner then calls them in order, the first three before any tracking run opens.
    """

    name: ClassVar[str] = ""
    loads_source: ClassVar[bool] = True  # False: nothing from a source, so no pretraining stage is run
    uses_prompt_window: ClassVar[bool] = True  # may read transfer.prompt_days of target readings at zero-shot
    builds_sources: ClassVar[bool] = False  # True: every city of experiment.datasets is a target, and the
    #                                         sources come from build_sources instead of stage 0
    settings_section: ClassVar[str] = ""  # the params.yaml section of the strategy's own settings (gpd, compress):
    #                                       logged and hashed only by runs that use this strategy

    def adapt(self, ctx: StrategyContext) -> Adapted:  # pragma: no cover - the interface
        raise NotImplementedError

    def source_model(self, params) -> tuple[str, dict]:
        """(model, model_kwargs) the targets are built with, replacing experiment.model (builds_sources only)."""
        raise NotImplementedError  # pragma: no cover

    def check(self, params, targets: list[str]) -> None:
        """Plan-time checks of the strategy's own settings (ConfigError naming the option); no data is read.
        Called for every strategy (for one that builds sources, only when it builds them)."""

    def settings(self, params) -> dict:
        """The strategy's settings that decide a run's numbers (part of the configuration hash)."""
        import dataclasses

        return dataclasses.asdict(getattr(params, self.settings_section)) if self.settings_section else {}

    def export(self, model):
        """The model as it is logged and served after a stage (MLflow model): the fine-tuned model itself by
        default; a strategy whose model carries training-only structure (adapters) returns the plain model."""
        return model

    def source_identity(self, params) -> str:
        """What identifies the built sources beyond params (e.g. a file's sha256), for the configuration hash."""
        return ""

    def prepare_sources(self, params, targets: list, load):
        """Load (`load(cities) -> bundles`) and check the sources' data before any run opens; returns what
        build_sources needs."""
        raise NotImplementedError  # pragma: no cover

    def build_sources(self, prepared, params, *, device: str, observer, echo) -> tuple[SourceModel, ...]:
        """The sources of the stage loop, built inside the parent run (`observer.phase` opens nested runs)."""
        raise NotImplementedError  # pragma: no cover


STRATEGIES: Registry[Strategy] = Registry("strategy", option="experiment.strategy",
                                          providers=("graphtune.transfer.strategies", "graphtune.generative.strategy",
                                                     "graphtune.compression.strategy", "graphtune.adapters"))


def register_strategy(name: str):
    """Class decorator: register one instance of a Strategy subclass under `name`."""

    def decorator(cls: type[Strategy]) -> type[Strategy]:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise TypeError(f"strategy {name!r}: register a subclass of Strategy, got {cls!r}")
        cls.name = name
        STRATEGIES.register(name, cls(), owner=cls.__module__)
        return cls

    return decorator


def get_strategy(name: str) -> Strategy:
    return STRATEGIES.get(name)


def list_strategies() -> list[str]:
    return STRATEGIES.names()


def report_for(model: ForecastModel, transfer: TransferReport | None = None) -> StrategyReport:
    """The report of a model as a strategy returns it: what `transfer` loaded, what the model has besides."""
    learnable = dict(model.named_parameters())
    loaded = list(transfer.copied) if transfer is not None else []
    return StrategyReport(
        loaded=loaded, created=[n for n in learnable if n not in set(loaded)],
        skipped=dict(transfer.skipped) if transfer is not None else {},
        loaded_params=transfer.transferred_params if transfer is not None else 0,
        total_params=sum(p.numel() for p in learnable.values()),
        trainable_params=sum(p.numel() for p in learnable.values() if p.requires_grad))


def _load_source(ctx: StrategyContext) -> tuple[ForecastModel, TransferReport]:
    """The model built for the target with every matching tensor of the latest source loaded."""
    model = ctx.build()
    transfer = load_partial_state(model, ctx.source.state, same_nodes=ctx.same_nodes)
    if transfer.copied:
        model.after_transfer()  # e.g. a seq2seq model ends its teacher-forcing curriculum (models.base)
    return model, transfer


@register_strategy("full")
class Full(Strategy):
    """Transfer every matching tensor, then fine-tune all parameters (the usual transfer baseline)."""

    def adapt(self, ctx: StrategyContext) -> Adapted:
        model, transfer = _load_source(ctx)
        for p in model.parameters():
            p.requires_grad_(True)
        return Adapted(model, report_for(model, transfer))


@register_strategy("freeze-transferred")
class FreezeTransferred(Strategy):
    """Transfer, then train only what was NOT transferred (node-specific tensors re-created for the city).

    The cheapest adaptation: the shared temporal/graph core stays frozen. A model whose every parameter
    transfers (e.g. hypernet) has nothing left to train and stays at its zero-shot weights.
    """

    def adapt(self, ctx: StrategyContext) -> Adapted:
        model, transfer = _load_source(ctx)
        copied = set(transfer.copied)
        for name, p in model.named_parameters():
            p.requires_grad_(name not in copied)
        return Adapted(model, report_for(model, transfer))


@register_strategy("scratch")
class Scratch(Strategy):
    """No transfer: train the target model from its random initialisation (what transfer must beat)."""

    loads_source = False
    uses_prompt_window = False

    def adapt(self, ctx: StrategyContext) -> Adapted:
        model = ctx.build()
        for p in model.parameters():
            p.requires_grad_(True)
        return Adapted(model, report_for(model))
