"""Models x strategies on the REAL METR-LA week, moved west -> east: the leaderboard as `graphtune compare` ranks it.

Every run is `graphtune experiment` with params.yaml as it is (the `make run` protocol: pretrain 6 epochs
on metr-la-west, 103 sensors; then per budget fraction 0.1 / 0.3 / 1.0 of metr-la-east's training windows,
104 sensors, 3 epochs from the transferred weights; the loss-gradient scheduler may stop the curve), for
each model, strategy and seed, tracked in a fresh sqlite store. The leaderboard is then read back from
that store, exactly as `graphtune compare` builds it, so the printed table is the product's own output.

Besides the board, the JSON records per run the comparable score and GraphTune-lite's within-run S_uep
(to show how the two rank the same runs), and for one run the data each budget point used (windows,
steps, days, readings), which shows how much of the training split a random subset of windows touches.

    python bench/bench_strategies.py                    # ~10 minutes on 2 CPU cores; bench/results/strategies.json
    python bench/bench_strategies.py --models hypernet --seeds 0
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_accuracy.py: shared 2-core machines

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from graphtune.compare import format_table, leaderboard  # noqa: E402
from graphtune.config import load_params  # noqa: E402
from graphtune.transfer.experiment import execute, plan_experiment  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "strategies.json"
MODELS = ("baseline", "hypernet", "bigst")  # the three that train in seconds per epoch on 2 cores
STRATEGIES = ("full", "freeze-transferred", "scratch")
SEEDS = (0, 1, 2)


def run_one(model: str, strategy: str, seed: int, store: str, work: Path) -> dict:
    params = load_params(ROOT / "params.yaml")
    params.experiment.model, params.experiment.strategy, params.experiment.seed = model, strategy, seed
    params.tracking.tracking_uri = store
    params.prepare.processed_dir = str(work / "processed")
    plan = plan_experiment(params)
    start = time.perf_counter()
    result, run_id = execute(plan, echo=lambda _: None, output_dir=work / f"{model}-{strategy}-s{seed}")
    target = result.stages[-1]
    return {"model": model, "strategy": strategy, "seed": seed, "run_id": run_id, "config_hash": result.config_hash,
            "score": result.score.score, "S_uep": result.s_uep, "final_test_rmse": target.test_rmse,
            "final_test_mae": target.test["mae"], "ha_test_rmse": target.reference["ha"]["rmse"],
            "zero_shot_test_rmse": target.zero_rmse, "skill": target.score["skill"],
            "transfer_auc": target.score["transfer_auc"], "cost_share": target.score["cost_share"],
            "finetune_tflops": target.cost["train_flops"] / 1e12, "trainable_params": target.cost["trainable_params"],
            "curve": [{"fraction": p["fraction"], "test_rmse": p["test_rmse"], "data": p["data"]} for p in target.curve],
            "zero_shot_data": target.zero_shot_data, "stages": [s.kind for s in result.stages],
            "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    os.chdir(ROOT)  # params.yaml's city folders are relative to the project root
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = f"sqlite:///{work}/mlflow.db"
        runs = []
        for model in args.models:
            for strategy in args.strategies:
                for seed in args.seeds:
                    runs.append(run_one(model, strategy, seed, store, work))
                    r = runs[-1]
                    print(f"{model:9s} {strategy:18s} seed {seed}: score {r['score']:+.4f}  S_uep {r['S_uep']:.4f}  "
                          f"test RMSE {r['final_test_rmse']:.3f} (HA {r['ha_test_rmse']:.3f})  {r['wall_s']:.0f} s",
                          flush=True)
        board = leaderboard(store)
    print()
    print(format_table(board))
    mean = {}
    for r in runs:
        mean.setdefault((r["model"], r["strategy"]), []).append(r)
    by_suep = sorted(mean, key=lambda k: -sum(r["S_uep"] for r in mean[k]) / len(mean[k]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "protocol": "graphtune experiment with params.yaml defaults (metr-la-west -> metr-la-east, REAL METR-LA "
                    "week), tracked in a fresh sqlite store; leaderboard read back with graphtune.compare",
        "board": json.loads(board.to_json(orient="records")),
        "rank_by_S_uep": [f"{m}/{s}" for m, s in by_suep],
        "runs": runs,
    }, indent=1) + "\n")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
