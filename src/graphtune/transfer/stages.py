"""The transfer experiment: pretrain on the first city, then, per target city, zero-shot and a budget curve.

    stage 0      build the model for city 0, fit, evaluate                                 -> StageResult
                 (skipped when the strategy loads nothing from the source, e.g. scratch)
    stage k > 0  the zero-shot point: build the model for the city as zero-shot may see it, transfer
                 weights (strategy), evaluate; then for each budget fraction f: the view of the city
                 that holds only f's sampled windows, build and transfer again, fine-tune, evaluate;
                 a loss-gradient scheduler stops the curve once gains flatten                -> StageResult
    all stages   the comparable score and GraphTune-lite's S_uep (graphtune.transfer.score)           -> ExperimentResult

What each point may see of the target city (`DatasetBundle.restrict`):

    zero-shot    the graph and coordinates, the source model's scaler, and, for a strategy that
                 declares it, the last `transfer.prompt_days` of the training split (an unlabelled
                 prompt window: node prompts and the scaler may read it, no gradient step does)
    fraction f   exactly its sampled training windows (and the prompt window): the scaler, node
                 prompts and the historical average are refitted on those readings alone
    every point  the validation split (early stopping, best epoch, the budget scheduler) and the test
                 split (the reported metrics); never trained on, never used for a statistic

Each point records the data it used (windows, steps, days, observed readings). The city's references
(the historical average fitted on its whole training split, and persistence) are measured once per stage
for the score, like the test split: no model ever sees them.

No MLflow and no files here: an `Observer` receives the events (stage and budget starts, epochs,
results) and the experiment runner (graphtune.transfer.experiment) turns them into tracked runs and outputs.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from graphtune.transfer.budget import BudgetScheduler, check_fraction, sample_windows, steps_cap
from graphtune.data.bundle import DatasetBundle, Scaler
from graphtune.engine import evaluate, fit
from graphtune.errors import ConfigError, TrainingDiverged
from graphtune.models import build_model
from graphtune.profiling import ResourceMonitor, graph_difficulty, profile_model
from graphtune.transfer.score import (ComparableScore, CostReferences, ScoreResult, ScoreWeights, StageInputs, StageMeasures,
                             comparable_score, score_experiment)
from graphtune.transfer.strategies import Strategy, get_strategy


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class TrainSettings:
    """One stage's optimisation (see graphtune.engine.fit)."""

    epochs: int
    lr: float
    batch_size: int = 64
    weight_decay: float = 1e-4
    clip_grad: float | None = 5.0
    patience: int | None = None  # early stopping on val MAE; None = never
    amp: bool | None = None  # None = on for CUDA only


@dataclass(frozen=True)
class CurveSettings:
    """The budget curve of a transfer stage and its scheduler (see graphtune.transfer.budget)."""

    fractions: tuple[float, ...] = (0.1, 0.3, 1.0)
    fewshot_mode: str = "subset"
    min_gain_rate: float = 0.5
    min_rel_improve: float = 0.01
    patience: int = 0
    prompt_days: float = 0.0  # unlabelled target days a strategy that declares it may read at zero-shot


