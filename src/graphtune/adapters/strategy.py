"""The transfer strategies `adapter` and `topology-adapter`: frozen source weights plus low-rank adapters.

At every budget point both strategies build experiment.model for the target, load the latest source's weights
as `full` does (node-specific tensors re-created for the target graph), and then:

    frozen     every parameter that came from the source
    adapters   a LowRankAdapter (graphtune.adapters.lowrank) on each chosen core layer whose weight came from
               the source; B starts at zero, so the zero-shot point is the source model itself
    trained    the adapters' A and B, the tensors the transfer re-created (node embeddings; what did not load),
               the seasonal wrapper's gate (reset for the target), and the biases adapter.bias names

`adapter` puts rank adapter.rank on the layer kinds of adapter.targets. `topology-adapter` chooses the rank and
the kinds per target city with graphtune.adapters.capacity.choose_capacity, from facts measured at the city's
zero-shot point: its node count, its graph's difficulty proxy, the zero-shot validation error of the source
model relative to persistence's, and the distance between its node prompts and the source city's (spatial
prompts: graph and coordinates). None of them reads a training window or a test reading. The decision is kept
for the city's budget points, so every point of a stage trains the same adapters: the stage's profiled
parameter count, taken at the zero-shot point, is then the count every point trained. A point that finds no
decision (a stage without a zero-shot point) decides from its own view: the same facts, its scaler fitted on
its windows.

What the stage loop sees. The adapted model's `state_dict()` holds the merged weights under the original names
(see lowrank.py), so the stage's checkpoint (`_cpu_state`), the next stage's source and `finetune --from` hold a
plain model's state; evaluation runs without gradients, on the merged weights, so it computes what the plain
merged model computes (tested) and costs the plain model's FLOPs. The MLflow model a tracked stage logs is the
adapted module itself (it pickles the module it fine-tuned); `graphtune.adapters.merge` turns it into the plain one.

Before any run opens, `check` builds the model on a small synthetic graph and rejects, in one line naming the
option: a model without an adapter layout, a kind the model does not have, a rank above an adapted layer's
width (naming the layer and its width), a rank range upside down, and adapters above adapter.max_share. A rank
below 1 is rejected when params are loaded. `adapt` repeats the checks on the model built for the city.
"""

from __future__ import annotations

import copy
import hashlib
import math

import numpy as np
import torch
import torch.nn as nn

from graphtune.adapters.capacity import (CapacitySettings, Diagnostics, adapter_parameters,
                                         choose_capacity, prompt_distance)
from graphtune.adapters.layouts import (WRAPPER_TRAINABLE, Layer, bias_parameters, core_layers, is_bias,
                                        present_kinds, select, shared_parameters)
from graphtune.adapters.lowrank import add_adapters
from graphtune.errors import ConfigError, DataError
from graphtune.models import build_model
from graphtune.transfer.state import is_node_specific
from graphtune.transfer.strategies import (Adapted, Strategy, StrategyContext, StrategyReport, _load_source,
                                           register_strategy)

STRATEGY_SETTINGS = ("alpha", "bias", "max_share")  # what both strategies read of the adapter section
FIXED_SETTINGS = ("rank", "targets")  # adapter only
TOPOLOGY_SETTINGS = ("rank_min", "rank_max", "topology_kinds", "w_nodes", "w_difficulty", "w_error", "w_shift",
                     "ref_nodes", "ref_difficulty", "ref_shift")  # topology-adapter only


def alpha_of(adapter, rank: int) -> float:
    """adapter.alpha, or 2 x rank when it is null."""
    return float(adapter.alpha) if adapter.alpha is not None else 2.0 * rank


def probe_model(params):
    """experiment.model built on a 4-node synthetic graph with the run's window lengths: its layer shapes and
    node-independent parameters are those of the model built for any city of the run."""
    from graphtune.data.synthetic import synthetic_bundle

    bundle = synthetic_bundle(num_nodes=4, num_steps=200, seed=0, t_in=params.prepare.t_in, t_out=params.prepare.t_out)
    torch.manual_seed(0)
    return build_model(params.experiment.model, bundle, **params.experiment.model_kwargs)


