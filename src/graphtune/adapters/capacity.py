"""How much adapter a target city gets: the pure rule `choose_capacity(diagnostics, settings) -> Capacity`.

The topology-adapter strategy measures four facts about a target city (`Diagnostics`), each turned into a
signal in [0, 1) by the saturation x / (x + ref) (0 at x = 0, one half at the reference, towards 1 above it;
the comparable score's cost shares use the same curve):

    nodes       N, the target's node count (ref adapter.ref_nodes). More nodes are more labels per window at
                the same budget and a more varied population of nodes: room and reason for more capacity.
    difficulty  GraphTune-lite's structural proxy N log(1 + mean degree) of the target graph
                (graphtune.profiling.difficulty_proxy; ref adapter.ref_difficulty). Only this half of
                profiling.graph_difficulty is used: its other half, difficulty_ha, reads the TEST split.
    error       the zero-shot error ratio: validation MAE of the transferred source model (the adapted model
                before any step, B = 0) over the validation MAE of persistence, both on the point's view of
                the target (ref 1: parity with persistence). Persistence needs no training data, so the ratio
                exists at the zero-shot point; the historical average would need training windows.
    shift       the distance between the source's and the target's node-prompt distributions
                (`prompt_distance`: spatial prompts of graphtune.data.prompts, ref adapter.ref_shift).

    need = sum_i w_i s_i / sum_i w_i in [0, 1)           (weights adapter.w_nodes, w_difficulty, w_error, w_shift;
                                                           a signal of weight 0 is neither measured nor used)

Every signal rises with its fact, so need does too. From it:

    kinds  the first k of adapter.topology_kinds that the model has, k = min(K, 1 + floor(need K)): more need
           adds layer kinds in that order (default graph, then temporal)
    rank   round(rank_min (rank_max / rank_min) ^ need), geometric between adapter.rank_min and rank_max

Then the parameter cap. The adapter parameters (A and B of every adapted layer, plus the biases adapter.bias
unfreezes) may be at most adapter.max_share of the model's node-independent parameters, which are the same for
every city; node-specific tensors only add to the model's total, so the share of ALL its parameters is lower
still. When the choice above exceeds the cap, the rule takes, among the configurations at most as large in
both rank and kinds, the one with the most adapter parameters under the cap (ties: more kinds, then higher
rank). The candidates only grow with need, so the adapter parameter count never falls as any fact rises, and
rank and kinds stay within their ranges; the tests check both on grids of every fact.

No fact reads a training window or a test reading: the graph and coordinates are part of every view, and the
validation split is what every point may use for model selection. The strategy decides once per target city,
at its zero-shot point, and keeps the decision for the city's budget points (see graphtune.adapters.strategy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from graphtune.adapters.layouts import Layer, present_kinds, select

SIGNALS = ("nodes", "difficulty", "error", "shift")


@dataclass(frozen=True)
class Diagnostics:
    """What the rule reads about one target city and the model built for it (see the module docstring)."""

    num_nodes: int
    difficulty: float | None  # difficulty_proxy of the target graph; None when its weight is 0
    error_ratio: float | None  # zero-shot val MAE / persistence val MAE; None when its weight is 0
    prompt_distance: float | None  # prompt_distance(source, target); None when its weight is 0
    layers: tuple[Layer, ...]  # the model's adaptable core layers (graphtune.adapters.layouts.core_layers)
    shared_params: int  # node-independent learnable elements of the unadapted model: the cap's basis
    bias_params: int = 0  # elements of every node-independent bias (what adapter.bias: all unfreezes)

    def value(self, signal: str) -> float | None:
        return {"nodes": float(self.num_nodes), "difficulty": self.difficulty, "error": self.error_ratio,
                "shift": self.prompt_distance}[signal]


@dataclass(frozen=True)
class CapacitySettings:
    """The rule's settings: the topology-adapter part of the `adapter:` params section."""

    rank_min: int = 1
    rank_max: int = 8
    kinds: tuple[str, ...] = ("graph", "temporal")
    max_share: float = 0.10
    bias: str = "none"
    weights: dict = field(default_factory=lambda: {"nodes": 1.0, "difficulty": 1.0, "error": 2.0, "shift": 1.0})
    refs: dict = field(default_factory=lambda: {"nodes": 100.0, "difficulty": 200.0, "error": 1.0, "shift": 0.5})

    @classmethod
    def from_config(cls, adapter) -> "CapacitySettings":
        """From an AdapterConfig (graphtune.config)."""
        return cls(rank_min=adapter.rank_min, rank_max=adapter.rank_max, kinds=tuple(adapter.topology_kinds),
                   max_share=adapter.max_share, bias=adapter.bias,
                   weights={"nodes": adapter.w_nodes, "difficulty": adapter.w_difficulty, "error": adapter.w_error,
                            "shift": adapter.w_shift},
                   refs={"nodes": adapter.ref_nodes, "difficulty": adapter.ref_difficulty, "error": 1.0,
                         "shift": adapter.ref_shift})


@dataclass(frozen=True)
class Capacity:
    """The rule's decision: the rank, the layer kinds and layers that get adapters, and why."""

    rank: int
    kinds: tuple[str, ...]
    layers: tuple[str, ...]
    need: float
    signals: dict  # signal -> value in [0, 1) (the signals of weight 0 left out)
    adapter_params: int
    share: float  # adapter_params / shared_params
    capped: bool  # the parameter cap (or a layer's width) lowered rank or kinds below what need asked for

    def as_dict(self) -> dict:
        return {"rank": self.rank, "kinds": list(self.kinds), "layers": list(self.layers), "need": self.need,
                "signals": dict(self.signals), "adapter_params": self.adapter_params, "share": self.share,
                "capped": self.capped}