@dataclass
class SourceModel:
    """What a transfer starts from: a trained state, the nodes it was trained on and the scaling it learned in."""

    model: str
    model_kwargs: dict
    state: dict
    city: str
    sensor_ids: list[str]
    scaler: dict  # {"mean", "std"} of the data the state was trained on: the zero-shot scaler of a target

    def checkpoint(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- results
@dataclass
class StageResult:
    """Everything one stage measured. `to_dict` is the stage's entry in results.json."""

    stage: int
    kind: str  # "pretrain" | "transfer"
    city: str
    num_nodes: int
    val: dict  # final metrics (mae, rmse, mape, per horizon)
    test: dict
    static_eff: dict  # params_total, params_trainable, size_mb
    flops: dict  # flops, macs, train_flops per forward batch (FlopCounterMode), thop_macs cross-check
    dynamic_eff: dict  # train_time_s, wall_time_s, peak_rss_mb, peak_gpu_mb
    difficulty: dict  # difficulty_proxy, difficulty_ha
    reference: dict  # the city's references on the test split: {"ha": metrics, "persistence": metrics}
    cost: dict  # deterministic costs: train_flops, train_samples, per-window train/infer FLOPs, trainable, size
    data: dict  # what the stage's final model was trained on: windows, steps, days, readings
    zero_shot_val: dict | None = None
    zero_shot_test: dict | None = None
    zero_shot_data: dict | None = None  # what the zero-shot point could see
    curve: list[dict] = field(default_factory=list)  # budget points: fraction, data, epochs, val_*, test_*
    transfer: dict | None = None  # share, copied, skipped, transferred
    scheduler: dict | None = None  # stopped_at, reason, saved_budget, steps
    history: list[dict] = field(default_factory=list)  # per-epoch entries of the stage's final fit
    stopped_reason: str = "completed"
    score: dict = field(default_factory=dict)  # the comparable score's parts: skill, transfer_auc, cost_share, ...
    suep: dict = field(default_factory=dict)  # S_uep's parts: perf_norm, transfer_auc, eff_norm, ...

    @property
    def test_rmse(self) -> float:
        return self.test["rmse"]

    @property
    def zero_rmse(self) -> float | None:
        return None if self.zero_shot_test is None else self.zero_shot_test["rmse"]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["S_uep"] = d.pop("suep")
        d.update(zero_rmse=self.zero_rmse, test_rmse=self.test_rmse,
                 curve_fraction=[p["fraction"] for p in self.curve],
                 curve_rmse=[p["test_rmse"] for p in self.curve])
        return d


@dataclass
class ExperimentResult:
    name: str
    model: str
    strategy: str
    datasets: list[str]
    seed: int
    stages: list[StageResult]
    score: ComparableScore  # what runs are ranked by (over the transfer stages; the pretrain stage alone if none)
    suep: ScoreResult  # GraphTune-lite's within-run S_uep over every stage
    references: dict = field(default_factory=dict)  # {"ha": {...}, "persistence": {...}} scored by the same rule
    config_hash: str = ""  # set by the experiment runner: the identity of the resolved configuration

    @property
    def run_type(self) -> str:
        """"transfer" when any stage moved to a target city, else "pretrain"."""
        return "transfer" if any(s.kind == "transfer" for s in self.stages) else "pretrain"

    @property
    def s_uep(self) -> float:
        return self.suep.s_uep

    def to_dict(self) -> dict:
        return {"name": self.name, "model": self.model, "strategy": self.strategy, "datasets": self.datasets,
                "seed": self.seed, "run_type": self.run_type, "config_hash": self.config_hash,
                "score": self.score.score, "S_uep": self.s_uep, "references": self.references,
                "stages": [s.to_dict() for s in self.stages]}

    def rows(self) -> list[dict]:
        """One flat row per stage for results.csv."""
        rows = []
        for s in self.stages:
            row = {"stage": s.stage, "kind": s.kind, "city": s.city, "num_nodes": s.num_nodes,
                   "zero_rmse": s.zero_rmse, "test_mae": s.test["mae"], "test_rmse": s.test_rmse,
                   "test_mape": s.test["mape"], "ref_ha_rmse": s.reference["ha"]["rmse"],
                   "params_trainable": s.static_eff["params_trainable"], "flops": s.flops["flops"],
                   "train_flops": s.cost["train_flops"], "windows": s.data["windows"], "days": s.data["days"],
                   "readings": s.data["readings"], **dict(s.dynamic_eff), **s.difficulty,
                   **{f"score_{k}": v for k, v in s.score.items()}, **{f"S_uep_{k}": v for k, v in s.suep.items()},
                   "score": self.score.score, "S_uep": self.s_uep}
            rows.append(row)
        return rows


class Observer:
    """Hooks the stage loop calls. The default does nothing; tracking and printing subclass it."""

    def stage(self, index: int, kind: str, city: str):
        return nullcontext()

    def budget(self, index: int, city: str, fraction: float):
        return nullcontext()

    def epoch(self, entry: dict) -> None: ...

    def budget_done(self, index: int, point: dict) -> None: ...

    def stage_done(self, result: StageResult, source: SourceModel) -> None: ...


# ----------------------------------------------------------------------------- checks
def per_stage(values, n_stages: int, option: str) -> list:
    """Expand a per-stage list: one value applies to every stage; otherwise exactly one per stage."""
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if len(values) == 1:
        return values * n_stages
    if len(values) != n_stages:
        raise ConfigError(f"{option}: expected one value or one per stage ({n_stages} stages), got {len(values)}")
    return values


def check_curve(curve: CurveSettings) -> None:
    if not curve.fractions:
        raise ConfigError("transfer.fractions: expected at least one budget fraction in (0, 1]")
    fractions = [check_fraction(f) for f in curve.fractions]
    if fractions != sorted(set(fractions)):
        raise ConfigError(f"transfer.fractions: expected increasing fractions without repeats, got {fractions}")
    BudgetScheduler(curve.min_gain_rate, curve.min_rel_improve, curve.patience)  # validates patience
    sample_windows(torch.arange(2), fractions[0], curve.fewshot_mode, 0)  # validates the mode


# ----------------------------------------------------------------------------- stages
def _fit(model, bundle, train: TrainSettings, *, seed, device, observer, time_budget_s, starts=None, cap=None):
    return fit(model, bundle, epochs=train.epochs, lr=train.lr, weight_decay=train.weight_decay,
               batch_size=train.batch_size, clip_grad=train.clip_grad, seed=seed, device=device,
               train_starts=starts, max_steps_per_epoch=cap, patience=train.patience,
               time_budget_s=time_budget_s, amp=train.amp, on_epoch_end=lambda _, e: observer.epoch(e))


def _efficiency(model: nn.Module, bundle: DatasetBundle, batch_size: int) -> tuple[dict, dict]:
    prof = profile_model(model, bundle, batch_size=batch_size)
    static = {k: prof[k] for k in ("params_total", "params_trainable", "size_mb")}
    flops = {k: prof[k] for k in ("flops", "macs", "train_flops", "thop_macs", "batch_size")}
    return static, flops


def _cost(static: dict, flops: dict, samples: int) -> dict:
    """The deterministic costs of a stage: training FLOPs = per-window FLOPs of a training step x windows trained."""
    per_window_train = flops["train_flops"] / flops["batch_size"]
    return {"train_flops": per_window_train * samples, "train_samples": samples,
            "train_flops_per_window": per_window_train, "infer_flops_per_window": flops["flops"] / flops["batch_size"],
            "trainable_params": static["params_trainable"], "size_mb": static["size_mb"]}


def _dynamic(monitor: ResourceMonitor, train_time_s: float) -> dict:
    return {"train_time_s": train_time_s, "wall_time_s": monitor.elapsed_s, "peak_rss_mb": monitor.peak_rss_mb,
            "peak_gpu_mb": monitor.peak_gpu_mb}


def _require_finite(metrics: dict, what: str) -> dict:
    """A non-finite error must never be scored: stop the run with a one-line reason."""
    bad = [k for k in ("mae", "rmse") if not math.isfinite(metrics[k])]
    if bad:
        raise TrainingDiverged(f"{what}: {bad[0].upper()} is {metrics[bad[0]]} (non-finite predictions, or no "
                               "observed reading in the split); the run is stopped and will not be ranked")
    return metrics


def city_references(bundle: DatasetBundle, *, batch_size: int = 64, device="cpu") -> dict:
    """Test metrics of the city's references on the same windows as every model: the time-of-day historical
    average fitted on the whole training split, and last-value persistence. Fixed per city and split."""
    return {name: _require_finite(evaluate(build_model(name, bundle), bundle, "test", batch_size=batch_size,
                                           device=device), f"{bundle.name}: the {name} reference")
            for name in ("ha", "persistence")}


def prompt_steps(bundle: DatasetBundle, prompt_days: float) -> int:
    """Steps of the prompt window: `prompt_days` at the end of the training split (at most the whole split)."""
    lo, hi = bundle.splits["train"]
    return min(hi - lo, int(round(prompt_days * 1440.0 / bundle.interval_minutes)))


def pretrain_stage(bundle: DatasetBundle, *, model: str, model_kwargs: dict, train: TrainSettings, seed: int = 0,
                   device="cpu", time_budget_s: float | None = None, observer: Observer | None = None
                   ) -> tuple[StageResult, SourceModel]:
    """Stage 0: train `model` on `bundle` (the whole training split) from scratch and evaluate it."""
    observer = observer or Observer()
    with observer.stage(0, "pretrain", bundle.name):
        with ResourceMonitor(device) as monitor:
            torch.manual_seed(seed)
            net = build_model(model, bundle, **model_kwargs)
            static, flops = _efficiency(net, bundle, train.batch_size)
            result = _fit(net, bundle, train, seed=seed, device=device, observer=observer,
                          time_budget_s=time_budget_s)
            val = _require_finite(evaluate(net, bundle, "val", batch_size=train.batch_size, device=device),
                                  f"{bundle.name}: pretraining, validation")
            test = _require_finite(evaluate(net, bundle, "test", batch_size=train.batch_size, device=device),
                                   f"{bundle.name}: pretraining, test")
            reference = city_references(bundle, batch_size=train.batch_size, device=device)
        stage = StageResult(stage=0, kind="pretrain", city=bundle.name, num_nodes=bundle.num_nodes, val=val,
                            test=test, static_eff=static, flops=flops,
                            dynamic_eff=_dynamic(monitor, result.train_time_s), difficulty=graph_difficulty(bundle),
                            reference=reference, cost=_cost(static, flops, result.samples),
                            data=bundle.data_used_by(bundle.window_starts("train")),
                            history=result.history, stopped_reason=result.stopped_reason)
        source = SourceModel(model, dict(model_kwargs), _cpu_state(net), bundle.name, list(bundle.sensor_ids),
                             bundle.scaler.to_dict())
        observer.stage_done(stage, source)
    return stage, source


def transfer_stage(bundle: DatasetBundle, source: SourceModel | None, *, index: int, strategy: str,
                   train: TrainSettings, curve: CurveSettings, model: str | None = None,
                   model_kwargs: dict | None = None, seed: int = 0, device="cpu",
                   time_budget_s: float | None = None, observer: Observer | None = None
                   ) -> tuple[StageResult, SourceModel]:
    """Stage `index` > 0: transfer `source` to `bundle`, evaluate zero-shot, run the budget curve.

    A strategy that loads nothing (scratch) needs no source: pass `model` and `model_kwargs` instead;
    it has no zero-shot point.
    """
    observer = observer or Observer()
    strat: Strategy = get_strategy(strategy)
    if strat.loads_source and source is None:
        raise ConfigError(f"experiment.strategy: {strategy!r} transfers from a source model; none was given")
    model = source.model if source is not None else model
    model_kwargs = dict(source.model_kwargs if source is not None else model_kwargs or {})
    same_nodes = source is not None and list(source.sensor_ids) == list(bundle.sensor_ids)
    source_scaler = Scaler(**source.scaler) if source is not None else None
    window = prompt_steps(bundle, curve.prompt_days) if strat.uses_prompt_window else 0
    all_starts = bundle.window_starts("train")

    def build(view: DatasetBundle) -> tuple[nn.Module, object]:
        torch.manual_seed(seed)  # every point starts from the same initial weights
        net = build_model(model, view, **model_kwargs)
        report = strat.apply(net, source.state if source is not None else None, same_nodes)
        if report is not None:
            net.after_transfer()  # e.g. a seq2seq model ends its teacher-forcing curriculum (models.base)
        return net, report

    with observer.stage(index, "transfer", bundle.name):
        with ResourceMonitor(device) as monitor:
            zero_val = zero_test = zero_data = zero_view = None
            scheduler = BudgetScheduler(curve.min_gain_rate, curve.min_rel_improve, curve.patience)
            static = flops = report = None
            if strat.loads_source:
                zero_view = bundle.restrict(all_starts[:0], prompt_steps=window, fallback_scaler=source_scaler)
                net, report = build(zero_view)
                static, flops = _efficiency(net, zero_view, train.batch_size)
                where = f"{bundle.name}: zero-shot"
                zero_val = _require_finite(evaluate(net, zero_view, "val", batch_size=train.batch_size,
                                                    device=device), where)
                zero_test = _require_finite(evaluate(net, zero_view, "test", batch_size=train.batch_size,
                                                     device=device), where)
                zero_data = zero_view.data_used
                scheduler.update(0.0, zero_val["mae"])
            points, spent, samples, history, stopped_reason, view = [], 0.0, 0, [], "completed", None
            for fraction in curve.fractions:
                remaining = None if time_budget_s is None else time_budget_s - spent
                if remaining is not None and remaining <= 0:
                    stopped_reason = "time_budget"
                    break
                with observer.budget(index, bundle.name, fraction):
                    starts = sample_windows(all_starts, fraction, curve.fewshot_mode, seed)
                    view = bundle.restrict(starts, prompt_steps=window, fallback_scaler=source_scaler)
                    net, report = build(view)
                    if static is None:  # no zero-shot point: measure the model as the first point builds it
                        static, flops = _efficiency(net, view, train.batch_size)
                    cap = steps_cap(all_starts.numel(), train.batch_size, fraction, curve.fewshot_mode)
                    result = _fit(net, view, train, seed=seed, device=device, observer=observer,
                                  time_budget_s=remaining, starts=starts, cap=cap)
                    where = f"{bundle.name}: fine-tuned at fraction {fraction:g}"
                    val = _require_finite(evaluate(net, view, "val", batch_size=train.batch_size, device=device),
                                          where)
                    test = _require_finite(evaluate(net, view, "test", batch_size=train.batch_size,
                                                    device=device), where)
                    spent += result.train_time_s
                    samples += result.samples
                    point = {"fraction": fraction, "windows": int(starts.numel()), "data": view.data_used,
                             "steps": result.steps, "samples": result.samples, "epochs": len(result.history),
                             "train_time_s": result.train_time_s, "stopped_reason": result.stopped_reason,
                             "val_mae": val["mae"], "val_rmse": val["rmse"], "test_mae": test["mae"],
                             "test_rmse": test["rmse"], "test_mape": test["mape"], "val": val, "test": test}
                    points.append(point)
                    history = result.history
                    observer.budget_done(index, point)
                if result.stopped_reason == "time_budget":
                    stopped_reason = "time_budget"
                    break
                if scheduler.update(fraction, val["mae"]):
                    stopped_reason = "budget_scheduler"
                    break
            reference = city_references(bundle, batch_size=train.batch_size, device=device)
        final_val, final_test = (points[-1]["val"], points[-1]["test"]) if points else (zero_val, zero_test)
        final_view = view if view is not None else zero_view
        stage = StageResult(
            stage=index, kind="transfer", city=bundle.name, num_nodes=bundle.num_nodes, val=final_val, test=final_test,
            static_eff=static, flops=flops, dynamic_eff=_dynamic(monitor, spent), difficulty=graph_difficulty(bundle),
            reference=reference, cost=_cost(static, flops, samples), data=final_view.data_used,
            zero_shot_val=zero_val, zero_shot_test=zero_test, zero_shot_data=zero_data,
            curve=[{k: v for k, v in p.items() if k not in ("val", "test")} for p in points],
            transfer=_transfer_summary(report, same_nodes),
            scheduler={"stopped_at": scheduler.stopped_at, "reason": scheduler.stop_reason,
                       "saved_budget": scheduler.saved_budget(curve.fractions), "steps": scheduler.steps},
            history=history, stopped_reason=stopped_reason,
        )
        new_source = SourceModel(model, model_kwargs, _cpu_state(net), bundle.name, list(bundle.sensor_ids),
                                 final_view.scaler.to_dict())
        observer.stage_done(stage, new_source)
    return stage, new_source


def _usage(s: StageResult) -> dict:
    """The measured resources the budgets (budgets.*) apply to, in score units."""
    return {"mem_mb": s.dynamic_eff["peak_gpu_mb"] if s.dynamic_eff.get("peak_gpu_mb") else s.dynamic_eff["peak_rss_mb"],
            "time_s": s.dynamic_eff["train_time_s"], "flops": s.flops["flops"],
            "trainable_params": s.static_eff["params_trainable"]}


def score_stages(stages: list[StageResult], weights: ScoreWeights, budgets: dict | None) -> ScoreResult:
    """GraphTune-lite's S_uep over the stages; also writes each stage's S_uep parts into `stage.suep`."""
    inputs = [StageInputs(test_rmse=s.test_rmse, zero_rmse=s.zero_rmse,
                          curve=[(p["fraction"], p["test_rmse"]) for p in s.curve], **_usage(s),
                          difficulty=s.difficulty["difficulty_proxy"], name=f"{s.stage}:{s.city}") for s in stages]
    result = score_experiment(inputs, weights, budgets)
    for stage, part in zip(stages, result.stages):
        stage.suep = {"perf_norm": part.perf_norm, "transfer_auc": part.transfer_auc, "eff_norm": part.eff_norm,
                      "budget_penalty": part.budget_penalty, "stage_score": part.stage_score,
                      "difficulty_weight": part.difficulty_weight}
    return result


def stage_measures(s: StageResult) -> StageMeasures:
    """A stage's inputs to the comparable score."""
    return StageMeasures(
        ref_rmse=s.reference["ha"]["rmse"], test_rmse=s.test_rmse, zero_rmse=s.zero_rmse,
        curve=[(p["fraction"], p["test_rmse"]) for p in s.curve],
        transferred=True if s.transfer is None else s.transfer["transferred"], kind=s.kind,
        finetune_flops=s.cost["train_flops"], trainable_params=s.cost["trainable_params"], size_mb=s.cost["size_mb"],
        infer_flops=s.cost["infer_flops_per_window"], usage=_usage(s), difficulty=s.difficulty["difficulty_proxy"],
        name=f"{s.stage}:{s.city}")


def scored_stages(stages: list[StageResult]) -> list[StageResult]:
    """The stages the comparable score covers: the transfer stages, or the pretrain stage of a pretrain-only run."""
    return [s for s in stages if s.kind == "transfer"] or list(stages)


def comparable_stages(stages: list[StageResult], weights: ScoreWeights, refs: CostReferences,
                      budgets: dict | None) -> ComparableScore:
    """The comparable score of a run; writes every stage's parts into `stage.score` (a pretrain stage of a
    transfer run gets its own parts for display; it does not count in the run's score)."""
    scored = scored_stages(stages)
    result = comparable_score([stage_measures(s) for s in scored], weights, refs, budgets)
    for stage, part in zip(scored, result.stages):
        stage.score = _parts(part)
    for stage in stages:
        if stage not in scored:
            stage.score = _parts(comparable_score([stage_measures(stage)], weights, refs, budgets).stages[0])
            stage.score["difficulty_weight"] = 0.0  # shown, not counted
    return result


def _parts(part) -> dict:
    return {k: v for k, v in asdict(part).items() if k != "name"}


def reference_scores(stages: list[StageResult], weights: ScoreWeights, refs: CostReferences) -> dict:
    """The historical average and persistence scored by the same rule as the run, on the same stages.

    A reference needs no transfer and no training: its error is the same at every point of the curve
    (persistence reads nothing of the training split; the historical average at fraction 0 would have no
    data, and counts as no skill anywhere), and it costs nothing. HA scores 0 by construction.
    """
    scored = scored_stages(stages)
    out = {}
    for name in ("ha", "persistence"):
        measures = []
        for s in scored:
            rmse = s.reference[name]["rmse"]
            measures.append(StageMeasures(ref_rmse=s.reference["ha"]["rmse"], test_rmse=rmse,
                                          zero_rmse=rmse if s.kind == "transfer" else None,
                                          curve=[(1.0, rmse)] if s.kind == "transfer" else [], kind=s.kind,
                                          difficulty=s.difficulty["difficulty_proxy"], name=f"{s.stage}:{s.city}"))
        result = comparable_score(measures, weights, refs)
        weights_ = [p.difficulty_weight for p in result.stages]
        out[name] = {"score": result.score,
                     "mean_skill": sum(p.difficulty_weight * p.skill for p in result.stages),
                     "mean_transfer_auc": sum(p.difficulty_weight * p.transfer_auc for p in result.stages),
                     "test_rmse": sum(w * s.reference[name]["rmse"] for w, s in zip(weights_, scored)),
                     "test_mae": sum(w * s.reference[name]["mae"] for w, s in zip(weights_, scored)),
                     "final_test_rmse": scored[-1].reference[name]["rmse"],
                     "final_test_mae": scored[-1].reference[name]["mae"]}
    return out


def run_experiment(bundles: list[DatasetBundle], *, model: str, model_kwargs: dict | None = None,
                   strategy: str = "full", train: list[TrainSettings], curve: CurveSettings = CurveSettings(),
                   weights: ScoreWeights = ScoreWeights(), refs: CostReferences = CostReferences(),
                   budgets: dict | None = None, enforce_time_s: float | None = None, seed: int = 0, device="cpu",
                   name: str = "", source: SourceModel | None = None,
                   observer: Observer | None = None) -> ExperimentResult:
    """The whole stage loop. With `source`, every bundle is a transfer target (no pretraining stage).

    `train` holds one TrainSettings per stage; `enforce_time_s` stops a stage's training once it has
    used that many seconds (the time budget when `budgets.enforce` is on). A strategy that loads
    nothing from the source (scratch) skips pretraining: the first city only names the source.
    """
    observer = observer or Observer()
    model_kwargs = dict(model_kwargs or {})
    n_stages = len(bundles)
    if len(train) != n_stages:
        raise ConfigError(f"train settings: expected one per stage ({n_stages}), got {len(train)}")
    loads_source = get_strategy(strategy).loads_source
    stages: list[StageResult] = []
    first = 0
    if source is None:
        first = 1
        if loads_source or n_stages == 1:  # a single city is a pretrain-only run, whatever the strategy
            stage, source = pretrain_stage(bundles[0], model=model, model_kwargs=model_kwargs, train=train[0],
                                           seed=seed, device=device, time_budget_s=enforce_time_s, observer=observer)
            stages.append(stage)
    for k in range(first, n_stages):
        stage, source = transfer_stage(bundles[k], source if loads_source else None, index=k, strategy=strategy,
                                       train=train[k], curve=curve, model=model, model_kwargs=model_kwargs,
                                       seed=seed, device=device, time_budget_s=enforce_time_s, observer=observer)
        stages.append(stage)
    suep = score_stages(stages, weights, budgets)
    score = comparable_stages(stages, weights, refs, budgets)
    return ExperimentResult(name=name, model=source.model, strategy=strategy, datasets=[b.name for b in bundles],
                            seed=seed, stages=stages, score=score, suep=suep,
                            references=reference_scores(stages, weights, refs))


# ----------------------------------------------------------------------------- helpers
def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _transfer_summary(report, same_nodes: bool) -> dict:
    """What the strategy loaded; `transferred` False when it loaded nothing (scratch)."""
    if report is None:
        return {"share": 0.0, "copied": 0, "skipped": {}, "same_nodes": same_nodes, "transferred": False}
    return {"share": report.share, "copied": len(report.copied), "skipped": dict(report.skipped),
            "same_nodes": same_nodes, "transferred": True}


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when available, else "cpu"; anything else must be a valid torch device."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"experiment.device: expected auto, cpu, cuda or cuda:N, got {device!r}") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"experiment.device: {device!r} requested but CUDA is not available")
    return device

