"""Masked forecasting metrics: the training loss and the evaluation accumulator.

Missing labels. A label is missing when it is NaN. With a null value (the GWNet/DCRNN convention,
null value 0 = no reading) a label within `NULL_EPS` of it is missing too, so a 0 that went
through float32 scaling still counts as missing. With `null_value=None` (a city whose zeros are
real readings, e.g. vehicle counts) only NaN is missing and a 0 is an observed reading.

- Training, per batch: `masked_mae_loss` weights each entry by mask / mask.mean() and zeroes
  the NaNs of 0/0, so a batch whose labels are all missing gives a loss of exactly 0 (and a
  zero gradient) instead of NaN.
- Evaluation, per split: `MetricAccumulator` sums errors and counts observed labels over the
  whole split, then divides once. This is the exact masked mean (a per-batch average of
  per-batch averages over-weights sparse batches), and an all-missing batch adds nothing.

Metrics over the observed labels y of a split, with error e = prediction - y:

- "mae": mean |e|; "rmse": sqrt(mean e^2), the square root of the split's masked MSE.
- "wape": 100 * sum |e| / sum |y|, in percent. Defined whenever some reading is non-zero, so it
  stays meaningful on counts with many zeros and on speeds near 0.
- "mape": 100 * mean(|e| / |y|), in percent (12.5 means 12.5 %, as the GWNet/DCRNN tables report
  it), over the observed labels with |y| >= `mape_floor` (raw units) and y != 0 only. A reading of
  0.3 km/h turns a 2 km/h error into 667 %, so readings below the floor are left out of MAPE
  (and only MAPE). A floor of 0 keeps every non-zero reading.
- "count": the number of observed labels evaluated; "mape_count": how many of them MAPE used.

A metric with nothing to measure is NaN, never 0 (which would read as a perfect forecast): every
metric when no label is observed, "mape" when no label reaches the floor, "wape" when every
observed reading is 0.

Horizons. `report_steps` picks the 1-based steps reported: `HORIZONS` clipped to T_out, without
duplicates (T_out = 4 reports steps 3 and 4). Each step's metrics appear twice: by step index,
"mae_h3", and by lead time, "mae_15min", where `horizon_names` turns a step into its lead time
at the city's sampling interval, always in minutes: step 12 is "60min" at 5-minute sampling,
"180min" at 15 minutes and "720min" hourly.
"""

from __future__ import annotations

import math

import torch

HORIZONS = (3, 6, 12)  # 1-based steps ahead: 15, 30 and 60 min at 5-minute sampling (the DCRNN tables)
NULL_EPS = 1e-4  # far below any real speed/flow reading, far above float32 round-off of a scaled 0 (~1e-5)

# Rows of MetricAccumulator's (6, T_out) float64 sums
_ABS, _SQ, _ABS_Y, _PCT, _COUNT, _MAPE_COUNT = range(6)
STEP_METRICS = ("mae", "rmse", "mape", "wape")  # reported overall and at every reported step


def horizon_minutes(h: int, interval_minutes: float) -> float:
    """Minutes ahead of the 1-based horizon `h`.

    h=3  # 3rd step = 15 min at 5-minute sampling
    """
    return h * interval_minutes


def report_steps(t_out: int, horizons: tuple[int, ...] = HORIZONS) -> tuple[int, ...]:
    """The 1-based steps whose metrics are reported for windows of `t_out` steps, ascending.

    Each horizon is clipped to t_out and duplicates are dropped:
    report_steps(12) == (3, 6, 12); report_steps(4) == (3, 4); report_steps(2) == (2,).
    """
    if int(t_out) != t_out or t_out < 1:
        raise ValueError(f"t_out: expected a positive whole number of steps, got {t_out!r}")
    if any(int(h) != h or h < 1 for h in horizons):
        raise ValueError(f"horizons: expected 1-based steps (whole numbers >= 1), got {tuple(horizons)!r}")
    return tuple(sorted({min(int(h), int(t_out)) for h in horizons}))


