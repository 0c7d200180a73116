"""The budget curve: which training windows and steps a fraction buys, and when to stop the curve.

A transfer stage fine-tunes at increasing fractions of the target city's training data
(e.g. 0.1, 0.3, 1.0), each run starting again from the transferred weights. `fewshot_mode`
says what a fraction limits:

- "subset": a seeded random subset of round(fraction * n) training windows (at least 1); every
  epoch runs over the whole subset. Subsets are nested: with one seed, the 0.1 subset lies inside
  the 0.3 subset, so a larger budget only ever adds data.
- "steps": every training window, but at most round(fraction * full-epoch batches) optimizer steps
  per epoch (at least 1).
- "both": the subset and the step cap (GraphTune-lite's budget-strict mode). The cap is taken
  against a full-data epoch, so it only binds where rounding makes the subset's epoch longer
  than the "steps" mode's; the compute per epoch never exceeds that of "steps".

`BudgetScheduler` stops the curve once more budget stops paying off (see its docstring).
"""

from __future__ import annotations

import math

import torch

from graphtune.config import TransferConfig
from graphtune.errors import ConfigError

FEWSHOT_MODES = ("subset", "steps", "both")


def check_fraction(fraction: float) -> float:
    """Return `fraction` as a float, or raise ConfigError unless 0 < fraction <= 1."""
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise ConfigError(f"fractions: each budget fraction must be in (0, 1], got {fraction!r}")
    return value


def _check_mode(mode: str) -> None:
    if mode not in FEWSHOT_MODES:
        raise ConfigError(f"fewshot_mode: expected one of {', '.join(FEWSHOT_MODES)}, got {mode!r}")


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))  # not Python's round(): 2.5 -> 3, as a reader would expect


