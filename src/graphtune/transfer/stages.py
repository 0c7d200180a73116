"""The transfer experiment: pretrain on the first city, then, per target city, zero-shot and a budget curve.

    stage 0      build the model for city 0, fit, evaluate                                 -> StageResult
                 (skipped when the strategy loads nothing from the source, e.g. scratch)
    stage k > 0  the zero-shot point: the strategy adapts the source to the city as zero-shot may see
                 it, evaluate; then for each budget fraction f: the view of the city that holds only
                 f's sampled windows, the strategy adapts again, fine-tune, evaluate; a loss-gradient
                 scheduler stops the curve once gains flatten                                -> StageResult
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

Settings arrive as the params.yaml sections, whole (graphtune.config): experiment, train, transfer,
score, budgets. A strategy is looked up by name (graphtune.transfer.strategies): this loop never changes
when one is added. The costs that enter the score are measured outside the timed and memory windows.

No MLflow and no files here: an `Observer` receives the events (stage and budget starts, epochs,
results) and the experiment runner (graphtune.transfer.experiment) turns them into tracked runs and outputs.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, is_dataclass, replace

import torch
import torch.nn as nn

from graphtune import distributed
from graphtune.config import BudgetConfig, ExperimentConfig, ScoreConfig, TrainConfig, TransferConfig
from graphtune.data.bundle import DatasetBundle, Scaler
from graphtune.engine import FitResult, evaluate, fit
from graphtune.errors import ConfigError, TrainingDiverged
from graphtune.models import build_model
from graphtune.profiling import ResourceMonitor, graph_difficulty, profile_model
from graphtune.transfer.budget import BudgetScheduler, budget_points, sample_windows, steps_cap
from graphtune.transfer.score import (ComparableScore, ScoreResult, StageInputs, StageMeasures, budgets_from_config,
                                      comparable_score, score_experiment)
from graphtune.transfer.strategies import SourceModel, StrategyContext, get_strategy


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

    @property
    def rmse_curve(self) -> list[tuple[float, float]]:
        """(fraction, test RMSE) of each budget point: the curve both scores integrate."""
        return [(p["fraction"], p["test_rmse"]) for p in self.curve]

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
    allocation: dict = field(default_factory=dict)  # transfer.allocation's shares and diagnostics, when one is made

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
                "stages": [s.to_dict() for s in self.stages]} | ({"allocation": self.allocation} if self.allocation else {})

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


@dataclass
class PointRecord:
    """A finished budget point, holding what resuming after it needs (`experiment --resume`): the point's entry,
    its fit's record (everything but the best state), its measured time and memory, and the fine-tuned weights."""

    position: int  # the point's place on the stage's curve (0 = the first fraction)
    point: dict  # the point's entry as the stage loop built it, val and test metrics included
    fit: dict  # FitResult's fields except best_state
    monitor: dict  # elapsed_s, peak_rss_mb, peak_gpu_mb of the point's resource window
    state: dict  # the weights the point ended with (CPU tensors)
    run: str | None = None  # the tracking run the point was recorded in, when there is one

    def payload(self) -> dict:
        """Plain containers and tensors only: loadable with torch.load(weights_only=True)."""
        return {"position": self.position, "point": self.point, "fit": self.fit, "monitor": self.monitor,
                "state": self.state}

    @classmethod
    def from_payload(cls, data: dict) -> "PointRecord":
        return cls(**{k: data[k] for k in ("position", "point", "fit", "monitor", "state")}, run=data.get("run"))

    def fit_result(self) -> FitResult:
        return FitResult(best_state={}, **self.fit)


@dataclass
class MonitorRecord:
    """A resource window measured before an interruption (what `_dynamic` reads of a ResourceMonitor)."""

    elapsed_s: float
    peak_rss_mb: float | None
    peak_gpu_mb: float | None


@dataclass
class ResumeState:
    """What an interrupted run had finished: whole stages (result and trained model) and, in the stage that
    was running, its finished budget points in curve order. `run_experiment` continues from there."""

    stages: dict = field(default_factory=dict)  # stage index -> (StageResult, SourceModel)
    points: dict = field(default_factory=dict)  # stage index -> [PointRecord, ...] of the unfinished stage


