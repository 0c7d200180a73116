"""The dataset bundle: what `prepare_dataset` returns and every model/stage consumes.

Windows are never materialized. The bundle holds one scaled array of shape (T, N),
one raw target array (T, N) and per-step time features (T, 2); a batch of windows
is gathered in a single indexing op from a tensor of window start indices:

    x[b, t, n, :] = (values[s_b + t, n], tod[s_b + t], dow[s_b + t])      t < T_in
    y[b, h, n]    = target[s_b + T_in + h, n]                              h < T_out

Input channels (C = 3): 0 = scaled value (missing -> 0, i.e. the train mean),
1 = time of day as a fraction of the day in [0, 1), 2 = day of week 0..6 (Monday = 0).
Targets stay in raw units with missing readings as NaN, so metrics never have to
guess whether an inverse-scaled value "is" the null value.

What the metrics need besides the targets: `null_value` (None = only NaN is missing, for cities
whose zeros are real readings; a number = labels within metrics.NULL_EPS of it are missing too)
and `mape_floor` (masked MAPE uses only labels with |y| >= it, in raw units).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np
import torch

from graphtune.config import PrepareConfig
from graphtune.data.cities import DEFAULT_MAPE_FLOOR

SPLITS = ("train", "val", "test")
_PREPARE = PrepareConfig()  # the one place window defaults live (graphtune.config)
IN_CHANNELS = 3  # value, time of day, day of week


@dataclass(frozen=True)
class Scaler:
    """Z-score scaler with one mean/std over all observed training readings (DCRNN convention)."""

    mean: float
    std: float

    @classmethod
    def fit(cls, series: np.ndarray) -> "Scaler":
        """Fit on the observed (non-NaN) entries of `series` only. Streams in chunks: no full-size temporaries."""
        total, total_sq, count = 0.0, 0.0, 0
        for chunk in np.array_split(series, max(1, series.shape[0] // 4096)):
            chunk = chunk[~np.isnan(chunk)].astype(np.float64)
            total += float(chunk.sum())
            total_sq += float(np.square(chunk).sum())
            count += chunk.size
        if count == 0:
            raise ValueError("the training part has no observed values to fit the scaler on")
        mean = total / count
        var = max(total_sq / count - mean * mean, 0.0)
        std = float(np.sqrt(var)) or 1.0  # a constant series scales by 1 rather than dividing by 0
        return cls(mean=float(mean), std=std)

    def transform(self, x):
        return (x - self.mean) / self.std

    def inverse_transform(self, x):
        return x * self.std + self.mean

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std}


@dataclass(eq=False)
class DatasetBundle:
    """Everything a model, a training loop and a stage need about one prepared city."""

    name: str
    values: torch.Tensor  # (T, N) float32, scaled, missing filled with 0.0 (= the train mean)
    target: torch.Tensor  # (T, N) float32, raw units, missing = NaN
    time_features: torch.Tensor  # (T, 2) float32: time of day in [0, 1), day of week 0..6
    adj: np.ndarray  # (N, N) float32 weighted adjacency, row = from, column = to
    sensor_ids: list[str]
    interval_minutes: float
    splits: dict[str, tuple[int, int]]  # split -> [start, stop) range of time steps
    scaler: Scaler
    coords: np.ndarray | None = None  # (N, 2) latitude, longitude in degrees, or None
    t_in: int = _PREPARE.t_in  # history steps per window (defaults: params.yaml prepare:, via config.py)
    t_out: int = _PREPARE.t_out  # steps ahead per window
    stride: int = _PREPARE.stride  # step between consecutive training windows
    units: str = ""
    null_value: float | None = 0.0  # labels equal to it are missing too; None = only NaN is missing
    mape_floor: float = DEFAULT_MAPE_FLOOR  # masked MAPE leaves out labels with |y| below it (raw units)
    meta: dict = field(default_factory=dict)
    # A view made by `restrict`: the only training windows it allows (None = every window of the split),
    # and what it lets a model or statistic see of the training split (None = all of it).
    allowed_train: torch.Tensor | None = None
    data_used: dict | None = None

    # ----------------------------------------------------------------- shape facts
    @property
    def num_nodes(self) -> int:
        return int(self.values.shape[1])

    @property
    def num_steps(self) -> int:
        return int(self.values.shape[0])

    @property
    def in_channels(self) -> int:
        return IN_CHANNELS

    @property
    def t_in_minutes(self) -> float:
        """The history a window spans, in minutes (t_in steps at the sampling interval)."""
        return self.t_in * self.interval_minutes

    @property
    def t_out_minutes(self) -> float:
        """How far ahead a window forecasts, in minutes (t_out steps at the sampling interval)."""
        return self.t_out * self.interval_minutes

    @property
    def steps_per_day(self) -> int:
        """Number of time-of-day slots (288 at 5 minutes); models use it to embed time of day."""
        return max(1, int(round(1440.0 / self.interval_minutes)))

    # ----------------------------------------------------------------- windows
    def window_starts(self, split: str) -> torch.Tensor:
        """Start indices of every window whose inputs and targets lie inside `split`.

        Windows never straddle a split boundary, so no test target is ever seen as a
        training input. Only `train` uses `stride`; evaluation always uses every window.
        """
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; expected one of {', '.join(self.splits)}")
        if split == "train" and self.allowed_train is not None:
            return self.allowed_train
        lo, hi = self.splits[split]
        last = hi - self.t_in - self.t_out  # last valid start (inclusive)
        step = self.stride if split == "train" else 1
        if last < lo:
            return torch.empty(0, dtype=torch.long)
        return torch.arange(lo, last + 1, step, dtype=torch.long)

    def num_windows(self, split: str) -> int:
        return int(self.window_starts(split).numel())

    def batch(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather the windows starting at `starts` (B,) in one indexing op each.

        Returns x (B, T_in, N, 3) float32 and y (B, T_out, N) float32 (raw units, NaN = missing).
        """
        starts = starts.to(torch.long)
        b, n = starts.numel(), self.num_nodes
        steps_in = starts[:, None] + torch.arange(self.t_in)  # (B, T_in)
        steps_out = starts[:, None] + (self.t_in + torch.arange(self.t_out))  # (B, T_out)
        x = torch.empty(b, self.t_in, n, IN_CHANNELS, dtype=torch.float32)
        x[..., 0] = self.values[steps_in]  # (B, T_in, N)
        x[..., 1:] = self.time_features[steps_in][:, :, None, :]  # (B, T_in, 1, 2) broadcast over nodes
        y = self.target[steps_out]  # (B, T_out, N)
        return x, y

    def restrict(self, train_starts: torch.Tensor, *, prompt_steps: int = 0,
                 fallback_scaler: Scaler | None = None) -> "DatasetBundle":
        """The city as one budget point may see it: only `train_starts`' windows of the training split,
        plus the last `prompt_steps` steps of that split (an unlabelled prompt window), nothing else of it.

        Every training reading outside those steps is hidden: NaN in `target` and 0 in `values`, so
        whatever is derived from the view (the scaler, refitted on the visible readings; node prompts;
        the historical average) depends on the visible data alone. Validation and test steps are kept:
        they are what the point is selected and evaluated on. With no visible reading at all (a zero-shot
        point without a prompt window) the scaler is `fallback_scaler`, i.e. the source model's.
        `window_starts("train")` of the view returns `train_starts`. The view records what it exposes in
        `data_used`: windows, steps, days and observed readings.
        """
        lo, hi = self.splits["train"]
        starts = torch.as_tensor(train_starts, dtype=torch.long).sort().values
        visible = self.visible_train_steps(starts, prompt_steps)
        target = self.target.clone()  # (T, N) raw; hidden training steps become NaN
        target[lo:hi][~visible] = float("nan")
        train_part = target[lo:hi]
        readings = int((~torch.isnan(train_part)).sum())
        if readings:
            scaler = Scaler.fit(train_part.numpy())
        elif fallback_scaler is not None:
            scaler = fallback_scaler
        else:
            raise ValueError(f"{self.name}: the view shows no training reading; pass fallback_scaler")
        values = torch.nan_to_num(scaler.transform(target), nan=0.0).to(torch.float32)  # missing -> the mean
        used = self.data_used_by(starts, prompt_steps) | {"scaler": "visible readings" if readings else "source"}
        return replace(self, values=values, target=target, scaler=scaler, allowed_train=starts, data_used=used)

    def visible_train_steps(self, train_starts: torch.Tensor, prompt_steps: int = 0) -> torch.Tensor:
        """(T_train,) bool: the training steps covered by the windows `train_starts` or the prompt window."""
        lo, hi = self.splits["train"]
        starts = torch.as_tensor(train_starts, dtype=torch.long)
        span = self.t_in + self.t_out
        if starts.numel() and (int(starts.min()) < lo or int(starts.max()) + span > hi):
            raise ValueError(f"train_starts must be windows inside the training split [{lo}, {hi})")
        if prompt_steps < 0:
            raise ValueError(f"prompt_steps must be >= 0, got {prompt_steps}")
        # Steps covered by a window: +1 at each start, -1 one window later; a positive running sum is covered.
        edges = torch.zeros(hi - lo + 1, dtype=torch.long)
        edges.index_add_(0, starts - lo, torch.ones_like(starts))
        edges.index_add_(0, starts - lo + span, -torch.ones_like(starts))
        visible = edges.cumsum(0)[:-1] > 0
        if prompt_steps:
            visible[max(0, hi - lo - prompt_steps):] = True
        return visible

    def data_used_by(self, train_starts: torch.Tensor, prompt_steps: int = 0) -> dict:
        """What training on `train_starts` (plus a prompt window) reads of this city: windows, steps, days
        and observed readings (sensor x step values that are not missing)."""
        lo, hi = self.splits["train"]
        visible = self.visible_train_steps(train_starts, prompt_steps)
        steps = int(visible.sum())
        readings = int((~torch.isnan(self.target[lo:hi][visible])).sum())
        return {"windows": int(torch.as_tensor(train_starts).numel()), "steps": steps,
                "days": steps * self.interval_minutes / 1440.0, "readings": readings,
                "prompt_steps": min(prompt_steps, hi - lo)}

    def loader(
        self,
        split: str,
        batch_size: int = 64,
        shuffle: bool = False,
        seed: int = 0,
        starts: torch.Tensor | None = None,
    ) -> "WindowLoader":
        """Iterate over (x, y) batches of `split` (or of an explicit subset of window `starts`)."""
        if starts is None:
            starts = self.window_starts(split)
        return WindowLoader(self, starts, batch_size, shuffle, seed)

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.num_windows(s)}" for s in self.splits)
        return (
            f"DatasetBundle({self.name!r}, T={self.num_steps}, N={self.num_nodes}, "
            f"interval={self.interval_minutes:g} min, T_in={self.t_in}, T_out={self.t_out}, windows: {counts})"
        )


class WindowLoader:
    """A re-iterable loader of window batches; each epoch reshuffles with its own seeded generator."""

    def __init__(self, bundle: DatasetBundle, starts: torch.Tensor, batch_size: int, shuffle: bool, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.bundle = bundle
        self.starts = starts.to(torch.long)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def num_samples(self) -> int:
        return int(self.starts.numel())

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.starts
        if self.shuffle:
            order = order[torch.randperm(order.numel(), generator=self._generator)]
        for i in range(0, order.numel(), self.batch_size):
            yield self.bundle.batch(order[i : i + self.batch_size])
