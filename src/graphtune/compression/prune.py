"""Iterative data-free compression of a model's declared prunable groups (PA-DFCR with LBYL compensation).

    compress(model, config, settings, on_round=...)   k rounds; each round prunes every group to its
                                                       scheduled width, compensating with LBYL
    prune_group(model, group, keep, ...)               one group, one step

The criterion ranks a group's output channels by the L2 norm of their filters (for a Linear with bias
the row [w_k | b_k]; for summed producers the concatenation of their rows, with the summed bias) and keeps
the largest. The compensation (lbyl.py) is hand-written and applied to every consumer of the group; the
structural surgery (removing the channels from producers, BatchNorm and consumers) is torch-pruning's
(MIT, github.com/VainF/Torch-Pruning): its per-layer pruners rebuild each parameter at the new size.
The model's config follows every change, so a pruned model is saved as (config, state_dict) and
rebuilt strictly from its config, never unpickled (see checkpoint.py).

No data is read anywhere here: the method is data-free by construction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp

from graphtune.compression.groups import PruneGroup, get_path, set_path
from graphtune.compression.lbyl import VARIANTS, BatchNormStats, scales_bn, scales_plain
from graphtune.compression.schedule import Round, check_ratio, check_rounds, schedule, width_after
from graphtune.errors import ConfigError

METHODS = ("lbyl", "prune-only")


@dataclass(frozen=True)
class CompressSettings:
    """How to compress: the `compress:` section of params.yaml (see config.CompressConfig)."""

    ratio: float = 0.5  # C: share of each group's channels removed in total
    rounds: int = 1  # k: 1 = one-shot LBYL; PA-DFCR iterates
    method: str = "lbyl"  # lbyl | prune-only
    variant: str = "derivation"  # derivation | reference (upstream's code, see lbyl.py)
    lambda1: float = 1e-3  # weight of the BN-offset term
    lambda2: float = 1e-2  # ridge weight
    k1: float = 0.2  # lambda1 growth with the cumulative rate (rounds >= 2)
    k2: float = 0.1  # lambda2 decay with the cumulative rate (rounds >= 2)

    def check(self, option: str = "compress") -> "CompressSettings":
        check_ratio(self.ratio, f"{option}.ratio")
        check_rounds(self.rounds, f"{option}.rounds")
        if self.method not in METHODS:
            raise ConfigError(f"{option}.method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"{option}.lbyl_variant: expected one of {', '.join(VARIANTS)}, got {self.variant!r}")
        for name in ("lambda1", "lambda2", "k1", "k2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{option}.{name}: expected a number >= 0, got {value!r}")
        return self


def groups_of(model: nn.Module, what: str = "model") -> list[PruneGroup]:
    """The model's declared prunable groups; ConfigError when it declares none."""
    groups = list(model.prunable_groups()) if hasattr(model, "prunable_groups") else []
    if not groups:
        raise ConfigError(f"compress: {what} declares no prunable group (nothing can be compressed without "
                          "changing what a residual stream, recurrent cell or LayerNorm mixes)")
    return groups


def group_width(model: nn.Module, group: PruneGroup) -> int:
    return _out_channels(model.get_submodule(group.producers[0]))


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _filters(model: nn.Module, group: PruneGroup) -> tuple[np.ndarray, np.ndarray | None]:
    """(weights (n, d), summed bias (n,) or None) of the group's channels, float64."""
    weights, bias = [], None
    for name in group.producers:
        layer = model.get_submodule(name)
        if not isinstance(layer, (nn.Linear, nn.Conv2d, nn.Conv1d)):
            raise ConfigError(f"compress: group {group.name!r}: producer {name} is a {type(layer).__name__}; "
                              "expected Linear or Conv")
        w = layer.weight.detach().double().cpu()
        weights.append(w.reshape(w.shape[0], -1).numpy())
        if layer.bias is not None:
            b = layer.bias.detach().double().cpu().numpy()
            bias = b if bias is None else bias + b
    return np.concatenate(weights, axis=1), bias


def keep_indices(rows: np.ndarray, keep: int) -> np.ndarray:
    """The `keep` channels with the largest L2 row norm, in ascending index order (ties: lower index first)."""
    norms = np.linalg.norm(rows, axis=1)
    order = np.argsort(-norms, kind="stable")
    return np.sort(order[:keep])