class PhaseLog:
    """What a phase (`Observer.phase`) records into: metrics per step, parameters, a JSON document."""

    def metrics(self, metrics: dict, step: int) -> None: ...

    def params(self, params: dict) -> None: ...

    def dict(self, data: dict, name: str) -> None: ...


class Observer:
    """Hooks the stage loop calls. The default does nothing; tracking and printing subclass it."""

    def stage(self, index: int, kind: str, city: str):
        return nullcontext()

    def phase(self, name: str, tags: dict | None = None):
        """A step outside the stage loop that builds its sources (gpd's collect and diffuse): yields a PhaseLog."""
        return nullcontext(PhaseLog())

    def budget(self, index: int, city: str, fraction: float):
        return nullcontext()

    def epoch(self, entry: dict) -> None: ...

    def budget_done(self, index: int, point: dict) -> None: ...

    def stage_done(self, result: StageResult, source: SourceModel, model: nn.Module | None = None,
                   example: torch.Tensor | None = None) -> None:
        """After a stage: its result, the trained model (as a checkpoint and as the module, with an example
        input batch (B, T_in, N, C) of its city)."""

    def point_done(self, index: int, record: PointRecord) -> None:
        """After a budget point of stage `index` (inside its budget context): what resuming after it needs."""

    def stage_restored(self, result: StageResult, source: SourceModel) -> None:
        """A stage an interrupted run had finished, taken as it was instead of being run again."""

    def allocation_done(self, allocation: dict) -> None:
        """The targets' shares of one fine-tuning budget (transfer.allocation), before the first is fine-tuned."""


# ----------------------------------------------------------------------------- checks
def check_transfer(transfer: TransferConfig) -> None:
    """What the section's own checks (graphtune.config: each fraction in (0, 1], the mode, patience) cannot
    see: the curve's order and repeats."""
    fractions = [float(f) for f in transfer.fractions]
    if fractions != sorted(set(fractions)):
        raise ConfigError(f"transfer.fractions: expected increasing fractions without repeats, got {fractions}")
    days = [float(d) for d in transfer.target_days]
    if days != sorted(set(days)):
        raise ConfigError(f"transfer.target_days: expected increasing days without repeats, got {days}")


# ----------------------------------------------------------------------------- measuring
def _efficiency(model: nn.Module, bundle: DatasetBundle, batch_size: int) -> tuple[dict, dict]:
    """Static cost (parameters, size) and FLOPs (forward, training step) of `model` on `bundle`'s graph.

    Profiled once per stage (every point of a stage has the same model shape and trainable set), outside its
    resource windows, so none of this is timed. thop's cross-check is left to `graphtune models --profile`.
    """
    prof = profile_model(model, bundle, batch_size=batch_size, thop=False)
    return ({k: prof[k] for k in ("params_total", "params_trainable", "size_mb")},
            {k: prof[k] for k in ("flops", "macs", "train_flops", "thop_macs", "batch_size")})


def _cost(static: dict, flops: dict, samples: int) -> dict:
    """The deterministic costs of a stage: training FLOPs = per-window FLOPs of a training step x windows trained."""
    per_window_train = flops["train_flops"] / flops["batch_size"]
    return {"train_flops": per_window_train * samples, "train_samples": samples,
            "train_flops_per_window": per_window_train, "infer_flops_per_window": flops["flops"] / flops["batch_size"],
            "trainable_params": static["params_trainable"], "size_mb": static["size_mb"]}


def _dynamic(monitors: list[ResourceMonitor], fits: list) -> dict:
    """Time and memory of a stage, over the windows its points were measured in: train_time_s counts training
    steps only, val_time_s the validations, fit_time_s the fits' wall time (steps, validations, checkpoint
    copies: the clock budgets.time_sec applies to), wall_time_s every window; the peaks are the highest of
    them (each above the memory in use when its window opened)."""
    def peak(values):
        values = [v for v in values if v is not None]
        return max(values) if values else None

    return {"train_time_s": sum(f.train_time_s for f in fits), "val_time_s": sum(f.val_time_s for f in fits),
            "fit_time_s": sum(f.fit_time_s for f in fits), "wall_time_s": sum(m.elapsed_s for m in monitors), "peak_rss_mb": peak(m.peak_rss_mb for m in monitors),
            "peak_gpu_mb": peak(m.peak_gpu_mb for m in monitors)}


