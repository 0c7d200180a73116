"""CSV channels -> one stacked array, windows as index arithmetic over it, label rules and splits.

Files
-----
Each CSV is one channel: rows are series (sensors), columns are time steps, values are numbers. Several CSVs,
in the order given, stack into channels of one float32 array `values` (N series, C channels, T steps); they must
all have the same rows and columns (and, where they have them, the same series ids and timestamps).

A file may start with a header row of timestamps and each row with a series id. `read_channels` detects both
unless told (`header=True/False`, `index_col=True/False`; None = detect), file by file:

* a cell is *text* when it is not empty and Python's float() cannot read it ("2012-03-01 00:00", "S7", "id");
  an *id word* is a cell such as id, ids, index, key, name, node, series, sensor, sensors, station or any word
  ending in `_id`, ` id` or `-id` (case and surrounding blanks ignored), e.g. sensor_id, series_id;
* header row: the first row is a header when one of its cells is text, not counting its first cell when the
  file may have an id column (index_col not False), or when its first cell is an id word. A header of numbers
  only (0, 1, 2, ...) cannot be told from data: pass header=True;
* id column: the first column holds ids when one of its cells below the header is text, or when the file has a
  header whose first cell is empty or an id word. Ids that are numbers (METR-LA's 773869) with no header, or
  under a header whose first cell is a timestamp, cannot be told from data: pass index_col=True.

Series ids come from the id column (else "0".."N-1"), timestamps from the header (else None); both are kept as
the text of the cells. Ids must be unique within a file. Ids (timestamps) come from the first file that has
them, and every other file that has them must have the same ones.

Missing values: an empty cell (or "nan", any case) is a missing value and becomes NaN. Every other cell must be
a finite number; anything else is a one-line DataError naming the file, the row and the column as a spreadsheet
shows them (1-based, with the column letter) and the series id / timestamp of the cell where the file has them.
Cells are comma-separated (Python's csv dialect, so quoted cells are fine); a byte-order mark is ignored.

Windows
-------
A window of context `L` (WindowSpec.context_len) starting at step `s` reads the input steps s .. s+L-1 of every
input channel (all channels, or all but the label channel with drop_label_from_x), and its label is the value of
channel `label_src_ch` at the label step s + L - 1 + label_offset, i.e. label_offset steps after its last input
step (label_offset >= 1, so no input step ever reaches the label step). A window thus spans
`span = L + label_offset` steps (L + 1 by default) and the valid starts are 0 .. T - span. A window whose label
is missing (NaN) is dropped from every split (its inputs may still hold NaN: WindowData passes them on, or fills
them with `nan_fill`). Windows are never copied: a split is a `WindowIndex` of (series, start) int64 pairs, and
`WindowData` gathers a batch from an unfolded view of the array on demand.

Splits (`make_splits`)
----------------------
Gap: consecutive window starts s, s+1, ... of one series touch overlapping steps, so two time-split windows share
no step (input or label) only when their starts differ by at least `span`. Between the last window start of one
split and the first of the next, `gap = span - 1 = context_len + label_offset - 1` starts are therefore skipped
(context_len = T - 1 steps with the default label_offset 1, T = context_len + 1 the window length): the next
split's first input step comes right after the previous split's last label step. That is the least gap with
which no step is shared, and the one used.

* holdout: chronological over the window starts: of the T - span + 1 starts per series, the 2 gaps are taken
  out and the rest shared train / val / test by `shares` (0.7, 0.1, 0.2), in that order in time, for every
  series alike. One fold, "holdout".
* group: whole series per split (like scikit-learn's GroupKFold with the series as groups): the series are
  shuffled with numpy's default_rng(seed) and cut into contiguous train / val / test parts by `shares`; every
  split gets at least one series. All windows of a series lie in its split, so no series is in two splits.
  One fold, "group".
* rolling: rolling-origin folds "fold1" .. "fold<k>", exactly scikit-learn's TimeSeriesSplit(n_splits=k,
  gap=gap) over the window starts: with S starts per series, test_size = S // (k + 1), fold i (1..k) tests the
  starts S - (k - i + 1) * test_size onwards (test_size of them), and its training range is every start before
  that but the last `gap`. Each fold's validation is the last part of that
  training range, shares[1] / (shares[0] + shares[1]) of it, with another gap before it, so the windows used for
  fitting and model selection never touch the test windows, nor each other.

Shares, gaps and blocks are fixed on the starts before windows with a missing label are dropped; `Fold.bounds`
records them (start and step ranges, timestamps where known, or the series of each split) for a run's params.

Labels (`LabelRule`)
--------------------
None: regression on the raw label value. "nonzero": 1 when value != 0. "gt THR" / "lt THR": 1 when value > THR /
value < THR. "quantile Q" (0 < Q < 1): 1 when value > the Q-quantile of the label values of the TRAINING windows
(`fit_rule`; validation and test never move it). A training split whose windows are all of one class is a
one-line DataError naming the rule and the split.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from graphtune.errors import ConfigError, DataError

__all__ = [
    "SeriesArray", "read_channels", "WindowSpec", "LabelRule", "WindowIndex", "Fold", "make_splits",
    "WindowData", "fit_rule", "export_city", "SPLIT_MODES", "RULE_KINDS", "CHANNEL_FILES",
]

SPLIT_MODES = ("holdout", "group", "rolling")
RULE_KINDS = ("nonzero", "gt", "lt", "quantile")
DEFAULT_SHARES = (0.7, 0.1, 0.2)
CHANNEL_FILES = ("speed.csv", "neighbour_mean.csv", "time_of_day.csv")  # export_city's channels, in order
SPLITS = ("train", "val", "test")

_ID_WORDS = frozenset({"id", "ids", "index", "key", "name", "node", "series", "sensor", "sensors", "station"})
_MISSING = frozenset({"", "nan"})


# ============================================================================ reading
@dataclass
class SeriesArray:
    """Stacked channels: `values` (N series, C channels, T steps) float32, C-contiguous, NaN = missing."""

    values: np.ndarray
    files: list[str]
    series_ids: list[str]
    timestamps: list[str] | None = None

    def __post_init__(self):
        self.values = np.ascontiguousarray(self.values, dtype=np.float32)  # no copy when it already is
        if self.values.ndim != 3:
            raise ValueError(f"SeriesArray.values must be (series, channels, steps), got shape {self.values.shape}")
        n, c, t = self.values.shape
        if len(self.series_ids) != n:
            raise ValueError(f"SeriesArray: {len(self.series_ids)} series ids for {n} series")
        if len(self.files) != c:
            raise ValueError(f"SeriesArray: {len(self.files)} file names for {c} channels")
        if self.timestamps is not None and len(self.timestamps) != t:
            raise ValueError(f"SeriesArray: {len(self.timestamps)} timestamps for {t} steps")

    @property
    def n_series(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_channels(self) -> int:
        return int(self.values.shape[1])

    @property
    def n_steps(self) -> int:
        return int(self.values.shape[2])

    def step_name(self, step: int) -> str:
        """The timestamp of `step` where the files have them, else "step <step>"."""
        return self.timestamps[step] if self.timestamps is not None else f"step {step}"


@dataclass
class _Csv:
    """One file as read: the numbers, and the ids / timestamps it has (None where it has none)."""

    values: np.ndarray  # (N, T) float32
    ids: list[str] | None
    timestamps: list[str] | None
    header: bool  # whether it has a header row (data rows start at file row 2)


def read_channels(paths: Sequence[str | Path], *, header: bool | None = None,
                  index_col: bool | None = None) -> SeriesArray:
    """Read one CSV per channel and stack them, in order, into a SeriesArray (module docstring: layout,
    header / id detection, missing cells). `header` / `index_col`: True or False for every file, None = detect
    per file. Files that differ in rows, steps, ids or timestamps: a one-line DataError naming the first file
    that differs from the first file and how."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if not paths:
        raise ConfigError("series files: expected at least one CSV file (one per channel), got none")
    for name, value in (("header", header), ("index_col", index_col)):
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true, false or none (detect), got {value!r}")
    first = _read_csv(paths[0], header, index_col)
    n, t = first.values.shape
    values = np.empty((n, len(paths), t), dtype=np.float32)
    values[:, 0, :] = first.values
    ids, ids_from = first.ids, paths[0]
    stamps, stamps_from = first.timestamps, paths[0]
    for c, path in enumerate(paths[1:], start=1):
        part = _read_csv(path, header, index_col)
        if part.values.shape != (n, t):
            raise DataError(f"{path}: {_shape_text(part.values.shape)}, but {paths[0]} has {_shape_text((n, t))}")
        if part.ids is not None:
            if ids is None:
                ids, ids_from = part.ids, path
            elif part.ids != ids:
                i = next(k for k, (a, b) in enumerate(zip(part.ids, ids)) if a != b)
                row = i + 1 + part.header
                raise DataError(f"{path}: series ids differ from {ids_from}'s: row {row} has id {part.ids[i]!r} "
                                f"where {ids_from} has {ids[i]!r}")
        if part.timestamps is not None:
            if stamps is None:
                stamps, stamps_from = part.timestamps, path
            elif part.timestamps != stamps:
                j = next(k for k, (a, b) in enumerate(zip(part.timestamps, stamps)) if a != b)
                col = j + 1 + (part.ids is not None)
                raise DataError(f"{path}: timestamps differ from {stamps_from}'s: column {col} "
                                f"({_column_letter(col)}) has {part.timestamps[j]!r} where {stamps_from} has "
                                f"{stamps[j]!r}")
        values[:, c, :] = part.values
        del part
    return SeriesArray(values=values, files=[str(p) for p in paths],
                       series_ids=ids if ids is not None else [str(i) for i in range(n)], timestamps=stamps)


