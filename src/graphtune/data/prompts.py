"""Node prompts for GPD (Yuan et al., ICLR 2024): per-node descriptors that condition the parameter generator.

GPD generates each node's model parameters with a diffusion model conditioned on a prompt for that node.
A prompt here has a spatial part (from the road graph) and a temporal part (from the node's readings). Both
are computed only from what a budget point may see, so that a prompt never carries information that the
point's data budget does not pay for:

Spatial features (`SPATIAL_FEATURES`, from the adjacency and coordinates only, never from readings). The graph
and the sensor positions are part of every city's static description; a budget point always sees them and
they contain no time series. Self loops are left out of every spatial feature, so that graphs stored with
and without a unit diagonal agree (as in `graphtune.models.layers.graph_statistics`).

- out_degree, in_degree: number of out- / in-edges (entries > 0 of `adj`, row = from, column = to).
- out_weight, in_weight: sum of the out- / in-edge weights.
- ego_size: 1 + the number of distinct 1-hop in- or out-neighbours (uncapped; `ego_members` caps the list).
- clustering: local clustering coefficient of the undirected simple view (an edge wherever adj[i, j] > 0 or
  adj[j, i] > 0, unweighted); 0 for a node with fewer than two neighbours (the networkx convention).
- pagerank: PageRank with damping 0.85 on the row-normalised weighted graph (dangling nodes teleport
  uniformly), power iteration to an L1 change below 1e-10, multiplied by N so that its mean is 1 whatever
  the city's size.
- east_km, north_km, distance_km: position relative to the city's coordinate centroid (mean latitude and
  longitude), equirectangular with the cosine of the centroid latitude. Raw latitude/longitude are never
  used: they would identify a city rather than describe a node's place in it. Without coordinates
  (`coords=None`) the three are 0 for every node, i.e. every node sits at the centroid; a node whose own
  coordinates are not finite gets NaN, which `check_prompts` reports.

Temporal features (`TEMPORAL_FEATURES(bins)`, from the readings at the time steps the caller passes, which
must be steps the point may see; `node_prompts` passes `visible_steps(bundle)`: training-split steps the
bundle's view has not hidden, never validation or test steps):

- profile_0..profile_{bins-1}: the daily profile, the mean observed reading in each of `bins` equal
  time-of-day bins (NaN for a bin without an observed reading).
- mean, std: mean and (population) standard deviation of the observed readings.
- acf_1step, acf_1h, acf_1d: autocorrelation at a lag of 1 step, round(60 / interval) steps and
  round(1440 / interval) steps (each at least 1), the Pearson correlation over the pairs (s, s + lag) where
  BOTH steps are among the given steps and both readings are observed, so a hidden or unseen step never
  enters a pair; NaN where undefined (fewer than two pairs, or a constant side).
- missing: the share of missing (NaN) readings among the given steps.

`PromptScaler` z-scores prompts per feature. It is fitted on SOURCE-city prompts only, never on target data:
the target's prompts are only transformed with the source statistics, as the generator saw them in training.

Everything is computed in float64 and returned as float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from graphtune.errors import DataError

SPATIAL_FEATURES: tuple[str, ...] = (
    "out_degree",
    "in_degree",
    "out_weight",
    "in_weight",
    "ego_size",
    "clustering",
    "pagerank",
    "east_km",
    "north_km",
    "distance_km",
)
_POSITION = ("east_km", "north_km", "distance_km")
PARTS = ("spatial", "temporal", "both")

PAGERANK_DAMPING = 0.85
PAGERANK_TOL = 1e-10  # L1 change of the (sum-1) rank vector between iterations
PAGERANK_MAX_ITER = 10_000  # the iteration contracts by 0.85 per step: ~150 steps reach 1e-10
EARTH_RADIUS_KM = 6371.0088  # mean Earth radius (IUGG)
_CHUNK_ELEMENTS = 1 << 22  # (steps x nodes) elements per temporal chunk: bounds the float64 temporaries
_ROW_BLOCK = 1024  # rows per block in ego_members


def TEMPORAL_FEATURES(bins: int) -> tuple[str, ...]:  # noqa: N802 - a name in the API, like a constant
    """Names of the temporal prompt features, in column order, for a daily profile of `bins` bins."""
    _check_bins(bins)
    return tuple(f"profile_{b}" for b in range(bins)) + ("mean", "std", "acf_1step", "acf_1h", "acf_1d", "missing")


def _check_bins(bins: int) -> None:
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1, got {bins!r}")


def _check_neighbours(neighbours: int) -> None:
    if isinstance(neighbours, bool) or not isinstance(neighbours, (int, np.integer)) or neighbours < 0:
        raise ValueError(f"neighbours must be an integer >= 0, got {neighbours!r}")


def _weights(adj: np.ndarray) -> np.ndarray:
    """The adjacency as float64 (N, N) with the diagonal (self loops) zeroed; validates it."""
    w = np.array(adj, dtype=np.float64)  # a copy: the caller's matrix is never changed
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"adjacency must be a square (N, N) matrix, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("adjacency has NaN or infinite weights")
    if (w < 0).any():
        raise ValueError("adjacency has negative weights; edges are entries > 0")
    np.fill_diagonal(w, 0.0)
    return w


# --------------------------------------------------------------------------- ego subgraphs
def ego_members(adj: np.ndarray, neighbours: int) -> np.ndarray:
    """(N, 1 + neighbours) int64: row i = [i, then up to `neighbours` distinct 1-hop neighbours of i].

    A neighbour is any j != i with adj[i, j] > 0 (out-edge) or adj[j, i] > 0 (in-edge); they are ordered
    strongest first by max(adj[i, j], adj[j, i]), ties by the lower index. Slots beyond a node's neighbours
    are -1. Pure and deterministic.
    """
    _check_neighbours(neighbours)
    w = _weights(adj)
    n = w.shape[0]
    members = np.full((n, 1 + neighbours), -1, dtype=np.int64)
    members[:, 0] = np.arange(n)
    take = min(neighbours, n)
    if take == 0:
        return members
    for lo in range(0, n, _ROW_BLOCK):
        hi = min(n, lo + _ROW_BLOCK)
        strength = np.maximum(w[lo:hi], w[:, lo:hi].T)  # (b, N) symmetric link strength; diagonal already 0
        key = np.where(strength > 0, -strength, np.inf)  # non-neighbours sort last
        order = np.argsort(key, axis=1, kind="stable")[:, :take]  # stable: ties by index
        linked = np.take_along_axis(strength, order, axis=1) > 0
        members[lo:hi, 1 : 1 + take] = np.where(linked, order, -1)
    return members


# --------------------------------------------------------------------------- spatial prompts
def _clustering(linked: np.ndarray) -> np.ndarray:
    """Local clustering coefficient of the undirected simple graph `linked` (N, N) bool, zero diagonal."""
    n = linked.shape[0]
    out = np.zeros(n, dtype=np.float64)
    for i in range(n):
        nb = np.flatnonzero(linked[i])
        k = nb.size
        if k < 2:
            continue
        edges_twice = int(linked[np.ix_(nb, nb)].sum())  # each edge among the neighbours counted twice
        out[i] = edges_twice / (k * (k - 1))  # = 2 * triangles / (k (k - 1))
    return out


def _pagerank(w: np.ndarray, damping: float = PAGERANK_DAMPING, tol: float = PAGERANK_TOL) -> np.ndarray:
    """PageRank (sum 1) of the weighted graph `w` (row = from), dangling nodes teleporting uniformly."""
    n = w.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    out = w.sum(axis=1)
    dangling = out <= 0
    inv = np.where(dangling, 0.0, 1.0 / np.where(dangling, 1.0, out))
    rank = np.full(n, 1.0 / n)
    for _ in range(PAGERANK_MAX_ITER):
        spread = (rank * inv) @ w  # = rank @ (D^-1 W), without forming the row-normalised matrix
        new = damping * (spread + rank[dangling].sum() / n) + (1.0 - damping) / n
        change = float(np.abs(new - rank).sum())
        rank = new
        if change < tol:
            break
    else:  # unreachable for 0 <= damping < 1 (a contraction); kept so a bad constant cannot loop silently
        raise RuntimeError(f"PageRank did not converge to {tol:g} in {PAGERANK_MAX_ITER} iterations")
    return rank / rank.sum()


def _positions(coords: np.ndarray | None, n: int) -> np.ndarray:
    """(N, 3) east km, north km, distance km from the coordinate centroid; zeros without coordinates."""
    if coords is None:
        return np.zeros((n, 3), dtype=np.float64)
    c = np.asarray(coords, dtype=np.float64)
    if c.shape != (n, 2):
        raise ValueError(f"coords must be (N, 2) latitude, longitude with N = {n}, got shape {c.shape}")
    known = np.isfinite(c).all(axis=1)
    out = np.full((n, 3), np.nan)
    if not known.any():
        return out
    lat0, lon0 = c[known].mean(axis=0)  # centroid of the nodes with coordinates
    east = EARTH_RADIUS_KM * np.radians(c[:, 1] - lon0) * np.cos(np.radians(lat0))
    north = EARTH_RADIUS_KM * np.radians(c[:, 0] - lat0)
    out[:, 0], out[:, 1], out[:, 2] = east, north, np.hypot(east, north)
    out[~known] = np.nan
    return out


def spatial_prompts(adj: np.ndarray, coords: np.ndarray | None, neighbours: int) -> np.ndarray:
    """(N, len(SPATIAL_FEATURES)) float32 spatial prompts from the graph and coordinates (see the module doc).

    `neighbours` (the ego list size of `ego_members`) is validated but changes no feature: ego_size counts
    every distinct neighbour, uncapped. It is taken so that the prompt and ego calls share one signature.
    """
    _check_neighbours(neighbours)
    w = _weights(adj)
    n = w.shape[0]
    edges = w > 0
    linked = edges | edges.T  # undirected simple view (diagonal already zero)
    feats = np.empty((n, len(SPATIAL_FEATURES)), dtype=np.float64)
    feats[:, 0] = edges.sum(axis=1)
    feats[:, 1] = edges.sum(axis=0)
    feats[:, 2] = w.sum(axis=1)
    feats[:, 3] = w.sum(axis=0)
    feats[:, 4] = 1.0 + linked.sum(axis=1)
    feats[:, 5] = _clustering(linked)
    feats[:, 6] = _pagerank(w) * n  # mean 1 for any city size
    feats[:, 7:10] = _positions(coords, n)
    return feats.astype(np.float32)


# --------------------------------------------------------------------------- temporal prompts
def _lag_steps(minutes: float, interval_minutes: float) -> int:
    return max(1, int(round(minutes / interval_minutes)))


def _masked_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-column Pearson correlation of x, y (P, C) over rows where both are observed; NaN where undefined."""
    both = ~np.isnan(x) & ~np.isnan(y)
    count = both.sum(axis=0)
    result = np.full(x.shape[1], np.nan)
    if x.shape[0] == 0:
        return result
    with np.errstate(invalid="ignore", divide="ignore"):
        xs, ys = np.where(both, x, 0.0), np.where(both, y, 0.0)
        mx, my = xs.sum(axis=0) / count, ys.sum(axis=0) / count
        dx, dy = np.where(both, x - mx, 0.0), np.where(both, y - my, 0.0)
        cov, vx, vy = (dx * dy).sum(axis=0), (dx * dx).sum(axis=0), (dy * dy).sum(axis=0)
        # A constant side has no correlation; test it exactly (rounding can leave a tiny non-zero variance).
        flat_x = np.where(both, x, -np.inf).max(axis=0) == np.where(both, x, np.inf).min(axis=0)
        flat_y = np.where(both, y, -np.inf).max(axis=0) == np.where(both, y, np.inf).min(axis=0)
        ok = (count >= 2) & ~flat_x & ~flat_y
        result[ok] = np.clip(cov[ok] / np.sqrt(vx[ok] * vy[ok]), -1.0, 1.0)
    return result