def saturate(x: float, ref: float) -> float:
    """x / (x + ref) for x >= 0 (1.0 for x = inf): 0 at 0, one half at `ref`, rising towards 1."""
    if math.isnan(x) or x < 0:
        raise ValueError(f"a capacity signal must be >= 0, got {x}")
    if math.isinf(x):
        return 1.0
    return x / (x + ref)


def adapter_parameters(layers, rank: int, bias: str, bias_params: int = 0) -> int:
    """Elements the adapters of `layers` at `rank` train: A and B of each, plus the biases `bias` unfreezes
    ('adapted': those of the adapted layers; 'all': every node-independent bias, `bias_params`)."""
    count = sum(layer.lowrank_params(rank) for layer in layers)
    if bias == "adapted":
        count += sum(layer.bias for layer in layers)
    elif bias == "all":
        count += bias_params
    return count


def choose_capacity(diagnostics: Diagnostics, settings: CapacitySettings) -> Capacity:
    """The topology-adapter's rank and adapted layers for one target city (see the module docstring).

    Pure: the same diagnostics and settings always give the same Capacity. ValueError when no configuration
    fits (no layer of settings.kinds in the model, or even rank_min on the first kind is above the cap);
    the strategy's plan-time check rules both out before any run opens.
    """
    d, s = diagnostics, settings
    used = [k for k in SIGNALS if s.weights.get(k, 0.0) > 0]
    if not used:
        raise ValueError("capacity: every signal weight is 0")
    signals = {}
    for k in used:
        value = d.value(k)
        if value is None:
            raise ValueError(f"capacity: signal {k} has weight {s.weights[k]} but was not measured")
        signals[k] = saturate(float(value), float(s.refs[k]))
    need = sum(s.weights[k] * signals[k] for k in used) / sum(s.weights[k] for k in used)

    order = [k for k in s.kinds if k in present_kinds(list(d.layers))]
    if not order:
        raise ValueError(f"capacity: the model has no layer of kinds {', '.join(s.kinds)}")
    k_need = min(len(order), 1 + math.floor(need * len(order)))
    r_need = min(s.rank_max, max(s.rank_min, round(s.rank_min * (s.rank_max / s.rank_min) ** need)))

    cap = s.max_share * d.shared_params
    best = None  # (params, kinds, rank) of the largest configuration under the cap
    for k in range(1, k_need + 1):
        layers = select(list(d.layers), order[:k])
        widest = min(layer.width for layer in layers)
        for r in range(s.rank_min, min(r_need, widest) + 1):
            params = adapter_parameters(layers, r, s.bias, d.bias_params)
            if params <= cap and (best is None or (params, k, r) > best):
                best = (params, k, r)
    if best is None:
        raise ValueError(f"capacity: rank {s.rank_min} on the {order[0]} layers is above the cap of "
                         f"{s.max_share:g} x {d.shared_params} parameters")
    params, k, rank = best
    layers = select(list(d.layers), order[:k])
    return Capacity(rank=rank, kinds=tuple(order[:k]), layers=tuple(layer.name for layer in layers), need=need,
                    signals=signals, adapter_params=params, share=params / d.shared_params if d.shared_params else 0.0,
                    capped=(k, rank) != (k_need, r_need))


# ----------------------------------------------------------------------------- the prompt distance
def wasserstein_1d(u: np.ndarray, v: np.ndarray) -> float:
    """Wasserstein-1 distance between the empirical distributions of samples `u` and `v` (1-D, finite, non-empty):
    the integral of |F_u(x) - F_v(x)| over x, exact for step CDFs."""
    u, v = np.sort(np.asarray(u, dtype=np.float64)), np.sort(np.asarray(v, dtype=np.float64))
    if u.size == 0 or v.size == 0:
        raise ValueError("wasserstein_1d needs two non-empty samples")
    points = np.sort(np.concatenate([u, v]))
    steps = np.diff(points)
    cdf_u = np.searchsorted(u, points[:-1], side="right") / u.size
    cdf_v = np.searchsorted(v, points[:-1], side="right") / v.size
    return float(np.sum(np.abs(cdf_u - cdf_v) * steps))


def prompt_distance(source: np.ndarray, target: np.ndarray) -> float:
    """How far the target's node prompts lie from the source's: the mean over features of the Wasserstein-1
    distance between the two cities' distributions of that feature, in units of the source's standard deviation
    (per feature, as graphtune.data.prompts.PromptScaler fits it: on the source only).

    source (N_s, F), target (N_t, F). Non-finite entries (a node without coordinates) are left out of their
    feature; a feature with no finite value in either city is left out. 0 for identical distributions.
    """
    source, target = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(f"prompts must be (N, F) with the same F, got {source.shape} and {target.shape}")
    distances = []
    for f in range(source.shape[1]):
        u, v = source[:, f], target[:, f]
        u, v = u[np.isfinite(u)], v[np.isfinite(v)]
        if u.size == 0 or v.size == 0:
            continue
        std = u.std()
        constant = u.max() == u.min() or std <= 1e-12 * max(1.0, abs(u.mean()))
        distances.append(wasserstein_1d(u, v) / (1.0 if constant else std))  # PromptScaler's rule for a constant
    return float(np.mean(distances)) if distances else 0.0