def _shape_text(shape) -> str:
    n, t = shape
    return f"{n} row{'s' if n != 1 else ''} x {t} step{'s' if t != 1 else ''}"


def _column_letter(col: int) -> str:
    """Spreadsheet letters of 1-based column `col`: 1 -> A, 27 -> AA."""
    letters = ""
    while col > 0:
        col, rest = divmod(col - 1, 26)
        letters = chr(ord("A") + rest) + letters
    return letters


def _is_text(cell: str) -> bool:
    """Not empty and not a number float() reads."""
    cell = cell.strip()
    if not cell:
        return False
    try:
        float(cell)
    except ValueError:
        return True
    return False


def _is_id_word(cell: str) -> bool:
    word = cell.strip().lower()
    return word in _ID_WORDS or word.endswith(("_id", " id", "-id"))


def _read_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(file row number, cells) of every non-blank row."""
    if not path.is_file():
        raise DataError(f"{path}: {'is not a file' if path.exists() else 'file not found'}; expected a CSV file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows = []
            for cells in reader:
                if cells:  # csv gives [] for a blank line
                    rows.append((reader.line_num, cells))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file; expected a CSV file") from None
    except csv.Error as err:
        raise DataError(f"{path}: not a readable CSV file ({err})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from None
    if not rows:
        raise DataError(f"{path}: is empty; expected rows of series with one column per time step")
    return rows


def _read_csv(path: Path, header: bool | None, index_col: bool | None) -> _Csv:
    rows = _read_rows(path)
    top = rows[0][1]
    if header is None:
        cells = top[1:] if index_col is not False else top
        header = any(_is_text(c) for c in cells) or (index_col is not False and _is_id_word(top[0]))
    data = rows[1:] if header else rows
    if not data:
        raise DataError(f"{path}: has a header row but no data rows; expected one row per series")
    if index_col is None:
        index_col = ((header and (not top[0].strip() or _is_id_word(top[0])))
                     or any(_is_text(cells[0]) for _, cells in data))
    width = len(top)
    for line, cells in data:
        if len(cells) != width:
            what = "the header row" if header else f"row {rows[0][0]}"
            raise DataError(f"{path}: row {line} has {len(cells)} cells, but {what} has {width}; "
                            f"expected the same number of columns in every row")
    skip = 1 if index_col else 0
    if width - skip < 1:
        raise DataError(f"{path}: has no time-step columns{' besides the id column' if skip else ''}")
    timestamps = [c.strip() for c in top[skip:]] if header else None
    ids = [cells[0].strip() for _, cells in data] if index_col else None
    if ids is not None and len(set(ids)) != len(ids):
        seen: dict[str, int] = {}
        for (line, _), sid in zip(data, ids):
            if sid in seen:
                raise DataError(f"{path}: series id {sid!r} appears in rows {seen[sid]} and {line}; "
                                f"expected one row per series")
            seen[sid] = line
    values = np.empty((len(data), width - skip), dtype=np.float32)
    for i, (line, cells) in enumerate(data):
        body = cells[skip:]
        try:
            row = np.array(body, dtype=np.float64)  # fast path: every cell a number
        except ValueError:
            try:  # empty cells are missing values
                row = np.array([c if c.strip() else "nan" for c in body], dtype=np.float64)
            except ValueError:  # a cell that is not a number: find it, name it
                row = _row_slowly(path, line, body, skip, ids[i] if ids else None, timestamps)
        if not np.isfinite(row).all() and np.isinf(row).any():
            j = int(np.flatnonzero(np.isinf(row))[0])
            raise DataError(_cell_problem(path, line, j, skip, ids[i] if ids else None, timestamps,
                                          f"{body[j].strip()!r} is infinite; expected a finite number"))
        values[i] = row
    return _Csv(values=values, ids=ids, timestamps=timestamps, header=bool(header))


def _row_slowly(path: Path, line: int, body: list[str], skip: int, sid: str | None,
                timestamps: list[str] | None) -> np.ndarray:
    """A row with missing (empty) cells, or with a cell that is not a number (a one-line DataError)."""
    row = np.empty(len(body), dtype=np.float64)
    for j, cell in enumerate(body):
        cell = cell.strip()
        if cell.lower() in _MISSING:
            row[j] = np.nan
            continue
        try:
            row[j] = float(cell)
        except ValueError:
            raise DataError(_cell_problem(path, line, j, skip, sid, timestamps,
                                          f"{cell!r} is not a number; expected a number, or an empty cell "
                                          f"for a missing value")) from None
    return row


def _cell_problem(path: Path, line: int, j: int, skip: int, sid: str | None, timestamps: list[str] | None,
                  problem: str) -> str:
    col = j + 1 + skip
    where = [f"series {sid!r}"] if sid is not None else []
    if timestamps is not None:
        where.append(f"timestamp {timestamps[j]!r}")
    extra = f" ({', '.join(where)})" if where else ""
    return f"{path}: row {line}, column {col} ({_column_letter(col)}){extra}: {problem}"


# ============================================================================ windows and labels
def _int_option(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class WindowSpec:
    """What a window reads: `context_len` input steps of the input channels, and the label of channel
    `label_src_ch` at `label_offset` steps after the last input step (module docstring, "Windows")."""

    context_len: int
    label_src_ch: int = 0
    label_offset: int = 1
    drop_label_from_x: bool = False

    def __post_init__(self):
        _int_option(self.context_len, "context_len", 1)
        _int_option(self.label_src_ch, "label_src_ch", 0)
        _int_option(self.label_offset, "label_offset", 1)
        if not isinstance(self.drop_label_from_x, (bool, np.bool_)):
            raise ConfigError(f"drop_label_from_x: expected true or false, got {self.drop_label_from_x!r}")

    @property
    def span(self) -> int:
        """Steps from a window's first input step to its label step, both included: context_len + label_offset."""
        return self.context_len - 1 + self.label_offset + 1

    @property
    def gap(self) -> int:
        """Window starts skipped between two time splits so that no step is shared: span - 1."""
        return self.span - 1

    @property
    def label_lag(self) -> int:
        """The label step minus the window's start: context_len - 1 + label_offset."""
        return self.context_len - 1 + self.label_offset

    def input_channels(self, n_channels: int) -> list[int]:
        """The channels a window's input holds, in order: all, or all but the label channel."""
        return [c for c in range(n_channels) if not (self.drop_label_from_x and c == self.label_src_ch)]

    def n_starts(self, n_steps: int) -> int:
        """How many windows fit in `n_steps` steps of one series (0 when none)."""
        return max(0, n_steps - self.span + 1)

    def check(self, array: SeriesArray) -> None:
        """ConfigError for a label channel out of range or no input channel left; DataError when no window fits."""
        c = array.n_channels
        if self.label_src_ch >= c:
            names = ", ".join(f"{i} = {Path(f).name}" for i, f in enumerate(array.files))
            raise ConfigError(f"label_src_ch: {self.label_src_ch} is out of range; the data has {c} "
                              f"channel{'s' if c != 1 else ''} ({names})")
        if not self.input_channels(c):
            raise ConfigError(f"drop_label_from_x: would leave no input channel (the data has only the label "
                              f"channel {array.files[self.label_src_ch]}); give more channels or set it false")
        if self.span > array.n_steps:
            raise DataError(f"{array.files[0]}: has {array.n_steps} steps, fewer than one window of context_len "
                            f"{self.context_len} + label_offset {self.label_offset} = {self.span} steps; "
                            f"use a shorter context_len")