def temporal_prompts(target: np.ndarray, tod: np.ndarray, steps: np.ndarray, interval_minutes: float,
                     bins: int = 8) -> np.ndarray:
    """(N, len(TEMPORAL_FEATURES(bins))) float32 temporal prompts from the readings at time indices `steps`.

    target: (T, N) raw readings, NaN = missing (a torch tensor on the CPU works too); tod: (T,) time of day
    in [0, 1); steps: 1-D strictly increasing time indices, ONLY steps the caller may see. No reading outside
    `steps` is read: autocorrelation pairs need both of their steps in `steps`. See the module doc.
    """
    _check_bins(bins)
    if not np.isfinite(interval_minutes) or interval_minutes <= 0:
        raise ValueError(f"interval_minutes must be > 0, got {interval_minutes!r}")
    data = np.asarray(target)
    if data.ndim != 2:
        raise ValueError(f"target must be (T, N), got shape {data.shape}")
    t_total, n = data.shape
    day = np.asarray(tod, dtype=np.float64).reshape(-1)
    if day.shape[0] != t_total:
        raise ValueError(f"tod must have one entry per time step ({t_total}), got {day.shape[0]}")
    idx = np.asarray(steps)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise ValueError("steps must be a 1-D integer array of time indices")
    idx = idx.astype(np.int64)
    if idx.size and (idx[0] < 0 or idx[-1] >= t_total or (np.diff(idx) <= 0).any()):
        raise ValueError(f"steps must be strictly increasing time indices in [0, {t_total})")
    if idx.size == 0:  # nothing seen: every feature is undefined
        return np.full((n, bins + 6), np.nan, dtype=np.float32)
    day_seen = day[idx]
    if not np.isfinite(day_seen).all():
        raise ValueError("tod is not finite at some of the given steps")
    which_bin = np.clip(np.floor(day_seen * bins).astype(np.int64), 0, bins - 1)
    onehot = np.zeros((idx.size, bins), dtype=np.float64)
    onehot[np.arange(idx.size), which_bin] = 1.0

    lags = [1, _lag_steps(60.0, interval_minutes), _lag_steps(1440.0, interval_minutes)]
    pairs = []  # per lag: first steps s of the pairs (s, s + lag) with both steps given
    for lag in lags:
        pairs.append(idx[np.isin(idx + lag, idx, assume_unique=True)])

    feats = np.full((n, bins + 6), np.nan, dtype=np.float64)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, idx.size))
    for lo in range(0, n, chunk):
        cols = slice(lo, min(n, lo + chunk))
        x = np.asarray(data[idx, cols], dtype=np.float64)  # (S, c)
        seen = ~np.isnan(x)
        filled = np.where(seen, x, 0.0)
        count = seen.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            feats[cols, :bins] = ((onehot.T @ filled) / (onehot.T @ seen)).T  # 0 / 0 -> NaN: an empty bin
            mean = filled.sum(axis=0) / count
            spread = np.sqrt((np.where(seen, x - mean, 0.0) ** 2).sum(axis=0) / count)
            flat = np.where(seen, x, -np.inf).max(axis=0) == np.where(seen, x, np.inf).min(axis=0)
            spread[flat & (count > 0)] = 0.0  # exactly 0 for a constant node, not a rounding residue
            feats[cols, bins] = mean
            feats[cols, bins + 1] = spread
            for j, (lag, first) in enumerate(zip(lags, pairs)):
                a = np.asarray(data[first, cols], dtype=np.float64)
                b = np.asarray(data[first + lag, cols], dtype=np.float64)
                feats[cols, bins + 2 + j] = _masked_pearson(a, b)
            feats[cols, bins + 5] = 1.0 - count / idx.size
    return feats.astype(np.float32)


