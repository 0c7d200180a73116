"""Two scores for a transfer experiment: the comparable `score` that ranks runs, and GraphTune-lite's S_uep.

The comparable score (what `graphtune compare` ranks by)
--------------------------------------------------------
It depends only on the run's own measurements and on fixed references of each city, never on which
other runs are in the store, so two runs compare, and adding or removing runs changes no score.
Everything in it is unit-free (mph, km/h and counts score alike) and deterministic (the same seed
and configuration give the same score: wall time and peak memory are reported beside it, not in it).

Per scored stage s (each transfer target; the pretrain stage only in a pretrain-only run):

    skill(rmse)      = 1 - q            if q <= 1      with q = rmse / rmse_HA, the ratio to the city's
                       1 / q - 1        if q >  1      time-of-day historical average on the same test
                                                       windows (its training split, fixed per city)
                       in (-1, 1]: 1 = perfect, 0 = no better than HA, < 0 = worse; strictly decreasing
                       in rmse (the q > 1 branch keeps it bounded and still ordered; NaN scores -1)
    Skill_s          = skill(final test RMSE of the stage)
    TransferAUC_s    = area over the budget axis [0, 1] under clip(skill, 0, 1) of the points
                       (0, zero-shot), (f_1, rmse_1), ..., (f_k, rmse_k), trapezoids between points and
                       the last point held to fraction 1 (a curve the scheduler stopped is taken as flat,
                       as the scheduler judged). The zero-shot point counts 0 for a strategy that loads
                       nothing from the source (scratch): improving on a random initialisation earns nothing.
    CostShare_s      = mean over the deterministic costs u of u / (u + ref_u), each in [0, 1), a half
                       at its reference budget (params.yaml score.ref_*):
                         finetune_flops    training FLOPs of the stage, every budget point together
                                           (forward + backward of one batch, counted by FlopCounterMode,
                                           per window, times the windows trained on)
                         trainable_params  parameters the strategy trains
                         size_mb           parameters + persistent buffers
                         infer_flops       forward FLOPs per window
    EffNorm_s        = 1 - CostShare_s
    EffTerm_s        = Skill_s * EffNorm_s      if Skill_s >= 0   (the efficient share of the skill counts)
                       Skill_s * CostShare_s    if Skill_s <  0   (the costly share of a loss counts)
    BudgetPenalty_s  = mean relative overrun of the budgets the user set (budgets.*), 0 without any
    stage score_s    = w_perf * Skill_s + w_transfer_auc * TransferAUC_s + w_eff * EffTerm_s
                       - w_budget * BudgetPenalty_s
    score            = sum_s d_s ** alpha * stage score_s / sum_t d_t ** alpha   (d = graph difficulty proxy)

A stage without a zero-shot point (the pretrain stage) shares TransferAUC's weight out over the
other two terms, as S_uep does. Properties (tested): a higher RMSE at equal cost, or a higher cost at
equal RMSE (Skill != 0), scores strictly lower; the historical average scores exactly 0, so any model
with a lower error ranks above it; a forecast worse than HA is never helped by being cheap; a strategy
that loads nothing never outscores a transfer with the same curve. Pretraining cost is not part of a
transfer run's score: the source model is taken as given, which is the question GraphTune asks.

S_uep (GraphTune-lite's within-run score, logged as `S_uep`)
-----------------------------------------------------------
Kept exactly as GraphTune-lite defines it, for comparison with its numbers and for ranking the
stages of ONE run against each other. It normalises by the run's own best RMSE and maxima, and its
efficiency term reads wall time and memory, so it is neither comparable across runs nor reproducible
to the last digit. Per stage s (pretrain on the first city, then one stage per target city):

    stage_score_s = w_perf * PerfNorm_s + w_transfer_auc * TransferAUC_s + w_eff * EffNorm_s
                    - w_budget * BudgetPenalty_s

    PerfNorm_s      = min over stages of test_rmse / test_rmse_s          in (0, 1]; 1 = the best stage
                      (a NaN test RMSE scores 0)
    TransferAUC_s   = (1 / f_max) * trapezoid area under the points (0, 0), (f_1, r_1), ..., (f_k, r_k)
                      with r_i = clip((zero_rmse - rmse_i) / zero_rmse, 0, 1) the relative improvement
                      over zero-shot at budget fraction f_i, and f_max = f_k the largest fraction run.
                      0 for an empty curve.
    EffNorm_s       = 1 - mean over the measured usages u in [mem_mb, time_s, flops, trainable_params]
                      of clip(u / budget_u, 0, 1) where a budget is given, else
                      clip(u / max over stages of u, 0, 1). Usages given as None are left out of the
                      mean; a stage with no measured usage gets 0 (no credit without a measurement).
    BudgetPenalty_s = mean over the given budgets of max(0, u / budget_u - 1); 0 without budgets.

    Missing zero-shot (zero_rmse None or NaN, e.g. the pretrain stage): TransferAUC_s = 0 and its
    weight is shared out over PerfNorm and EffNorm in proportion to their weights, i.e. those two
    terms are multiplied by (w_perf + w_transfer_auc + w_eff) / (w_perf + w_eff).

Across stages, with difficulty d_s >= 0 (e.g. profiling.difficulty_proxy):

    difficulty_weight_s = d_s ** alpha / sum_t d_t ** alpha      (uniform if all are 0)
    S_uep               = sum_s difficulty_weight_s * stage_score_s
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from graphtune.config import BudgetConfig, ScoreConfig
from graphtune.errors import ConfigError

USAGE_KEYS = ("mem_mb", "time_s", "flops", "trainable_params")  # the budgetable resources, StageInputs units


@dataclass
class StageInputs:
    """What one stage contributes to S_uep."""

    test_rmse: float  # final test RMSE of the stage (after the largest budget fraction for transfers)
    zero_rmse: float | None = None  # zero-shot test RMSE; None for the pretrain stage
    curve: list[tuple[float, float]] = field(default_factory=list)  # (fraction, test RMSE), fraction in (0, 1]
    mem_mb: float | None = None  # peak memory, MB
    time_s: float | None = None  # wall time of the stage's fits (steps and their validations), seconds
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


def budgets_from_config(budgets: BudgetConfig) -> dict:
    """The params.yaml `budgets:` section in StageInputs units (GFLOPs -> FLOPs, millions -> parameters);
    a budget left null is absent."""
    scaled = {"mem_mb": (budgets.mem_mb, 1.0), "time_s": (budgets.time_sec, 1.0),
              "flops": (budgets.flops_g, 1e9), "trainable_params": (budgets.trainable_m, 1e6)}
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


def score_experiment(stages: list[StageInputs], weights: ScoreConfig = ScoreConfig(),
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
    return _budget_penalty_of({key: _usage(stage, key) for key in USAGE_KEYS}, budgets)


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


# ============================================================================ the comparable score
SCORE_VERSION = 2  # bump when the comparable score's definition changes: runs of other versions are not ranked together
COST_KEYS = ("finetune_flops", "trainable_params", "size_mb", "infer_flops")  # the deterministic costs


def cost_references(score: ScoreConfig) -> dict[str, float]:
    """The reference budgets of the comparable score (params.yaml score.ref_*) in StageMeasures units."""
    return {"finetune_flops": score.ref_finetune_tflops * 1e12, "trainable_params": score.ref_trainable_m * 1e6,
            "size_mb": score.ref_size_mb, "infer_flops": score.ref_infer_gflops * 1e9}


@dataclass
class StageMeasures:
    """What one stage contributes to the comparable score: errors, the city's reference and deterministic costs."""

    ref_rmse: float  # test RMSE of the city's time-of-day historical average (fixed per city and split)
    test_rmse: float  # final test RMSE of the stage (after the last budget point run)
    zero_rmse: float | None = None  # zero-shot test RMSE; None without a zero-shot point (pretrain, scratch)
    curve: list[tuple[float, float]] = field(default_factory=list)  # (fraction in (0, 1], test RMSE)
    transferred: bool = True  # False: the strategy loaded nothing, so its zero-shot point counts 0
    kind: str = "transfer"  # "transfer" (zero-shot + budget curve) | "pretrain" (no curve: AUC weight shared out)
    finetune_flops: float = 0.0  # training FLOPs of the stage (all budget points)
    trainable_params: float = 0.0
    size_mb: float = 0.0
    infer_flops: float = 0.0  # forward FLOPs per window
    usage: dict = field(default_factory=dict)  # measured mem_mb / time_s / flops / trainable_params for budgets
    difficulty: float = 1.0
    name: str = ""