@dataclass(frozen=True)
class LabelRule:
    """How a raw label value becomes the target (module docstring, "Labels"). `fitted`: the quantile's
    threshold once `fit` has seen the training labels (None before, and for the other kinds)."""

    kind: str | None
    value: float | None = None
    fitted: float | None = field(default=None, repr=False)

    def __post_init__(self):
        problem = _rule_problem(self.kind, self.value)
        if problem is not None:
            raise ConfigError(f"label rule: {problem}")

    @classmethod
    def parse(cls, text: str | None, *, option: str = "label rule") -> "LabelRule":
        """"nonzero", "gt THR", "lt THR", "quantile Q"; None, "" or "none" = regression. ConfigError (one line,
        naming `option`) for anything else, a rule without its number included."""
        if text is None:
            return cls(None)
        if not isinstance(text, str):
            raise ConfigError(f"{option}: expected text such as 'gt 40', 'quantile 0.9' or 'nonzero', got {text!r}")
        parts = text.replace("=", " ").replace(":", " ").split()
        if not parts or (len(parts) == 1 and parts[0].lower() in ("none", "null", "regress", "regression")):
            return cls(None)
        kind = parts[0].lower()
        if kind not in RULE_KINDS:
            raise ConfigError(f"{option}: {text!r} is not a rule; expected nonzero, gt THR, lt THR, quantile Q, "
                              f"or none (regression)")
        if kind == "nonzero":
            if len(parts) != 1:
                raise ConfigError(f"{option}: {text!r}: nonzero takes no number")
            return cls("nonzero")
        example = "quantile 0.9" if kind == "quantile" else f"{kind} 40"
        if len(parts) != 2:
            raise ConfigError(f"{option}: {text!r} needs exactly one number after {kind!r} (e.g. {example!r})")
        try:
            number = float(parts[1])
        except ValueError:
            raise ConfigError(f"{option}: {text!r}: {parts[1]!r} is not a number (e.g. {example!r})") from None
        problem = _rule_problem(kind, number)
        if problem is not None:
            raise ConfigError(f"{option}: {problem}")
        return cls(kind, number)

    @property
    def task(self) -> str:
        return "regress" if self.kind is None else "classify"

    @property
    def threshold(self) -> float | None:
        """The threshold a value is compared with: THR for gt / lt, the fitted quantile, else None."""
        if self.kind in ("gt", "lt"):
            return float(self.value)
        if self.kind == "quantile":
            return self.fitted
        return None

    @property
    def text(self) -> str:
        """The rule as `parse` reads it: "gt 40", "quantile 0.9", "nonzero", "none"."""
        if self.kind is None:
            return "none"
        return self.kind if self.value is None else f"{self.kind} {float(self.value):g}"

    def fit(self, labels_train: np.ndarray) -> "LabelRule":
        """A quantile rule with its threshold fitted on `labels_train` (NaN ignored); other rules unchanged."""
        if self.kind != "quantile":
            return self
        labels = np.asarray(labels_train, dtype=np.float64).ravel()
        labels = labels[~np.isnan(labels)]
        if labels.size == 0:
            raise DataError(f"label rule {self.text!r}: no training label to fit the quantile on")
        return replace(self, fitted=float(np.quantile(labels, float(self.value))))

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """float32 0/1 per value (classify; NaN stays NaN) or the raw values as float32 (regress)."""
        raw = np.asarray(raw, dtype=np.float32)
        if self.kind is None:
            return raw
        if self.kind == "nonzero":
            out = raw != 0
        else:
            thr = self.threshold
            if thr is None:
                raise ValueError(f"label rule {self.text!r} is not fitted: fit it on the training split first "
                                 f"(fit_rule)")
            out = raw < np.float32(thr) if self.kind == "lt" else raw > np.float32(thr)
        labels = out.astype(np.float32)
        labels[np.isnan(raw)] = np.nan
        return labels

    def describe(self) -> str:
        if self.kind is None:
            return "regression: label = the raw value"
        if self.kind == "nonzero":
            return "nonzero: label 1 when the value is not 0"
        if self.kind == "gt":
            return f"gt {self.value:g}: label 1 when the value is above {self.value:g}"
        if self.kind == "lt":
            return f"lt {self.value:g}: label 1 when the value is below {self.value:g}"
        fitted = (f"{self.fitted:.6g}, fitted on the training windows" if self.fitted is not None
                  else "not fitted yet")
        return f"quantile {self.value:g}: label 1 when the value is above the training quantile ({fitted})"