# --------------------------------------------------------------------------- from a bundle
def visible_steps(bundle: Any) -> np.ndarray:
    """(S,) int64 sorted: the training-split steps the bundle (or a `restrict` view of it) exposes.

    A view hides a training step by setting every node's reading to NaN, so these are the steps in
    [lo, hi) of splits["train"] where not all nodes are NaN. Validation and test steps are never included.
    A step at which every sensor is missing in the data itself (an outage) is indistinguishable from a
    hidden one and is left out too; it carries no reading, so only the `missing` share notices.
    """
    lo, hi = bundle.splits["train"]
    part = np.asarray(bundle.target[lo:hi])  # (T_train, N); a CPU tensor is viewed, not copied
    if part.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    shown = np.zeros(part.shape[0], dtype=bool)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, part.shape[1]))
    for s in range(0, part.shape[0], chunk):
        shown[s : s + chunk] = ~np.isnan(part[s : s + chunk]).all(axis=1)
    return np.flatnonzero(shown).astype(np.int64) + lo


def node_prompts(bundle: Any, neighbours: int, bins: int = 8,
                 parts: str = "both") -> tuple[np.ndarray | None, np.ndarray | None]:
    """(spatial (N, ds) or None, temporal (N, dt) or None) for `parts` in "spatial", "temporal", "both".

    The temporal part reads only `visible_steps(bundle)`: the training steps the view exposes, never the
    validation or test splits. The spatial part reads the graph and coordinates (no readings).
    """
    if parts not in PARTS:
        raise ValueError(f"parts must be one of {', '.join(PARTS)}, got {parts!r}")
    spatial = temporal = None
    if parts in ("spatial", "both"):
        spatial = spatial_prompts(bundle.adj, bundle.coords, neighbours)
    if parts in ("temporal", "both"):
        _check_neighbours(neighbours)
        tod = np.asarray(bundle.time_features[:, 0])
        temporal = temporal_prompts(bundle.target, tod, visible_steps(bundle), bundle.interval_minutes, bins)
    return spatial, temporal