@dataclass
class ComparableStage:
    name: str
    skill: float
    zero_skill: float | None
    transfer_auc: float
    cost_share: float
    eff_norm: float
    eff_term: float
    budget_penalty: float
    stage_score: float
    difficulty_weight: float


@dataclass
class ComparableScore:
    stages: list[ComparableStage]
    score: float

    def to_dict(self) -> dict:
        return {"score": self.score, "stages": [asdict(s) for s in self.stages]}

    @property
    def mean_skill(self) -> float:
        """The stages' skill, weighted as the score weighs them."""
        return sum(s.difficulty_weight * s.skill for s in self.stages)

    @property
    def mean_transfer_auc(self) -> float:
        return sum(s.difficulty_weight * s.transfer_auc for s in self.stages)


def skill(rmse: float | None, ref_rmse: float) -> float:
    """Skill against the historical average, in (-1, 1]: 1 - q for q = rmse / ref <= 1, else 1 / q - 1.

    Strictly decreasing in rmse; 0 at the reference's error; a missing (None/NaN) error scores -1.
    """
    if not (math.isfinite(ref_rmse) and ref_rmse > 0):
        raise ValueError(f"the reference RMSE must be finite and > 0, got {ref_rmse!r}")
    if _missing(rmse):
        return -1.0
    q = max(float(rmse), 0.0) / ref_rmse
    return 1.0 - q if q <= 1.0 else 1.0 / q - 1.0