def horizon_names(interval_minutes: float, t_out: int, horizons: tuple[int, ...] = HORIZONS) -> dict[int, str]:
    """{step: lead-time name} for the steps `report_steps(t_out, horizons)` reports.

    The lead time is step * interval_minutes, always written in minutes ("min"), a whole number
    where it is one and a plain decimal otherwise (never an exponent):
    horizon_names(5, 12) == {3: "15min", 6: "30min", 12: "60min"}
    horizon_names(15, 12) == {3: "45min", 6: "90min", 12: "180min"}
    horizon_names(60, 4) == {3: "180min", 4: "240min"}
    horizon_names(2.5, 12) == {3: "7.5min", 6: "15min", 12: "30min"}
    """
    interval = _check_interval(interval_minutes)
    return {step: _minutes_name(horizon_minutes(step, interval)) for step in report_steps(t_out, horizons)}


def valid_mask(target: torch.Tensor, null_value: float | None = 0.0) -> torch.Tensor:
    """Boolean mask of observed labels: not NaN and, unless `null_value` is None, not within NULL_EPS of it."""
    if null_value is None:
        return ~torch.isnan(target)
    return (target - null_value).abs() > NULL_EPS  # NaN > eps is False: NaN labels drop out here too


def mape_mask(target: torch.Tensor, valid: torch.Tensor, mape_floor: float) -> torch.Tensor:
    """The labels MAPE uses: observed (`valid`), |target| >= `mape_floor` (raw units) and non-zero."""
    floor = _check_floor(mape_floor)
    magnitude = target.abs()
    return valid & (magnitude >= floor) & (magnitude > 0)


def masked_mae_loss(pred: torch.Tensor, target: torch.Tensor, null_value: float | None = 0.0) -> torch.Tensor:
    """Masked mean absolute error for training (a scalar tensor; 0, never NaN, when all labels are missing).

    pred, target: same shape, e.g. (B, T_out, N), raw units; target may hold NaN.
    null_value: see `valid_mask`; None = only NaN is missing.
    """
    mask = valid_mask(target, null_value).float()
    mask = mask / mask.mean()  # all missing: 0/0 = NaN, zeroed below
    mask = torch.nan_to_num(mask, nan=0.0)
    # Fill missing labels before subtracting: a NaN inside |pred - target| would make the gradient NaN
    # even though its weight is 0. Any finite fill does; its entries are weighted 0.
    fill = 0.0 if null_value is None else float(null_value)
    target = torch.nan_to_num(target, nan=fill)
    return ((pred - target).abs() * mask).mean()