def prune_group(model: nn.Module, group: PruneGroup, keep: int, *, method: str = "lbyl", lambda1: float = 1e-3,
                lambda2: float = 1e-2, variant: str = "derivation") -> dict:
    """Prune `group` down to `keep` channels, restoring the pruned ones' contributions (method lbyl).

    Returns {"group", "before", "after"}. keep >= the current width changes nothing (not a bit)."""
    n = group_width(model, group)
    if keep >= n:
        return {"group": group.name, "before": n, "after": n}
    if keep < 1:
        raise ConfigError(f"compress: group {group.name!r} would keep {keep} channels; at least 1 must stay")
    weights, bias = _filters(model, group)
    norm = model.get_submodule(group.norm) if group.norm else None
    if norm is None:
        rows = weights if bias is None else np.concatenate([weights, bias[:, None]], axis=1)
    else:
        rows = weights  # BN follows: a producer bias only shifts mu (folded below), the filter is the weights
    kept = keep_indices(rows, keep)
    pruned = np.setdiff1d(np.arange(n), kept)

    if method == "lbyl":
        if norm is None:
            s = scales_plain(rows, kept, pruned, lambda2, variant)
        else:
            stats = BatchNormStats.of(norm, variant)
            if bias is not None:  # BN((w x + b) - mu) = BN(w x - (mu - b)): the bias folds into the mean
                stats = BatchNormStats(stats.gamma, stats.beta, stats.mu - bias, stats.sigma)
            s = scales_bn(weights, kept, pruned, stats, lambda1, lambda2, variant)
        _merge_into_consumers(model, group, kept, pruned, s)
    elif method != "prune-only":
        raise ConfigError(f"compress.method: expected one of {', '.join(METHODS)}, got {method!r}")

    idxs = pruned.tolist()
    for name in group.producers:
        layer = model.get_submodule(name)
        (tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels)(layer, idxs)
    if norm is not None:
        tp.prune_batchnorm_out_channels(norm, idxs)
    for name in group.consumers:
        layer = model.get_submodule(name)
        (tp.prune_linear_in_channels if isinstance(layer, nn.Linear) else tp.prune_conv_in_channels)(layer, idxs)
    return {"group": group.name, "before": n, "after": keep}


@torch.no_grad()
def _merge_into_consumers(model: nn.Module, group: PruneGroup, kept: np.ndarray, pruned: np.ndarray,
                          s: np.ndarray) -> None:
    """W'[:, j] += sum_i s_ij W'[:, i] in every consumer (float64, then back to the weight's dtype)."""
    for name in group.consumers:
        layer = model.get_submodule(name)
        w = layer.weight.data
        if w.shape[1] != len(kept) + len(pruned):
            raise ConfigError(f"compress: group {group.name!r}: consumer {name} reads {w.shape[1]} channels, "
                              f"the group has {len(kept) + len(pruned)}")
        wd = w.double()
        scale = torch.as_tensor(s, dtype=torch.float64, device=w.device)  # (P, J)
        added = torch.einsum("oi...,ij->oj...", wd[:, torch.as_tensor(pruned)], scale)
        wd[:, torch.as_tensor(kept)] += added
        w.copy_(wd.to(w.dtype))


@dataclass
class RoundResult:
    """What one round did: the schedule entry, the widths after it and the time it took."""

    round: Round
    widths: dict[str, int]
    seconds: float


def compress(model: nn.Module, config: dict, settings: CompressSettings, *, groups: list[PruneGroup] | None = None,
             on_round=None) -> list[RoundResult]:
    """Compress `model` in place in settings.rounds rounds; `config` (the model's builder config) is updated
    so that it rebuilds the pruned model. `on_round(result)` is called after each round (evaluate, log)."""
    settings.check()
    groups = groups if groups is not None else groups_of(model)
    start = {g.name: group_width(model, g) for g in groups}
    for g in groups:
        declared = get_path(config, g.width)
        if declared != start[g.name]:
            raise ConfigError(f"compress: the model's config gives {g.width}={declared}, but its group {g.name!r} "
                              f"has {start[g.name]} channels")
    out = []
    for rnd in schedule(settings.ratio, settings.rounds, settings.lambda1, settings.lambda2, settings.k1,
                        settings.k2):
        began = time.perf_counter()
        widths = {}
        for g in groups:
            keep = width_after(start[g.name], settings.ratio, settings.rounds, rnd.t)
            prune_group(model, g, keep, method=settings.method, lambda1=rnd.lambda1, lambda2=rnd.lambda2,
                        variant=settings.variant)
            set_path(config, g.width, keep)
            widths[g.name] = keep
        result = RoundResult(rnd, widths, time.perf_counter() - began)
        out.append(result)
        if on_round is not None:
            on_round(result)
    return out
