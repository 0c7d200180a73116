"""Training and evaluation loops: `fit` and `evaluate`. No MLflow and no file I/O here.

Models map x (B, T_in, N, C) to scaled predictions (B, T_out, N). The loop inverse-scales
predictions with the bundle's scaler and computes the masked MAE against raw targets, so the
loss and the reported metrics are in the city's own units (mph, vehicles/5 min).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from graphtune.config import TrainConfig
from graphtune.data.bundle import DatasetBundle
from graphtune.errors import DataError, TrainingDiverged
from graphtune.metrics import MetricAccumulator, masked_mae_loss, valid_mask


EVAL_BATCH = TrainConfig().batch_size  # evaluation's default batch: memory only, never the metrics


@dataclass
class FitResult:
    """What `fit` returns. The model itself already holds `best_state` when fit returns."""

    best_state: dict  # state_dict copy of the best-on-validation epoch (tensors on the training device)
    best_epoch: int  # 1-based; 0 = the starting weights stayed best on validation (or nothing was trained)
    history: list[dict] = field(default_factory=list)  # one dict per epoch, see `fit`
    train_time_s: float = 0.0  # time in training steps only (synchronized on CUDA at epoch ends)
    val_time_s: float = 0.0  # time in the per-epoch validations
    fit_time_s: float = 0.0  # wall time of the whole fit: steps, validations, checkpoint copies
    start_val: dict | None = None  # validation metrics of the starting weights (a candidate like every epoch)
    best_val: dict | None = None  # validation metrics of best_state, the weights the model holds on return
    stopped_reason: str = "completed"  # completed | early_stopping | time_budget | no_trainable_parameters
    steps: int = 0  # optimizer steps taken in total
    samples: int = 0  # training windows processed in total (the batch sizes of all steps summed)

    @property
    def best_val_mae(self) -> float:
        return self.best_val["mae"] if self.best_val else math.nan


@torch.no_grad()
def evaluate(model: nn.Module, bundle: DatasetBundle, split: str, *, batch_size: int = EVAL_BATCH, device="cpu",
             starts: torch.Tensor | None = None) -> dict[str, float]:
    """Masked metrics of `model` on `split` (or on the windows `starts`), in raw units.

    Returns MetricAccumulator.compute() with the bundle's null_value (None: only NaN is missing),
    mape_floor and sampling interval: mae, rmse, mape and wape (both percent), count and mape_count,
    then the four metrics at each step of metrics.report_steps (3/6/12 clipped to T_out) under two
    names, by step ("mae_h3") and by lead time in minutes ("mae_15min" at 5-minute sampling; see
    metrics.horizon_names). The model is moved to `device`; its train/eval mode is restored
    afterwards. The batch size changes memory, not the metrics.
    """
    was_training = model.training
    model.to(device).eval()
    acc = MetricAccumulator(null_value=bundle.null_value, mape_floor=getattr(bundle, "mape_floor", 1.0),
                            interval_minutes=bundle.interval_minutes)
    for x, y in bundle.loader(split, batch_size=batch_size, starts=starts):
        pred = model(x.to(device))  # (B, T_out, N) scaled
        acc.update(bundle.scaler.inverse_transform(pred.float()), y.to(device))
    model.train(was_training)
    return acc.compute()


def fit(model: nn.Module, bundle: DatasetBundle, train: TrainConfig, *, stage: int = 0, n_stages: int = 1,
        seed: int, device="cpu", train_starts: torch.Tensor | None = None,
        max_steps_per_epoch: int | None = None, time_budget_s: float | None = None, progress: bool | None = None,
        on_epoch_end: Callable[[int, dict], None] | None = None) -> FitResult:
    """Train with Adam on the masked MAE (raw units) and keep the best-on-validation weights.

    - train: the params.yaml `train:` section, passed whole: epochs and lr of `stage` in a run of
      `n_stages` stages (TrainConfig.epochs_at / lr_at), batch_size, weight_decay, clip_grad,
      early_stop_patience (epochs without a lower validation MAE before stopping; 0 = never), amp.
    - train_starts: train only on these window starts (few-shot subset); default every train window.
    - max_steps_per_epoch: cap optimizer steps per epoch (budgeted fine-tuning).
    - time_budget_s: stop once the fit has run this long; checked after every step (against the host
      clock, without a CUDA sync) and after every validation, so the overrun is at most about one step
      plus the validation of the interrupted epoch.
    - progress: tqdm bar over steps; None = only when stderr is a terminal.
    - on_epoch_end(epoch, entry): called with each history entry: epoch (1-based), train_loss
      (mean batch loss), val_mae, val_rmse, train_time_s (the epoch's steps), val_time_s, epoch_time_s
      (both), steps.

    Raises TrainingDiverged when, at the end of an epoch, the mean train loss or the val MAE/RMSE is NaN
    or inf (checked once per epoch, where validation synchronizes anyway; the steps stay sync-free), and
    DataError before training when the val split has no window or no observed label to validate on.

    The starting weights are evaluated on validation first and are a candidate for the best state: when no
    epoch improves on them, `best_epoch` is 0 and the model is left as it started.

    Same seed, same data, same device (CPU) -> identical history.
    """
    epochs, lr = train.epochs_at(stage, n_stages), train.lr_at(stage, n_stages)
    torch.manual_seed(seed)  # dropout and any sampling inside the model
    device = torch.device(device)
    model.to(device)
    fit_start = _clock(device)
    if not any(p.requires_grad for p in model.parameters()):  # e.g. the historical average: nothing to optimize
        return FitResult(best_state=_copy_state(model), best_epoch=0, stopped_reason="no_trainable_parameters")
    step_fn = TrainStep.for_config(model, bundle, train, device, lr=lr)
    loader = bundle.loader("train", batch_size=train.batch_size, shuffle=True, seed=seed, starts=train_starts)
    if loader.num_samples == 0:
        raise DataError(f"{bundle.name}: no training windows to fit on (train split shorter than "
                        f"T_in + T_out = {bundle.t_in + bundle.t_out} steps, or empty train_starts)")
    _require_val_labels(bundle)
    steps_per_epoch = min(len(loader), max_steps_per_epoch or len(loader))
    bar = tqdm(total=epochs * steps_per_epoch, disable=not _show_progress(progress), unit="step", leave=False)
    # The starting weights are a candidate like every epoch: fine-tuning never returns a state that is worse on
    # validation than the one it started from (a transferred model that training only degrades stays as it was).
    start_val = evaluate(model, bundle, "val", batch_size=train.batch_size, device=device)
    result = FitResult(best_state=_copy_state(model), best_epoch=0, start_val=start_val, best_val=start_val)
    best_key, stale = (start_val["mae"] if math.isfinite(start_val["mae"]) else math.inf), 0
    try:
        for epoch in range(1, epochs + 1):
            epoch_start = _clock(device)
            losses = []
            for x, y in loader:
                losses.append(step_fn(x, y))
                result.samples += x.shape[0]  # a host-side shape: no sync
                bar.update(1)
                over_time = time_budget_s is not None and time.perf_counter() - fit_start > time_budget_s
                if len(losses) >= steps_per_epoch or over_time:
                    break
            val_start = _clock(device)
            val = evaluate(model, bundle, "val", batch_size=train.batch_size, device=device)
            now = _clock(device)
            entry = {"epoch": epoch, "train_loss": float(torch.stack(losses).mean()), "val_mae": val["mae"],
                     "val_rmse": val["rmse"], "train_time_s": val_start - epoch_start, "val_time_s": now - val_start,
                     "epoch_time_s": now - epoch_start, "steps": len(losses)}
            _require_finite(entry, bundle.name, lr, train.clip_grad)
            result.history.append(entry)
            result.steps += len(losses)
            result.train_time_s += entry["train_time_s"]
            result.val_time_s += entry["val_time_s"]
            bar.set_postfix(epoch=epoch, val_mae=f"{val['mae']:.4f}")
            if val["mae"] < best_key:
                result.best_state, result.best_epoch, best_key, stale = _copy_state(model), epoch, val["mae"], 0
                result.best_val = val
            else:
                stale += 1
            if on_epoch_end is not None:
                on_epoch_end(epoch, entry)
            if time_budget_s is not None and now - fit_start > time_budget_s:
                result.stopped_reason = "time_budget"
                break
            if train.patience is not None and stale >= train.patience:
                result.stopped_reason = "early_stopping"
                break
    finally:
        bar.close()
    model.load_state_dict(result.best_state)
    result.fit_time_s = _clock(device) - fit_start
    return result


class TrainStep:
    """One optimizer step: forward (with teacher-forcing targets if the model takes them), masked MAE
    on inverse-scaled predictions, backward, clip, step. Returns the detached loss (no host sync).

    `fit` runs it, and the benchmarks time it: the code users run is the code measured.
    """

    @classmethod
    def for_config(cls, model: nn.Module, bundle: DatasetBundle, train: TrainConfig, device, *,
                   lr: float | None = None) -> "TrainStep":
        """The step `fit` takes: Adam over the trainable parameters with train's weight decay, clipping and
        AMP; `lr` defaults to the first stage's."""
        device = torch.device(device)
        params = [p for p in model.parameters() if p.requires_grad]
        lr = train.lr_at(0, 1) if lr is None else lr
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=train.weight_decay)
        return cls(model, bundle, optimizer, device, train.clip_grad, train.amp_enabled)

    def __init__(self, model: nn.Module, bundle: DatasetBundle, optimizer: torch.optim.Optimizer,
                 device: torch.device, clip_grad: float | None, amp: bool | None):
        self.model, self.bundle, self.optimizer = model, bundle, optimizer
        self.device, self.clip_grad = device, clip_grad
        self.takes_targets = getattr(model, "takes_targets", False)  # ForecastModel: teacher forcing reads them
        use_amp = device.type == "cuda" if amp is None else amp
        bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
        self.autocast_dtype = torch.bfloat16 if bf16 else torch.float16
        self.use_amp = use_amp
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range and needs none
        self.grad_scaler = torch.amp.GradScaler(device.type, enabled=use_amp and not bf16)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = x.to(self.device), y.to(self.device)  # (B, T_in, N, C), (B, T_out, N) raw, NaN = missing
        kwargs = {}
        if self.takes_targets:  # scaled, missing -> 0.0 (the train mean), like the inputs
            kwargs["targets"] = torch.nan_to_num(self.bundle.scaler.transform(y), nan=0.0)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.use_amp):
            pred = self.model(x, **kwargs)  # (B, T_out, N) scaled
        loss = masked_mae_loss(self.bundle.scaler.inverse_transform(pred.float()), y, self.bundle.null_value)
        self.grad_scaler.scale(loss).backward()
        if self.clip_grad:
            self.grad_scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        return loss.detach()