def _require_finite(metrics: dict, what: str) -> dict:
    """A non-finite error must never be scored: stop the run with a one-line reason."""
    bad = [k for k in ("mae", "rmse") if not math.isfinite(metrics[k])]
    if bad:
        raise TrainingDiverged(f"{what}: {bad[0].upper()} is {metrics[bad[0]]} (non-finite predictions, or no "
                               "observed reading in the split); the run is stopped and will not be ranked")
    return metrics


def city_references(bundle: DatasetBundle, *, batch_size: int, device="cpu") -> dict:
    """Test metrics of the city's references on the same windows as every model: the time-of-day historical
    average fitted on the whole training split, and last-value persistence. Fixed per city and split."""
    return {name: _require_finite(evaluate(build_model(name, bundle), bundle, "test", batch_size=batch_size,
                                           device=device), f"{bundle.name}: the {name} reference")
            for name in ("ha", "persistence")}


def prompt_steps(bundle: DatasetBundle, prompt_days: float) -> int:
    """Steps of the prompt window: `prompt_days` at the end of the training split (at most the whole split)."""
    lo, hi = bundle.splits["train"]
    return min(hi - lo, int(round(prompt_days * 1440.0 / bundle.interval_minutes)))


# ----------------------------------------------------------------------------- stages
def pretrain_stage(bundle: DatasetBundle, experiment: ExperimentConfig, train: TrainConfig, *, n_stages: int = 1,
                   device="cpu", time_budget_s: float | None = None, observer: Observer | None = None
                   ) -> tuple[StageResult, SourceModel]:
    """Stage 0: train experiment.model on `bundle` (the whole training split) from scratch and evaluate it."""
    observer = observer or Observer()
    seed, batch = experiment.seed, train.batch_size
    with observer.stage(0, "pretrain", bundle.name):
        torch.manual_seed(seed)
        net = build_model(experiment.model, bundle, **experiment.model_kwargs)
        static, flops = _efficiency(net, bundle, batch)
        with ResourceMonitor(device) as monitor:
            result = fit(net, bundle, train, stage=0, n_stages=n_stages, seed=seed, device=device,
                         time_budget_s=time_budget_s, on_epoch_end=lambda _, e: observer.epoch(e))
            val = _require_finite(_best_val(result, net, bundle, batch, device), f"{bundle.name}: pretraining, validation")
            test = _require_finite(evaluate(net, bundle, "test", batch_size=batch, device=device),
                                   f"{bundle.name}: pretraining, test")
        reference = city_references(bundle, batch_size=batch, device=device)
        stage = StageResult(stage=0, kind="pretrain", city=bundle.name, num_nodes=bundle.num_nodes, val=val,
                            test=test, static_eff=static, flops=flops, dynamic_eff=_dynamic([monitor], [result]),
                            difficulty=graph_difficulty(bundle), reference=reference,
                            cost=_cost(static, flops, result.samples),
                            data=bundle.data_used_by(bundle.window_starts("train")),
                            history=result.history, stopped_reason=result.stopped_reason)
        source = SourceModel(experiment.model, dict(experiment.model_kwargs), _cpu_state(net), bundle.name,
                             list(bundle.sensor_ids), bundle.scaler.to_dict())
        observer.stage_done(stage, source, net, _example(bundle))
    return stage, source


