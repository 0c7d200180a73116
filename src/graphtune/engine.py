"""Training and evaluation loops: `fit` and `evaluate`. No MLflow and no file I/O here.

Models map x (B, T_in, N, C) to scaled predictions (B, T_out, N). The loop inverse-scales
predictions with the bundle's scaler and computes the masked MAE against raw targets, so the
loss and the reported metrics are in the city's own units (mph, vehicles/5 min).
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from graphtune import distributed
from graphtune.config import TrainConfig
from graphtune.data.bundle import DatasetBundle
from graphtune.errors import ConfigError, DataError, TrainingDiverged
from graphtune.memory import MemoryPlan, plan_memory
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
    plan: MemoryPlan | None = None  # the memory plan under train.memory_budget_mb (graphtune.memory), else None

    @property
    def best_val_mae(self) -> float:
        return self.best_val["mae"] if self.best_val else math.nan


@torch.no_grad()
def evaluate(model: nn.Module, bundle: DatasetBundle, split: str, *, batch_size: int = EVAL_BATCH, device="cpu",
             starts: torch.Tensor | None = None, shard: bool | None = None) -> dict[str, float]:
    """Masked metrics of `model` on `split` (or on the windows `starts`), in raw units.

    Returns MetricAccumulator.compute() with the bundle's null_value (None: only NaN is missing),
    mape_floor and sampling interval: mae, rmse, mape and wape (both percent), count and mape_count,
    then the four metrics at each step of metrics.report_steps (3/6/12 clipped to T_out) under two
    names, by step ("mae_h3") and by lead time in minutes ("mae_15min" at 5-minute sampling; see
    metrics.horizon_names). The model is moved to `device`; its train/eval mode is restored
    afterwards. The batch size changes memory, not the metrics.

    In a distributed job (graphtune.distributed.world_size() > 1) every rank must call it, with the same
    weights: each evaluates a contiguous block of the batches one process would run and the per-batch
    metric sums are all-reduced, then added in batch order exactly as one process adds them, so every rank
    returns the same metrics, those of a single process up to how its own forward passes round. shard=False
    evaluates every window on this rank alone, with no collective (e.g. on rank 0 only); None = shard in a
    distributed job. A DistributedDataParallel model is evaluated through the module inside it.
    """
    model = distributed.unwrap(model)  # the wrapper's forward would run collectives of its own
    device = distributed.rank_device(device)
    was_training = model.training
    model.to(device).eval()
    acc = MetricAccumulator(null_value=bundle.null_value, mape_floor=getattr(bundle, "mape_floor", 1.0),
                            interval_minutes=bundle.interval_minutes)
    if shard is not False and distributed.world_size() > 1:
        _evaluate_shard(model, bundle, split, acc, batch_size, device, starts)
    else:
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

    Data parallel (graphtune.distributed.world_size() > 1, e.g. under torchrun). Every rank calls fit with
    the same arguments and a model of the same shapes; rank 0's starting weights and buffers are copied to
    the others, and so are its epochs, step cap and whether a time budget applies. train.batch_size stays
    the GLOBAL batch: each step trains the batch one process would (distributed.ShardedWindowSampler: the
    same seeded order, each batch cut into one shard of batch_size / world_size windows per rank), so
    ConfigError unless the world size divides it. The model runs inside DistributedDataParallel, which
    averages the gradients; each rank's gradient is scaled by world_size x its shard's share of the batch's
    observed labels, so the average is the gradient of the masked MAE over the whole batch (a plain average
    of per-shard masked means would over-weight a shard with fewer observed labels). The epoch's train_loss
    is the mean over steps of that whole-batch loss. Validation is sharded and all-reduced (see `evaluate`);
    the best-epoch, early-stopping and time-budget decisions are rank 0's, broadcast, so all ranks stop
    together. `samples` counts whole batches; `best_state` is the plain module's (no `module.` prefix), the
    same on every rank. on_epoch_end runs on every rank with the same entry (its timings are the rank's
    own): log from distributed.is_main() only.
    What stays apart from one process, besides float rounding: dropout draws (each rank's RNG is seeded
    with distributed.rank_seed(seed), so shards never share masks) and scheduled-sampling coins (one per
    shard instead of one per batch); BatchNorm normalises each shard with its own batch statistics (torch's
    SyncBatchNorm needs a GPU) and keeps rank 0's running statistics, copied to every rank before each
    validation; a short last batch is padded with label-less windows (see `_DataParallel`).
    train.memory_budget_mb is refused (each rank would plan its own micro-batches).
    """
    epochs, lr = train.epochs_at(stage, n_stages), train.lr_at(stage, n_stages)
    world = distributed.world_size()
    if world > 1:
        _check_data_parallel(train, world)
    torch.manual_seed(distributed.rank_seed(seed))  # dropout and any sampling inside the model
    device = distributed.rank_device(device)
    model.to(device)
    fit_start = _clock(device)
    if not any(p.requires_grad for p in model.parameters()):  # e.g. the historical average: nothing to optimize
        return FitResult(best_state=_copy_state(model), best_epoch=0, stopped_reason="no_trainable_parameters")
    step_fn = TrainStep.for_config(model, bundle, train, device, lr=lr, starts=train_starts) if world == 1 else None
    loader = bundle.loader("train", batch_size=train.batch_size, shuffle=True, seed=seed, starts=train_starts)
    if loader.num_samples == 0:
        raise DataError(f"{bundle.name}: no training windows to fit on (train split shorter than "
                        f"T_in + T_out = {bundle.t_in + bundle.t_out} steps, or empty train_starts)")
    _require_val_labels(bundle)
    parallel = None
    if world > 1:  # after the checks, which every rank fails alike: nothing below may leave one rank behind
        parallel = _DataParallel(model, bundle, loader.starts, train.batch_size, seed, device)
        try:
            step_fn = TrainStep.for_config(parallel.module, bundle, train, device, lr=lr, starts=train_starts)
        except BaseException:
            parallel.close()
            raise
    steps_per_epoch = min(len(loader), max_steps_per_epoch or len(loader))
    timed = time_budget_s is not None
    if parallel is not None:  # rank 0's loop bounds, so that a rank given other arguments never waits forever
        epochs, steps_per_epoch, timed = distributed.broadcast_object((epochs, steps_per_epoch, timed))
    show = _show_progress(progress) and distributed.is_main()
    bar = tqdm(total=epochs * steps_per_epoch, disable=not show, unit="step", leave=False)
    try:
        # The starting weights are a candidate like every epoch: fine-tuning never returns a state that is worse
        # on validation than the one it started from (a transferred model that training only degrades stays).
        start_val = evaluate(model, bundle, "val", batch_size=train.batch_size, device=device)
        result = FitResult(best_state=_copy_state(model), best_epoch=0, start_val=start_val, best_val=start_val)
        result.plan = step_fn.plan  # memory plan (train.memory_budget_mb), None without a budget
        best_key, stale = (start_val["mae"] if math.isfinite(start_val["mae"]) else math.inf), 0
        for epoch in range(1, epochs + 1):
            epoch_start = _clock(device)
            losses = []
            for x, y, size, share in (_whole_batches(loader) if parallel is None else parallel.batches()):
                loss = step_fn(x, y)
                losses.append(loss if share is None else loss.double() * share)  # the shard's part of the batch loss
                result.samples += size  # a host-side count: no sync
                bar.update(1)
                over_time = time_budget_s is not None and time.perf_counter() - fit_start > time_budget_s
                if parallel is not None and timed:
                    over_time = distributed.broadcast_object(over_time)  # rank 0's clock decides for every rank
                if len(losses) >= steps_per_epoch or over_time:
                    break
            train_loss = torch.stack(losses)
            if parallel is not None:
                distributed.all_reduce_sum(train_loss)  # the shards' parts summed: each step's global batch loss
                distributed.broadcast_buffers(model)  # BatchNorm statistics: rank 0's, before anything reads them
            val_start = _clock(device)
            val = evaluate(model, bundle, "val", batch_size=train.batch_size, device=device)
            now = _clock(device)
            entry = {"epoch": epoch, "train_loss": float(train_loss.mean()), "val_mae": val["mae"],
                     "val_rmse": val["rmse"], "train_time_s": val_start - epoch_start, "val_time_s": now - val_start,
                     "epoch_time_s": now - epoch_start, "steps": len(losses)}
            _require_finite(entry, bundle.name, lr, train.clip_grad)
            result.history.append(entry)
            result.steps += len(losses)
            result.train_time_s += entry["train_time_s"]
            result.val_time_s += entry["val_time_s"]
            bar.set_postfix(epoch=epoch, val_mae=f"{val['mae']:.4f}")
            improved = val["mae"] < best_key
            over_time = time_budget_s is not None and now - fit_start > time_budget_s
            out_of_patience = train.patience is not None and (0 if improved else stale + 1) >= train.patience
            if parallel is not None:  # rank 0 decides (the metrics agree on every rank; clocks need not)
                improved, over_time, out_of_patience = distributed.broadcast_object(
                    (improved, over_time, out_of_patience))
            if improved:
                result.best_state, result.best_epoch, best_key, stale = _copy_state(model), epoch, val["mae"], 0
                result.best_val = val
            else:
                stale += 1
            if on_epoch_end is not None:
                on_epoch_end(epoch, entry)
            if over_time:
                result.stopped_reason = "time_budget"
                break
            if out_of_patience:
                result.stopped_reason = "early_stopping"
                break
    finally:
        bar.close()
        if parallel is not None:
            parallel.close()
    model.load_state_dict(result.best_state)
    result.fit_time_s = _clock(device) - fit_start
    return result


