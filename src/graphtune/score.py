"""S_uep: one number for a transfer experiment (accuracy, transfer gain, efficiency, budgets).

Per stage s (pretrain on the first city, then one stage per target city):

    stage_score_s = w_perf * PerfNorm_s + w_transfer_auc * TransferAUC_s + w_eff * EffNorm_s
                    - w_budget * BudgetPenalty_s

    PerfNorm_s      = min over stages of test_rmse / test_rmse_s          in (0, 1]; 1 = the best stage
                      (a NaN test RMSE scores 0; note that stages are different cities, so this
                      rewards the stages that reach the experiment's lowest error)
    TransferAUC_s   = (1 / f_max) * trapezoid area under the points (0, 0), (f_1, r_1), ..., (f_k, r_k)
                      with r_i = clip((zero_rmse - rmse_i) / zero_rmse, 0, 1) the relative improvement
                      over zero-shot at budget fraction f_i, and f_max = f_k the largest fraction run.
                      Dividing by the covered range keeps it in [0, 1] and does not punish a curve the
                      budget scheduler stopped early. 0 for an empty curve.
    EffNorm_s       = 1 - mean over the measured usages u in [mem_mb, time_s, flops, trainable_params]
                      of clip(u / budget_u, 0, 1) where a budget is given, else
                      clip(u / max over stages of u, 0, 1). Usages given as None are left out of the
                      mean; a stage with no measured usage gets 0 (no credit without a measurement).
    BudgetPenalty_s = mean over the given budgets of max(0, u / budget_u - 1); 0 without budgets.

    Missing zero-shot (zero_rmse None or NaN, e.g. the pretrain stage): TransferAUC_s = 0 and its
    weight is shared out over PerfNorm and EffNorm in proportion to their weights, i.e. those two
    terms are multiplied by (w_perf + w_transfer_auc + w_eff) / (w_perf + w_eff). A stage that has
    nothing to transfer is then neither rewarded nor punished for it, and its score keeps the range
    of the others.

Across stages, with difficulty d_s >= 0 (e.g. profiling.difficulty_proxy):

    difficulty_weight_s = d_s ** alpha / sum_t d_t ** alpha      (uniform if all are 0)
    S_uep               = sum_s difficulty_weight_s * stage_score_s

so harder cities count more (alpha = 0: plain mean). Higher is better; without budget penalties
S_uep <= 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from graphtune.errors import ConfigError

USAGE_KEYS = ("mem_mb", "time_s", "flops", "trainable_params")  # the budgetable resources, StageInputs units


@dataclass(frozen=True)
class ScoreWeights:
    """Weights of S_uep (GraphTune-lite's defaults)."""

    w_perf: float = 0.45  # accuracy is the main goal
    w_transfer_auc: float = 0.35  # how quickly fine-tuning improves over zero-shot
    w_eff: float = 0.20  # cheaper is better, but never at the price of accuracy
    w_budget: float = 0.25  # subtracted per unit of relative budget overrun
    alpha: float = 1.0  # difficulty weights proportional to difficulty


@dataclass
class StageInputs:
    """What one stage contributes to S_uep."""

    test_rmse: float  # final test RMSE of the stage (after the largest budget fraction for transfers)
    zero_rmse: float | None = None  # zero-shot test RMSE; None for the pretrain stage
    curve: list[tuple[float, float]] = field(default_factory=list)  # (fraction, test RMSE), fraction in (0, 1]
    mem_mb: float | None = None  # peak memory, MB
    time_s: float | None = None  # training wall time, seconds
    flops: float | None = None  # forward FLOPs per batch
    trainable_params: float | None = None
    difficulty: float = 1.0
    name: str = ""


@dataclass
class StageScore:
    name: str
    perf_norm: float
    transfer_auc: float
    eff_norm: float
    budget_penalty: float
    stage_score: float
    difficulty_weight: float


@dataclass
class ScoreResult:
    stages: list[StageScore]
    s_uep: float

    def to_dict(self) -> dict:
        return {"s_uep": self.s_uep, "stages": [asdict(s) for s in self.stages]}


def budgets_from_config(budget_mem_mb: float | None = None, budget_time_sec: float | None = None,
                        budget_flops_g: float | None = None, budget_trainable_m: float | None = None) -> dict:
    """The params.yaml budget options in StageInputs units (GFLOPs -> FLOPs, millions -> parameters)."""
    scaled = {"mem_mb": (budget_mem_mb, 1.0), "time_s": (budget_time_sec, 1.0),
              "flops": (budget_flops_g, 1e9), "trainable_params": (budget_trainable_m, 1e6)}
    return {key: value * unit for key, (value, unit) in scaled.items() if value is not None}


def transfer_auc(zero_rmse: float | None, curve: list[tuple[float, float]]) -> float:
    """Normalised area under the clipped relative improvement over zero-shot (see module doc)."""
    if _missing(zero_rmse):
        return 0.0
    points = sorted((float(f), float(r)) for f, r in curve if f > 0)
    if not points:
        return 0.0
    fractions = np.array([0.0] + [f for f, _ in points])
    if zero_rmse > 0:
        gains = [(zero_rmse - r) / zero_rmse for _, r in points]
    else:  # a perfect zero-shot leaves nothing to improve
        gains = [0.0] * len(points)
    rel = np.clip(np.nan_to_num(np.array([0.0] + gains), nan=0.0), 0.0, 1.0)
    area = float(np.sum((fractions[1:] - fractions[:-1]) * (rel[1:] + rel[:-1]) / 2.0))  # trapezoid rule
    return area / float(fractions[-1])


def score_experiment(stages: list[StageInputs], weights: ScoreWeights = ScoreWeights(),
                     budgets: dict | None = None) -> ScoreResult:
    """S_uep and its per-stage parts (formula in the module docstring).

    budgets: {resource: budget} with resources from USAGE_KEYS in StageInputs units
    (see `budgets_from_config`); missing or None entries mean "no budget for that resource".
    """
    if not stages:
        raise ValueError("score_experiment needs at least one stage")
    budgets = _check_budgets(budgets)
    rmses = [s.test_rmse for s in stages if not _missing(s.test_rmse)]
    best_rmse = min(rmses) if rmses else math.nan
    maxima = {k: max((_usage(s, k) for s in stages if _usage(s, k) is not None), default=None) for k in USAGE_KEYS}
    difficulty_weights = _difficulty_weights([s.difficulty for s in stages], weights.alpha)
    scored = []
    for stage, dw in zip(stages, difficulty_weights):
        perf = _perf_norm(best_rmse, stage.test_rmse)
        auc = transfer_auc(stage.zero_rmse, stage.curve)
        eff = _eff_norm(stage, budgets, maxima)
        penalty = _budget_penalty(stage, budgets)
        positive = weights.w_perf * perf + weights.w_transfer_auc * auc + weights.w_eff * eff
        if _missing(stage.zero_rmse):  # share TransferAUC's weight over the other two (module doc)
            kept = weights.w_perf + weights.w_eff
            total = kept + weights.w_transfer_auc
            positive = (weights.w_perf * perf + weights.w_eff * eff) * total / kept if kept > 0 else 0.0
        scored.append(StageScore(stage.name, perf, auc, eff, penalty, positive - weights.w_budget * penalty, dw))
    s_uep = float(sum(s.difficulty_weight * s.stage_score for s in scored))
    return ScoreResult(stages=scored, s_uep=s_uep)


def _missing(value) -> bool:
    return value is None or math.isnan(float(value))


def _usage(stage: StageInputs, key: str) -> float | None:
    value = getattr(stage, key)
    return None if _missing(value) else float(value)


def _check_budgets(budgets: dict | None) -> dict:
    budgets = {k: v for k, v in (budgets or {}).items() if v is not None}
    unknown = sorted(set(budgets) - set(USAGE_KEYS))
    if unknown:
        raise ConfigError(f"budgets: unknown resource(s) {', '.join(unknown)}; expected {', '.join(USAGE_KEYS)}")
    bad = [k for k, v in budgets.items() if not v > 0]
    if bad:
        raise ConfigError(f"budgets: {', '.join(bad)} must be > 0 (leave a budget out to disable it)")
    return {k: float(v) for k, v in budgets.items()}


def _perf_norm(best_rmse: float, rmse: float) -> float:
    if _missing(rmse) or _missing(best_rmse):
        return 0.0
    return 1.0 if rmse <= 0 else best_rmse / rmse


def _eff_norm(stage: StageInputs, budgets: dict, maxima: dict) -> float:
    shares = []
    for key in USAGE_KEYS:
        usage = _usage(stage, key)
        if usage is None:
            continue
        scale = budgets.get(key, maxima[key])
        shares.append(min(max(usage / scale, 0.0), 1.0) if scale > 0 else 0.0)
    return 1.0 - sum(shares) / len(shares) if shares else 0.0


def _budget_penalty(stage: StageInputs, budgets: dict) -> float:
    overruns = [max(0.0, usage / budget - 1.0) for key, budget in budgets.items()
                if (usage := _usage(stage, key)) is not None]
    return sum(overruns) / len(overruns) if overruns else 0.0


def _difficulty_weights(difficulties: list[float], alpha: float) -> list[float]:
    if any(_missing(d) or d < 0 for d in difficulties):
        raise ValueError(f"difficulties must be finite and >= 0, got {difficulties}")
    if alpha < 0:
        raise ConfigError(f"alpha: the difficulty exponent must be >= 0, got {alpha}")
    powered = [float(d) ** alpha for d in difficulties]  # 0 ** 0 = 1: alpha 0 is a plain mean
    total = sum(powered)
    if total == 0:  # no stage is harder than another
        return [1.0 / len(difficulties)] * len(difficulties)
    return [p / total for p in powered]