def skill_auc(zero_skill: float | None, points: list[tuple[float, float]]) -> float:
    """Area over [0, 1] under clip(skill, 0, 1): (0, zero_skill) then the (fraction, skill) points,
    trapezoids in between and the last point held to fraction 1. No point at all: 0."""
    pts = sorted((float(f), float(s)) for f, s in points if f > 0)
    start = 0.0 if zero_skill is None or _missing(zero_skill) else float(zero_skill)
    fractions = np.array([0.0] + [f for f, _ in pts] + ([1.0] if not pts or pts[-1][0] < 1.0 else []))
    values = [start] + [s for _, s in pts]
    if len(values) < len(fractions):
        values.append(values[-1])  # held to fraction 1
    clipped = np.clip(np.array(values, dtype=float), 0.0, 1.0)
    return float(np.trapezoid(clipped, fractions))


def cost_share(stage: StageMeasures, score: ScoreConfig = ScoreConfig()) -> float:
    """Mean of u / (u + ref) over the deterministic costs: 0 = free, a half = at every reference, < 1."""
    refs = cost_references(score)
    shares = []
    for key in COST_KEYS:
        usage = max(float(getattr(stage, key) or 0.0), 0.0)
        shares.append(usage / (usage + refs[key]))
    return sum(shares) / len(shares)


def comparable_score(stages: list[StageMeasures], weights: ScoreConfig = ScoreConfig(),
                     budgets: dict | None = None) -> ComparableScore:
    """The comparable score and its per-stage parts (definition in the module docstring).

    `weights` is the params.yaml `score:` section: the w_* weights, alpha and the ref_* reference budgets.
    `budgets`: as for `score_experiment` ({resource: budget} in StageInputs units); the stages'
    `usage` dicts hold the measured resources.
    """
    if not stages:
        raise ValueError("comparable_score needs at least one stage")
    budgets = _check_budgets(budgets)
    difficulty_weights = _difficulty_weights([s.difficulty for s in stages], weights.alpha)
    scored = []
    for stage, dw in zip(stages, difficulty_weights):
        if stage.kind not in ("transfer", "pretrain"):
            raise ValueError(f"stage kind must be transfer or pretrain, got {stage.kind!r}")
        final = skill(stage.test_rmse, stage.ref_rmse)
        has_zero = stage.kind == "transfer"
        zero = None
        if has_zero:  # a strategy that loaded nothing gets no credit for what a random initialisation scores
            zero = skill(stage.zero_rmse, stage.ref_rmse) if stage.transferred and stage.zero_rmse is not None else 0.0
        auc = skill_auc(zero, [(f, skill(r, stage.ref_rmse)) for f, r in stage.curve]) if has_zero else 0.0
        share = cost_share(stage, weights)
        eff = 1.0 - share
        eff_term = final * eff if final >= 0 else final * share
        penalty = _budget_penalty_of(stage.usage, budgets)
        if has_zero:
            positive = weights.w_perf * final + weights.w_transfer_auc * auc + weights.w_eff * eff_term
        else:  # no zero-shot point (a pretrain stage): TransferAUC's weight is shared out, as in S_uep
            kept = weights.w_perf + weights.w_eff
            total = kept + weights.w_transfer_auc
            positive = (weights.w_perf * final + weights.w_eff * eff_term) * total / kept if kept > 0 else 0.0
        scored.append(ComparableStage(stage.name, final, zero, auc, share, eff, eff_term, penalty,
                                      positive - weights.w_budget * penalty, dw))
    return ComparableScore(stages=scored, score=float(sum(s.difficulty_weight * s.stage_score for s in scored)))


def _budget_penalty_of(usage: dict, budgets: dict) -> float:
    """Mean relative overrun max(0, u / budget - 1) over the budgets whose usage was measured."""
    overruns = [max(0.0, float(usage[key]) / budget - 1.0) for key, budget in budgets.items()
                if usage.get(key) is not None and not _missing(usage[key])]
    return sum(overruns) / len(overruns) if overruns else 0.0