def check_kinds(layers: list[Layer], kinds, model: str, option: str) -> None:
    """ConfigError naming `option` when a kind in `kinds` has no layer in the model, or a kind repeats."""
    kinds = list(kinds)
    have = present_kinds(layers)
    repeated = sorted({k for k in kinds if kinds.count(k) > 1})
    if repeated:
        raise ConfigError(f"{option}: {repeated[0]} is listed twice in {kinds}")
    missing = [k for k in kinds if k not in have]
    if missing:
        raise ConfigError(f"{option}: {model} has no {missing[0]} layers; its layer kinds are {', '.join(have)}")


def check_rank(layers: list[Layer], rank: int, model: str, option: str, kinds_option: str) -> None:
    """ConfigError naming `option`, the layer and its width, when `rank` exceeds the width of one of `layers`."""
    for layer in layers:
        if rank > layer.width:
            raise ConfigError(f"{option}: rank {rank} exceeds the width {layer.width} of {model} layer "
                              f"{layer.describe()}; lower {option} or leave "
                              f"{'/'.join(layer.kinds)} out of {kinds_option}")


def check_share(params_count: int, shared: int, max_share: float, model: str, what: str, option: str) -> None:
    """ConfigError when `params_count` adapter parameters exceed max_share of the `shared` ones."""
    if params_count > max_share * shared:
        raise ConfigError(f"{option}: {what} gives {model} {params_count} adapter parameters, "
                          f"{params_count / shared:.1%} of its {shared} node-independent parameters, above "
                          f"adapter.max_share={max_share:g}; lower {option} or raise adapter.max_share")


