"""The transfer experiment: pretrain on the first city, then, per target city, zero-shot and a budget curve.

    stage 0      build model for city 0, fit, evaluate                          -> StageResult
    stage k > 0  build model for city k, transfer weights from stage k-1 (strategy),
                 evaluate zero-shot (fraction 0), then for each budget fraction f:
                 restart from the transferred weights, fine-tune on f of the training data,
                 evaluate; a loss-gradient scheduler stops the curve once gains flatten   -> StageResult
    all stages   S_uep (graphtune.score) with difficulty weights                         -> ExperimentResult

No MLflow and no files here: an `Observer` receives the events (stage and budget starts, epochs,
results) and the experiment runner (graphtune.experiment) turns them into tracked runs and outputs.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from graphtune.budget import BudgetScheduler, check_fraction, sample_windows, steps_cap
from graphtune.data.bundle import DatasetBundle
from graphtune.engine import evaluate, fit
from graphtune.errors import ConfigError
from graphtune.models import build_model
from graphtune.profiling import ResourceMonitor, graph_difficulty, profile_model
from graphtune.score import ScoreResult, ScoreWeights, StageInputs, score_experiment
from graphtune.strategies import get_strategy


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
    """The budget curve of a transfer stage and its scheduler (see graphtune.budget)."""

    fractions: tuple[float, ...] = (0.1, 0.3, 1.0)
    fewshot_mode: str = "subset"
    min_gain_rate: float = 0.5
    min_rel_improve: float = 0.01
    patience: int = 0


@dataclass
class SourceModel:
    """What a transfer starts from: a trained state and the nodes it was trained on."""

    model: str
    model_kwargs: dict
    state: dict
    city: str
    sensor_ids: list[str]

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
    flops: dict  # flops, macs per forward batch (FlopCounterMode), thop_macs cross-check
    dynamic_eff: dict  # train_time_s, wall_time_s, peak_rss_mb, peak_gpu_mb
    difficulty: dict  # difficulty_proxy, difficulty_ha
    zero_shot_val: dict | None = None
    zero_shot_test: dict | None = None
    curve: list[dict] = field(default_factory=list)  # budget points: fraction, windows, epochs, val_*, test_*
    transfer: dict | None = None  # share, copied, skipped
    scheduler: dict | None = None  # stopped_at, reason, saved_budget, steps
    history: list[dict] = field(default_factory=list)  # per-epoch entries of the stage's final fit
    stopped_reason: str = "completed"
    score: dict = field(default_factory=dict)  # filled by S_uep: perf_norm, transfer_auc, eff_norm, ...

    @property
    def test_rmse(self) -> float:
        return self.test["rmse"]

    @property
    def zero_rmse(self) -> float | None:
        return None if self.zero_shot_test is None else self.zero_shot_test["rmse"]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(zero_rmse=self.zero_rmse, test_rmse=self.test_rmse,
                 curve_fraction=[p["fraction"] for p in self.curve],
                 curve_rmse=[p["test_rmse"] for p in self.curve])
        d.update(self.score)
        return d


@dataclass
class ExperimentResult:
    name: str
    model: str
    strategy: str
    datasets: list[str]
    seed: int
    stages: list[StageResult]
    score: ScoreResult

    @property
    def s_uep(self) -> float:
        return self.score.s_uep

    def to_dict(self) -> dict:
        return {"name": self.name, "model": self.model, "strategy": self.strategy, "datasets": self.datasets,
                "seed": self.seed, "S_uep": self.s_uep, "stages": [s.to_dict() for s in self.stages]}

    def rows(self) -> list[dict]:
        """One flat row per stage for results.csv."""
        rows = []
        for s in self.stages:
            row = {"stage": s.stage, "kind": s.kind, "city": s.city, "num_nodes": s.num_nodes,
                   "zero_rmse": s.zero_rmse, "test_mae": s.test["mae"], "test_rmse": s.test_rmse,
                   "test_mape": s.test["mape"], "params_trainable": s.static_eff["params_trainable"],
                   "flops": s.flops["flops"], **{k: v for k, v in s.dynamic_eff.items()},
                   **s.difficulty, **s.score, "S_uep": self.s_uep}
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
    flops = {k: prof[k] for k in ("flops", "macs", "thop_macs", "batch_size")}
    return static, flops


def _dynamic(monitor: ResourceMonitor, train_time_s: float) -> dict:
    return {"train_time_s": train_time_s, "wall_time_s": monitor.elapsed_s, "peak_rss_mb": monitor.peak_rss_mb,
            "peak_gpu_mb": monitor.peak_gpu_mb}


def pretrain_stage(bundle: DatasetBundle, *, model: str, model_kwargs: dict, train: TrainSettings, seed: int = 0,
                   device="cpu", time_budget_s: float | None = None, observer: Observer | None = None
                   ) -> tuple[StageResult, SourceModel]:
    """Stage 0: train `model` on `bundle` from scratch and evaluate it."""
    observer = observer or Observer()
    with observer.stage(0, "pretrain", bundle.name):
        with ResourceMonitor(device) as monitor:
            torch.manual_seed(seed)
            net = build_model(model, bundle, **model_kwargs)
            static, flops = _efficiency(net, bundle, train.batch_size)
            result = _fit(net, bundle, train, seed=seed, device=device, observer=observer,
                          time_budget_s=time_budget_s)
            val = evaluate(net, bundle, "val", batch_size=train.batch_size, device=device)
            test = evaluate(net, bundle, "test", batch_size=train.batch_size, device=device)
        stage = StageResult(stage=0, kind="pretrain", city=bundle.name, num_nodes=bundle.num_nodes, val=val,
                            test=test, static_eff=static, flops=flops,
                            dynamic_eff=_dynamic(monitor, result.train_time_s), difficulty=graph_difficulty(bundle),
                            history=result.history, stopped_reason=result.stopped_reason)
        source = SourceModel(model, dict(model_kwargs), _cpu_state(net), bundle.name, list(bundle.sensor_ids))
        observer.stage_done(stage, source)
    return stage, source


def transfer_stage(bundle: DatasetBundle, source: SourceModel, *, index: int, strategy: str,
                   train: TrainSettings, curve: CurveSettings, seed: int = 0, device="cpu",
                   time_budget_s: float | None = None, observer: Observer | None = None
                   ) -> tuple[StageResult, SourceModel]:
    """Stage `index` > 0: transfer `source` to `bundle`, evaluate zero-shot, run the budget curve."""
    observer = observer or Observer()
    apply = get_strategy(strategy)
    same_nodes = list(source.sensor_ids) == list(bundle.sensor_ids)

    def transferred() -> tuple[nn.Module, object]:
        torch.manual_seed(seed)  # every budget point restarts from the same initial weights
        net = build_model(source.model, bundle, **source.model_kwargs)
        report = apply(net, source.state, same_nodes)
        if report is not None and hasattr(net, "batches_seen"):
            # a transferred seq2seq model has finished its teacher-forcing curriculum: fine-tune it free-running,
            # the way it is evaluated (a rebuilt model would otherwise restart fully teacher-forced)
            net.batches_seen = 10**9
        return net, report

    with observer.stage(index, "transfer", bundle.name):
        with ResourceMonitor(device) as monitor:
            net, report = transferred()
            static, flops = _efficiency(net, bundle, train.batch_size)
            zero_val = evaluate(net, bundle, "val", batch_size=train.batch_size, device=device)
            zero_test = evaluate(net, bundle, "test", batch_size=train.batch_size, device=device)
            scheduler = BudgetScheduler(curve.min_gain_rate, curve.min_rel_improve, curve.patience)
            scheduler.update(0.0, zero_val["mae"])
            all_starts = bundle.window_starts("train")
            points, spent, history, stopped_reason = [], 0.0, [], "completed"
            for fraction in curve.fractions:
                remaining = None if time_budget_s is None else time_budget_s - spent
                if remaining is not None and remaining <= 0:
                    stopped_reason = "time_budget"
                    break
                with observer.budget(index, bundle.name, fraction):
                    net, _ = transferred()
                    starts = sample_windows(all_starts, fraction, curve.fewshot_mode, seed)
                    cap = steps_cap(all_starts.numel(), train.batch_size, fraction, curve.fewshot_mode)
                    result = _fit(net, bundle, train, seed=seed, device=device, observer=observer,
                                  time_budget_s=remaining, starts=starts, cap=cap)
                    val = evaluate(net, bundle, "val", batch_size=train.batch_size, device=device)
                    test = evaluate(net, bundle, "test", batch_size=train.batch_size, device=device)
                    spent += result.train_time_s
                    point = {"fraction": fraction, "windows": int(starts.numel()), "steps": result.steps,
                             "epochs": len(result.history), "train_time_s": result.train_time_s,
                             "stopped_reason": result.stopped_reason, "val_mae": val["mae"], "val_rmse": val["rmse"],
                             "test_mae": test["mae"], "test_rmse": test["rmse"], "test_mape": test["mape"],
                             "val": val, "test": test}
                    points.append(point)
                    history = result.history
                    observer.budget_done(index, point)
                if result.stopped_reason == "time_budget":
                    stopped_reason = "time_budget"
                    break
                if scheduler.update(fraction, val["mae"]):
                    stopped_reason = "budget_scheduler"
                    break
        final_val, final_test = (points[-1]["val"], points[-1]["test"]) if points else (zero_val, zero_test)
        stage = StageResult(
            stage=index, kind="transfer", city=bundle.name, num_nodes=bundle.num_nodes, val=final_val, test=final_test,
            static_eff=static, flops=flops, dynamic_eff=_dynamic(monitor, spent), difficulty=graph_difficulty(bundle),
            zero_shot_val=zero_val, zero_shot_test=zero_test,
            curve=[{k: v for k, v in p.items() if k not in ("val", "test")} for p in points],
            transfer=_transfer_summary(report, same_nodes),
            scheduler={"stopped_at": scheduler.stopped_at, "reason": scheduler.stop_reason,
                       "saved_budget": scheduler.saved_budget(curve.fractions), "steps": scheduler.steps},
            history=history, stopped_reason=stopped_reason,
        )
        new_source = SourceModel(source.model, source.model_kwargs, _cpu_state(net), bundle.name,
                                 list(bundle.sensor_ids))
        observer.stage_done(stage, new_source)
    return stage, new_source


def score_stages(stages: list[StageResult], weights: ScoreWeights, budgets: dict | None) -> ScoreResult:
    """S_uep over the stages; also writes each stage's score parts into `stage.score`."""
    inputs = [StageInputs(
        test_rmse=s.test_rmse, zero_rmse=s.zero_rmse, curve=[(p["fraction"], p["test_rmse"]) for p in s.curve],
        mem_mb=s.dynamic_eff["peak_gpu_mb"] if s.dynamic_eff.get("peak_gpu_mb") else s.dynamic_eff["peak_rss_mb"],
        time_s=s.dynamic_eff["train_time_s"], flops=s.flops["flops"],
        trainable_params=s.static_eff["params_trainable"], difficulty=s.difficulty["difficulty_proxy"],
        name=f"{s.stage}:{s.city}") for s in stages]
    result = score_experiment(inputs, weights, budgets)
    for stage, part in zip(stages, result.stages):
        stage.score = {"perf_norm": part.perf_norm, "transfer_auc": part.transfer_auc, "eff_norm": part.eff_norm,
                       "budget_penalty": part.budget_penalty, "stage_score": part.stage_score,
                       "difficulty_weight": part.difficulty_weight}
    return result


