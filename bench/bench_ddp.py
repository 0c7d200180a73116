"""Data-parallel `fit` (graphtune.distributed) against one process, on the REAL METR-LA week sample.

Each configuration trains a fresh model with `graphtune.engine.fit` in fresh processes, started side by side
in one run and in alternating rounds, so that load from other processes on a shared machine hits them alike:

    1 proc x 2 threads   one process using every core through torch's intra-op threads (today's default)
    1 proc x 1 thread    one process, one thread: the per-rank setting of the 2-process job
    2 procs x 1 thread   two processes (gloo over loopback), one thread each, each training half of every batch

Measured per run: training samples/s = FitResult.samples / FitResult.train_time_s (the optimizer steps of
rank 0, whose gradient all-reduce waits for the slower rank, so the figure is the job's), the validation
time (the starting weights and the epoch's end, both sharded under 2 processes) and the whole fit's wall
time. The global batch is train.batch_size = 64 in every configuration, so every configuration takes the
same optimizer steps on the same windows, and the val MAE after the steps is printed as a check that the
2-process job trained the same model (see tests/test_ddp.py for the tolerance).

On the 2-core machine these numbers come from, two single-threaded processes have no more cores than one
process with two threads: expect little or no speedup, or a slowdown, from the all-reduce of every step and
the duplicated per-process work (each rank gathers its own windows and runs its own optimizer step). The
point of the data-parallel path is machines with more cores or GPUs than one process can use.

    python bench/bench_ddp.py            # ~3 minutes on 2 CPU cores; prints a table, writes bench/results/ddp.json
    python bench/bench_ddp.py --rounds 1 --models hypernet
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI and the other benchmarks: no spinning threads

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "ddp.json"
BATCH = 64  # the global batch, the GWNet/DCRNN protocol
# (name, model kwargs, optimizer steps measured): hypernet as `make run` trains it; a narrow GWNet (its
# default widths take seconds per step on 2 cores), whose BatchNorm normalises per shard under 2 processes
MODELS = {
    "hypernet": ({}, 20),
    "gwnet": ({"residual_channels": 8, "dilation_channels": 8, "skip_channels": 32, "end_channels": 64}, 6),
}
CONFIGS = (("1 proc x 2 threads", 1, 2), ("1 proc x 1 thread", 1, 1), ("2 procs x 1 thread", 2, 1))
WARMUP_STEPS = 2  # untimed steps first, on a copy of the model: allocations and first-touch costs


def worker(rank: int, world: int, port: int, threads: int, model: str, steps: int, out: str) -> None:
    """One rank: warm up, then one capped epoch of fit; rank 0 writes what it measured to `out`."""
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    from graphtune import distributed
    from graphtune.config import TrainConfig
    from graphtune.data.prepare import prepare_dataset
    from graphtune.engine import fit
    from graphtune.models import build_model

    if world > 1 and distributed.loopback_interface():  # as launch() sets it: gloo over loopback
        os.environ.setdefault("GLOO_SOCKET_IFNAME", distributed.loopback_interface())
    distributed.init_from_env(timeout_s=600)
    bundle = prepare_dataset("metr-la-week", root=ROOT, use_processed=False)
    torch.manual_seed(0)
    net = build_model(model, bundle, **MODELS[model][0])
    train = TrainConfig(epochs=[1], lrs=[3e-3], batch_size=BATCH)
    fit(copy.deepcopy(net), bundle, train, seed=1, max_steps_per_epoch=WARMUP_STEPS, progress=False)
    result = fit(net, bundle, train, seed=0, max_steps_per_epoch=steps, progress=False)
    if distributed.is_main():
        row = {"samples": result.samples, "steps": result.steps, "train_time_s": result.train_time_s,
               "val_time_s": result.val_time_s, "fit_time_s": result.fit_time_s,
               "samples_per_s": result.samples / result.train_time_s,
               "train_loss": result.history[0]["train_loss"], "val_mae": result.best_val_mae}
        Path(out).write_text(json.dumps(row))
    distributed.shutdown()


def measure(model: str, world: int, threads: int) -> dict:
    """One configuration in fresh processes (a single process, too, is spawned: the same cold start)."""
    from graphtune.distributed import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "row.json")
        mp.start_processes(worker, args=(world, free_port(), threads, model, MODELS[model][1], out), nprocs=world,
                           join=True, start_method="spawn")
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds over the configurations")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    runs = []
    started, load_before = time.perf_counter(), os.getloadavg()
    for round_ in range(args.rounds):
        for model in args.models:
            for name, world, threads in CONFIGS:
                row = measure(model, world, threads)
                row.update(model=model, config=name, processes=world, threads=threads, round=round_ + 1)
                runs.append(row)
                print(f"round {round_ + 1} {model:9s} {name:19s} {row['samples_per_s']:7.1f} samples/s", flush=True)
    summary = {}
    for model in args.models:
        summary[model] = {}
        for name, _, _ in CONFIGS:
            rows = [r for r in runs if r["model"] == model and r["config"] == name]
            summary[model][name] = {key: statistics.median(r[key] for r in rows)
                                    for key in ("samples_per_s", "train_time_s", "val_time_s", "fit_time_s")}
            summary[model][name]["val_mae"] = rows[0]["val_mae"]
        base = summary[model]["1 proc x 2 threads"]["samples_per_s"]
        for name, _, _ in CONFIGS:
            summary[model][name]["vs_1_proc_2_threads"] = summary[model][name]["samples_per_s"] / base

    print("\n| model | configuration | train samples/s | vs 1 proc x 2 threads | val s | fit s | val MAE after "
          "the steps |\n|---|---|---|---|---|---|---|")
    for model, rows in summary.items():
        for name, r in rows.items():
            print(f"| {model} | {name} | {r['samples_per_s']:.1f} | {r['vs_1_proc_2_threads']:.2f}x | "
                  f"{r['val_time_s']:.2f} | {r['fit_time_s']:.2f} | {r['val_mae']:.6f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "protocol": (f"graphtune.engine.fit on the REAL METR-LA week sample, global batch {BATCH}, one epoch capped "
                     f"at each model's steps after {WARMUP_STEPS} warm-up steps, fresh spawned processes, "
                     f"configurations alternated over {args.rounds} rounds; medians; samples/s = samples / "
                     "train_time_s of rank 0"),
        # the 1-minute load average before and after: other processes on a shared machine take cores too
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "load_average_1min": [load_before[0], os.getloadavg()[0]]},
        "models": {model: {"kwargs": MODELS[model][0], "steps": MODELS[model][1]} for model in args.models},
        "summary": summary, "runs": runs, "bench_s": time.perf_counter() - started,
    }, indent=1) + "\n")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