def _rule_problem(kind, value) -> str | None:
    """What is wrong with rule `kind` `value` (one line), or None."""
    if kind is not None and kind not in RULE_KINDS:
        return f"{kind!r} is not a rule; expected nonzero, gt THR, lt THR, quantile Q, or none (regression)"
    needs = kind in ("gt", "lt", "quantile")
    example = "quantile 0.9" if kind == "quantile" else f"{kind} 40"
    if needs and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                  or not math.isfinite(float(value))):
        return f"{kind!r} needs a finite number after it (e.g. {example!r}), got {value!r}"
    if not needs and value is not None:
        return f"{kind or 'none'!r} takes no number, got {value!r}"
    if kind == "quantile" and not 0.0 < float(value) < 1.0:
        return f"'quantile {float(value):g}': Q must lie strictly between 0 and 1 (e.g. {example!r})"
    return None


# ============================================================================ splits
@dataclass
class WindowIndex:
    """Windows as (series, first input step) pairs; nothing else is stored."""

    series: np.ndarray
    start: np.ndarray

    def __post_init__(self):
        self.series = np.ascontiguousarray(self.series, dtype=np.int64)
        self.start = np.ascontiguousarray(self.start, dtype=np.int64)
        if self.series.shape != self.start.shape or self.series.ndim != 1:
            raise ValueError(f"WindowIndex: series {self.series.shape} and start {self.start.shape} must be "
                             f"equal-length 1-d arrays")

    def __len__(self) -> int:
        return int(self.series.shape[0])

    def take(self, rows) -> "WindowIndex":
        return WindowIndex(self.series[rows], self.start[rows])