def run_experiment(bundles: list[DatasetBundle], *, model: str, model_kwargs: dict | None = None,
                   strategy: str = "full", train: list[TrainSettings], curve: CurveSettings = CurveSettings(),
                   weights: ScoreWeights = ScoreWeights(), budgets: dict | None = None,
                   enforce_time_s: float | None = None, seed: int = 0, device="cpu", name: str = "",
                   source: SourceModel | None = None, observer: Observer | None = None) -> ExperimentResult:
    """The whole stage loop. With `source`, every bundle is a transfer target (no pretraining stage).

    `train` holds one TrainSettings per stage; `enforce_time_s` stops a stage's training once it has
    used that many seconds (the time budget when `budgets.enforce` is on).
    """
    observer = observer or Observer()
    model_kwargs = dict(model_kwargs or {})
    n_stages = len(bundles)
    if len(train) != n_stages:
        raise ConfigError(f"train settings: expected one per stage ({n_stages}), got {len(train)}")
    stages: list[StageResult] = []
    first = 0
    if source is None:
        stage, source = pretrain_stage(bundles[0], model=model, model_kwargs=model_kwargs, train=train[0], seed=seed,
                                       device=device, time_budget_s=enforce_time_s, observer=observer)
        stages.append(stage)
        first = 1
    for k in range(first, n_stages):
        stage, source = transfer_stage(bundles[k], source, index=k, strategy=strategy, train=train[k], curve=curve,
                                       seed=seed, device=device, time_budget_s=enforce_time_s, observer=observer)
        stages.append(stage)
    score = score_stages(stages, weights, budgets)
    return ExperimentResult(name=name, model=source.model, strategy=strategy, datasets=[b.name for b in bundles],
                            seed=seed, stages=stages, score=score)


# ----------------------------------------------------------------------------- helpers
def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _transfer_summary(report, same_nodes: bool) -> dict:
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