class TrainStep:
    """One optimizer step: forward (with teacher-forcing targets if the model takes them), masked MAE
    on inverse-scaled predictions, backward, clip, step. Returns the detached loss (no host sync).

    With `micro_batch` set (train.grad_accum > 1) the batch runs as consecutive micro-batches of that many
    windows, each a forward and backward, their gradients summed before the one clip and optimizer step.
    The loss stays the masked MAE of the whole batch: each micro-batch's absolute error summed over its
    valid readings is divided by the valid readings of the WHOLE batch (not a mean of micro-batch means), so
    the summed losses and gradients are those of one forward over the batch up to float rounding. That holds
    for models without batch statistics; GWNet's BatchNorm normalises each micro-batch with its own, and a
    random draw (a dropout mask, a teacher-forcing coin) is drawn per micro-batch. A batch shorter than a
    full one (an epoch's last) splits into as many micro-batches as it needs.

    With `checkpointing` the model's blocks (ForecastModel.checkpoint_blocks) are recomputed in backward
    instead of being stored: same numbers, less memory, about one more forward per step.

    `fit` runs it, and the benchmarks time it: the code users run is the code measured.
    """

    plan: MemoryPlan | None = None  # set by for_config under train.memory_budget_mb (graphtune.memory)

    @classmethod
    def for_config(cls, model: nn.Module, bundle: DatasetBundle, train: TrainConfig, device, *,
                   lr: float | None = None, starts: torch.Tensor | None = None) -> "TrainStep":
        """The step `fit` takes: Adam over the trainable parameters with train's weight decay, clipping, AMP,
        gradient accumulation and activation checkpointing; `lr` defaults to the first stage's.

        With train.memory_budget_mb the memory planner first measures candidate plans on a copy of the model
        with the training windows `starts` (default: the whole train split), and the step runs the plan it
        picks, kept in `plan` (graphtune.memory.plan_memory). ConfigError, before any step, when grad_accum
        does not divide batch_size, checkpointing is asked of a model without blocks, or the budget is below
        the measured minimum.
        """
        device = torch.device(device)
        micro = train.micro_batch_size  # ConfigError unless grad_accum divides batch_size
        plan = None
        if train.memory_budget_mb is not None:
            plan = plan_memory(model, bundle, train, device, lr=lr, starts=starts)
            micro, checkpointing = plan.micro_batch, plan.checkpointing
        else:
            checkpointing = train.activation_checkpointing
        params = [p for p in model.parameters() if p.requires_grad]
        lr = train.lr_at(0, 1) if lr is None else lr
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=train.weight_decay)
        step = cls(model, bundle, optimizer, device, train.clip_grad, train.amp_enabled,
                   micro_batch=None if micro == train.batch_size else micro, checkpointing=checkpointing)
        step.plan = plan
        return step

    def __init__(self, model: nn.Module, bundle: DatasetBundle, optimizer: torch.optim.Optimizer,
                 device: torch.device, clip_grad: float | None, amp: bool | None, *,
                 micro_batch: int | None = None, checkpointing: bool = False):
        self.model, self.bundle, self.optimizer = model, bundle, optimizer
        self.device, self.clip_grad = device, clip_grad
        self.takes_targets = getattr(model, "takes_targets", False)  # ForecastModel: teacher forcing reads them
        use_amp = device.type == "cuda" if amp is None else amp
        bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
        self.autocast_dtype = torch.bfloat16 if bf16 else torch.float16
        self.use_amp = use_amp
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range and needs none
        self.grad_scaler = torch.amp.GradScaler(device.type, enabled=use_amp and not bf16)
        self.micro_batch = micro_batch  # None: the whole batch in one forward
        if checkpointing and not (hasattr(model, "checkpoint_blocks") and model.checkpoint_blocks()):
            raise ConfigError(f"train.activation_checkpointing: {type(model).__name__} marks no checkpointable "
                              "block (ForecastModel.checkpoint_blocks); set it to false for this model")
        self.checkpointing = checkpointing

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = x.to(self.device), y.to(self.device)  # (B, T_in, N, C), (B, T_out, N) raw, NaN = missing
        targets = None
        if self.takes_targets:  # scaled, missing -> 0.0 (the train mean), like the inputs
            targets = torch.nan_to_num(self.bundle.scaler.transform(y), nan=0.0)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.model.activation_checkpointing() if self.checkpointing else nullcontext():
            if self.micro_batch is None:
                loss = self._backward(0, x, y, targets, None)
            else:
                valid = valid_mask(y, self.bundle.null_value).sum()  # every micro-batch divides by the batch's count
                xs, ys = x.split(self.micro_batch), y.split(self.micro_batch)
                ts = (None,) * len(xs) if targets is None else targets.split(self.micro_batch)
                loss = sum(self._backward(i, *part, valid) for i, part in enumerate(zip(xs, ys, ts)))
        if self.clip_grad:
            self.grad_scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        return loss

    def _backward(self, index: int, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None,
                  valid: torch.Tensor | None) -> torch.Tensor:
        """Forward and backward of micro-batch `index`; returns its detached share of the batch's loss.

        valid None: the whole batch, masked_mae_loss. Otherwise the micro-batch's masked absolute error sum
        over `valid`, the number of valid readings of the whole batch (0 errors -> a 0 loss, as masked_mae_loss).
        """
        if hasattr(self.model, "micro_batch"):
            self.model.micro_batch(index)
        kwargs = {} if targets is None else {"targets": targets}
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.use_amp):
            pred = self.model(x, **kwargs)  # (B, T_out, N) scaled
        pred = self.bundle.scaler.inverse_transform(pred.float())
        if valid is None:
            loss = masked_mae_loss(pred, y, self.bundle.null_value)
        else:
            mask = valid_mask(y, self.bundle.null_value)
            fill = 0.0 if self.bundle.null_value is None else float(self.bundle.null_value)  # as masked_mae_loss
            loss = ((pred - torch.nan_to_num(y, nan=fill)).abs() * mask).sum() / valid.clamp_min(1)
        self.grad_scaler.scale(loss).backward()
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