class MetricAccumulator:
    """Accumulates masked MAE/RMSE/MAPE/WAPE over a whole split, per horizon step.

    acc = MetricAccumulator(null_value=0.0, mape_floor=1.0, interval_minutes=5.0)
    for pred, y in batches:        # (B, T_out, N) raw units, y NaN = missing
        acc.update(pred, y)
    acc.compute()                  # {"mae": ..., "rmse": ..., "mape": ..., "wape": ..., "count": ...,
                                   #  "mape_count": ..., "mae_h3": ..., "mae_15min": ..., ...}

    null_value: see `valid_mask` (None: only NaN is missing).
    horizons: the 1-based steps to report, clipped to T_out (`report_steps`).
    mape_floor: readings with |y| below it (raw units) are left out of MAPE; 0 keeps every non-zero one.
    interval_minutes: the sampling interval; when given, every step's metrics are also reported under
        its lead-time name ("mae_15min", `horizon_names`); None reports them by step index only.
    """

    def __init__(self, null_value: float | None = 0.0, horizons: tuple[int, ...] = HORIZONS, *,
                 mape_floor: float = 0.0, interval_minutes: float | None = None):
        self.null_value = null_value
        self.horizons = tuple(horizons)
        self.mape_floor = _check_floor(mape_floor)
        self.interval_minutes = None if interval_minutes is None else _check_interval(interval_minutes)
        self.sums: torch.Tensor | None = None  # (6, T_out) float64 sums over batches and nodes, rows _ABS.._MAPE_COUNT

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch. pred, target: (B, T_out, N) in raw units; target NaN = missing."""
        if pred.shape != target.shape or pred.dim() != 3:
            raise ValueError(f"pred and target must both be (B, T_out, N); got {tuple(pred.shape)} and "
                             f"{tuple(target.shape)}")
        valid = valid_mask(target, self.null_value)  # (B, T_out, N)
        target = torch.where(valid, target.double(), 0.0)  # missing -> 0: adds nothing to sum |y|
        err = torch.where(valid, (pred.double() - target).abs(), 0.0)  # (B, T_out, N)
        in_mape = mape_mask(target, valid, self.mape_floor)
        pct = torch.where(in_mape, err / torch.where(in_mape, target.abs(), 1.0), 0.0)  # 1.0: never divide by 0
        sums = torch.stack([
            err.sum(dim=(0, 2)),
            err.square().sum(dim=(0, 2)),
            target.abs().sum(dim=(0, 2)),
            pct.sum(dim=(0, 2)),
            valid.sum(dim=(0, 2)).double(),
            in_mape.sum(dim=(0, 2)).double(),
        ]).cpu()  # (6, T_out)
        if self.sums is None:
            self.sums = torch.zeros_like(sums)
        if sums.shape[1] != self.sums.shape[1]:
            raise ValueError(f"T_out changed between batches: {self.sums.shape[1]} then {sums.shape[1]}")
        self.sums += sums

    def compute(self) -> dict[str, float]:
        """Overall metrics, the counts, then each reported step's metrics by step and by lead time.

        Keys: mae, rmse, mape, wape, count, mape_count; then for each step h of `report_steps`
        mae_h{h}, rmse_h{h}, mape_h{h}, wape_h{h}, and, with interval_minutes, the same four
        named by lead time (mae_15min, ...). count and mape_count are ints; the rest are floats.
        """
        sums = self._require_sums("compute")
        totals = sums.sum(dim=1)
        out: dict[str, float] = _metrics(totals)
        out["count"] = int(totals[_COUNT])
        out["mape_count"] = int(totals[_MAPE_COUNT])
        t_out = sums.shape[1]
        names = {} if self.interval_minutes is None else horizon_names(self.interval_minutes, t_out, self.horizons)
        for h in report_steps(t_out, self.horizons):
            step = _metrics(sums[:, h - 1])  # step h is index h - 1
            out.update({f"{name}_h{h}": value for name, value in step.items()})
            if names:
                out.update({f"{name}_{names[h]}": value for name, value in step.items()})
        return out

    def per_step(self) -> dict[str, list[float]]:
        """mae/rmse/mape/wape for every step 1..T_out (for horizon plots)."""
        sums = self._require_sums("per_step")
        steps = [_metrics(sums[:, i]) for i in range(sums.shape[1])]
        return {name: [step[name] for step in steps] for name in STEP_METRICS}

    def _require_sums(self, method: str) -> torch.Tensor:
        if self.sums is None:
            raise ValueError(f"MetricAccumulator.{method}() called before any update()")
        return self.sums


def _metrics(sums: torch.Tensor) -> dict[str, float]:
    """mae/rmse/mape/wape from one column (6,) of accumulated sums; NaN where there is nothing to measure."""
    abs_err, sq_err, abs_y, pct_err, count, mape_count = (float(v) for v in sums)
    return {
        "mae": abs_err / count if count else math.nan,
        "rmse": math.sqrt(sq_err / count) if count else math.nan,
        "mape": 100.0 * pct_err / mape_count if mape_count else math.nan,  # percent
        "wape": 100.0 * abs_err / abs_y if abs_y else math.nan,  # percent
    }


def _check_floor(mape_floor: float) -> float:
    floor = float(mape_floor)
    if not (math.isfinite(floor) and floor >= 0):
        raise ValueError(f"mape_floor: expected a finite number >= 0 (raw units), got {mape_floor!r}")
    return floor


def _check_interval(interval_minutes: float) -> float:
    interval = float(interval_minutes)
    if not (math.isfinite(interval) and interval > 0):
        raise ValueError(f"interval_minutes: expected a positive number of minutes, got {interval_minutes!r}")
    return interval


def _minutes_name(minutes: float) -> str:
    """15.0 -> "15min", 7.5 -> "7.5min": whole minutes without a decimal point, never an exponent."""
    rounded = round(minutes, 6)  # 3 * 0.1 = 0.30000000000000004 -> 0.3
    if rounded.is_integer():
        return f"{int(rounded)}min"
    return f"{rounded:.6f}".rstrip("0") + "min"