def transfer_stage(bundle: DatasetBundle, sources: tuple[SourceModel, ...], experiment: ExperimentConfig,
                   train: TrainConfig, transfer: TransferConfig, *, index: int, n_stages: int, device="cpu",
                   time_budget_s: float | None = None, observer: Observer | None = None,
                   done: list[PointRecord] | tuple = ()) -> tuple[StageResult, SourceModel]:
    """Stage `index` > 0: adapt `sources` to `bundle` with experiment.strategy, evaluate zero-shot, run the curve.

    A strategy that loads nothing (scratch) needs no source and has no zero-shot point. `done`: the budget
    points an interrupted run finished (in curve order); they are taken as recorded, and the curve continues
    after them. Every point is seeded on its own (the strategy's initialisation, fit's seed, the windows of
    `budget_points`), so the continued curve equals an uninterrupted one.
    """
    observer = observer or Observer()
    strategy = get_strategy(experiment.strategy)
    sources = tuple(sources) if strategy.loads_source else ()
    if strategy.loads_source and not sources:
        raise ConfigError(f"experiment.strategy: {experiment.strategy!r} transfers from a source model; none was given")
    model = sources[-1].model if sources else experiment.model
    model_kwargs = dict(sources[-1].model_kwargs if sources else experiment.model_kwargs)
    seed, batch = experiment.seed, train.batch_size
    source_scaler = Scaler(**sources[-1].scaler) if sources else None
    window = prompt_steps(bundle, transfer.prompt_days) if strategy.uses_prompt_window else 0
    all_starts = bundle.window_starts("train")

    def context(view: DatasetBundle, fraction: float) -> StrategyContext:
        return StrategyContext(sources=sources, target=view, model=model, model_kwargs=model_kwargs, seed=seed,
                               device=str(device), fraction=fraction)

    with observer.stage(index, "transfer", bundle.name):
        zero_val = zero_test = zero_data = zero_view = static = flops = None
        scheduler = BudgetScheduler(transfer)
        if strategy.loads_source:
            zero_view = bundle.restrict(all_starts[:0], prompt_steps=window, fallback_scaler=source_scaler)
            ctx = context(zero_view, 0.0)
            adapted = strategy.adapt(ctx)
            net, report = adapted.model, adapted.report
            static, flops = _efficiency(net, zero_view, batch)
        points, fits, monitors, history, stopped_reason, view = [], [], [], [], "completed", None
        if zero_view is not None:
            with ResourceMonitor(device) as monitor:
                where = f"{bundle.name}: zero-shot"
                zero_val = _require_finite(evaluate(net, zero_view, "val", batch_size=batch, device=device), where)
                zero_test = _require_finite(evaluate(net, zero_view, "test", batch_size=batch, device=device), where)
            monitors.append(monitor)
            zero_data = zero_view.data_used
            scheduler.update(0.0, zero_val["mae"])
        curve = budget_points(all_starts, transfer, bundle.steps_per_day, seed)
        for position, (fraction, starts, days) in enumerate(curve):
            spent = sum(f.fit_time_s for f in fits)
            remaining = None if time_budget_s is None else time_budget_s - spent
            # rank 0's clock decides in a data-parallel job, so every rank runs the same points
            remaining = distributed.broadcast_object(remaining) if distributed.world_size() > 1 else remaining
            if remaining is not None and remaining <= 0:
                stopped_reason = "time_budget"
                break
            if position < len(done):  # finished before an interruption: taken as recorded
                record = done[position]
                result, point = record.fit_result(), record.point
                val = point["val"]
                fits.append(result)
                monitors.append(MonitorRecord(**record.monitor))
                points.append(point)
                history = result.history
                if position == len(done) - 1:  # the model the stage ends with, if the curve stops here
                    view = bundle.restrict(starts, prompt_steps=window, fallback_scaler=source_scaler)
                    ctx = context(view, fraction)
                    adapted = strategy.adapt(ctx)
                    net, report = adapted.model, adapted.report
                    net.load_state_dict(record.state)
                    if static is None:
                        static, flops = _efficiency(net, view, batch)
            else:  # run the point
                with observer.budget(index, bundle.name, fraction):
                    # the point's data, as a pretraining stage's, is set up outside its resource window
                    view = bundle.restrict(starts, prompt_steps=window, fallback_scaler=source_scaler)
                    ctx = context(view, fraction)
                    cap = None if days is not None else steps_cap(all_starts.numel(), batch, fraction,
                                                                  transfer.fewshot_mode)
                    with ResourceMonitor(device) as monitor:  # each point's own time and memory, its adaptation in
                        adapted = strategy.adapt(ctx)
                        net, report = adapted.model, adapted.report
                        result = fit(net, view, train, stage=index, n_stages=n_stages, seed=seed, device=device,
                                     max_steps_per_epoch=cap, time_budget_s=remaining,
                                     on_epoch_end=lambda _, e: observer.epoch(e))
                        where = f"{bundle.name}: fine-tuned at fraction {fraction:g}"
                        val = _require_finite(_best_val(result, net, view, batch, device), where)
                        test = _require_finite(evaluate(net, view, "test", batch_size=batch, device=device), where)
                    if static is None:  # no zero-shot point (scratch): the first point's model, after its window
                        static, flops = _efficiency(net, view, batch)
                    monitors.append(monitor)
                    fits.append(result)
                    point = {"fraction": fraction, "target_days": days, "windows": int(starts.numel()), "data": view.data_used,
                             "steps": result.steps, "samples": result.samples, "epochs": len(result.history),
                             "best_epoch": result.best_epoch, "train_time_s": result.train_time_s,
                             "wall_time_s": monitor.elapsed_s, "peak_rss_mb": monitor.peak_rss_mb,
                             "peak_gpu_mb": monitor.peak_gpu_mb, "train_flops": _cost(static, flops, result.samples)["train_flops"],
                             "stopped_reason": result.stopped_reason, "val_mae": val["mae"], "val_rmse": val["rmse"],
                             "test_mae": test["mae"], "test_rmse": test["rmse"], "test_mape": test["mape"],
                             "test_wape": test["wape"],
                             # train.memory_budget_mb's choice (graphtune.memory), None without a budget
                             "memory_plan": result.plan.as_dict() if result.plan is not None else None,
                             "val": val, "test": test}
                    points.append(point)
                    history = result.history
                    observer.budget_done(index, point)
                    # plain containers only (a memory plan as a dict): the journal is read with weights_only
                    fit_record = {k: (asdict(v) if is_dataclass(v) else v) for k, v in vars(result).items()
                                  if k != "best_state"}
                    observer.point_done(index, PointRecord(
                        position=position, point=point, fit=fit_record, state=_cpu_state(net),
                        monitor={"elapsed_s": monitor.elapsed_s, "peak_rss_mb": monitor.peak_rss_mb,
                                 "peak_gpu_mb": monitor.peak_gpu_mb}))
            if result.stopped_reason == "time_budget":
                stopped_reason = "time_budget"
                break
            if scheduler.update(fraction, val["mae"]):
                stopped_reason = "budget_scheduler"
                break
        reference = city_references(bundle, batch_size=batch, device=device)
        final_val, final_test = (points[-1]["val"], points[-1]["test"]) if points else (zero_val, zero_test)
        final_view = view if view is not None else zero_view
        stage = StageResult(
            stage=index, kind="transfer", city=bundle.name, num_nodes=bundle.num_nodes, val=final_val, test=final_test,
            static_eff=static, flops=flops, dynamic_eff=_dynamic(monitors, fits), difficulty=graph_difficulty(bundle),
            reference=reference, cost=_cost(static, flops, sum(f.samples for f in fits)), data=final_view.data_used,
            zero_shot_val=zero_val, zero_shot_test=zero_test, zero_shot_data=zero_data,
            curve=[{k: v for k, v in p.items() if k not in ("val", "test")} for p in points],
            transfer=report.summary(ctx.same_nodes),
            scheduler={"stopped_at": scheduler.stopped_at, "reason": scheduler.stop_reason,
                       "saved_budget": scheduler.saved_budget([p[0] for p in curve]), "steps": scheduler.steps},
            history=history, stopped_reason=stopped_reason,
        )
        new_source = SourceModel(model, adapted.model_kwargs or model_kwargs, _cpu_state(net), bundle.name,
                                 list(bundle.sensor_ids), final_view.scaler.to_dict())
        observer.stage_done(stage, new_source, strategy.export(net), _example(final_view))
    return stage, new_source