@dataclass
class Fold:
    """One train / val / test split of the windows, and what defines it (`bounds`, JSON-ready)."""

    name: str
    train: WindowIndex
    val: WindowIndex
    test: WindowIndex
    bounds: dict

    def splits(self) -> dict[str, WindowIndex]:
        return {"train": self.train, "val": self.val, "test": self.test}


def _check_shares(shares) -> tuple[float, float, float]:
    try:
        values = tuple(float(s) for s in shares)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values) or abs(sum(values) - 1) > 1e-6:
        raise ConfigError(f"shares: expected three positive fractions (train, val, test) summing to 1, "
                          f"got {shares!r}")
    return values


def _share_counts(total: int, shares: Sequence[float]) -> list[int]:
    """`total` items cut by `shares` (rounded), each part >= 1 (taken from the largest); total >= len(shares)."""
    counts = [int(round(total * s)) for s in shares[:-1]]
    counts.append(total - sum(counts))
    while min(counts) < 1:
        lo, hi = counts.index(min(counts)), counts.index(max(counts))
        counts[lo] += 1
        counts[hi] -= 1
    return counts


def make_splits(array: SeriesArray, spec: WindowSpec, mode: str = "holdout", *,
                shares=DEFAULT_SHARES, folds: int = 3, seed: int = 0) -> list[Fold]:
    """The folds of `mode` (module docstring, "Splits"): holdout and group give one, rolling gives `folds`.
    Windows whose label is NaN are left out of every split."""
    if mode not in SPLIT_MODES:
        raise ConfigError(f"split mode {mode!r}: expected one of {', '.join(SPLIT_MODES)}")
    shares = _check_shares(shares)
    spec.check(array)
    if mode == "holdout":
        return [_holdout(array, spec, shares)]
    if mode == "group":
        return [_group(array, spec, shares, _int_option(seed, "seed", 0))]
    return _rolling(array, spec, shares, _int_option(folds, "folds", 2))


def _labels_present(array: SeriesArray, spec: WindowSpec, series: np.ndarray, start: np.ndarray) -> np.ndarray:
    raw = array.values[series, spec.label_src_ch, start + spec.label_lag]
    return ~np.isnan(raw)


def _time_index(array: SeriesArray, spec: WindowSpec, lo: int, hi: int) -> WindowIndex:
    """Every series' windows with starts lo .. hi-1 whose label is present (series-major)."""
    n = array.n_series
    starts = np.arange(lo, hi, dtype=np.int64)
    series = np.repeat(np.arange(n, dtype=np.int64), starts.size)
    start = np.tile(starts, n)
    keep = _labels_present(array, spec, series, start)
    if keep.all():
        return WindowIndex(series, start)
    return WindowIndex(series[keep], start[keep])


def _time_bounds(array: SeriesArray, spec: WindowSpec, lo: int, hi: int, windows: int) -> dict:
    """A time split's record: window starts [lo, hi), the steps its windows touch [lo, hi - 1 + span)."""
    last = hi - 1 + spec.label_lag
    out = {"starts": [lo, hi], "steps": [lo, last + 1], "windows": windows}
    if array.timestamps is not None:
        out["first_step"] = array.timestamps[lo]
        out["last_step"] = array.timestamps[last]
    return out


def _empty_split(array: SeriesArray, spec: WindowSpec, fold: str, split: str) -> DataError:
    return DataError(f"{array.files[0]}: the {split} split of {fold} has no window with a label (every label "
                     f"of channel {spec.label_src_ch} there is missing); use other shares or fill the gaps")


def _too_short(array: SeriesArray, spec: WindowSpec, what: str, need: int) -> DataError:
    return DataError(f"{array.files[0]}: {array.n_steps} steps leave too few windows for {what} (windows of "
                     f"{spec.span} steps, {spec.gap} starts skipped between splits); need at least {need} "
                     f"steps, or use a shorter context_len")


def _time_fold(array: SeriesArray, spec: WindowSpec, name: str, ranges: dict, extra: dict) -> Fold:
    parts = {}
    bounds = {"mode": extra.pop("mode"), "gap": spec.gap, "window_steps": spec.span, **extra}
    for split in SPLITS:
        lo, hi = ranges[split]
        parts[split] = _time_index(array, spec, lo, hi)
        if len(parts[split]) == 0:
            raise _empty_split(array, spec, name, split)
        bounds[split] = _time_bounds(array, spec, lo, hi, len(parts[split]))
    return Fold(name=name, bounds=bounds, **parts)


def _holdout(array: SeriesArray, spec: WindowSpec, shares) -> Fold:
    n_starts, gap = spec.n_starts(array.n_steps), spec.gap
    usable = n_starts - 2 * gap
    if usable < 3:
        raise _too_short(array, spec, "a holdout train / val / test split", spec.span + 2 * gap + 2)
    n_train, n_val, _ = _share_counts(usable, shares)
    val_lo = n_train + gap
    test_lo = val_lo + n_val + gap
    ranges = {"train": (0, n_train), "val": (val_lo, val_lo + n_val), "test": (test_lo, n_starts)}
    return _time_fold(array, spec, "holdout", ranges, {"mode": "holdout", "shares": list(shares)})


def _group(array: SeriesArray, spec: WindowSpec, shares, seed: int) -> Fold:
    n = array.n_series
    if n < 3:
        raise DataError(f"{array.files[0]}: has {n} series; the group split needs at least 3 (one per split "
                        f"for train, val and test)")
    order = np.random.default_rng(seed).permutation(n)
    counts = _share_counts(n, shares)
    edges = np.cumsum([0, *counts])
    n_starts = spec.n_starts(array.n_steps)
    bounds: dict = {"mode": "group", "seed": seed, "shares": list(shares), "window_steps": spec.span}
    parts = {}
    for k, split in enumerate(SPLITS):
        members = np.sort(order[edges[k]:edges[k + 1]]).astype(np.int64)
        series = np.repeat(members, n_starts)
        start = np.tile(np.arange(n_starts, dtype=np.int64), members.size)
        keep = _labels_present(array, spec, series, start)
        parts[split] = WindowIndex(series[keep], start[keep])
        if len(parts[split]) == 0:
            raise _empty_split(array, spec, "group", split)
        bounds[split] = {"series": [array.series_ids[i] for i in members], "windows": len(parts[split])}
    return Fold(name="group", bounds=bounds, **parts)


def _rolling(array: SeriesArray, spec: WindowSpec, shares, folds: int) -> list[Fold]:
    """scikit-learn TimeSeriesSplit(n_splits=folds, gap=gap) over the starts, with validation carved from the
    end of each training range (another gap before it)."""
    n_starts, gap = spec.n_starts(array.n_steps), spec.gap
    test_size = n_starts // (folds + 1)
    val_share = shares[1] / (shares[0] + shares[1])
    # fold 1 is the tightest: its training range (train + gap + val) must hold at least 2 + gap starts
    if test_size < 1 or n_starts - folds * test_size - gap < 2 + gap:
        need = folds + 1  # the fewest starts that work, for the message
        while need // (folds + 1) < 1 or need - folds * (need // (folds + 1)) - gap < 2 + gap:
            need += 1
        raise _too_short(array, spec, f"{folds} rolling folds", need + spec.span - 1)
    out = []
    for i in range(folds):
        test_lo = n_starts - (folds - i) * test_size
        pre = test_lo - gap  # TimeSeriesSplit's training range: starts [0, pre)
        n_val = max(1, int(round((pre - gap) * val_share)))
        n_train = pre - gap - n_val
        if n_train < 1:
            n_val, n_train = pre - gap - 1, 1
        ranges = {"train": (0, n_train), "val": (n_train + gap, pre), "test": (test_lo, test_lo + test_size)}
        extra = {"mode": "rolling", "fold": i + 1, "folds": folds, "shares": list(shares),
                 "timeseriessplit_train": [0, pre]}
        out.append(_time_fold(array, spec, f"fold{i + 1}", ranges, extra))
    return out


# ============================================================================ gathering
def fit_rule(rule: LabelRule, array: SeriesArray, spec: WindowSpec, train: WindowIndex, *,
             where: str = "training split") -> LabelRule:
    """`rule` fitted on the training windows' labels only (the quantile; others as they are). For a classify
    rule, a training split with a single class is a one-line DataError naming the rule and `where`."""
    spec.check(array)
    raw = array.values[train.series, spec.label_src_ch, train.start + spec.label_lag]
    raw = raw[~np.isnan(raw)]
    if raw.size == 0:
        raise DataError(f"{array.files[spec.label_src_ch]}: the {where} has no window with a label")
    fitted = rule.fit(raw)
    if fitted.task == "classify":
        positive = int(np.count_nonzero(fitted.apply(raw)))
        if positive in (0, raw.size):
            which = "negative" if positive == 0 else "positive"
            thr = f", threshold {fitted.threshold:.6g}" if fitted.threshold is not None else ""
            raise DataError(f"label rule {rule.text!r}{thr}: every window of the {where} is {which} "
                            f"({positive} of {raw.size} positive, channel {spec.label_src_ch} = "
                            f"{array.files[spec.label_src_ch]}); choose another rule or threshold, or another split")
    return fitted


class WindowData:
    """The windows of one split, gathered on demand: x (B, C', L) float32, y (B,) float32.

    Nothing per window is stored: `array.values` is viewed as its sliding windows (numpy's sliding_window_view,
    (N, C, T - L + 1, L), no copy), from which a batch is one advanced-indexing gather into a new (B, C', L)
    array handed to torch without a copy (numpy's gather measured 3-4x faster than torch's on the strided view);
    the index arrays are the split's own (int64), the labels one float32 per window (raw and after the rule).
    `nan_fill`: None passes missing inputs on as NaN, a number replaces them in every x gathered.
    Rows (`batch`) are positions 0 .. len - 1 in this split, in the order of `index`.
    """

    def __init__(self, array: SeriesArray, spec: WindowSpec, index: WindowIndex, rule: LabelRule, *,
                 nan_fill: float | None = None):
        spec.check(array)
        if rule.kind == "quantile" and rule.fitted is None:
            raise ValueError(f"label rule {rule.text!r} is not fitted: fit it with fit_rule on the training split")
        if len(index) and (index.start.min() < 0 or index.start.max() > array.n_steps - spec.span
                           or index.series.min() < 0 or index.series.max() >= array.n_series):
            raise ValueError("WindowData: the index holds windows outside the array")
        self.array, self.spec, self.index, self.rule = array, spec, index, rule
        self.nan_fill = nan_fill
        self.channels = spec.input_channels(array.n_channels)
        # (N, C, T - L + 1, L) read-only view of array.values: window (n, s) is _windows[n, :, s]
        self._windows = np.lib.stride_tricks.sliding_window_view(array.values, spec.context_len, axis=2)
        self._channels = None if len(self.channels) == array.n_channels else np.asarray(self.channels)[None, :]
        self._raw = array.values[index.series, spec.label_src_ch, index.start + spec.label_lag]  # (M,) float32
        self._labels = rule.apply(self._raw)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def n_inputs(self) -> int:
        """C': the number of input channels."""
        return len(self.channels)

    def batch(self, rows: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C', L) float32 and y (B,) float32 of the windows at positions `rows` of this split."""
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().cpu().numpy()
        rows = np.asarray(rows, dtype=np.int64)
        series, start = self.index.series[rows], self.index.start[rows]
        if self._channels is None:
            x = self._windows[series, :, start]  # (B, C, L), a new C-contiguous array
        else:
            x = self._windows[series[:, None], self._channels, start[:, None]]  # (B, C', L)
        if self.nan_fill is not None:
            np.nan_to_num(x, copy=False, nan=float(self.nan_fill))
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(self._labels[rows])

    def batches(self, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) batches of `batch_size` windows over the split, in order or shuffled with `generator`."""
        batch_size = _int_option(batch_size, "batch_size", 1)
        m = len(self)
        order = torch.randperm(m, generator=generator) if shuffle else torch.arange(m)
        for i in range(0, m, batch_size):
            yield self.batch(order[i:i + batch_size])

    def labels(self) -> np.ndarray:
        """(M,) float32: every window's y (0/1 or the raw value), in row order."""
        return self._labels

    def raw_labels(self) -> np.ndarray:
        """(M,) float32: every window's label value before the rule."""
        return self._raw

    def label_steps(self) -> np.ndarray:
        """(M,) int64: the absolute time step of each window's label (array.timestamps gives its time)."""
        return self.index.start + self.spec.label_lag

    def series_ids(self) -> list[str]:
        """Each window's series id, in row order."""
        ids = self.array.series_ids
        return [ids[i] for i in self.index.series]

    def sample_rows(self, max_windows: int | None = None) -> np.ndarray:
        """Rows `flat(max_windows)` takes: all, or `max_windows` evenly spaced over the split, in order."""
        m = len(self)
        if max_windows is None or max_windows >= m:
            return np.arange(m, dtype=np.int64)
        max_windows = _int_option(max_windows, "max_windows", 1)
        return np.unique(np.linspace(0, m - 1, max_windows).round().astype(np.int64))

    def flat(self, max_windows: int | None = None) -> np.ndarray:
        """(M', C' * L) float32: the windows' inputs flattened, for the scikit-learn reference. This one DOES
        materialise them (M' x C' x L floats): all windows, or `max_windows` evenly spaced ones
        (`sample_rows(max_windows)`; their labels are `labels()[sample_rows(max_windows)]`, see `flat_xy`)."""
        rows = self.sample_rows(max_windows)
        out = np.empty((rows.size, self.n_inputs * self.spec.context_len), dtype=np.float32)
        chunk = max(1, (1 << 24) // max(1, out.shape[1]))  # about 64 MB per gather
        for i in range(0, rows.size, chunk):
            x, _ = self.batch(torch.from_numpy(rows[i:i + chunk]))
            out[i:i + chunk] = x.reshape(x.shape[0], -1).numpy()
        return out

    def flat_xy(self, max_windows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`flat(max_windows)` and the labels of the same rows."""
        return self.flat(max_windows), self.labels()[self.sample_rows(max_windows)]


# ============================================================================ export
def export_city(city: str, out: str | Path, params=None, *, root: str | Path = ".",
                use_processed: bool = True) -> list[Path]:
    """Write city `city` (any city of the city table, user cities of `params.cities` included) as three channel
    CSVs in folder `out`, replaced atomically (graphtune.fileio.atomic_directory), and return their paths:

    speed.csv           the city's readings (speeds for the METR-LA cities; whatever the city measures, e.g.
                        boardings for montevideo-bus); missing readings (the city's null_value, NaN) as empty cells
    neighbour_mean.csv  per sensor and step, the mean of its graph neighbours' readings: neighbours are the other
                        sensors j with adj[i, j] > 0 or adj[j, i] > 0 (either direction, the sensor itself
                        excluded), unweighted, over the neighbours observed at that step (empty when none is);
                        a sensor with no neighbour gets its own reading
    time_of_day.csv     the fraction of the day of each step, in [0, 1), the same in every row

    Each file: header row "sensor_id", then the timestamps (ISO 8601); then one row per sensor: its id, then
    its values (float32, shortest text that reads back exactly). `read_channels` reads them back with header
    and ids detected. `params`: a graphtune.config.Params (its prepare: and cities: sections) or a
    PrepareConfig, None = the defaults; `use_processed` as in prepare_dataset.
    """
    import pandas as pd

    from graphtune.config import PrepareConfig
    from graphtune.data.prepare import prepare_dataset
    from graphtune.fileio import atomic_directory

    if params is None or isinstance(params, PrepareConfig):
        prepare, cities = params, None
    else:
        prepare, cities = params.prepare, params.cities
    bundle = prepare_dataset(city, prepare, root=root, cities=cities, use_processed=use_processed)
    speed = bundle.target.numpy().T  # (N, T) raw readings, NaN = missing
    n, t = speed.shape
    adj = np.asarray(bundle.adj)
    linked = (adj > 0) | (adj.T > 0)
    np.fill_diagonal(linked, False)
    weights = linked.astype(np.float32)  # (N, N): 1 where j is a neighbour of i
    observed = ~np.isnan(speed)
    sums = weights @ np.where(observed, speed, np.float32(0))  # (N, T)
    counts = weights @ observed.astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        neighbour = np.where(counts > 0, sums / counts, np.float32(np.nan)).astype(np.float32)
    lonely = ~linked.any(axis=1)
    neighbour[lonely] = speed[lonely]
    tod = np.broadcast_to(bundle.time_features[:, 0].numpy()[None, :], (n, t))
    start = pd.Timestamp(bundle.meta["start"])
    stamps = [(start + pd.Timedelta(minutes=bundle.interval_minutes) * k).isoformat() for k in range(t)]
    header = ",".join(["sensor_id", *stamps]) + "\n"
    out = Path(out)
    with atomic_directory(out) as tmp:
        for name, values in zip(CHANNEL_FILES, (speed, neighbour, tod)):
            with open(tmp / name, "w", newline="") as f:
                f.write(header)
                for sid, row in zip(bundle.sensor_ids, values):
                    f.write(_csv_row(sid, row))
    return [out / name for name in CHANNEL_FILES]


def _csv_row(sid: str, row: np.ndarray) -> str:
    """One row: the id (quoted when it needs it), then the float32 values as numpy's shortest text that reads
    back exactly ("64.375", "1e-07"), NaN as an empty cell."""
    cells = row.astype(np.float32).astype(str)
    missing = np.isnan(row)
    if missing.any():
        cells[missing] = ""
    sid_cell = '"' + sid.replace('"', '""') + '"' if re.search(r'[",\n\r]', sid) else sid
    return sid_cell + "," + ",".join(cells.tolist()) + "\n"
