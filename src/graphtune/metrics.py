"""Masked forecasting metrics: the training loss and the evaluation accumulator.

Convention (GWNet/DCRNN, null value 0): a label counts as observed when it is not NaN and
lies further than `NULL_EPS` from the null value, so readings that are almost but not exactly
0 (a 0 that went through float32 scaling) are treated as missing too.

- Training, per batch: `masked_mae_loss` weights each entry by mask / mask.mean() and zeroes
  the NaNs of 0/0, so a batch whose labels are all missing gives a loss of exactly 0 (and a
  zero gradient) instead of NaN.
- Evaluation, per split: `MetricAccumulator` sums errors and counts observed labels over the
  whole split, then divides once. This is the exact masked mean (a per-batch average of
  per-batch averages over-weights sparse batches), and an all-missing batch adds nothing.

Metric names: "mae", "rmse", "mape" over all horizons, and "mae_h3", "rmse_h12", ... at the
horizons in `HORIZONS`. MAPE is in percent (12.5 means 12.5 %), as the GWNet/DCRNN tables
report it. RMSE is the square root of the split's masked MSE (not a mean of per-batch RMSEs).
"""

from __future__ import annotations

import math

import torch

HORIZONS = (3, 6, 12)  # 1-based steps ahead: 15, 30 and 60 min at 5-minute sampling (the DCRNN tables)
NULL_EPS = 1e-4  # far below any real speed/flow reading, far above float32 round-off of a scaled 0 (~1e-5)


def horizon_minutes(h: int, interval_minutes: float) -> float:
    """Minutes ahead of the 1-based horizon `h`.

    h=3  # 3rd step = 15 min at 5-minute sampling
    """
    return h * interval_minutes


def valid_mask(target: torch.Tensor, null_value: float = 0.0) -> torch.Tensor:
    """Boolean mask of observed labels: not NaN and not within NULL_EPS of `null_value`."""
    return (target - null_value).abs() > NULL_EPS  # NaN > eps is False: NaN labels drop out here too


def masked_mae_loss(pred: torch.Tensor, target: torch.Tensor, null_value: float = 0.0) -> torch.Tensor:
    """Masked mean absolute error for training (a scalar tensor; 0, never NaN, when all labels are missing).

    pred, target: same shape, e.g. (B, T_out, N), raw units; target may hold NaN.
    """
    mask = valid_mask(target, null_value).float()
    mask = mask / mask.mean()  # all missing: 0/0 = NaN, zeroed below
    mask = torch.nan_to_num(mask, nan=0.0)
    # Fill missing labels before subtracting: a NaN inside |pred - target| would make the gradient NaN
    # even though its weight is 0.
    target = torch.nan_to_num(target, nan=null_value)
    return ((pred - target).abs() * mask).mean()


class MetricAccumulator:
    """Accumulates masked MAE/RMSE/MAPE over a whole split, per horizon step.

    acc = MetricAccumulator()
    for pred, y in batches:        # (B, T_out, N) raw units, y NaN = missing
        acc.update(pred, y)
    acc.compute()                  # {"mae": ..., "rmse": ..., "mape": ..., "mae_h3": ..., ...}
    """

    def __init__(self, null_value: float = 0.0, horizons: tuple[int, ...] = HORIZONS):
        self.null_value = null_value
        self.horizons = horizons
        self.abs_err: torch.Tensor | None = None  # (T_out,) float64 sums over batches and nodes
        self.sq_err: torch.Tensor | None = None
        self.pct_err: torch.Tensor | None = None
        self.count: torch.Tensor | None = None

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch. pred, target: (B, T_out, N) in raw units; target NaN = missing."""
        if pred.shape != target.shape or pred.dim() != 3:
            raise ValueError(f"pred and target must both be (B, T_out, N); got {tuple(pred.shape)} and "
                             f"{tuple(target.shape)}")
        mask = valid_mask(target, self.null_value)  # (B, T_out, N)
        pred = pred.double()
        target = torch.where(mask, target.double(), 1.0)  # 1.0: any finite non-zero placeholder, masked out
        err = torch.where(mask, (pred - target).abs(), 0.0)  # (B, T_out, N)
        sums = torch.stack([
            err.sum(dim=(0, 2)),
            err.square().sum(dim=(0, 2)),
            (err / target.abs()).sum(dim=(0, 2)),
            mask.sum(dim=(0, 2)).double(),
        ]).cpu()  # (4, T_out)
        if self.count is None:
            self.abs_err, self.sq_err, self.pct_err, self.count = torch.zeros_like(sums).unbind(0)
        if sums.shape[1] != self.count.numel():
            raise ValueError(f"T_out changed between batches: {self.count.numel()} then {sums.shape[1]}")
        self.abs_err += sums[0]
        self.sq_err += sums[1]
        self.pct_err += sums[2]
        self.count += sums[3]

    def compute(self) -> dict[str, float]:
        """Overall and per-horizon metrics (horizons beyond T_out are skipped).

        A split with no observed label at all gives NaN: there is nothing to measure, and 0 would
        read as a perfect forecast.
        """
        if self.count is None:
            raise ValueError("MetricAccumulator.compute() called before any update()")
        out = _metrics(self.abs_err.sum(), self.sq_err.sum(), self.pct_err.sum(), self.count.sum())
        for h in self.horizons:
            if h <= self.count.numel():
                at = h - 1  # horizon h is the h-th step ahead, index h - 1
                step = _metrics(self.abs_err[at], self.sq_err[at], self.pct_err[at], self.count[at])
                out.update({f"{name}_h{h}": value for name, value in step.items()})
        return out

    def per_step(self) -> dict[str, list[float]]:
        """mae/rmse/mape for every step 1..T_out (for horizon plots)."""
        if self.count is None:
            raise ValueError("MetricAccumulator.per_step() called before any update()")
        steps = [_metrics(a, s, p, c) for a, s, p, c in zip(self.abs_err, self.sq_err, self.pct_err, self.count)]
        return {name: [step[name] for step in steps] for name in ("mae", "rmse", "mape")}


def _metrics(abs_err: torch.Tensor, sq_err: torch.Tensor, pct_err: torch.Tensor, count: torch.Tensor) -> dict:
    n = float(count)
    if n == 0:
        return {"mae": math.nan, "rmse": math.nan, "mape": math.nan}
    return {
        "mae": float(abs_err) / n,
        "rmse": math.sqrt(float(sq_err) / n),
        "mape": 100.0 * float(pct_err) / n,  # percent
    }