def _require_val_labels(bundle: DatasetBundle) -> None:
    """Fail before training when validation cannot measure anything: a data problem, not a diverged fit."""
    starts = bundle.window_starts("val")
    if starts.numel() == 0:
        raise DataError(f"{bundle.name}: no validation windows (the val split is shorter than T_in + T_out = "
                        f"{bundle.t_in + bundle.t_out} steps); give prepare.split a larger val share")
    # every val label: the targets of the first window through those of the last (evaluation uses stride 1)
    labels = bundle.target[int(starts[0]) + bundle.t_in : int(starts[-1]) + bundle.t_in + bundle.t_out]
    if not bool(valid_mask(labels, bundle.null_value).any()):
        missing = "missing" if bundle.null_value is None else f"missing or {bundle.null_value:g}"
        raise DataError(f"{bundle.name}: the val split has no observed readings (every label is {missing}), "
                        "so no epoch can be validated; check the data or prepare.split")


def _require_finite(entry: dict, name: str, lr: float, clip_grad: float | None) -> None:
    """Raise TrainingDiverged naming what became NaN or inf in an epoch's history entry."""
    labels = {"train_loss": "train loss", "val_mae": "val MAE", "val_rmse": "val RMSE"}
    bad = [f"{label} {entry[key]}" for key, label in labels.items() if not math.isfinite(entry[key])]
    if bad:
        advice = "set train.clip_grad" if not clip_grad else f"lower train.clip_grad (now {clip_grad:g})"
        raise TrainingDiverged(f"{name}: training diverged at epoch {entry['epoch']} (lr {lr:g}): "
                               f"{', '.join(bad)}; lower train.lrs or {advice}")


def _copy_state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _clock(device: torch.device) -> float:
    """perf_counter after waiting for queued CUDA work, so GPU time is not under-counted."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _show_progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress
