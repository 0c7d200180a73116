"""The transfer strategy `compress`: transfer, compress with no target data, evaluate zero-shot, fine-tune.

At every budget point the source's weights are transferred into experiment.model built for the target
(as `full` does), the model's prunable groups are compressed by compress.ratio in compress.rounds
rounds with LBYL's compensation (graphtune.compression.prune), and the smaller model is returned whole
for fine-tuning. Compression reads weights only, never the target's readings, so the zero-shot point is
still zero-shot. The stage's parameters, FLOPs and trainable count are the compressed model's, so the
comparable score credits the smaller model. The stage checkpoint records the pruned widths as the
model's options, so it rebuilds strictly.

`compress.ratio: budget` asks for the smallest ratio (to 0.01) whose compressed model meets
budgets.trainable_m (trainable parameters, millions) and budgets.flops_g (forward GFLOPs per batch of
train.batch_size windows); widths alone decide both, so the search builds models and never trains.
"""

from __future__ import annotations

import copy
import time

import torch

from graphtune.compression.prune import compress, group_width, groups_of
from graphtune.errors import ConfigError
from graphtune.models import build_model, model_defaults
from graphtune.transfer.strategies import Adapted, Strategy, StrategyContext, _load_source, register_strategy

RATIO_STEP = 0.01  # resolution of the budget search


def _budgets(params) -> tuple[float | None, float | None]:
    return params.budgets.trainable_m, params.budgets.flops_g


@register_strategy("compress")
class Compress(Strategy):
    """Transfer, compress data-free (iterative LBYL), then fine-tune every parameter of the smaller model."""

    settings_section = "compress"

    def __init__(self):
        # The run's settings, recorded by check() when the experiment is planned (the stage loop passes a
        # StrategyContext, which carries no params); defaults until then.
        from graphtune.config import CompressConfig

        self._compress = CompressConfig()
        self._budget = ((None, None), 64)
        self._ratios: dict = {}  # budget searches already done (see adapt)

    def settings(self, params) -> dict:
        c = params.compress
        return {"ratio": c.ratio, "rounds": c.rounds, "method": c.method, "lbyl_variant": c.lbyl_variant,
                "lambda1": c.lambda1, "lambda2": c.lambda2, "k1": c.k1, "k2": c.k2}

    def check(self, params, targets: list[str]) -> None:
        from graphtune.data.synthetic import synthetic_bundle

        c = params.compress
        if c.ratio == "budget":
            if all(b is None for b in _budgets(params)):
                raise ConfigError("compress.ratio: 'budget' needs budgets.trainable_m or budgets.flops_g")
        else:
            c.settings().check()
        model, kwargs = params.experiment.model, params.experiment.model_kwargs
        probe = build_model(model, synthetic_bundle(num_nodes=4, num_steps=200, seed=0), **kwargs)
        groups_of(probe, f"experiment.model {model!r}")  # a model with no prunable group: one line, before any run
        self._compress = copy.deepcopy(c)
        self._budget = (_budgets(params), params.train.batch_size)

    def adapt(self, ctx: StrategyContext) -> Adapted:
        c = self._compress
        model, transfer = _load_source(ctx)
        config = model_defaults(ctx.model) | dict(ctx.model_kwargs)
        ratio = c.ratio
        if ratio == "budget":  # widths alone decide it: searched once per target graph, not per budget point
            key = (ctx.model, repr(sorted(config.items())), ctx.target.name, ctx.target.num_nodes, self._budget)
            if key not in self._ratios:
                self._ratios[key] = self.ratio_for_budget(ctx, config)
            ratio = self._ratios[key]
        began = time.perf_counter()
        rounds = compress(model, config, c.settings(ratio))
        seconds = time.perf_counter() - began
        for p in model.parameters():
            p.requires_grad_(True)
        params = dict(model.named_parameters())
        report = _report(model, [n for n in transfer.copied if n in params], transfer.skipped)
        report.extra = {"compress": {"ratio": ratio, "rounds": c.rounds, "method": c.method,
                                     "widths": rounds[-1].widths if rounds else {}, "seconds": seconds}}
        return Adapted(model, report, model_kwargs={k: config[k] for k in config if k in ctx.model_kwargs or
                                                    k in _width_keys(model)})

    def ratio_for_budget(self, ctx: StrategyContext, config: dict) -> float:
        """The smallest ratio (to RATIO_STEP) whose compressed model meets the run's budgets."""
        from graphtune.profiling import count_flops
        from graphtune.transfer.stages import _example

        (trainable_m, flops_g), batch = self._budget
        probe = ctx.build()
        groups = groups_of(probe, f"experiment.model {ctx.model!r}")
        start = {g.width: group_width(probe, g) for g in groups}
        example = _example(ctx.target, batch)

        def meets(ratio: float) -> bool:
            cfg = dict(config)
            for path, n0 in start.items():
                cfg[path] = max(1, round(n0 * (1 - ratio)))
            torch.manual_seed(0)
            net = build_model(ctx.model, ctx.target, **cfg)
            ok = trainable_m is None or sum(p.numel() for p in net.parameters()) <= trainable_m * 1e6
            return ok and (flops_g is None or count_flops(net, example)["flops"] <= flops_g * 1e9)

        steps = int(round((1 - RATIO_STEP) / RATIO_STEP))  # ratios 0, 0.01, ..., 0.99
        if not meets(steps * RATIO_STEP):
            raise ConfigError(f"compress.ratio: even ratio {steps * RATIO_STEP:.2f} leaves {ctx.model} above "
                              f"budgets.trainable_m={trainable_m} / budgets.flops_g={flops_g}")
        lo, hi = 0, steps  # meets(hi) holds; find the smallest such step
        while lo < hi:
            mid = (lo + hi) // 2
            if meets(mid * RATIO_STEP):
                hi = mid
            else:
                lo = mid + 1
        return round(lo * RATIO_STEP, 10)


def _width_keys(model) -> set[str]:
    return {g.width for g in groups_of(model)}


def _report(model, copied: list[str], skipped: dict):
    from graphtune.transfer.strategies import StrategyReport

    params = dict(model.named_parameters())
    return StrategyReport(loaded=copied, created=[n for n in params if n not in set(copied)], skipped=dict(skipped),
                          loaded_params=sum(params[n].numel() for n in copied),
                          total_params=sum(p.numel() for p in params.values()),
                          trainable_params=sum(p.numel() for p in params.values() if p.requires_grad))