def _fingerprint(state: dict) -> str:
    """A digest of a source model's state: a capacity decision is kept only for the source it was made for."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())
    return digest.hexdigest()[:16]


def adapt_model(model: nn.Module, copied: list[str], layers: list[Layer], rank: int, alpha: float,
                bias: str) -> tuple[list[str], dict]:
    """Freeze what came from the source, add adapters to `layers` (those whose weight came from the source), and
    unfreeze what the strategy trains (see the module docstring). In place; returns (adapted layer names, name
    -> adapter)."""
    copied_set = set(copied)
    for name, p in model.named_parameters():
        p.requires_grad_(name not in copied_set or name.rsplit(".", 1)[-1] in WRAPPER_TRAINABLE)
        if bias == "all" and is_bias(name) and not is_node_specific(name):
            p.requires_grad_(True)
    names = [layer.name for layer in layers if f"{layer.name}.weight" in copied_set]
    adapters = add_adapters(model, names, rank, alpha)
    for adapter in adapters.values():
        if bias == "adapted" and adapter.bias is not None:
            adapter.bias.requires_grad_(True)
    return names, adapters


def _report(model: nn.Module, plain_names: list[str], transfer, adapters: dict) -> StrategyReport:
    """What was loaded (the source's tensors), created (re-created tensors and the adapters) and what trains."""
    copied = set(transfer.copied)
    created = [n for n in plain_names if n not in copied]
    created += [f"{name}.{factor}" for name in adapters for factor in ("lora_A", "lora_B")]
    learnable = list(model.parameters())
    return StrategyReport(loaded=list(transfer.copied), created=created, skipped=dict(transfer.skipped),
                          loaded_params=transfer.transferred_params,
                          total_params=sum(p.numel() for p in learnable),
                          trainable_params=sum(p.numel() for p in learnable if p.requires_grad))


class _LowRank(Strategy):
    """What both adapter strategies share: their params section, its recording at plan time, the adaptation."""

    settings_section = "adapter"
    own_settings: tuple[str, ...] = ()

    def export(self, model):
        """The plain model: adapters merged into the weights (the same keys and outputs, no extra cost)."""
        from graphtune.adapters.lowrank import merge

        return merge(model)

    def __init__(self):
        # The run's settings, recorded by check() when the experiment is planned (the stage loop passes a
        # StrategyContext, which carries no params); defaults until then.
        from graphtune.config import AdapterConfig, PrepareConfig

        self._adapter = AdapterConfig()
        self._prepare = PrepareConfig()
        self._cities: dict = {}

    def settings(self, params) -> dict:
        a = params.adapter
        return {key: copy.deepcopy(getattr(a, key)) for key in STRATEGY_SETTINGS + self.own_settings}

    def check(self, params, targets: list[str]) -> None:
        model = params.experiment.model
        probe = probe_model(params)
        self.check_layers(core_layers(probe, model), shared_parameters(probe), bias_parameters(probe),
                          params.adapter, model)
        self._adapter = copy.deepcopy(params.adapter)
        self._prepare = copy.deepcopy(params.prepare)
        self._cities = copy.deepcopy(params.cities)

    def check_layers(self, layers: list[Layer], shared: int, biases: int, adapter, model: str) -> None:
        raise NotImplementedError  # pragma: no cover - each strategy checks its own settings

    def _adapt_loaded(self, model, transfer, layers: list[Layer], rank: int, extra: dict) -> Adapted:
        a = self._adapter
        alpha = alpha_of(a, rank)
        plain_names = [n for n, _ in model.named_parameters()]
        shared = shared_parameters(model)
        biases = bias_parameters(model)
        names, adapters = adapt_model(model, transfer.copied, layers, rank, alpha, a.bias)
        report = _report(model, plain_names, transfer, adapters)
        count = adapter_parameters([layer for layer in layers if layer.name in names], rank, a.bias, biases)
        report.extra = {"adapter": {"rank": rank, "alpha": alpha, "scale": alpha / rank, "bias": a.bias,
                                    "layers": names, "adapter_params": count,
                                    "adapter_share": count / shared if shared else 0.0, "max_share": a.max_share}
                        | extra}
        return Adapted(model, report)


@register_strategy("adapter")
class Adapter(_LowRank):
    """Frozen source weights plus low-rank adapters of rank adapter.rank on the layer kinds adapter.targets."""

    own_settings = FIXED_SETTINGS

    def check_layers(self, layers, shared, biases, adapter, model) -> None:
        check_kinds(layers, adapter.targets, model, "adapter.targets")
        chosen = select(layers, adapter.targets)
        check_rank(chosen, adapter.rank, model, "adapter.rank", "adapter.targets")
        check_share(adapter_parameters(chosen, adapter.rank, adapter.bias, biases), shared, adapter.max_share, model,
                    f"rank {adapter.rank} on {', '.join(adapter.targets)}", "adapter.rank")

    def adapt(self, ctx: StrategyContext) -> Adapted:
        a = self._adapter
        model, transfer = _load_source(ctx)
        layers = core_layers(model, ctx.model)
        self.check_layers(layers, shared_parameters(model), bias_parameters(model), a, ctx.model)
        chosen = select(layers, a.targets)
        return self._adapt_loaded(model, transfer, chosen, a.rank, {"targets": list(a.targets)})


@register_strategy("topology-adapter")
class TopologyAdapter(_LowRank):
    """Low-rank adapters whose rank and layer kinds are chosen per target city (capacity.choose_capacity)."""

    own_settings = TOPOLOGY_SETTINGS

    def __init__(self):
        super().__init__()
        self._decisions: dict = {}  # decisions already made: (target, source, settings) -> (Capacity, Diagnostics)
        self._source_prompts: dict = {}  # source city -> its spatial prompts

    def check_layers(self, layers, shared, biases, adapter, model) -> None:
        if adapter.rank_min > adapter.rank_max:
            raise ConfigError(f"adapter.rank_min: {adapter.rank_min} is above adapter.rank_max={adapter.rank_max}")
        weights = {k: getattr(adapter, f"w_{k}") for k in ("nodes", "difficulty", "error", "shift")}
        if not any(w > 0 for w in weights.values()):
            raise ConfigError("adapter.w_error: the weights w_nodes, w_difficulty, w_error and w_shift are all 0; "
                              "give at least one signal a positive weight")
        kinds = list(adapter.topology_kinds)
        repeated = sorted({k for k in kinds if kinds.count(k) > 1})
        if repeated:
            raise ConfigError(f"adapter.topology_kinds: {repeated[0]} is listed twice in {kinds}")
        order = [k for k in kinds if k in present_kinds(layers)]
        if not order:
            raise ConfigError(f"adapter.topology_kinds: {model} has none of {', '.join(kinds)}; its layer kinds are "
                              f"{', '.join(present_kinds(layers))}")
        check_rank(select(layers, order), adapter.rank_max, model, "adapter.rank_max", "adapter.topology_kinds")
        first = select(layers, order[:1])
        check_share(adapter_parameters(first, adapter.rank_min, adapter.bias, biases), shared, adapter.max_share,
                    model, f"the smallest choice, rank {adapter.rank_min} on the {order[0]} layers", "adapter.rank_min")

    def adapt(self, ctx: StrategyContext) -> Adapted:
        a = self._adapter
        model, transfer = _load_source(ctx)
        layers = core_layers(model, ctx.model)
        self.check_layers(layers, shared_parameters(model), bias_parameters(model), a, ctx.model)
        settings = CapacitySettings.from_config(a)
        key = (ctx.model, repr(sorted(ctx.model_kwargs.items())), ctx.target.name, tuple(ctx.target.sensor_ids),
               ctx.source.city, _fingerprint(ctx.source.state), repr(settings))
        if key not in self._decisions:
            diagnostics = self.diagnose(ctx, model, layers, settings)
            self._decisions[key] = (choose_capacity(diagnostics, settings), diagnostics, ctx.fraction)
        capacity, diagnostics, decided_at = self._decisions[key]
        chosen = [layer for layer in layers if layer.name in set(capacity.layers)]
        extra = {"capacity": capacity.as_dict() | {"decided_at_fraction": decided_at,
                                                   "facts": _facts(diagnostics)}}
        return self._adapt_loaded(model, transfer, chosen, capacity.rank, extra)

    # ------------------------------------------------------------------ the facts
    def diagnose(self, ctx: StrategyContext, model: nn.Module, layers: list[Layer],
                 settings: CapacitySettings) -> Diagnostics:
        """The rule's facts about ctx.target for `model` (the source loaded, no adapter yet); a fact of weight 0
        is not measured."""
        from graphtune.profiling import difficulty_proxy

        w = settings.weights
        difficulty = difficulty_proxy(ctx.target.adj) if w["difficulty"] > 0 else None
        error = zero_shot_ratio(model, ctx.target, ctx.device) if w["error"] > 0 else None
        shift = self.prompt_shift(ctx) if w["shift"] > 0 else None
        return Diagnostics(num_nodes=ctx.target.num_nodes, difficulty=difficulty, error_ratio=error,
                           prompt_distance=shift, layers=tuple(layers), shared_params=shared_parameters(model),
                           bias_params=bias_parameters(model))

    def prompt_shift(self, ctx: StrategyContext) -> float:
        """prompt_distance between the source city's spatial prompts and the target's (graph and coordinates)."""
        from graphtune.data.prompts import spatial_prompts

        city = ctx.source.city
        if city not in self._source_prompts:
            from graphtune.data.prepare import prepare_dataset

            try:
                source = prepare_dataset(city, self._prepare, cities=self._cities)
            except (ConfigError, DataError) as err:
                raise ConfigError(f"adapter.w_shift: the prompt distance needs the graph of the source city {city}, "
                                  f"which cannot be loaded ({err}); set adapter.w_shift to 0 to decide without "
                                  "it") from None
            self._source_prompts[city] = spatial_prompts(source.adj, source.coords, 0)
        return prompt_distance(self._source_prompts[city], spatial_prompts(ctx.target.adj, ctx.target.coords, 0))


def zero_shot_ratio(model: nn.Module, view, device: str) -> float:
    """Validation MAE of `model` over persistence's, both on `view` (the point's view of the target city): how
    much worse than the naive forecast the transferred model starts. inf when persistence is exact and the model
    is not; 1.0 when both are exact."""
    from graphtune.engine import evaluate

    ours = evaluate(model, view, "val", device=device)["mae"]
    naive = evaluate(build_model("persistence", view), view, "val", device=device)["mae"]
    if not math.isfinite(ours):
        return math.inf
    if naive <= 0:
        return 1.0 if ours <= 0 else math.inf
    return float(ours / naive)


def _facts(d: Diagnostics) -> dict:
    """The measured facts of a decision, JSON-ready (None = not measured)."""
    def plain(x):
        return None if x is None else (float(x) if np.isfinite(x) else str(x))

    return {"num_nodes": d.num_nodes, "difficulty_proxy": plain(d.difficulty), "error_ratio": plain(d.error_ratio),
            "prompt_distance": plain(d.prompt_distance), "shared_params": d.shared_params}
