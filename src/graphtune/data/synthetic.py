"""Generated (SYNTHETIC) sensor-graph data for tests, benchmarks and scale studies.

Nothing here is real traffic. The signal is a smooth daily profile per node plus noise,
diffused once over the graph so that neighbours correlate; the graph is either given
(e.g. the real PEMS-BAY adjacency, then the result is still labelled synthetic because
its signal is generated) or a random geometric graph with a Gaussian kernel.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from graphtune.config import PrepareConfig
from graphtune.data.bundle import DatasetBundle, Scaler
from graphtune.data.prepare import split_bounds, time_features
from graphtune.data.windows import window_steps


def random_geometric_graph(num_nodes: int, seed: int = 0, neighbours: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in a ~0.5 degree box and a k-nearest-neighbour Gaussian-kernel adjacency (sparse rows).

    Returns (adj (N, N) float32, coords (N, 2) lat/lon). Memory is O(N * neighbours) until the dense
    adjacency is built, so it scales to tens of thousands of nodes.
    """
    rng = np.random.default_rng(seed)
    coords = np.column_stack([34.0 + 0.5 * rng.random(num_nodes), -118.5 + 0.5 * rng.random(num_nodes)])
    k = min(neighbours, num_nodes - 1)
    adj = np.zeros((num_nodes, num_nodes), dtype=np.float32)
    if k <= 0:
        np.fill_diagonal(adj, 1.0)
        return adj, coords
    for lo in range(0, num_nodes, 1024):  # blocks keep the distance matrix small
        d = np.linalg.norm(coords[lo : lo + 1024, None, :] - coords[None, :, :], axis=-1)  # (b, N)
        nearest = np.argpartition(d, k, axis=1)[:, : k + 1]  # includes self
        dn = np.take_along_axis(d, nearest, axis=1)
        sigma = max(float(dn.std()), 1e-6)
        rows = np.arange(lo, lo + d.shape[0])[:, None]
        adj[rows, nearest] = np.exp(-np.square(dn / sigma)).astype(np.float32)
    return adj, coords


def synthetic_series(num_steps: int, adj: np.ndarray, interval_minutes: float = 5.0, seed: int = 0,
                     missing_rate: float = 0.0) -> np.ndarray:
    """(T, N) float64 speed-like values in ~[20, 70]; `missing_rate` of entries set to 0 (the null value)."""
    rng = np.random.default_rng(seed)
    n = adj.shape[0]
    t = np.arange(num_steps) * interval_minutes / 1440.0  # days
    phase = rng.uniform(0, 2 * np.pi, n)
    base = rng.uniform(45, 65, n)
    daily = np.sin(2 * np.pi * t[:, None] + phase[None, :])  # (T, N)
    series = base[None, :] - 12.0 * np.clip(daily, 0, None) + rng.normal(0, 2.0, (num_steps, n))
    deg = adj.sum(1, keepdims=True)
    deg[deg == 0] = 1.0
    series = 0.5 * series + 0.5 * series @ (adj / deg).T  # one diffusion step: neighbours correlate
    if missing_rate > 0:
        series[rng.random(series.shape) < missing_rate] = 0.0
    return series


def synthetic_bundle(num_nodes: int = 12, num_steps: int = 600, seed: int = 0, t_in: int | str | None = None,
                     t_out: int | str | None = None, interval_minutes: float = 5.0, adj: np.ndarray | None = None,
                     coords: np.ndarray | None = None, name: str | None = None) -> DatasetBundle:
    """A small in-memory SYNTHETIC bundle with params.yaml's chronological split and windows (t_in, t_out
    default to the prepare section's; steps or a duration such as "1h", as there), for tests and benchmarks."""
    prepare = PrepareConfig()
    t_in = window_steps(prepare.t_in if t_in is None else t_in, interval_minutes, "t_in")
    t_out = window_steps(prepare.t_out if t_out is None else t_out, interval_minutes, "t_out")
    if adj is None:
        adj, coords = random_geometric_graph(num_nodes, seed=seed)
    num_nodes = adj.shape[0]
    raw = synthetic_series(num_steps, adj, interval_minutes, seed)
    splits = split_bounds(num_steps, prepare.split)
    scaler = Scaler.fit(raw[: splits["train"][1]])
    index = pd.date_range("2024-01-01", periods=num_steps, freq=pd.Timedelta(minutes=interval_minutes))
    return DatasetBundle(
        name=name or f"synthetic-{num_nodes}",
        values=torch.from_numpy(scaler.transform(raw).astype(np.float32)),
        target=torch.from_numpy(raw.astype(np.float32)),
        time_features=torch.from_numpy(time_features(index)),
        adj=adj.astype(np.float32),
        sensor_ids=[f"s{i}" for i in range(num_nodes)],
        interval_minutes=interval_minutes,
        splits=splits,
        scaler=scaler,
        coords=coords,
        t_in=t_in,
        t_out=t_out,
        units="synthetic",
        meta={"synthetic": True},
    )
