"""Learned models on a count city: the REAL Montevideo bus-stop boardings, with and without the seasonal residual.

Each run is `graphtune experiment --datasets metr-la-week,montevideo-bus` with params.yaml as it is (default
epochs: 6 to pretrain on the METR-LA week, 3 per budget point on the bus stops), the model's CPU widths below,
and the scheduler told never to stop, so that every run reaches the full budget (fraction 1.0). The city is
hourly, so the 12 -> 12 windows are 12 hours of history and 12 hours ahead; 80% of its readings are real
zeros (null_value: null). Reported: test MAE / RMSE / WAPE of the target at every budget point, next to the
historical average (HA), persistence and forecasting all zeros, on the same test windows.

    python bench/bench_counts.py                  # about 20 minutes on 2 CPU cores; bench/results/counts.json
    python bench/bench_counts.py --models hypernet
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_accuracy.py: shared 2-core machines

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from graphtune.config import load_params  # noqa: E402
from graphtune.metrics import valid_mask  # noqa: E402
from graphtune.transfer.experiment import execute, plan_experiment  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "counts.json"
MODELS = ("hypernet", "baseline", "gwnet")
# GWNet at the paper's width costs minutes per epoch on 2 cores at 675 nodes: the width bench_accuracy uses.
KWARGS = {"gwnet": {"residual_channels": 16, "dilation_channels": 16, "skip_channels": 64, "end_channels": 128}}


def run(model: str, seasonal: bool, work: Path) -> dict:
    params = load_params(ROOT / "params.yaml", ["transfer.min_gain_rate=-1e9", "transfer.min_rel_improve=-1e9"])
    params.experiment.datasets = ["metr-la-week", "montevideo-bus"]
    params.experiment.model = model
    params.experiment.model_kwargs = {**KWARGS.get(model, {}), "seasonal": seasonal}
    params.prepare.processed_dir = str(work / "processed")
    start = time.perf_counter()
    result, _ = execute(plan_experiment(params), echo=lambda _: None, tracking=False,
                        output_dir=work / f"{model}-{seasonal}")
    target = result.stages[-1]
    return {"model": model, "seasonal": seasonal, "kwargs": params.experiment.model_kwargs,
            "zero_shot": {k: target.zero_shot_test[k] for k in ("mae", "rmse", "wape")},
            "curve": [{"fraction": p["fraction"], "best_epoch": p["best_epoch"],
                       **{k: p[f"test_{k}"] for k in ("mae", "rmse", "wape")}} for p in target.curve],
            "references": {name: {k: ref[k] for k in ("mae", "rmse", "wape")}
                           for name, ref in target.reference.items()},
            "score": result.score.score, "wall_s": time.perf_counter() - start}


def all_zeros(work: Path) -> dict:
    """MAE / RMSE / WAPE of forecasting 0 boardings everywhere, on the same test windows as every model."""
    from graphtune.config import PrepareConfig
    from graphtune.data.prepare import prepare_dataset

    bundle = prepare_dataset("montevideo-bus", PrepareConfig(processed_dir=str(work / "processed")), root=ROOT)
    _, y = bundle.batch(bundle.window_starts("test"))
    y = y[valid_mask(y, bundle.null_value)].double()
    return {"mae": float(y.abs().mean()), "rmse": float(y.pow(2).mean().sqrt()), "wape": 100.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    os.chdir(ROOT)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = []
        for model in args.models:
            for seasonal in (False, True):
                rows.append(run(model, seasonal, work))
                r = rows[-1]
                print(f"{model:9s} seasonal={seasonal!s:5s}: test MAE at 1.0 {r['curve'][-1]['mae']:.4f} "
                      f"(HA {r['references']['ha']['mae']:.4f}), {r['wall_s']:.0f} s", flush=True)
        zeros = all_zeros(work)
    refs = rows[0]["references"]
    print("\n| model | seasonal | test MAE at 0.1 / 0.3 / 1.0 | RMSE at 1.0 | WAPE % at 1.0 | epochs kept at 1.0 |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        maes = " / ".join(f"{p['mae']:.3f}" for p in r["curve"])
        last = r["curve"][-1]
        print(f"| {r['model']} | {'yes' if r['seasonal'] else 'no'} | {maes} | {last['rmse']:.3f} | "
              f"{last['wape']:.1f} | {last['best_epoch']} |")
    for name, ref in [("historical average", refs["ha"]), ("persistence", refs["persistence"]), ("all zeros", zeros)]:
        print(f"| {name} | - | {ref['mae']:.3f} | {ref['rmse']:.3f} | {ref['wape']:.1f} | - |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"protocol": "graphtune experiment metr-la-week -> montevideo-bus, params.yaml "
                                                "epochs, scheduler off, REAL data, 2 CPU threads",
                                    "runs": rows, "all_zeros": zeros}, indent=1) + "\n")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
