"""Run a tracked transfer experiment from typed params: the glue between stages, MLflow and files.

    params (config.Params) -> check everything -> prepare bundles -> the resolved configuration and
        its hash -> parent MLflow run -> stages.run_experiment with a TrackingObserver (nested runs per
        stage and per budget fraction, per-epoch metrics, live table) -> the comparable score and S_uep
        -> results.json / results.csv / PNG plots in experiment.output_dir, logged as artifacts.

A strategy that builds its own sources (`builds_sources`, e.g. gpd) loads and checks them before the parent
run opens, and builds them inside it (its nested runs come first); every city is then a target.

Every option is checked before any data is read or any run is opened, so bad input never leaves
a run behind; a failure during training (a diverged fit included) marks the open runs FAILED and
writes no results files, so it never reaches a leaderboard.

The configuration hash (`graphtune.config_hash`) identifies everything that decides a run's numbers
except the seed: model and resolved model options, strategy, every training, curve, budget and score
setting, the preparation options, the user city entries and the sha256 of every raw data file, the
device type, the source of a fine-tuning run and the score version. `graphtune compare` groups runs
into leaderboard rows by it.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import io
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from graphtune.compare import live_leaderboard
from graphtune.config import ExperimentConfig, Params
from graphtune.data.bundle import DatasetBundle
from graphtune.data.cities import get_city
from graphtune.data.prepare import prepare_dataset
from graphtune.errors import ConfigError
from graphtune.fileio import atomic_directory, check_owned
from graphtune.models import check_model_kwargs, model_defaults
from graphtune.plots import stage_scores_png, transfer_curve_png
from graphtune.transfer.score import SCORE_VERSION, budgets_from_config, comparable_score
from graphtune.transfer.stages import (ExperimentResult, Observer, StageResult, check_transfer, resolve_device,
                                       run_experiment, scored_stages, stage_measures)
from graphtune.transfer.resume import TAG_FORCED, TAG_RESUMED, find_run, load_journal, point_entry, stage_entry
from graphtune.transfer.strategies import SourceModel, get_strategy
from graphtune.tracking import (TAG_CONFIG, TAG_CONFIG_HASH, TAG_REFERENCE_KEY, TAG_RUN_TYPE, TAG_SCORE_VERSION,
                                TAG_SOURCE, TAG_TARGETS, Tracker, graphtune_tags, load_checkpoint, run_exists)

CHECKPOINT = "source_model.pt"  # artifact name of a stage's trained model (SourceModel.checkpoint())
# What experiment.output_dir held before GraphTune marked its folders (kept replaceable, never anything else).
OUTPUT_FILES = ("results.json", "results.csv", "curves.csv", "transfer_curve.png", "stage_scores.png",
                "params.yaml", "config.json")


@dataclass
class Plan:
    """A fully checked experiment: the validated params (the experiment section resolved against a fine-tuning
    source), the resolved device and the sources, ready for run_experiment."""

    params: Params
    datasets: list[str]
    device: str
    sources: tuple[SourceModel, ...] = ()
    source_ref: str = ""
    source_id: str = ""  # the source's identity in the configuration: a run id or the checkpoint's sha256
    builds_sources: bool = False  # the strategy builds its own sources (gpd): every city is a target

    @property
    def experiment(self) -> ExperimentConfig:
        return self.params.experiment

    @property
    def name(self) -> str:
        exp = self.experiment
        return exp.name or f"{exp.model}-{exp.strategy}-{'-to-'.join(self.datasets)}-s{exp.seed}"

    @property
    def first_stage(self) -> int:
        """The stage index of the first city: 0 (it is pretrained), 1 in a fine-tuning run (it is a target)."""
        return 1 if self.sources or self.builds_sources else 0

    @property
    def n_stages(self) -> int:
        return len(self.datasets) + self.first_stage

    @property
    def run_type(self) -> str:
        """"transfer" when any city is a target, "pretrain" for a single city without a source."""
        return "transfer" if self.first_stage or len(self.datasets) > 1 else "pretrain"

    @property
    def targets(self) -> list[str]:
        """The cities the comparable score covers."""
        return list(self.datasets) if self.first_stage else self.datasets[1:] or list(self.datasets)


def plan_experiment(params: Params, *, explicit_transfer: list[str] = (), source_ref: str = "",
                    tracking_uri: str | None = None, explicit_model: str = "") -> Plan:
    """Check every option and return the plan; raises ConfigError (naming the option) on bad input.

    explicit_transfer: names of transfer-only options the user set explicitly (they need a target city).
    source_ref: a pretrain run id or checkpoint path to fine-tune from (every dataset is then a target,
    and the source's model and options replace experiment.model / model_kwargs; a model the user named
    explicitly, `explicit_model`, must be the source's).
    """
    params = copy.deepcopy(params).validate()  # every section's types and ranges, after the CLI's options
    exp = params.experiment
    datasets = [d for d in exp.datasets if d]
    if not datasets:
        raise ConfigError("experiment.datasets: expected at least one city")
    for city in datasets:
        get_city(city, params.cities)  # unknown city -> error listing the known ones
    source, source_id = _load_source(source_ref, tracking_uri) if source_ref else (None, "")
    strategy = get_strategy(exp.strategy)
    builds = strategy.builds_sources and source is None
    n_targets = len(datasets) - (0 if source or builds else 1)
    if n_targets == 0 and explicit_transfer:
        raise ConfigError(f"{', '.join(explicit_transfer)}: transfer-only option(s) need at least two cities in "
                          f"experiment.datasets (got only {datasets[0]})")
    if source is not None:
        if explicit_model and explicit_model != source.model:
            raise ConfigError(f"--model: the source {source_ref} is a {source.model} model, and fine-tuning "
                              f"continues it; drop --model {explicit_model}, or pretrain a {explicit_model} first")
        exp.model, exp.model_kwargs = source.model, dict(source.model_kwargs)
    if not strategy.builds_sources:  # after the source's model replaced experiment.model: the model it adapts
        strategy.check(params, datasets)
    if builds:
        strategy.check(params, datasets)
        model, kwargs = strategy.source_model(params)
        if explicit_model and explicit_model != model:
            raise ConfigError(f"--model: strategy {exp.strategy} generates {model} models; drop --model {explicit_model}")
        exp.model, exp.model_kwargs = model, kwargs
        source_id = strategy.source_identity(params)
    exp.datasets = datasets
    check_model_kwargs(exp.model, exp.model_kwargs)  # an unknown model (listing the registered ones), option or range
    plan = Plan(params=params, datasets=datasets, device=resolve_device(exp.device),
                sources=(source,) if source is not None else (), source_ref=source_ref, source_id=source_id,
                builds_sources=builds)
    params.train.check_stages(range(plan.first_stage, plan.n_stages), plan.n_stages)
    check_transfer(params.transfer)
    from graphtune.transfer.allocation import check_allocation

    tr = params.transfer
    check_allocation(tr.allocation, tr.total_budget, tr.fractions, tr.target_days, plan.n_stages - 1)
    if params.budgets.enforce and params.budgets.time_sec is None:
        raise ConfigError("budgets.enforce: enforcing budgets needs budgets.time_sec")
    return plan


def _load_source(ref: str, tracking_uri: str | None) -> tuple[SourceModel, str]:
    """A SourceModel from a checkpoint file, a run id or a registered model (models:/NAME/VERSION) of the
    tracking store, and its identity for the configuration hash (the checkpoint's sha256, or the run id)."""
    path = Path(ref)
    if path.suffix == ".pt" or path.exists():
        if not path.is_file():
            raise ConfigError(f"--from: checkpoint file {ref} not found")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001  (any unreadable file is the user's input)
            raise ConfigError(f"--from: {ref} is not a GraphTune checkpoint ({type(err).__name__})") from None
        identity = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    elif ref.startswith("models:/"):  # a registered model: the stage run that logged it holds the checkpoint
        from graphtune.tracking.store import registered_model_run

        run_id = registered_model_run(ref, tracking_uri)
        data = load_checkpoint(run_id, CHECKPOINT, tracking_uri=tracking_uri)
        identity = f"run:{run_id}"
    else:
        if not run_exists(ref, tracking_uri):
            raise ConfigError(f"--from: no run with id {ref!r} in the tracking store {tracking_uri or ''}".rstrip())
        data = load_checkpoint(ref, CHECKPOINT, tracking_uri=tracking_uri)
        identity = f"run:{ref}"
    keys = [f.name for f in dataclasses.fields(SourceModel) if f.name != "generator"]  # generator: optional
    if not isinstance(data, dict) or sorted(set(data) - {"generator"}) != sorted(keys):
        raise ConfigError(f"--from: {ref} does not hold a GraphTune source model (expected keys {', '.join(keys)}; "
                          "checkpoints written before the scaler was recorded must be pretrained again)")
    return SourceModel(**data), identity


# ----------------------------------------------------------------------------- observer
class TrackingObserver(Observer):
    """Turns stage-loop events into nested MLflow runs and prints a live per-stage table."""

    def __init__(self, tracker: Tracker, plan: Plan, echo: Callable[[str], None], log_checkpoints: bool = True):
        self.tracker, self.plan, self.echo, self.log_checkpoints = tracker, plan, echo, log_checkpoints
        self.stage_runs: dict[int, str | None] = {}
        self.last_source: SourceModel | None = None  # the latest stage's trained model
        self.stages: list[StageResult] = []
        self.parts: list = []  # each stage's comparable-score parts, for the live table
        self.extra_tags: dict = {}  # tags every run of this experiment carries (config hash, run type)
        self.bundles: dict[str, DatasetBundle] = {}  # city -> its data, logged as each stage run's dataset input
        self.model_uris: dict[int, str] = {}  # stage -> the models:/ URI of its trained model
        self.parent_id: str | None = None  # the experiment run: the resume journal goes into its artifacts
        self.reopen: dict[int, str] = {}  # stage -> the run of an interrupted attempt, continued when resuming

    def _tags(self, kind: str, stage: int | None = None, city: str | None = None, fraction: float | None = None,
              **extra) -> dict:
        exp = self.plan.experiment
        tags = graphtune_tags(kind, model=exp.model, strategy=exp.strategy, datasets=self.plan.datasets, seed=exp.seed,
                              stage=stage, city=city, fraction=fraction)
        return tags | self.extra_tags | {k: str(v) for k, v in extra.items()}

    @contextmanager
    def stage(self, index, kind, city):
        self.echo(f"[stage {index}] {kind} on {city}")
        tags = self._tags("stage", stage=index, city=city, **{"graphtune.stage_kind": kind})
        with self.tracker.run(f"stage{index}-{kind}-{city}", nested=True, tags=tags,
                              resume=self.reopen.pop(index, None)) as run_id:
            self.stage_runs[index] = run_id  # the final score parts are logged to it after the last stage
            if city in self.bundles:
                log_dataset(self.tracker, self.bundles[city], "training", self.plan.params.prepare.processed_dir)
            yield run_id

    @contextmanager
    def phase(self, name, tags=None):
        run_tags = self._tags("phase", **{"graphtune.phase": name, **(tags or {})})
        with self.tracker.run(name, nested=True, tags=run_tags):
            yield _TrackerLog(self.tracker)

    def budget(self, index, city, fraction):
        return self.tracker.run(f"stage{index}-{city}-frac{fraction:g}", nested=True,
                                tags=self._tags("budget", stage=index, city=city, fraction=fraction))

    def epoch(self, entry):
        step = entry["epoch"]
        self.tracker.log_metrics({f"epoch/{k}": v for k, v in entry.items() if k != "epoch"}, step=step)

    def budget_done(self, index, point):
        self.tracker.log_params({"fraction": point["fraction"], "windows": point["windows"]})
        self.tracker.log_metrics(_metric_block(point["val"], "val_") | _metric_block(point["test"], "test_")
                                 | _data_block(point["data"], "data/")
                                 | {k: point[k] for k in ("train_time_s", "wall_time_s", "steps", "samples",
                                                          "best_epoch", "peak_rss_mb", "peak_gpu_mb", "train_flops")})
        plan = point.get("memory_plan")
        if plan is not None:  # the plan train.memory_budget_mb chose, and what it measured
            self.tracker.log_metrics({"memory_plan_mb": plan["measured_mb"], "memory_plan_grad_accum": plan["grad_accum"],
                                      "memory_plan_checkpointing": float(plan["checkpointing"])})
            self.tracker.set_tags({"graphtune.memory_measure": plan["measure"]})
        data = point["data"]
        self.echo(f"    fraction {point['fraction']:g}: {data['windows']} windows ({data['days']:.2f} days, "
                  f"{data['readings']} readings), {point['epochs']} epochs, val MAE {point['val_mae']:.3f}, "
                  f"test RMSE {point['test_rmse']:.3f}")

    def stage_done(self, result, source, model=None, example=None):
        # the stage's metrics, and the transfer curve as one metric with step = fraction in percent: one batch
        zero = {} if result.zero_rmse is None else {"curve_test_rmse": result.zero_rmse}
        self.tracker.log_steps([(0, stage_metrics(result) | zero)]
                               + [(round(100 * f), {"curve_test_rmse": rmse}) for f, rmse in result.rmse_curve])
        if result.transfer is not None:
            self.tracker.log_params({"transfer_share": round(result.transfer["share"], 4),
                                     "same_nodes": result.transfer["same_nodes"],
                                     "transferred": result.transfer["transferred"]})
        self.last_source = source
        self.tracker.log_dict(result.to_dict(), "stage.json")
        if self.log_checkpoints:
            self.tracker.log_checkpoint(source.checkpoint(), CHECKPOINT)
            if model is not None and example is not None:  # an MLflow model: the UI's Models column, the registry
                self.model_uris[result.stage] = self.tracker.log_model(model, example)
        # the resume journal's stage entry comes last: everything it points to is logged by now
        self.tracker.log_checkpoint({"result": dataclasses.asdict(result), "stage_run": self.stage_runs.get(result.stage),
                                     "source": None if self.log_checkpoints else source.checkpoint()},
                                    stage_entry(result.stage), run_id=self.parent_id)
        self._show(result)

    def allocation_done(self, allocation):
        shares = allocation["shares"]
        self.echo(f"budget allocation ({allocation['rule']}, {allocation['total_budget']:g} of all targets' windows): "
                  + ", ".join(f"{city} {share:.3f}" for city, share in shares.items()))
        self.tracker.log_metrics({f"allocation/{city}/share": share for city, share in shares.items()})
        self.tracker.log_dict(allocation, "allocation.json")

    def point_done(self, index, record):
        # with the point's budget run: resuming marks it FINISHED if the kill came before the run could end
        entry = record.payload() | {"run": self.tracker.active_run_id}
        self.tracker.log_checkpoint(entry, point_entry(index, record.position), run_id=self.parent_id)

    def stage_restored(self, result, source):
        self.echo(f"[stage {result.stage}] {result.kind} on {result.city}: finished before the interruption, "
                  "taken as recorded")
        run_id = self.stage_runs.get(result.stage)
        if run_id and self.tracker.enabled:  # a stage completed just before the kill ended KILLED: it was not
            from graphtune.tracking.store import set_status

            set_status(run_id, "FINISHED", self.tracker.tracking_uri)
        self.last_source = source
        self._show(result)

    def _show(self, result):
        self.stages.append(result)
        # this stage's score parts as they will stand: a stage's comparable parts need no other stage
        params = self.plan.params
        self.parts.append(comparable_score([stage_measures(result)], params.score,
                                           budgets_from_config(params.budgets)).stages[0])
        self.echo(live_leaderboard([_live_row(s, p) for s, p in zip(self.stages, self.parts)]))


class _TrackerLog:
    """A PhaseLog into the tracker's current run."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    def metrics(self, metrics: dict, step: int) -> None:
        self.tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def params(self, params: dict) -> None:
        self.tracker.log_params(params)

    def dict(self, data: dict, name: str) -> None:
        self.tracker.log_dict(data, name)


def _metric_block(metrics: dict, prefix: str) -> dict:
    return {f"{prefix}{k}": v for k, v in metrics.items()}


def _data_block(data: dict | None, prefix: str) -> dict:
    """The numeric entries of a data-used record (windows, steps, days, readings, prompt_steps)."""
    return {f"{prefix}{k}": v for k, v in (data or {}).items() if isinstance(v, (int, float))}


def stage_metrics(s: StageResult) -> dict:
    """The flat metrics of one stage run: final val/test (overall and per horizon), zero-shot, references,
    efficiency, deterministic costs, data used."""
    out = _metric_block(s.val, "val_") | _metric_block(s.test, "test_")
    if s.zero_shot_test is not None:
        out |= _metric_block(s.zero_shot_val, "zero_val_") | _metric_block(s.zero_shot_test, "zero_test_")
    out |= _data_block(s.zero_shot_data, "zero_data/") | _data_block(s.data, "data/")
    for name, ref in s.reference.items():
        out |= {f"reference/{name}/test_rmse": ref["rmse"], f"reference/{name}/test_mae": ref["mae"]}
    out |= {k: v for k, v in s.static_eff.items()} | {k: v for k, v in s.dynamic_eff.items() if v is not None}
    out |= {"flops": s.flops["flops"], "macs": s.flops["macs"], "num_nodes": s.num_nodes}
    out |= {f"cost/{k}": v for k, v in s.cost.items()}
    out |= {k: v for k, v in s.difficulty.items()}
    if s.transfer is not None:
        out["transfer_share"] = s.transfer["share"]
    if s.scheduler is not None:
        out["saved_budget"] = s.scheduler["saved_budget"]
        out["curve_points"] = len(s.curve)
    return out


def _live_row(s: StageResult, part) -> dict:
    return {"stage": s.stage, "city": s.city, "zero_shot_rmse": s.zero_rmse, "test_rmse": s.test_rmse,
            "ha_rmse": s.reference["ha"]["rmse"], "skill": part.skill, "transfer_auc": part.transfer_auc,
            "stage_score": part.stage_score}


# ----------------------------------------------------------------------------- the runner
def load_bundles(params: Params, datasets: list[str]) -> list[DatasetBundle]:
    return [prepare_dataset(city, params.prepare, cities=params.cities) for city in datasets]


def data_digest(bundle: DatasetBundle) -> str:
    """A digest of a city's processed data: of its array files' sha256 when it was read from (or written to) its
    processed folder, else of what decides those arrays (the raw files' sha256 and the preparation options)."""
    meta = bundle.meta
    basis = meta.get("arrays") or {"sources": meta.get("sources"), "options": meta.get("options")}
    return hashlib.sha256(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()[:16]


def log_dataset(tracker: Tracker, bundle: DatasetBundle, context: str, processed_dir: str) -> None:
    """A city as an MLflow dataset input of the current run: its name, its processed folder, the digest."""
    tracker.log_dataset(bundle.name, str(Path(processed_dir, bundle.name).resolve()), data_digest(bundle), context)


def data_hashes(bundles: list[DatasetBundle], length: int | None = 16) -> dict:
    """city -> sha256 of each raw source file (what `dvc add`/`dvc.lock` versions), short form by default."""
    return {b.name: {role: s["sha256"][:length] for role, s in b.meta.get("sources", {}).items()} for b in bundles}


def resolved_config(plan: Plan, bundles: list[DatasetBundle]) -> dict:
    """Everything that decides a run's numbers except the seed (see the module docstring)."""
    params = plan.params
    exp, prep, train = params.experiment, params.prepare, params.train
    stages = range(plan.first_stage, plan.n_stages)
    return {
        "score_version": SCORE_VERSION,
        "run_type": plan.run_type,
        "datasets": list(plan.datasets),
        "source": plan.source_id,
        "model": exp.model,
        "model_kwargs": model_defaults(exp.model) | dict(exp.model_kwargs),  # {} and explicit defaults agree
        "strategy": exp.strategy,
        "train": [{"epochs": train.epochs_at(k, plan.n_stages), "lr": train.lr_at(k, plan.n_stages),
                   "batch_size": train.batch_size, "weight_decay": train.weight_decay, "clip_grad": train.clip_grad,
                   "patience": train.patience, "amp": train.amp_enabled} | _memory_options(train) for k in stages],
        "curve": dataclasses.asdict(params.transfer),
        "budgets": dataclasses.asdict(params.budgets),
        "score": dataclasses.asdict(params.score),
        "prepare": {"split": list(prep.split), "normalized_k": prep.normalized_k, "t_in": prep.t_in,
                    "t_out": prep.t_out, "stride": prep.stride},
        "cities": {c: params.cities[c] for c in plan.datasets if c in params.cities},
        "data": data_hashes(bundles, length=None),
        "device": torch.device(plan.device).type,
    } | _strategy_settings(plan) | _parallel()


def _memory_options(train) -> dict:
    """The memory-aware training options that are set (graphtune.memory): accumulation changes the numbers by float
    rounding, a memory budget may choose it; checkpointing recomputes the same values. Left out at their defaults,
    so runs without them keep the configuration hash they had before these options existed."""
    out = {}
    if train.grad_accum != 1:
        out["grad_accum"] = train.grad_accum
    if train.activation_checkpointing:
        out["activation_checkpointing"] = True
    if train.memory_budget_mb is not None:
        out["memory_budget_mb"] = train.memory_budget_mb
    return out


def _parallel() -> dict:
    """{"world_size": N} in a data-parallel job: its numbers differ from one process's in float rounding, dropout
    draws and per-shard BatchNorm (graphtune.engine.fit), so it is another configuration; {} for one process."""
    from graphtune import distributed

    world = distributed.world_size()
    return {"world_size": world} if world > 1 else {}


STRATEGY_SECTIONS = ("gpd", "compress", "adapter")  # params sections that only the strategy of their name reads


def _strategy_settings(plan: Plan) -> dict:
    """{section: settings} of the strategy's own params section, when the run uses them (gpd, compress)."""
    strategy = get_strategy(plan.params.experiment.strategy)
    if not strategy.settings_section or (strategy.builds_sources and not plan.builds_sources):
        return {}
    return {strategy.settings_section: strategy.settings(plan.params)}


def config_hash(config: dict) -> str:
    """sha256 of the canonical JSON of a resolved configuration (first 16 hex digits)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def reference_key(config: dict, targets: list[str]) -> str:
    """Identity of the reference rows a run contributes: its scored cities, their data and preparation,
    and the score settings (references are the same for every model and strategy on those cities)."""
    keep = {k: config[k] for k in ("score_version", "run_type", "prepare", "cities", "score")}
    keep |= {"targets": list(targets), "data": {c: config["data"].get(c) for c in targets}}
    return config_hash(keep)


RUN_PLACEHOLDER = "{run}"  # experiment.output_dir's last component: a folder per run
LATEST = "latest"  # the link to the newest run folder, next to the run folders


def output_folder(spec: str | Path) -> tuple[Path, bool]:
    """(folder, per_run) of an experiment.output_dir: `base/{run}` is a folder per run under base (per_run
    True, folder = base); anything else is that one folder. ConfigError for a misplaced placeholder."""
    text = str(spec)
    path = Path(text)
    if RUN_PLACEHOLDER not in text:
        if "{" in text or "}" in text:
            raise ConfigError(f"experiment.output_dir: {text!r} has braces; the only placeholder is {RUN_PLACEHOLDER}")
        return path, False
    if path.name != RUN_PLACEHOLDER or RUN_PLACEHOLDER in str(path.parent):
        raise ConfigError(f"experiment.output_dir: {RUN_PLACEHOLDER} must be the whole last folder name, as in "
                          f"outputs/runs/{RUN_PLACEHOLDER}; got {text!r}")
    return path.parent, True


def run_folder_name(plan: Plan, run_id: str | None) -> str:
    """A run's own folder: the run name and the start of its run id (the same folder when it is resumed), or,
    untracked, the time and a random suffix."""
    import re
    import secrets
    import time

    name = re.sub(r"[^\w.\-]", "_", plan.name)
    if run_id:
        return f"{name}-{run_id[:8]}"
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def point_latest(base: Path, folder: str) -> None:
    """Make base/latest a link to `folder` (atomically: a new link renamed over the old one). A `latest` that is
    not a link is the user's: left alone, with a notice."""
    import os
    import secrets
    import warnings

    from graphtune.errors import GraphTuneNotice

    link = base / LATEST
    if link.exists() and not link.is_symlink():
        warnings.warn(f"{link}: not a link GraphTune made; left as it is (the run's results are in {base / folder})",
                      GraphTuneNotice, stacklevel=2)
        return
    tmp = base / f".{LATEST}.{secrets.token_hex(4)}"
    os.symlink(folder, tmp)
    os.replace(tmp, link)


def execute(plan: Plan, *, echo: Callable[[str], None] = print, tracking: bool = True,
            output_dir: str | Path | None = None, resume: str | None = None,
            force: bool = False) -> tuple[ExperimentResult, str | None]:
    """Run the planned experiment under one parent MLflow run; write and log the outputs.

    resume: a run id, or "last", of an interrupted run of this configuration to continue (graphtune.transfer.resume);
    force: resume it even though it was recorded at another code commit (recorded on the run).
    """
    from graphtune import distributed

    params = plan.params
    folder, per_run = output_folder(output_dir or params.experiment.output_dir)
    if resume and not tracking:
        raise ConfigError("--resume: an interrupted run is continued from its tracking store; drop --no-tracking")
    main = distributed.is_main()  # under torchrun only rank 0 tracks and writes; every rank trains
    if not main:
        echo, tracking = (lambda _: None), False

    def checks() -> str:
        # refuse a folder of the user's own, or one that cannot be written, before any work
        since = check_owned(folder / ".run" if per_run else folder, legacy_names=OUTPUT_FILES)
        if tracking:  # the store is reachable and writable before any data is read (one line otherwise)
            from graphtune.tracking.preflight import check_store

            check_store(params.tracking.tracking_uri or None)
        return since

    since = _on_main(checks)
    bundles = load_bundles(params, plan.datasets)
    strategy = get_strategy(params.experiment.strategy)
    prepared = (strategy.prepare_sources(params, bundles, lambda cities: load_bundles(params, cities))
                if plan.builds_sources else None)  # every source input checked before any run opens
    config = resolved_config(plan, bundles + list(getattr(prepared, "bundles", [])))  # the sources a strategy built from
    digest = config_hash(config)
    tr = params.tracking
    tracker = Tracker(tr.tracking_uri or None, tr.experiment_name, system_metrics=tr.system_metrics, enabled=tracking)
    observer = TrackingObserver(tracker, plan, echo, log_checkpoints=tr.log_checkpoints)
    observer.extra_tags = {TAG_CONFIG_HASH: digest, TAG_RUN_TYPE: plan.run_type, TAG_SCORE_VERSION: str(SCORE_VERSION)}
    tags = observer._tags("experiment", device=plan.device, **{
        "dvc.data_hashes": json.dumps(data_hashes(bundles)), TAG_TARGETS: ",".join(plan.targets),
        TAG_REFERENCE_KEY: reference_key(config, plan.targets),
        TAG_CONFIG: json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)})
    if plan.source_ref:
        tags[TAG_SOURCE] = plan.source_ref
    journal = None
    if resume:
        from graphtune.tracking.tags import git_info, resolve_tracking_uri

        commit = git_info(Path(__file__).resolve().parent)["git.commit"]
        uri = resolve_tracking_uri(tr.tracking_uri or None)

        def find():
            run, forced = find_run(resume, config_hash=digest, config=config, seed=plan.experiment.seed, commit=commit,
                                   force=force, tracking_uri=uri, experiment_name=tr.experiment_name)
            return (run, forced) + load_journal(run["run_id"], uri, first_stage=plan.first_stage, n_stages=plan.n_stages)

        run, forced, journal, stage_runs = _on_main(find)  # every rank continues from rank 0's journal
        resume = run["run_id"] if main else None
        tags[TAG_RESUMED] = str(int(run["tags"].get(TAG_RESUMED, "0")) + 1)
        if forced:
            tags[TAG_FORCED] = forced
        observer.stage_runs = dict(stage_runs)
        observer.reopen = {k: v for k, v in stage_runs.items() if k not in journal.stages}
        from graphtune.tracking.store import set_status

        for record in (r for points in journal.points.values() for r in points):
            if record.run:  # a finished point's budget run that the kill left RUNNING (then KILLED): it did finish
                set_status(record.run, "FINISHED", tracker.tracking_uri)
    experiment = dataclasses.replace(params.experiment, name=plan.name)
    observer.bundles = {b.name: b for b in bundles}
    with tracker.run(plan.name, tags=tags, params=logged_params(plan, tracker.tracking_uri),
                     resume=resume) as parent_id:
        observer.parent_id = parent_id
        if journal is None:
            for i, bundle in enumerate(bundles):
                log_dataset(tracker, bundle, "target" if plan.sources or i > 0 else "source",
                            params.prepare.processed_dir)
        exp = plan.experiment
        echo(f"experiment {plan.name}: {' -> '.join(plan.datasets)} (model {exp.model}, strategy {exp.strategy}, "
             f"device {plan.device}, config {digest})" + (f", run {parent_id}" if parent_id else "")
             + (f", resumed: {len(journal.stages)} stage(s) and {sum(map(len, journal.points.values()))} budget "
                "point(s) already finished" if journal is not None else ""))
        sources = plan.sources
        if plan.builds_sources:
            sources = strategy.build_sources(prepared, params, device=plan.device, observer=observer, echo=echo)
        result = run_experiment(bundles, experiment, params.train, params.transfer, params.score, params.budgets,
                                device=plan.device, sources=sources, observer=observer, resume=journal)
        result.config_hash = digest
        for stage in result.stages:  # final score parts (they need every stage) into each stage run
            run_id = observer.stage_runs.get(stage.stage)
            if run_id:
                tracker.log_metrics_to(run_id, {f"score/{k}": v for k, v in stage.score.items()}
                                       | {f"S_uep/{k}": v for k, v in stage.suep.items()})
        tracker.log_metrics(experiment_metrics(result))
        if tr.log_checkpoints and observer.last_source is not None:  # `finetune --from <this run id>`
            tracker.log_checkpoint(observer.last_source.checkpoint(), CHECKPOINT)
        out = folder / run_folder_name(plan, parent_id) if per_run else folder
        if main:
            files = write_outputs(result, params, out, config=config, since=None if per_run else since)
            if per_run:
                point_latest(folder, out.name)
            for path in files.values():
                tracker.log_artifact(path)
    echo(f"score = {result.score.score:.4f} (comparable across runs; S_uep within this run = {result.s_uep:.4f}); "
         f"results in {out}")
    return result, parent_id


def _on_main(fn):
    """fn() run on rank 0 alone and its value given to every rank; an error it raises is raised on every rank,
    so no rank goes on to train while rank 0 has stopped (single process: just fn())."""
    from graphtune import distributed

    if distributed.world_size() == 1:
        return fn()
    value = error = None
    if distributed.is_main():
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001  (re-raised below, on every rank)
            error = err
    value, error = distributed.broadcast_object((value, error))
    if error is not None:
        raise error
    return value


def logged_params(plan: Plan, tracking_uri: str | None) -> dict:
    """The run's parameters as resolved: every section that decides the run, the parent run's name and the
    store as they are used, never an empty string (the compare section is not part of a run)."""
    logged = plan.params.as_dict()
    logged.pop("compare", None)
    used = _strategy_settings(plan)
    for section in STRATEGY_SECTIONS:
        if section not in used:
            logged.pop(section, None)  # settings of a strategy this run does not use
        else:
            logged[section] = used[section]
    if "gpd" in used and not logged["gpd"]["generator"]:
        logged["gpd"]["generator"] = "trained in this run"
    logged["experiment"]["name"] = plan.name
    logged["experiment"]["device"] = plan.device
    logged["tracking"]["tracking_uri"] = tracking_uri or "disabled"
    return logged


def experiment_metrics(result: ExperimentResult) -> dict:
    """Parent-run metrics: what the leaderboard ranks (`score`) and shows."""
    last = result.stages[-1]
    scored = scored_stages(result.stages)
    gpu = [s.dynamic_eff.get("peak_gpu_mb") for s in result.stages if s.dynamic_eff.get("peak_gpu_mb")]
    metrics = {
        "score": result.score.score,
        "S_uep": result.s_uep,
        "final_test_mae": last.test["mae"], "final_test_rmse": last.test["rmse"], "final_test_mape": last.test["mape"],
        "mean_skill": result.score.mean_skill, "mean_transfer_auc": result.score.mean_transfer_auc,
        "finetune_tflops": sum(s.cost["train_flops"] for s in scored) / 1e12,
        "total_train_time_s": sum(s.dynamic_eff["train_time_s"] for s in result.stages),
        "peak_rss_mb": max(s.dynamic_eff["peak_rss_mb"] or 0.0 for s in result.stages),
        "peak_gpu_mb": max(gpu) if gpu else 0.0,
        "trainable_params": last.static_eff["params_trainable"], "total_params": last.static_eff["params_total"],
        "size_mb": last.static_eff["size_mb"], "flops_g": last.flops["flops"] / 1e9,
        "saved_budget": sum((s.scheduler or {}).get("saved_budget", 0.0) for s in result.stages if s.scheduler),
        "data/windows": sum(s.data["windows"] for s in scored), "data/days": sum(s.data["days"] for s in scored),
        "data/readings": sum(s.data["readings"] for s in scored),
    }
    # every test metric of the final model: overall, by step (_h3) and by lead time (_15min, _180min, ...)
    metrics |= {f"final_test_{k}": v for k, v in last.test.items() if k not in ("mae", "rmse", "mape")}
    for name, ref in result.references.items():
        metrics |= {f"reference/{name}/{k}": v for k, v in ref.items()}
    return metrics


def write_outputs(result: ExperimentResult, params: Params, out: Path, config: dict | None = None,
                  since: str | None = None) -> dict[str, Path]:
    """results.json, results.csv, curves.csv, transfer_curve.png, stage_scores.png, params.yaml, config.json;
    replaced atomically, and only where the folder holds nothing but GraphTune's own files (`since`: see
    fileio.atomic_directory)."""
    with atomic_directory(out, legacy_names=OUTPUT_FILES, since=since) as tmp:
        (tmp / "results.json").write_text(json.dumps(_clean(result.to_dict()), indent=1, sort_keys=True) + "\n")
        _write_csv(tmp / "results.csv", result.rows())
        curve_rows = [{"stage": s.stage, "city": s.city, "fraction": f, "test_rmse": r}
                      for s in result.stages if s.kind == "transfer"
                      for f, r in _curve_points(s)]
        _write_csv(tmp / "curves.csv", curve_rows or [{"stage": 0, "city": "", "fraction": 0.0, "test_rmse": ""}])
        curves = {f"{s.stage}: {s.city}": _curve_points(s) for s in result.stages if s.kind == "transfer"}
        transfer_curve_png(curves, tmp / "transfer_curve.png", title=result.name)
        stage_scores_png({f"{s.stage}: {s.kind} {s.city}": s.score["stage_score"] for s in result.stages},
                         tmp / "stage_scores.png", title=f"{result.name}: score = {result.score.score:.3f}")
        (tmp / "params.yaml").write_text(yaml.safe_dump(params.as_dict(), sort_keys=True))
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True, default=str) + "\n")
    return {p.name: p for p in sorted(out.iterdir()) if not p.name.startswith(".")}


def _curve_points(s: StageResult) -> list[tuple[float, float]]:
    """(fraction, test RMSE) of a transfer stage, the zero-shot point at fraction 0 when there is one."""
    zero = [(0.0, s.zero_rmse)] if s.zero_rmse is not None else []
    return zero + [(p["fraction"], p["test_rmse"]) for p in s.curve]


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in keys})
    path.write_text(buf.getvalue())


def _fmt(value):
    return "" if value is None else (f"{value:.6g}" if isinstance(value, float) else value)


def _clean(obj):
    """JSON-safe: NaN/inf -> None, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
