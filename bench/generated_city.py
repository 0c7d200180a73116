"""A GENERATED city in the DCRNN file format, for the benchmarks that measure preparation at full size.

The real full METR-LA files cannot be downloaded here; this writes one of the same shape (34272 x 207 by
default), with a random geometric graph and 8% zero readings (missing, like the real METR-LA), as
series.h5 + adj.pkl + loc.csv, so `prepare_dataset` reads it through the same loaders as a real city.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pandas as pd

from graphtune.data.synthetic import random_geometric_graph, synthetic_series

METR_LA_SHAPE = (34272, 207)  # steps x sensors of the full METR-LA series
NAME = "gen"


def write_generated_city(folder: Path, shape: tuple[int, int] = METR_LA_SHAPE) -> dict:
    """Write the city's files into `folder`; returns the `cities` table entry for prepare_dataset."""
    t, n = shape
    adj, coords = random_geometric_graph(n, seed=0)
    values = synthetic_series(t, adj, seed=0, missing_rate=0.08)
    ids = [str(700000 + i) for i in range(n)]
    index = pd.date_range("2012-03-01", periods=t, freq="5min")
    pd.DataFrame(values, index=index, columns=ids).to_hdf(folder / "series.h5", key="df", mode="w")
    with open(folder / "adj.pkl", "wb") as f:
        pickle.dump([ids, {s: i for i, s in enumerate(ids)}, adj], f)
    pd.DataFrame({"sensor_id": ids, "latitude": coords[:, 0], "longitude": coords[:, 1]}).to_csv(folder / "loc.csv")
    return city_entry(folder)


def city_entry(folder) -> dict:
    """The `cities` table entry (name NAME) for the files write_generated_city wrote into `folder`."""
    return {NAME: {"directory": str(folder), "series": "series.h5", "graph": "adj.pkl", "locations": "loc.csv",
                   "series_options": {"key": "df"}}}