# ---------------------------------------------------------------------------------------------------------------
# Data parallel (graphtune.distributed): what fit and evaluate add when the world size is above 1
# ---------------------------------------------------------------------------------------------------------------

def _check_data_parallel(train: TrainConfig, world: int) -> None:
    """ConfigError, on every rank alike, for what a `world`-process fit cannot run."""
    if train.batch_size % world:
        raise ConfigError(f"train.batch_size: {train.batch_size} is not divisible by the {world} processes of this "
                          f"job (each trains an equal share of every batch); use a multiple of {world}")
    if getattr(train, "memory_budget_mb", None) is not None:
        raise ConfigError("train.memory_budget_mb: not available with several processes (each would plan its own "
                          "micro-batches, and the ranks must run the same ones); set train.grad_accum and "
                          "train.activation_checkpointing instead")


def _whole_batches(loader):
    """One process's batches as the data-parallel loop sees them: (x, y, windows, share None = the whole batch)."""
    for x, y in loader:
        yield x, y, x.shape[0], None


def _evaluate_shard(model: nn.Module, bundle: DatasetBundle, split: str, acc: MetricAccumulator, batch_size: int,
                    device: torch.device, starts: torch.Tensor | None) -> None:
    """Fill `acc` with the sums of the whole split while this rank evaluates only its block of it.

    The windows are cut into the batches one process's `bundle.loader` makes (consecutive, batch_size each);
    of n batches, rank r evaluates [r n / W, (r + 1) n / W). Batch k's sums fill row k of an all-zero
    (n, rows, T_out) tensor; the all-reduce adds exact zeros to them, so every rank receives each batch's sums
    unchanged and adds them in batch order, as MetricAccumulator.update does in one process: the same float64
    arithmetic, whatever the world size.
    """
    loader = bundle.loader(split, batch_size=batch_size, starts=starts)  # the split's windows, batch_size checked
    batches = torch.split(loader.starts, loader.batch_size)
    rank, world, n = distributed.rank(), distributed.world_size(), len(batches)
    sums = torch.zeros(n, *_accumulator_shape(acc, bundle.t_out), dtype=torch.float64)
    for k in range(rank * n // world, (rank + 1) * n // world):
        x, y = bundle.batch(batches[k])
        one = _like(acc)
        one.update(bundle.scaler.inverse_transform(model(x.to(device)).float()), y.to(device))
        sums[k] = one.sums
    distributed.all_reduce_sum(sums)
    for batch_sums in sums:  # no batch at all: acc stays empty and compute() raises as in one process
        if acc.sums is None:
            acc.sums = torch.zeros_like(batch_sums)
        acc.sums += batch_sums


def _like(acc: MetricAccumulator) -> MetricAccumulator:
    """An empty accumulator with `acc`'s settings."""
    return MetricAccumulator(null_value=acc.null_value, horizons=acc.horizons, mape_floor=acc.mape_floor,
                             interval_minutes=acc.interval_minutes)


def _accumulator_shape(acc: MetricAccumulator, t_out: int) -> tuple[int, ...]:
    """The shape of `acc`'s sums for windows of t_out steps (asked of the accumulator, not assumed): every rank
    needs it for the all-reduce, including a rank that evaluates no batch."""
    probe = _like(acc)
    probe.update(torch.zeros(1, t_out, 1), torch.zeros(1, t_out, 1))
    return tuple(probe.sums.shape)


class _Replicated(DistributedDataParallel):
    """DistributedDataParallel that also answers for the module inside it.

    TrainStep reads the model's hooks off the module it is given (takes_targets, micro_batch,
    activation_checkpointing, checkpoint_blocks); a plain wrapper has none of them, so teacher forcing would
    silently turn off. Public names the wrapper lacks are looked up on the inner module.
    """

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name == "module":  # DDP's own state, and the inner module while it is set
                raise
            return getattr(self.module, name)


class _DataParallel:
    """fit's side of a data-parallel job: the model in DistributedDataParallel, this rank's shard of every
    batch, and the gradient weight that turns DDP's average of the shards' gradients into the gradient of
    the masked MAE over the whole batch.

    The weight. masked_mae_loss divides a shard's absolute errors by the shard's own count of observed
    labels c_r; the whole batch's loss divides by C = sum of c_r. DDP averages the W shards' gradients, so
    scaling shard r's gradient by W c_r / C gives sum_r (c_r / C) grad(loss_r) = grad(batch loss) exactly (up
    to rounding). The scale is applied in backward, on the gradient of the wrapper's output, so the step,
    clipping included, sees the whole batch's gradient; the loss TrainStep returns stays the shard's, and
    fit sums the shards' loss_r c_r / C into the batch loss. The counts come from the bundle's labels of
    every shard of the batch, which every rank knows (no communication).

    A short last batch. tensor_split gives the shards sizes that differ by one window, or an empty shard when
    the batch has fewer windows than there are ranks. Every rank must run the same forward and backward
    passes (each backward is an all-reduce; micro-batches split a shard by size), so a shorter shard is
    padded to the longest with copies of the batch's first window whose labels are all set missing (NaN):
    they add nothing to the loss or the gradient, only to a BatchNorm's batch statistics on that step.

    Buffers are copied from rank 0 once, when the wrapper is built, and not at every forward
    (forward_sync_buffers=False): fit copies rank 0's to all ranks before each validation, their only reader.
    Rank 0 ends with the same statistics either way (a per-forward copy would only overwrite the others').
    """

    def __init__(self, model: nn.Module, bundle: DatasetBundle, starts: torch.Tensor, batch_size: int, seed: int,
                 device: torch.device):
        self.bundle, self.rank, self.world = bundle, distributed.rank(), distributed.world_size()
        device_ids = [device.index] if device.type == "cuda" else None
        # rank 0's parameters and buffers are copied to every rank here; buffers never again during forward
        self.module = _Replicated(model, device_ids=device_ids, forward_sync_buffers=False)
        self.sampler = distributed.ShardedWindowSampler(starts, batch_size, seed=seed, world_size=self.world)
        self._scale = 1.0
        self._hook = self.module.register_forward_hook(self._weight_gradient)

    def __len__(self) -> int:
        return len(self.sampler)

    def batches(self):
        """One epoch: per global batch, this rank's (x, y), the batch's window count, and the shard's share
        c_r / C of the batch's observed labels (0 when the batch has none)."""
        for parts in self.sampler:
            counts = _label_counts(self.bundle, parts)
            total = sum(counts)
            share = counts[self.rank] / total if total else 0.0
            self._scale = self.world * share
            mine = parts[self.rank]
            pad = max(part.numel() for part in parts) - mine.numel()
            x, y = self.bundle.batch(torch.cat([mine, parts[0][:1].repeat(pad)]))
            if pad:
                y[-pad:] = math.nan  # missing labels: the stand-in windows weigh nothing
            yield x, y, sum(part.numel() for part in parts), share

    def _weight_gradient(self, module: nn.Module, args, output: torch.Tensor) -> None:
        if module.training and torch.is_grad_enabled() and output.requires_grad:
            scale = self._scale  # this step's, fixed now: backward runs later
            output.register_hook(lambda grad: grad * scale)

    def close(self) -> None:
        """Detach the wrapper from the model, so fitting the same model again (the next stage) or training it
        alone runs none of this wrapper's all-reduce hooks, whenever the wrapper itself is garbage collected."""
        self._hook.remove()
        remove = getattr(self.module, "_remove_autograd_hooks", None)  # DDP's reducer hooks on the parameters
        if remove is not None:
            remove()


def _label_counts(bundle: DatasetBundle, parts: tuple[torch.Tensor, ...]) -> list[int]:
    """Observed labels (metrics.valid_mask, as the loss masks them) of the windows of each part."""
    starts = torch.cat(parts)
    steps = starts[:, None] + (bundle.t_in + torch.arange(bundle.t_out))  # (B, T_out): the targets batch() gathers
    observed = valid_mask(bundle.target[steps], bundle.null_value).flatten(1).sum(1)  # (B,)
    return [int(count.sum()) for count in observed.split([part.numel() for part in parts])]