# --------------------------------------------------------------------------- checks
def _likely_cause(feature: str) -> str:
    if feature in _POSITION:
        return "the node has no valid coordinates"
    if feature.startswith("profile_"):
        return "no readings in the visible data at that time of day"
    if feature.startswith("acf_"):
        return "no readings in the visible data, or too few or constant readings at that lag"
    return "no readings in the visible data"


def check_prompts(prompts: np.ndarray, names: Sequence[str], sensor_ids: Sequence[Any], where: str) -> None:
    """Raise DataError (one line) if any prompt entry is NaN or infinite.

    The message names `where` (a city or file), the first offending node's id, the feature, the likely cause
    and how many nodes are affected.
    """
    p = np.asarray(prompts)
    names = list(names)
    if p.ndim != 2 or p.shape[1] != len(names) or p.shape[0] != len(sensor_ids):
        raise ValueError(f"prompts must be (nodes={len(sensor_ids)}, features={len(names)}), got shape {p.shape}")
    bad = ~np.isfinite(p)
    rows = np.flatnonzero(bad.any(axis=1))
    if rows.size == 0:
        return
    node = int(rows[0])
    col = int(np.flatnonzero(bad[node])[0])
    value = "NaN" if np.isnan(p[node, col]) else "infinite"
    feature = names[col]
    line = (f"{where}: node prompt feature {feature!r} is {value} for node {sensor_ids[node]} "
            f"({_likely_cause(feature)}); {rows.size} of {p.shape[0]} nodes affected")
    raise DataError(" ".join(line.split()))  # always one line, whatever the ids hold


