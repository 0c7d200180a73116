"""`graphtune series train | finetune | infer`: the CSV series task as tracked runs with artifacts.

    graphtune series train data/LP{1..31}a.csv --task classify --bin-rule "gt 0.5" --context-len 64
    graphtune series finetune other/*.csv --ckpt artifacts/train_classify_.../ --epochs 3
    graphtune series infer other/*.csv --ckpt artifacts/train_classify_.../model.pt.best

One invocation = one MLflow run (experiment `series` unless --experiment-name says otherwise), tagged
graphtune.kind=series, with every option as a param, per-epoch metrics as steps and the final metrics of
the evaluated split. Every check (files, shapes, options, labels, the checkpoint) runs before the run
opens, so bad input leaves no run and no folder. Artifacts are written atomically into

    artifacts/<mode>_<task>_ctx<L>_ch<C>_alpha<a>_pw<pw>_<backbone>_seed<s>_split<mode>[_<desc>]/

and logged to the run: model.pt (last epoch), model.pt.best (best validation epoch), and for classify
preds.csv, metrics.json, roc_curve.png, pr_curve.png, hist_score.png; for regress preds.csv,
summary.json, residuals.png, scatter.png. A rolling split writes one folder per fold inside (fold1/, ...)
and the folds' mean and spread at the top.

Model selection never sees the test split: the best epoch is the lowest validation loss, and `best_tau`
(the threshold that maximises F1) is chosen on the validation split. The scikit-learn reference
(series/reference.py) is fitted on the training windows and reported on the same split as the backbone.
Inputs are standardised per channel with training-split statistics (and the regression target too); they
travel inside the checkpoint, so finetune and infer apply the training run's statistics.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from graphtune.errors import ConfigError, DataError, GraphTuneNotice

MODES = ("train", "finetune", "infer")
CKPT_FORMAT = "graphtune-series/1"
NORM_SAMPLE = 20_000  # training windows read to estimate per-channel statistics (seeded when subsampled)
REFERENCE_MAX_TRAIN = 200_000  # training windows the scikit-learn reference fits on (a seeded subsample above it,
#                                recorded as reference_fit): its flattened matrix is the largest allocation of a run


@dataclass
class SeriesOptions:
    """Every option of a series command (the CLI fills it; all of it is logged as params)."""

    files: list[str]
    mode: str = "train"
    task: str | None = None  # classify | regress; None: classify when bin_rule is given, else regress
    bin_rule: str | None = None  # nonzero | gt THR | lt THR | quantile Q
    context_len: int = 12
    label_src_ch: int = 0
    label_offset: int = 1
    drop_label_from_x: bool = False
    split: str = "holdout"  # holdout | group | rolling
    folds: int = 3
    eval_split: str = "test"
    plot_split: str | None = None  # default: eval_split
    backbone: str = "conv"
    backbone_options: dict = field(default_factory=dict)
    pretrained_dir: str | None = None
    alpha: float = 0.5
    pos_weight: str = "global"  # global | none | a number
    thresh_default: float = 0.5
    loss: str = "mse"  # regress: mse | mae
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 1024
    weight_decay: float = 0.0
    amp: bool = False
    compile: str = "off"  # off | reduce-overhead
    seed: int = 0
    device: str = "auto"
    ckpt: str | None = None
    desc: str = ""
    artifacts_dir: str = "artifacts"
    reference: bool = True
    experiment_name: str = "series"

    def check(self) -> "SeriesOptions":
        if self.mode not in MODES:
            raise ConfigError(f"series mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.files:
            raise ConfigError("FILES: expected at least one channel CSV")
        if self.mode in ("finetune", "infer") and not self.ckpt:
            raise ConfigError(f"--ckpt: `series {self.mode}` continues a trained model; give its artifact folder or "
                              "model file")
        if self.task not in (None, "classify", "regress"):
            raise ConfigError(f"--task: expected classify or regress, got {self.task!r}")
        if self.task == "classify" and not self.bin_rule:
            raise ConfigError("--bin-rule: classify needs a rule: nonzero, gt THR, lt THR or quantile Q")
        if self.task == "regress" and self.bin_rule:
            raise ConfigError(f"--bin-rule {self.bin_rule!r}: a regression predicts the value itself; drop the rule "
                              "or use --task classify")
        for name, ok in (("context_len", self.context_len >= 1), ("label_offset", self.label_offset >= 1),
                         ("label_src_ch", self.label_src_ch >= 0), ("folds", self.folds >= 2),
                         ("epochs", self.epochs >= (0 if self.mode == "infer" else 1)),
                         ("batch_size", self.batch_size >= 1), ("lr", self.lr > 0),
                         ("weight_decay", self.weight_decay >= 0), ("alpha", 0.0 <= self.alpha <= 1.0),
                         ("thresh_default", 0.0 < self.thresh_default < 1.0)):
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')}: {getattr(self, name)!r} is out of range")
        for name, value, allowed in (("split", self.split, ("holdout", "group", "rolling")),
                                     ("eval_split", self.eval_split, ("train", "val", "test")),
                                     ("plot_split", self.plot_split or "test", ("train", "val", "test")),
                                     ("loss", self.loss, ("mse", "mae")),
                                     ("compile", self.compile, ("off", "reduce-overhead"))):
            if value not in allowed:
                raise ConfigError(f"--{name.replace('_', '-')}: expected one of {', '.join(allowed)}, got {value!r}")
        pos_weight(self.pos_weight, None)  # the spelling; the value needs the training labels
        return self

    @property
    def resolved_task(self) -> str:
        return self.task or ("classify" if self.bin_rule else "regress")


def pos_weight(text: str, train_labels: np.ndarray | None) -> float | None:
    """--pos-weight: `global` = negatives / positives of the training labels, `none`, or a positive number."""
    if text == "none":
        return None
    if text == "global":
        if train_labels is None:
            return None
        from graphtune.series.losses import global_pos_weight

        return float(global_pos_weight(train_labels))
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--pos-weight: expected global, none or a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"--pos-weight: expected a positive number, got {text!r}")
    return value


# ----------------------------------------------------------------------------- the model a run trains

class SeriesModel(nn.Module):
    """A backbone with the training split's standardisation: x (B, C', L) raw -> (B,) logits or raw-unit values."""

    def __init__(self, backbone: nn.Module, channels: int, task: str):
        super().__init__()
        self.backbone = backbone
        self.task = task
        self.register_buffer("x_mean", torch.zeros(channels, 1))
        self.register_buffer("x_std", torch.ones(channels, 1))
        self.register_buffer("y_mean", torch.zeros(()))
        self.register_buffer("y_std", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nan_to_num((x - self.x_mean) / self.x_std)  # a missing reading enters as the training mean
        out = self.backbone(x).float()
        return out if self.task == "classify" else out * self.y_std + self.y_mean

    def scaled_target(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.y_mean) / self.y_std


def _statistics(data, task: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Per-channel mean/std of training inputs and the target's (regress), from up to NORM_SAMPLE windows."""
    n = len(data)
    rows = np.arange(n) if n <= NORM_SAMPLE else np.sort(np.random.default_rng(seed).choice(n, NORM_SAMPLE, False))
    x, y = data.batch(rows)
    mean = torch.nanmean(x.transpose(0, 1).reshape(x.shape[1], -1), dim=1)
    centred = x - mean[None, :, None]
    std = torch.sqrt(torch.nanmean(centred.transpose(0, 1).reshape(x.shape[1], -1) ** 2, dim=1))
    std = torch.where(torch.isfinite(std) & (std > 1e-8), std, torch.ones_like(std))
    mean = torch.nan_to_num(mean)
    y_mean, y_std = 0.0, 1.0
    if task == "regress":
        y_mean = float(y.mean())
        y_std = float(y.std()) if y.numel() > 1 and float(y.std()) > 1e-8 else 1.0
    return mean[:, None], std[:, None], y_mean, y_std


def _compiled(model: nn.Module, mode: str, example: torch.Tensor) -> tuple[nn.Module, str]:
    """torch.compile(model) when asked and possible (tried on one batch), else the eager model with a notice."""
    if mode == "off":
        return model, "eager"
    try:
        compiled = torch.compile(model, mode=mode)
        with torch.no_grad():
            compiled(example)
        return compiled, f"compiled:{mode}"
    except Exception as err:  # noqa: BLE001 - no compiler toolchain, unsupported op, ...: eager still works
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        warnings.warn(f"--compile {mode} is not possible here ({type(err).__name__}: {reason}); running eager",
                      GraphTuneNotice, stacklevel=2)
        return model, "eager (compile failed)"


# ----------------------------------------------------------------------------- checkpoints

def resolve_ckpt(path: str) -> Path:
    """A folder -> its model.pt.best if present, else model.pt; a file -> itself."""
    p = Path(path)
    if p.is_dir():
        for name in ("model.pt.best", "model.pt"):
            if (p / name).is_file():
                return p / name
        raise DataError(f"--ckpt {path}: the folder holds neither model.pt.best nor model.pt")
    if not p.is_file():
        raise DataError(f"--ckpt {path}: no such file or folder")
    return p


def read_ckpt(path: str) -> tuple[dict, Path]:
    file = resolve_ckpt(path)
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"--ckpt {file}: not a GraphTune series checkpoint ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != CKPT_FORMAT:
        raise DataError(f"--ckpt {file}: not a GraphTune series checkpoint (expected format {CKPT_FORMAT})")
    return payload, file


