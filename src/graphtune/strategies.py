"""Adaptation strategies: how a model built for a target city starts, and which of its weights train.

A strategy is a function `(model, source_state, same_nodes) -> TransferReport | None` registered by
name. It loads what it wants from the source state and sets `requires_grad` on the parameters that
fine-tuning may change. Later capabilities (adapters, generated parameters, compressed models) plug
in here as further strategies without touching the stage loop.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from graphtune.errors import ConfigError
from graphtune.models.transfer import TransferReport, load_partial_state

Strategy = Callable[[nn.Module, dict, bool], "TransferReport | None"]
_STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str):
    def decorator(fn: Strategy) -> Strategy:
        if name in _STRATEGIES:
            raise ValueError(f"strategy {name!r} is already registered")
        _STRATEGIES[name] = fn
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


@register_strategy("scratch")
def scratch(model: nn.Module, state: dict, same_nodes: bool) -> None:
    """No transfer: train the target model from its random initialisation (what transfer must beat)."""
    for p in model.parameters():
        p.requires_grad_(True)
    return None

