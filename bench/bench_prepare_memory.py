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
import tempfile
import tracemalloc
from pathlib import Path

from graphtune.data.prepare import prepare_dataset
from generated_city import METR_LA_SHAPE, NAME as GENERATED, write_generated_city  # bench/, next to this script

T, N = METR_LA_SHAPE
T_IN = T_OUT = 12
TARGET_EXTRA = 2.0  # the target: peak extra memory <= 2x the raw array


def main() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        city = write_generated_city(folder, (T, N))
        gc.collect()
        tracemalloc.start()
        bundle = prepare_dataset(GENERATED, root=folder, cities=city, use_processed=False)
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