def _save(path: Path, model: SeriesModel, meta: dict) -> None:
    from graphtune.series.models import unwrap

    state = {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}
    torch.save({"format": CKPT_FORMAT, **meta, "state": state}, path)


# ----------------------------------------------------------------------------- training and scoring

def _loss_fn(task: str, opts: SeriesOptions, pw: float | None) -> Callable:
    from graphtune.series.losses import classify_loss, regress_loss

    if task == "classify":
        return lambda model, out, y: classify_loss(out, y, alpha=opts.alpha, pos_weight=pw)
    return lambda model, out, y: regress_loss(out, y, kind=opts.loss)


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16)


@torch.no_grad()
def predict(model: nn.Module, data, batch_size: int, device: torch.device, amp: bool, task: str) -> np.ndarray:
    """Scores (classify: probabilities) or predictions (regress, raw units) of every window of `data`, in order."""
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        x, _ = data.batch(np.arange(start, min(start + batch_size, len(data))))
        with _autocast(device, amp):
            y = model(x.to(device)).float()
        out.append(y.cpu())
    scores = torch.cat(out) if out else torch.zeros(0)
    return (torch.sigmoid(scores) if task == "classify" else scores).numpy().astype(np.float64)


def _train(model: nn.Module, base: SeriesModel, train, val, opts: SeriesOptions, task: str, pw: float | None,
           device: torch.device, log: Callable[[dict, int], None], echo) -> dict:
    """Adam on the task loss; the best validation loss's state is kept. Returns the history and the best epoch."""
    loss_fn = _loss_fn(task, opts, pw)
    params = [p for p in base.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=opts.lr, weight_decay=opts.weight_decay)
    generator = torch.Generator().manual_seed(opts.seed)
    best = {"epoch": 0, "val_loss": math.inf, "state": None}
    history = []
    for epoch in range(1, opts.epochs + 1):
        model.train()
        began, total, seen = time.perf_counter(), 0.0, 0
        for x, y in train.batches(opts.batch_size, shuffle=True, generator=generator):
            x, y = x.to(device), y.to(device)
            target = y if task == "classify" else base.scaled_target(y)
            with _autocast(device, opts.amp):
                out = model(x) if task == "classify" else (model(x) - base.y_mean) / base.y_std
            loss = loss_fn(base, out.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(y)
            seen += len(y)
        train_s = time.perf_counter() - began
        val_loss = _eval_loss(model, base, val, opts, task, pw, device, loss_fn)
        entry = {"train_loss": total / max(seen, 1), "val_loss": val_loss, "epoch_s": train_s,
                 "samples_per_s": seen / train_s if train_s > 0 else math.nan}
        history.append(entry | {"epoch": epoch})
        log(entry, epoch)
        improved = val_loss < best["val_loss"]
        if improved:
            best = {"epoch": epoch, "val_loss": val_loss,
                    "state": {k: v.detach().clone() for k, v in base.state_dict().items()}}
        echo(f"  epoch {epoch}: train loss {entry['train_loss']:.4f}, val loss {val_loss:.4f}"
             + (" (best)" if improved else ""))
    return {"history": history, "best_epoch": best["epoch"], "best_val_loss": best["val_loss"],
            "best_state": best["state"]}


@torch.no_grad()
def _eval_loss(model, base, data, opts, task, pw, device, loss_fn) -> float:
    model.eval()
    total, seen = 0.0, 0
    for x, y in data.batches(opts.batch_size):
        x, y = x.to(device), y.to(device)
        target = y if task == "classify" else base.scaled_target(y)
        with _autocast(device, opts.amp):
            out = model(x) if task == "classify" else (model(x) - base.y_mean) / base.y_std
        total += float(loss_fn(base, out.float(), target)) * len(y)
        seen += len(y)
    return total / seen if seen else math.nan


# ----------------------------------------------------------------------------- the command

@dataclass
class _Prepared:
    """Everything checked before a run opens."""

    opts: SeriesOptions
    task: str
    array: object
    spec: object
    rules: list  # the label rule of each fold (fitted on its training split)
    folds: list
    ckpt: dict | None
    ckpt_file: Path | None
    channels: int


def folder_name(opts: SeriesOptions, task: str, channels: int) -> str:
    pw = opts.pos_weight if task == "classify" else "na"
    alpha = f"{opts.alpha:g}" if task == "classify" else "na"
    name = (f"{opts.mode}_{task}_ctx{opts.context_len}_ch{channels}_alpha{alpha}_pw{pw}_{opts.backbone}"
            f"_seed{opts.seed}_split{opts.split}")
    return name + (f"_{opts.desc}" if opts.desc else "")


def prepare(opts: SeriesOptions) -> _Prepared:
    """Read and check everything (files, options, labels, checkpoint) before any run opens or file is written."""
    from graphtune.series.data import LabelRule, WindowSpec, make_splits, read_channels
    from graphtune.series.models import BACKBONES

    opts.check()
    task = opts.resolved_task
    BACKBONES.get(opts.backbone)  # unknown backbone: one line listing the known ones
    ckpt = ckpt_file = None
    if opts.mode in ("finetune", "infer"):
        ckpt, ckpt_file = read_ckpt(opts.ckpt)
        if ckpt["config"]["name"] != opts.backbone:
            raise ConfigError(f"--ckpt {ckpt_file}: a {ckpt['config']['name']} checkpoint, but --backbone is "
                              f"{opts.backbone}")
        if ckpt["task"] != task:
            raise ConfigError(f"--ckpt {ckpt_file}: trained to {ckpt['task']}, but this run would {task}")
    array = read_channels(opts.files)
    spec = WindowSpec(opts.context_len, opts.label_src_ch, opts.label_offset, opts.drop_label_from_x)
    spec.check(array)
    rule = LabelRule.parse(opts.bin_rule, option="--bin-rule")
    folds = make_splits(array, spec, opts.split, folds=opts.folds, seed=opts.seed)
    channels = len(spec.input_channels(array.n_channels))
    if ckpt is not None:
        want = (ckpt["config"]["channels"], ckpt["config"]["context_len"])
        if want != (channels, opts.context_len):
            raise ConfigError(f"--ckpt {ckpt_file}: built for {want[0]} input channels x {want[1]} steps, but these "
                              f"files give {channels} x {opts.context_len}")
    rules = [_fold_rule(rule, task, ckpt, array, spec, fold) for fold in folds]  # single-class train: one line
    prepared = _Prepared(opts, task, array, spec, rules, folds, ckpt, ckpt_file, channels)
    if ckpt is not None:
        _build(prepared)  # the checkpoint loads strictly (a wrong shape: one line naming both) before any run opens
    return prepared


def _fold_rule(rule, task: str, ckpt: dict | None, array, spec, fold):
    """The label rule of one fold: fitted on its training split, except that a checkpoint's fitted quantile is
    reused as it was trained (finetune and infer label windows the way the model learned them)."""
    from graphtune.series.data import fit_rule

    if task != "classify":
        return rule
    if ckpt is not None and ckpt.get("rule") and rule.kind == "quantile":
        return dataclasses.replace(rule, value=ckpt["rule"]["value"], fitted=ckpt["rule"]["threshold"])
    where = "training split" if fold.name in ("holdout", "group") else f"training split of {fold.name}"
    return fit_rule(rule, array, spec, fold.train, where=where)


def _build(p: _Prepared) -> SeriesModel:
    from graphtune.series.models import build_backbone

    opts = p.opts
    torch.manual_seed(opts.seed)
    if p.ckpt is not None:
        cfg = p.ckpt["config"]
        backbone = build_backbone(cfg["name"], channels=cfg["channels"], context_len=cfg["context_len"],
                                  task=cfg["task"], options=cfg.get("options"))
    else:
        backbone = build_backbone(opts.backbone, channels=p.channels, context_len=opts.context_len, task=p.task,
                                  options=opts.backbone_options, pretrained_dir=opts.pretrained_dir)
    model = SeriesModel(backbone, p.channels, p.task)
    if p.ckpt is not None:
        from graphtune.compression.checkpoint import load_state_strict

        load_state_strict(model, p.ckpt["state"], f"--ckpt {p.ckpt_file}")
    return model


def _logged_params(opts: SeriesOptions, p: _Prepared) -> dict:
    out = dataclasses.asdict(opts)
    out["files"] = ",".join(opts.files) if len(opts.files) <= 8 else f"{opts.files[0]} .. {opts.files[-1]} " \
        f"({len(opts.files)} files)"
    out["task"] = p.task
    out["n_series"], out["n_channels"], out["n_steps"] = p.array.n_series, p.array.n_channels, p.array.n_steps
    return out


def config_hash(opts: SeriesOptions, p: _Prepared) -> str:
    """Everything that decides the numbers except the seed (the series board groups runs by it)."""
    d = dataclasses.asdict(opts)
    for key in ("seed", "desc", "artifacts_dir", "experiment_name", "device", "plot_split"):
        d.pop(key, None)
    d["files"] = [hashlib.sha256(Path(f).read_bytes()).hexdigest()[:16] for f in opts.files]
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_series(opts: SeriesOptions, *, echo: Callable[[str], None] = print, tracking: bool = True,
               tracking_uri: str | None = None) -> Path:
    """Run one series command; returns its artifact folder."""
    from graphtune.fileio import atomic_directory, check_owned
    from graphtune.tracking import Tracker
    from graphtune.tracking.tags import graphtune_tags

    from graphtune.transfer.stages import resolve_device

    device = torch.device(resolve_device(opts.device, "--device"))
    if tracking:  # the store first: reachable and writable, before any CSV is read
        from graphtune.tracking.preflight import check_store

        check_store(tracking_uri)
    p = prepare(opts)
    out = Path(opts.artifacts_dir) / folder_name(opts, p.task, p.channels)
    check_owned(out)  # a folder GraphTune did not write is refused now, before any work
    tracker = Tracker(tracking_uri, opts.experiment_name, enabled=tracking)
    tags = graphtune_tags("series", model=opts.backbone, strategy=opts.mode, datasets=[Path(f).name for f in
                          opts.files[:3]], seed=opts.seed)
    tags |= {"graphtune.series.task": p.task, "graphtune.config_hash": config_hash(opts, p),
             "graphtune.series.eval_split": opts.eval_split}
    with tracker.run(out.name, tags=tags, params=_logged_params(opts, p)):
        with atomic_directory(out) as tmp:
            results = []
            for fold, rule in zip(p.folds, p.rules):
                where = tmp / fold.name if len(p.folds) > 1 else tmp
                where.mkdir(parents=True, exist_ok=True)
                prefix = f"{fold.name}/" if len(p.folds) > 1 else ""
                results.append(_run_fold(p, fold, rule, where, device, tracker, prefix, echo))
            summary = _summarise(results, p.task) if len(results) > 1 else results[0]
            if len(results) > 1:
                (tmp / ("metrics.json" if p.task == "classify" else "summary.json")).write_text(
                    json.dumps(summary, indent=1, sort_keys=True, default=_json) + "\n")
            tracker.log_metrics({k: v for k, v in _flat_final(summary).items()})
        for f in sorted(out.rglob("*")):
            if f.is_file() and f.name != ".graphtune-manifest.json":
                tracker.log_artifact(f, str(f.parent.relative_to(out)) if f.parent != out else None)
    echo(f"artifacts: {out}")
    return out


def _json(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(type(value).__name__)


def _flat_final(summary: dict) -> dict:
    """The final metrics of the evaluated split as flat MLflow metrics (NaN ones skipped: MLflow cannot rank them)."""
    out = {}
    for group in ("metrics", "reference"):
        for key, value in (summary.get(group) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[f"{'' if group == 'metrics' else 'reference_'}{key}"] = float(value)
    for key in ("best_tau", "best_epoch"):
        if isinstance(summary.get(key), (int, float)) and math.isfinite(summary[key]):
            out[key] = float(summary[key])
    return out


def _summarise(results: list[dict], task: str) -> dict:
    """Mean and spread (sample std) over rolling folds, per metric."""
    out = {"folds": results, "metrics": {}, "reference": {}, "spread": {}}
    for group in ("metrics", "reference"):
        keys = [k for k in (results[0].get(group) or {}) if isinstance(results[0][group][k], (int, float))]
        for k in keys:
            vals = np.array([r[group][k] for r in results], dtype=float)
            out[group][k] = float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan
            out["spread"][f"{'' if group == 'metrics' else 'reference_'}{k}"] = float(np.nanstd(vals, ddof=1)) \
                if np.isfinite(vals).sum() > 1 else math.nan
    return out


def _split_data(p: _Prepared, fold, rule):
    from graphtune.series.data import WindowData

    return {name: WindowData(p.array, p.spec, getattr(fold, name), rule) for name in ("train", "val", "test")}


def _run_fold(p: _Prepared, fold, rule, where: Path, device: torch.device, tracker, prefix: str, echo) -> dict:
    opts, task = p.opts, p.task
    data = _split_data(p, fold, rule)
    model = _build(p)
    if p.ckpt is None:  # a new model learns the standardisation of its training split
        x_mean, x_std, y_mean, y_std = _statistics(data["train"], task, opts.seed)
        with torch.no_grad():
            model.x_mean.copy_(x_mean)
            model.x_std.copy_(x_std)
            model.y_mean.fill_(y_mean)
            model.y_std.fill_(y_std)
    model.to(device)
    example, _ = data["train"].batch(np.arange(min(len(data["train"]), 8)))
    runner, compiled = _compiled(model, opts.compile, example.to(device))
    train_labels = data["train"].labels() if task == "classify" else None
    pw = pos_weight(opts.pos_weight, train_labels) if task == "classify" else None
    echo(f"series {opts.mode} {task} [{fold.name}]: {p.array.n_series} series x {p.channels} channels, context "
         f"{opts.context_len}, {len(data['train'])}/{len(data['val'])}/{len(data['test'])} train/val/test windows"
         + (f", rule {rule.describe()}" if task == "classify" else "") + f", {opts.backbone} ({compiled})")
    meta = {"config": dict(model.backbone.config), "task": task, "spec": dataclasses.asdict(p.spec),
            "rule": {"kind": rule.kind, "value": rule.value, "threshold": rule.threshold} if task == "classify"
            else None, "files": [Path(f).name for f in opts.files], "weights_source": model.backbone.weights_source}
    tracker.set_tags({"graphtune.series.weights": meta["weights_source"], "graphtune.series.compiled": compiled})
    trained = {"history": [], "best_epoch": 0, "best_state": None}
    if opts.mode != "infer":
        began = time.perf_counter()
        trained = _train(runner, model, data["train"], data["val"], opts, task, pw, device,
                         lambda m, step: tracker.log_metrics({f"{prefix}{k}": v for k, v in m.items()
                                                              if math.isfinite(v)}, step=step), echo)
        trained["train_s"] = time.perf_counter() - began
        _save(where / "model.pt", model, meta)  # the last epoch
        if trained["best_state"] is not None:
            model.load_state_dict(trained["best_state"])
            _save(where / "model.pt.best", model, meta)  # the best validation epoch, which is evaluated
    result = {"fold": fold.name, "bounds": fold.bounds, "best_epoch": trained["best_epoch"], "compiled": compiled,
              "weights_source": meta["weights_source"], "pos_weight": pw, "rule": meta["rule"],
              "epochs": trained["history"]}
    scores = {s: predict(runner, data[s], opts.batch_size, device, opts.amp, task) for s in
              {opts.eval_split, opts.plot_split or opts.eval_split, "val"}}
    ev, pl = opts.eval_split, opts.plot_split or opts.eval_split
    y_eval, y_plot = data[ev].labels(), data[pl].labels()
    if task == "classify":
        _classify_outputs(p, data, rule, scores, y_eval, y_plot, where, result)
    else:
        _regress_outputs(p, data, scores, y_eval, y_plot, where, result)
    return result


def _fit_reference(p: _Prepared, data):
    """The scikit-learn reference fitted on (a seeded subsample of) the training windows; None when turned off."""
    from graphtune.series.reference import Reference

    if not p.opts.reference:
        return None
    ref = Reference(p.task, seed=p.opts.seed, max_train=REFERENCE_MAX_TRAIN)
    x_train, y_train = _flat_with_labels(data["train"], REFERENCE_MAX_TRAIN, p.opts.seed)
    ref.fit(x_train, y_train)
    ref.fitted_on = {"windows": len(y_train), "available": len(data["train"]),
                     "subsampled": len(y_train) < len(data["train"])}  # reported beside its metrics
    return ref


def _ref_scores(ref, data, chunk: int = 65_536) -> np.ndarray:
    """The reference's scores of every window of `data`, gathered and flattened a chunk at a time."""
    out = []
    for start in range(0, len(data), chunk):
        x, _ = data.batch(np.arange(start, min(start + chunk, len(data))))
        out.append(np.asarray(ref.score(np.nan_to_num(x.reshape(len(x), -1).numpy())), dtype=np.float64))
    return np.concatenate(out) if out else np.zeros(0)


def _flat_with_labels(data, max_windows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Flattened training windows and their labels, a seeded subsample of at most max_windows."""
    n = len(data)
    rows = np.arange(n) if n <= max_windows else np.sort(np.random.default_rng(seed).choice(n, max_windows, False))
    x, y = data.batch(rows)
    return np.nan_to_num(x.reshape(len(rows), -1).numpy()), y.numpy()


def _classify_outputs(p, data, rule, scores, y_eval, y_plot, where: Path, result: dict) -> None:
    from graphtune.series.metrics import best_threshold, classify_metrics, classify_plots

    opts = p.opts
    tau, f1_val = best_threshold(data["val"].labels(), scores["val"])  # chosen on validation, never test
    ev = opts.eval_split
    metrics = classify_metrics(y_eval, scores[ev], opts.thresh_default)
    at_best = classify_metrics(y_eval, scores[ev], tau)
    metrics |= {"best_tau": tau, "val_f1_at_best_tau": f1_val, "f1_at_best_tau": at_best["f1"],
                "precision_at_best_tau": at_best["precision"], "recall_at_best_tau": at_best["recall"],
                "tau_default": opts.thresh_default}
    result |= {"split": ev, "metrics": metrics, "best_tau": tau}
    ref = _fit_reference(p, data)
    if ref is not None:
        ref_scores = _ref_scores(ref, data[ev])
        ref_tau, _ = best_threshold(data["val"].labels(), _ref_scores(ref, data["val"]))
        result["reference"] = classify_metrics(y_eval, ref_scores, opts.thresh_default) | {
            "best_tau": ref_tau, "f1_at_best_tau": classify_metrics(y_eval, ref_scores, ref_tau)["f1"]}
        result["reference_fit"] = ref.fitted_on
    (where / "metrics.json").write_text(json.dumps(result, indent=1, sort_keys=True, default=_json) + "\n")
    _preds(where / "preds.csv", p, data[ev], y_eval, scores[ev], (scores[ev] >= tau).astype(int), "y_score",
           f"y_pred@{tau:.6g}")
    pl = opts.plot_split or ev
    classify_plots(y_plot, scores[pl], tau, where)


def _regress_outputs(p, data, scores, y_eval, y_plot, where: Path, result: dict) -> None:
    from graphtune.series.metrics import regress_metrics, regress_plots

    ev = p.opts.eval_split
    result |= {"split": ev, "metrics": regress_metrics(y_eval, scores[ev])}
    ref = _fit_reference(p, data)
    if ref is not None:
        result["reference"] = regress_metrics(y_eval, _ref_scores(ref, data[ev]))
        result["reference_fit"] = ref.fitted_on
    (where / "summary.json").write_text(json.dumps(result, indent=1, sort_keys=True, default=_json) + "\n")
    _preds(where / "preds.csv", p, data[ev], y_eval, scores[ev], None, "y_pred", None)
    pl = p.opts.plot_split or ev
    regress_plots(y_plot, scores[pl], where)


def _preds(path: Path, p, data, y_true, y_score, y_pred, score_name: str, pred_name: str | None) -> None:
    ids = np.asarray(p.array.series_ids)[data.index.series]
    steps = data.label_steps()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["series_id", "time_index", "y_true", score_name] + ([pred_name] if pred_name else []))
    for i in range(len(y_true)):
        row = [ids[i], int(steps[i]), _num(y_true[i]), _num(y_score[i])]
        w.writerow(row + ([int(y_pred[i])] if y_pred is not None else []))
    path.write_text(buf.getvalue())


def _num(v) -> str:
    return repr(float(v))
