"""Peak extra memory of preparing a METR-LA-sized city (34272 x 207, GENERATED values).

Windows are index arithmetic over one array, so preparation should cost about one float32 copy of
the series plus the scaled copy, not T_in + T_out copies. We measure the peak of all traced
allocations (tracemalloc sees numpy and pandas buffers) while `prepare_dataset` reads the raw
HDF5 file and builds the bundle, and report it as a multiple of the raw array (T x N float64).
For comparison we print what materializing every (T_in, T_out) window pair as float64 costs
(the GraphTune-lite approach), computed from the shapes, not allocated.

    python bench/bench_prepare_memory.py          # prints a table, writes bench/results/prepare_memory.json
"""

from __future__ import annotations

import gc
import json
import pickle
import tempfile
import tracemalloc
from pathlib import Path

import pandas as pd

from graphtune.data.prepare import prepare_dataset
from graphtune.data.synthetic import random_geometric_graph, synthetic_series

T, N = 34272, 207  # the full METR-LA shape
T_IN = T_OUT = 12
TARGET_EXTRA = 2.0  # the target: peak extra memory <= 2x the raw array


def _write_city(folder: Path) -> None:
    adj, coords = random_geometric_graph(N, seed=0)
    values = synthetic_series(T, adj, seed=0, missing_rate=0.08)  # 8% zeros like the real METR-LA
    ids = [str(700000 + i) for i in range(N)]
    index = pd.date_range("2012-03-01", periods=T, freq="5min")
    pd.DataFrame(values, index=index, columns=ids).to_hdf(folder / "series.h5", key="df", mode="w")
    with open(folder / "adj.pkl", "wb") as f:
        pickle.dump([ids, {s: i for i, s in enumerate(ids)}, adj], f)
    pd.DataFrame({"sensor_id": ids, "latitude": coords[:, 0], "longitude": coords[:, 1]}).to_csv(folder / "loc.csv")


def main() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _write_city(folder)
        city = {"gen": {"directory": str(folder), "series": "series.h5", "graph": "adj.pkl",
                        "locations": "loc.csv", "series_options": {"key": "df"}}}
        gc.collect()
        tracemalloc.start()
        bundle = prepare_dataset("gen", root=folder, cities=city, use_processed=False)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    raw_bytes = T * N * 8
    windows = bundle.num_windows("train") + bundle.num_windows("val") + bundle.num_windows("test")
    materialized = windows * (T_IN + T_OUT) * N * 2 * 8  # x and y windows with 2 channels, float64
    result = {
        "shape": [T, N],
        "raw_mb": raw_bytes / 2**20,
        "peak_traced_mb": peak / 2**20,
        "peak_total_over_raw": peak / raw_bytes,
        "peak_extra_over_raw": (peak - raw_bytes) / raw_bytes,
        "target_extra_over_raw": TARGET_EXTRA,
        "materialized_windows_mb": materialized / 2**20,
        "materialized_over_raw": materialized / raw_bytes,
        "synthetic": True,
    }
    print(f"prepare memory, {T} x {N} (GENERATED values, METR-LA shape)")
    print(f"  {'raw array (float64)':36s} {result['raw_mb']:9.1f} MB   1.00x")
    print(f"  {'peak traced during prepare':36s} {result['peak_traced_mb']:9.1f} MB   "
          f"{result['peak_total_over_raw']:.2f}x  (extra {result['peak_extra_over_raw']:.2f}x, target <= 2x)")
    print(f"  {'materialized windows (not built)':36s} {result['materialized_windows_mb']:9.1f} MB  "
          f"{result['materialized_over_raw']:.1f}x")
    out = Path(__file__).parent / "results" / "prepare_memory.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result


if __name__ == "__main__":
    main()