# --------------------------------------------------------------------------- scaling
@dataclass(frozen=True)
class PromptScaler:
    """Per-feature z-score of prompts. Fit it on SOURCE-city prompts only, never on target data: the target's
    prompts are transformed with the source statistics the generator was trained with."""

    mean: np.ndarray  # (F,) float64
    std: np.ndarray  # (F,) float64, > 0

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, dtype=np.float64).reshape(-1)
        std = np.asarray(self.std, dtype=np.float64).reshape(-1)
        if mean.shape != std.shape:
            raise ValueError(f"mean and std must have the same length, got {mean.size} and {std.size}")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise ValueError("PromptScaler needs finite means and finite, positive stds")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def fit(cls, prompts: np.ndarray) -> "PromptScaler":
        """Fit on (N, F) source prompts; they must be finite (run `check_prompts` first). A feature with
        std 0 (up to rounding, i.e. constant) gets std 1, so it maps to 0 rather than dividing by 0."""
        p = np.asarray(prompts, dtype=np.float64)
        if p.ndim != 2 or p.shape[0] == 0:
            raise ValueError(f"prompts must be a non-empty (N, F) array, got shape {p.shape}")
        if not np.isfinite(p).all():
            col = int(np.flatnonzero(~np.isfinite(p).all(axis=0))[0])
            raise ValueError(f"cannot fit PromptScaler: feature column {col} has NaN or infinite values")
        mean = p.mean(axis=0)
        std = p.std(axis=0)
        constant = (p.max(axis=0) == p.min(axis=0)) | (std <= 1e-12 * np.maximum(1.0, np.abs(mean)))
        std = np.where(constant, 1.0, std)
        return cls(mean=mean, std=std)

    def transform(self, prompts: np.ndarray) -> np.ndarray:
        """(N, F) -> (N, F) float32 z-scores. NaN entries stay NaN."""
        p = np.asarray(prompts, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != self.mean.size:
            raise ValueError(f"prompts must be (N, {self.mean.size}), got shape {p.shape}")
        return ((p - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_dict(cls, data: dict) -> "PromptScaler":
        return cls(mean=np.asarray(data["mean"], dtype=np.float64), std=np.asarray(data["std"], dtype=np.float64))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PromptScaler):
            return NotImplemented
        return bool(np.array_equal(self.mean, other.mean) and np.array_equal(self.std, other.std))