def _best_val(result, net: nn.Module, view: DatasetBundle, batch: int, device) -> dict:
    """Validation metrics of the weights `net` holds after `fit`: fit's own, else (nothing trained) measured."""
    if result.best_val is not None:
        return result.best_val
    return evaluate(net, view, "val", batch_size=batch, device=device)


def _usage(s: StageResult) -> dict:
    """The measured resources the budgets (budgets.*) apply to, in score units."""
    return {"mem_mb": s.dynamic_eff["peak_gpu_mb"] if s.dynamic_eff.get("peak_gpu_mb") else s.dynamic_eff["peak_rss_mb"],
            "time_s": s.dynamic_eff["fit_time_s"], "flops": s.flops["flops"],
            "trainable_params": s.static_eff["params_trainable"]}


def score_stages(stages: list[StageResult], weights: ScoreConfig, budgets: dict | None) -> ScoreResult:
    """GraphTune-lite's S_uep over the stages; also writes each stage's S_uep parts into `stage.suep`."""
    inputs = [StageInputs(test_rmse=s.test_rmse, zero_rmse=s.zero_rmse,
                          curve=s.rmse_curve, **_usage(s),
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
        curve=s.rmse_curve,
        transferred=True if s.transfer is None else s.transfer["transferred"], kind=s.kind,
        finetune_flops=s.cost["train_flops"], trainable_params=s.cost["trainable_params"], size_mb=s.cost["size_mb"],
        infer_flops=s.cost["infer_flops_per_window"], usage=_usage(s), difficulty=s.difficulty["difficulty_proxy"],
        name=f"{s.stage}:{s.city}")


def scored_stages(stages: list[StageResult]) -> list[StageResult]:
    """The stages the comparable score covers: the transfer stages, or the pretrain stage of a pretrain-only run."""
    return [s for s in stages if s.kind == "transfer"] or list(stages)


def comparable_stages(stages: list[StageResult], weights: ScoreConfig, budgets: dict | None) -> ComparableScore:
    """The comparable score of a run; writes every stage's parts into `stage.score` (a pretrain stage of a
    transfer run gets its own parts for display; it does not count in the run's score)."""
    scored = scored_stages(stages)
    result = comparable_score([stage_measures(s) for s in scored], weights, budgets)
    for stage, part in zip(scored, result.stages):
        stage.score = _parts(part)
    for stage in stages:
        if stage not in scored:
            stage.score = _parts(comparable_score([stage_measures(stage)], weights, budgets).stages[0])
            stage.score["difficulty_weight"] = 0.0  # shown, not counted
    return result


def _parts(part) -> dict:
    return {k: v for k, v in asdict(part).items() if k != "name"}


def reference_scores(stages: list[StageResult], weights: ScoreConfig) -> dict:
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
        result = comparable_score(measures, weights)
        weights_ = [p.difficulty_weight for p in result.stages]
        out[name] = {"score": result.score,
                     "mean_skill": result.mean_skill, "mean_transfer_auc": result.mean_transfer_auc,
                     "test_rmse": sum(w * s.reference[name]["rmse"] for w, s in zip(weights_, scored)),
                     "test_mae": sum(w * s.reference[name]["mae"] for w, s in zip(weights_, scored)),
                     "final_test_rmse": scored[-1].reference[name]["rmse"],
                     "final_test_mae": scored[-1].reference[name]["mae"]}
    return out


def run_experiment(bundles: list[DatasetBundle], experiment: ExperimentConfig, train: TrainConfig,
                   transfer: TransferConfig, score: ScoreConfig = ScoreConfig(), budgets: BudgetConfig = BudgetConfig(),
                   *, device="cpu", sources: tuple[SourceModel, ...] = (), observer: Observer | None = None,
                   resume: ResumeState | None = None) -> ExperimentResult:
    """The whole stage loop over `bundles`, with the params.yaml sections passed whole.

    Without `sources`, stage 0 pretrains experiment.model on the first city and every later city is a
    transfer target; a strategy that loads nothing from a source (scratch) skips the pretraining, the first
    city then only names the source. With `sources` (a fine-tuning run), every bundle is a target: stages
    1..n, as stage 0 was the source's pretraining. `budgets.enforce` stops a stage's training at
    `budgets.time_sec`.

    resume: what an interrupted run of the same configuration finished: its finished stages are taken as they
    were (`observer.stage_restored`), and the stage it was in continues after its last finished budget point.
    """
    observer = observer or Observer()
    resume = resume or ResumeState()
    strategy = get_strategy(experiment.strategy)
    first = 1 if sources else 0  # the stage index of bundles[0]
    n_stages = len(bundles) + first
    train.check_stages(range(first, n_stages), n_stages)
    enforce_time_s = budgets.time_sec if budgets.enforce else None
    stages: list[StageResult] = []
    sources = tuple(sources)
    shares, allocation = None, {}
    for index, bundle in enumerate(bundles, start=first):
        stage_transfer = transfer
        if index > 0 and transfer.allocation != "none":
            if shares is None:  # before the first target is fine-tuned: every target's share of the budget
                shares, allocation = allocate_budget([(i, b) for i, b in enumerate(bundles, start=first) if i > 0],
                                                     sources, experiment, train, transfer, n_stages=n_stages,
                                                     device=device)
                observer.allocation_done(allocation)
            probe, share = float(transfer.fractions[0]), shares[bundle.name]
            # the allocation decided the budget: the scheduler does not stop the curve after the probe
            stage_transfer = replace(transfer, fractions=[probe] + ([share] if share > probe else []), patience=2)
        if index in resume.stages:
            stage, source = resume.stages[index]
            observer.stage_restored(stage, source)
        elif index == 0:
            if not strategy.loads_source and len(bundles) > 1:
                continue  # scratch: nothing is transferred, so nothing is pretrained
            stage, source = pretrain_stage(bundle, experiment, train, n_stages=n_stages, device=device,
                                           time_budget_s=enforce_time_s, observer=observer)
        else:
            stage, source = transfer_stage(bundle, sources, experiment, train, stage_transfer, index=index,
                                           n_stages=n_stages, device=device, time_budget_s=enforce_time_s,
                                           observer=observer, done=resume.points.get(index, ()))
        stages.append(stage)
        sources = sources + (source,)
    budget_dict = budgets_from_config(budgets)
    suep = score_stages(stages, score, budget_dict)
    result = comparable_stages(stages, score, budget_dict)
    return ExperimentResult(name=experiment.name, model=sources[-1].model, strategy=experiment.strategy,
                            datasets=[b.name for b in bundles], seed=experiment.seed, stages=stages, score=result,
                            suep=suep, references=reference_scores(stages, score), allocation=allocation)


def allocate_budget(targets: list[tuple[int, DatasetBundle]], sources: tuple, experiment: ExperimentConfig,
                    train: TrainConfig, transfer: TransferConfig, *, n_stages: int, device="cpu"
                    ) -> tuple[dict[str, float], dict]:
    """Each target's share of `transfer.total_budget` by `transfer.allocation` (graphtune.transfer.allocation),
    and the record of how it was chosen: {"rule", "total_budget", "probe_fraction", "shares", "targets"}."""
    from graphtune.transfer.allocation import Diagnostics, diagnostics_shares, uniform

    probe = float(transfer.fractions[0])
    windows = {b.name: int(b.window_starts("train").numel()) for _, b in targets}
    record = {"rule": transfer.allocation, "total_budget": transfer.total_budget, "probe_fraction": probe}
    if transfer.allocation == "uniform":
        shares = uniform(windows, transfer.total_budget)
        return shares, record | {"shares": shares, "targets": []}
    diags = []
    probe_transfer = replace(transfer, fractions=[probe], allocation="none")
    for index, bundle in targets:  # the probe is the stage's own first point (same seed, same windows), unrecorded
        stage, _ = transfer_stage(bundle, sources, experiment, train, probe_transfer, index=index, n_stages=n_stages,
                                  device=device)
        view = bundle.restrict(sample_windows(bundle.window_starts("train"), probe, transfer.fewshot_mode,
                                              experiment.seed))
        ha = evaluate(build_model("ha", view), view, "val", batch_size=train.batch_size, device=device)["mae"]
        zero = stage.zero_shot_val["mae"] if stage.zero_shot_val is not None else stage.curve[0]["val_mae"]
        diags.append(Diagnostics(city=bundle.name, windows=windows[bundle.name], zero=zero,
                                 probe=stage.curve[0]["val_mae"], ha=ha,
                                 difficulty=stage.difficulty["difficulty_proxy"], probe_fraction=probe))
    shares, table = diagnostics_shares(diags, transfer.total_budget, probe)
    return shares, record | {"shares": shares, "targets": table}


# ----------------------------------------------------------------------------- helpers
def _example(bundle: DatasetBundle, size: int = 4) -> torch.Tensor:
    """A few validation windows x (B, T_in, N, C) of `bundle`: a model's example input (its signature)."""
    x, _ = bundle.batch(bundle.window_starts("val")[:size])
    return x


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def resolve_device(device: str, option: str = "experiment.device") -> str:
    """"auto" -> "cuda" when available, else "cpu"; anything else must be a valid torch device (errors name
    `option`, the setting it came from)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{option}: expected auto, cpu, cuda or cuda:N, got {device!r}") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{option}: {device!r} requested but CUDA is not available")
    return device