def sample_windows(starts: torch.Tensor, fraction: float, mode: str, seed: int) -> torch.Tensor:
    """The training window starts a `fraction` of the budget uses, sorted ("steps" mode: all of them)."""
    fraction = check_fraction(fraction)
    _check_mode(mode)
    if mode == "steps":
        return starts
    n = starts.numel()
    k = min(n, max(1, _round_half_up(fraction * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # one permutation per seed:
    return starts[order[:k].sort().values]  # its first k are nested across fractions


def recent_windows(starts: torch.Tensor, days: float, steps_per_day: int) -> torch.Tensor:
    """The windows of the last `days` days of the training split (GPD's target_days): the most recent
    round(days * steps_per_day) window starts (at least 1, at most all of them), in order."""
    k = min(starts.numel(), max(1, _round_half_up(days * steps_per_day)))
    return starts[starts.numel() - k:]


def budget_points(starts: torch.Tensor, transfer: TransferConfig, steps_per_day: int, seed: int
                  ) -> list[tuple[float, torch.Tensor, float | None]]:
    """The curve's points (fraction, window starts, days or None): `transfer.target_days` when set (each the
    most recent days, recorded with the share of the windows it is), else `transfer.fractions` sampled by
    `transfer.fewshot_mode`. Target days whose windows coincide (more days than the split holds) count once."""
    if not transfer.target_days:
        return [(float(f), sample_windows(starts, f, transfer.fewshot_mode, seed), None) for f in transfer.fractions]
    points, seen = [], set()
    for days in transfer.target_days:
        chosen = recent_windows(starts, float(days), steps_per_day)
        if chosen.numel() not in seen:
            seen.add(chosen.numel())
            points.append((chosen.numel() / max(1, starts.numel()), chosen, float(days)))
    return points


def steps_cap(n_windows: int, batch_size: int, fraction: float, mode: str) -> int | None:
    """Max optimizer steps per epoch for "steps"/"both" (fraction of a full-data epoch), None for "subset".

    n_windows is the number of windows in the full training split, not in the subset.
    """
    fraction = check_fraction(fraction)
    _check_mode(mode)
    if mode == "subset":
        return None
    full_epoch = -(-n_windows // batch_size)  # batches in one epoch over every window
    return max(1, _round_half_up(fraction * full_epoch))


class BudgetScheduler:
    """Loss-gradient budget scheduler: stop the budget curve when more budget stops paying off.

    Feed it points (fraction, val_metric) in increasing fraction order, starting with the zero-shot
    point at fraction 0 (the first point is only the reference; without a zero-shot point, the first
    budget point is). For each later point, with ref the first point's val_metric, prev_best the lowest
    val_metric so far and prev_fraction the previous point's fraction:

        gain      = prev_best - val                              (> 0: better)
        gain_rate = (gain / ref) / (fraction - prev_fraction)    (share of the reference error per full budget)
        rel_gain  = gain / prev_best

    Both thresholds are shares of an error, so one setting means the same in mph, km/h or counts. The
    step is "flat" when gain_rate < min_gain_rate AND rel_gain < min_rel_improve (a NaN metric counts as
    flat). The curve stops when more than `patience` consecutive steps are flat; a non-flat step resets
    the count.
    """

    def __init__(self, transfer: TransferConfig):
        """Thresholds from the params.yaml `transfer:` section: min_gain_rate (a share of the reference val error
        per full budget), min_rel_improve (a share of the best val error so far) and patience (flat steps
        tolerated)."""
        if not (isinstance(transfer.patience, int) and transfer.patience >= 0):
            raise ConfigError(f"transfer.patience: expected an integer >= 0, got {transfer.patience!r}")
        self.min_gain_rate = float(transfer.min_gain_rate)
        self.min_rel_improve = float(transfer.min_rel_improve)
        self.patience = int(transfer.patience)
        self.points: list[tuple[float, float]] = []
        self.steps: list[dict] = []  # per point after the first: fraction, val, gain, gain_rate, rel_gain, flat
        self.flat_streak = 0
        self.stopped_at: float | None = None  # fraction of the point that triggered the stop
        self.stop_reason: str | None = None

    @property
    def should_stop(self) -> bool:
        return self.stopped_at is not None

    def update(self, fraction: float, val_metric: float) -> bool:
        """Add the point (fraction, val_metric); returns `should_stop`."""
        fraction, val_metric = float(fraction), float(val_metric)
        if self.points and fraction <= self.points[-1][0]:
            raise ConfigError(f"fractions: budget points must increase; got {fraction:g} after "
                              f"{self.points[-1][0]:g}")
        if self.points and not self.should_stop:
            self._step(fraction, val_metric)
        self.points.append((fraction, val_metric))
        return self.should_stop

    def _step(self, fraction: float, val: float) -> None:
        prev_best = min((v for _, v in self.points if not math.isnan(v)), default=math.nan)
        reference = self.points[0][1]
        gain = prev_best - val
        gain_rate = (gain / reference if reference > 0 else 0.0) / (fraction - self.points[-1][0])
        rel_gain = gain / prev_best if prev_best > 0 else 0.0
        # written as "not (good enough)" so that NaN comparisons (all False) count as flat
        flat = not (gain_rate >= self.min_gain_rate or rel_gain >= self.min_rel_improve)
        self.flat_streak = self.flat_streak + 1 if flat else 0
        self.steps.append({"fraction": fraction, "val": val, "gain": gain, "gain_rate": gain_rate,
                           "rel_gain": rel_gain, "flat": flat})
        if self.flat_streak > self.patience:
            self.stopped_at = fraction
            self.stop_reason = (
                f"stopped at fraction {fraction:g}: {self.flat_streak} consecutive flat steps > patience "
                f"{self.patience} (last gain_rate {gain_rate:.4g} < min_gain_rate {self.min_gain_rate:g} "
                f"and rel_gain {rel_gain:.4g} < min_rel_improve {self.min_rel_improve:g})")

    def saved_budget(self, fractions) -> float:
        """Sum of the planned `fractions` that were not run (0.0 if the curve did not stop).

        Each fraction is a separate fine-tuning run whose cost is proportional to the fraction,
        so this is the training saved in units of one full-data fine-tune. Divide by
        sum(fractions) for the share of the curve's planned cost saved.
        """
        if not self.should_stop:
            return 0.0
        return float(sum(f for f in fractions if f > self.stopped_at))
