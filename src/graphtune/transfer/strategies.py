"""Adaptation strategies: how a model built for a target city starts, and which of its weights train.

A strategy is registered by name with what it declares about the data and the source:

    @register_strategy("full")                    # loads_source=True, uses_prompt_window=True by default
    def full(model, source_state, same_nodes) -> TransferReport | None: ...

- `apply(model, source_state, same_nodes)` loads what it wants from the source state (None when the
  strategy loads nothing) and sets `requires_grad` on the parameters fine-tuning may change.
- `loads_source`: False for a strategy that takes nothing from the source (scratch). The stage loop
  then skips pretraining, and the comparable score gives its zero-shot point no credit.
- `uses_prompt_window`: the strategy may read the target's unlabelled prompt window
  (`transfer.prompt_days` of readings) at zero-shot, for node prompts and the scaler.

Later capabilities (adapters, generated parameters, compressed models) plug in here as further
strategies without touching the stage loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from graphtune.errors import ConfigError
from graphtune.transfer.state import TransferReport, load_partial_state

Apply = Callable[[nn.Module, dict, bool], "TransferReport | None"]


@dataclass(frozen=True)
class Strategy:
    name: str
    apply: Apply
    loads_source: bool = True  # False: nothing comes from the source, so no pretraining stage is run
    uses_prompt_window: bool = True  # may read transfer.prompt_days of target readings at zero-shot
    description: str = ""


_STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str, *, loads_source: bool = True, uses_prompt_window: bool = True):
    def decorator(fn: Apply) -> Apply:
        if name in _STRATEGIES:
            raise ValueError(f"strategy {name!r} is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        _STRATEGIES[name] = Strategy(name, fn, loads_source, uses_prompt_window, doc[0] if doc else "")
        return fn

    return decorator


def list_strategies() -> list[str]:
    return sorted(_STRATEGIES)


def get_strategy(name: str) -> Strategy:
    if name not in _STRATEGIES:
        raise ConfigError(f"experiment.strategy: unknown strategy {name!r}; known: {', '.join(list_strategies())}")
    return _STRATEGIES[name]


@register_strategy("full")
def full(model: nn.Module, state: dict, same_nodes: bool) -> TransferReport:
    """Transfer every matching tensor, then fine-tune all parameters (the usual transfer baseline)."""
    report = load_partial_state(model, state, same_nodes=same_nodes)
    for p in model.parameters():
        p.requires_grad_(True)
    return report


@register_strategy("freeze-transferred")
def freeze_transferred(model: nn.Module, state: dict, same_nodes: bool) -> TransferReport:
    """Transfer, then train only what was NOT transferred (node-specific tensors re-created for the city).

    The cheapest adaptation: the shared temporal/graph core stays frozen. A model whose every parameter
    transfers (e.g. hypernet) has nothing left to train and stays at its zero-shot weights.
    """
    report = load_partial_state(model, state, same_nodes=same_nodes)
    copied = set(report.copied)
    for name, p in model.named_parameters():
        p.requires_grad_(name not in copied)
    return report


@register_strategy("scratch", loads_source=False, uses_prompt_window=False)
def scratch(model: nn.Module, state: dict | None, same_nodes: bool) -> None:
    """No transfer: train the target model from its random initialisation (what transfer must beat)."""
    for p in model.parameters():
        p.requires_grad_(True)
    return None
