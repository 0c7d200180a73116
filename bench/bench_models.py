"""Training cost of every learnable model, and how BigST and GWNet scale with the number of nodes.

Part 1, per learnable registered model, on two city shapes:
  metr-la-week    the REAL embedded METR-LA week (prepare_dataset("metr-la-week")): 207 nodes, 2016 steps.
  pems-bay-graph  the REAL PEMS-BAY graph (data/sample/pems-bay-graph: adj_mx_bay.pkl + sensor locations),
                  325 nodes, with a GENERATED signal (synthetic_series, 2016 steps): labelled synthetic.
  - throughput: `--warmup` optimizer steps, then `--steps` timed ones, each as `fit` takes it (forward with
    teacher-forcing targets, masked MAE on inverse-scaled predictions, backward, clip 5, Adam with
    weight decay 1e-4) on shuffled training batches of 64 windows; samples/s = steps * 64 / time.
  - peak memory: ResourceMonitor around model build + warm-up + timed steps: peak process RSS above the
    level after the data was loaded (parameters, gradients, Adam state, activations), and the CUDA peak
    on a GPU. Every (model, shape) runs in a fresh process, so one model's freed memory cannot hide the
    next one's.
  - params (count_parameters) and forward FLOPs per batch of 64 (count_flops: matrix products only).

Part 2, scaling of BigST (linearized attention, O(N)) against GWNet (dense N x N adaptive adjacency and
diffusion, O(N^2)) on GENERATED random geometric graphs: batch 4, per node count in a fresh process, one
warm-up step, then forward + backward + Adam steps timed until 5 of them or 10 s (the median counts);
peak memory as above (model build included: GWNet's N x N supports are part of its cost; the bundle's
dense adjacency is not). Before any measurement a worker runs one step of the same model on a tiny city,
so one-off library initialisation is not counted as the model's memory.
Before each point the time and the process's peak memory are extrapolated from the previous points
(log-log growth of the last two, 2 with one point); a model's sweep stops with "skipped (cap)" once
the extrapolation exceeds --time-cap seconds per step or --mem-cap MB, or leaves less than 2 GB of the
machine's available memory: a point is never allowed to run the machine out of memory. The log-log
slope of time and memory against N is fitted over all measured points and over the largest three,
where fixed per-step costs (Python, kernel launches, the allocator) weigh least (expected: ~1 for BigST;
~2 for GWNet's time, whose N x N products dominate, while its memory stays mostly O(N B T C) activations
until N x N matrices outgrow them).

The machine running this is shared: compare numbers within one run (ratios), not across runs.

    python bench/bench_models.py            # both parts; prints tables, writes bench/results/models.json
    python bench/bench_models.py --quick    # smoke run: 2 timed steps, nodes up to 2000
    python bench/bench_models.py --skip-training --device cuda --mem-cap 40000 \
        --out bench/results/models_scaling_cuda.json            # the scaling study on a GPU
"""

from __future__ import annotations

import os

# GNU OpenMP's default spin-wait makes a thread that lost its core to another process stall every parallel
# op: on a shared 2-core machine that slowed small ops 10-100x. Passive waiting costs microseconds when
# the machine is idle. It must be set before torch loads libgomp (spawned workers inherit it); an explicit
# setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from graphtune.data.loaders import read_graph, read_locations  # noqa: E402
from graphtune.data.prepare import prepare_dataset  # noqa: E402
from graphtune.data.synthetic import random_geometric_graph, synthetic_bundle  # noqa: E402
from graphtune.config import TrainConfig  # noqa: E402
from graphtune.engine import TrainStep  # noqa: E402
from graphtune.models import build_model, list_models  # noqa: E402
from graphtune.profiling import MB, ResourceMonitor, count_flops, count_parameters  # noqa: E402
from isolation import isolated  # noqa: E402  (bench/, next to this script)

ROOT = Path(__file__).resolve().parent.parent
PEMS_BAY_GRAPH = ROOT / "data" / "sample" / "pems-bay-graph"
OUT = ROOT / "bench" / "results" / "models.json"

BATCH = 64  # the DCRNN/GWNet protocol batch, what `fit` uses by default
# params.yaml's training settings, with a typical Adam rate (throughput does not depend on it)
TRAIN = TrainConfig(lrs=[1e-3])
SHAPE_STEPS = 2016  # one week at 5 min, the length of the real METR-LA sample, for the PEMS-BAY shape too
SCALING_MODELS = ("bigst", "gwnet")
SCALING_BATCH = 4  # small: GWNet's step time grows with B * N^2, so a big batch would stop its sweep early
SCALING_STEPS = 64  # series length of a scaling city: 22 training windows, enough for one batch
SCALING_NODES = (250, 500, 1000, 2000, 4000, 8000, 16000)  # doubling steps give evenly spaced log-log points
SCALING_REPEATS = 5  # timed steps per point at most ...
SCALING_TIME_S = 10.0  # ... or until this much time went into them: slow points get one
TAIL_POINTS = 3  # slopes are also fitted over the largest N only, where fixed per-step costs fade
MEMORY_MARGIN_MB = 2048  # a point must leave this much of the machine's available memory to the others


# ----------------------------------------------------------------------------- helpers
def train_step_fn(model: torch.nn.Module, bundle, device: torch.device):
    """The engine's own optimizer step (graphtune.engine.TrainStep, what `fit` runs): step(x, y) -> detached loss."""
    return TrainStep.for_config(model, bundle, TRAIN, device)


def endless_batches(loader):
    """Batches of `loader`, reshuffled epoch after epoch, forever."""
    while True:
        yield from loader


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def process_peak_mb() -> float:
    """Peak RSS of this whole process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def available_mb() -> float:
    """Memory the machine can still give (MemAvailable), or infinity where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    return math.inf


def learnable_models() -> list[str]:
    """Registered models with trainable parameters (ha and persistence have none), by building them on a tiny city."""
    tiny = synthetic_bundle(num_nodes=5, num_steps=200, seed=0)
    return [n for n in list_models() if any(p.requires_grad for p in build_model(n, tiny).parameters())]


# ----------------------------------------------------------------------------- part 1: models x shapes
def load_shape(shape: str):
    if shape == "metr-la-week":
        return prepare_dataset("metr-la-week", root=ROOT)  # REAL data
    if shape == "pems-bay-graph":
        adj, ids = read_graph(PEMS_BAY_GRAPH / "adj_mx_bay.pkl")  # REAL graph, (325, 325)
        locations = read_locations(PEMS_BAY_GRAPH / "graph_sensor_locations_bay.csv").set_index("sensor_id")
        coords = locations.loc[ids, ["latitude", "longitude"]].to_numpy(copy=True)  # (325, 2), the graph's order
        return synthetic_bundle(num_steps=SHAPE_STEPS, seed=0, adj=adj, coords=coords,
                                name="pems-bay-graph (SYNTHETIC signal)")
    raise ValueError(f"unknown shape {shape!r}")


def warm_up_libraries(name: str, device: torch.device) -> None:
    """One step of `name` on a tiny city, so that one-off lazy initialisations (autograd engine, oneDNN/MKL
    buffers, CUDA context) are paid before memory is measured rather than counted as the model's cost."""
    tiny = synthetic_bundle(num_nodes=8, num_steps=64, seed=1)
    x, y = tiny.batch(tiny.window_starts("train")[:2])
    train_step_fn(build_model(name, tiny).to(device), tiny, device)(x, y)
    gc.collect()


def measure_training(shape: str, name: str, steps: int, warmup: int, device: str) -> dict:
    """Worker: throughput and peak memory of `name` training on `shape` (runs in a fresh process)."""
    device = torch.device(device)
    bundle = load_shape(shape)
    batches = endless_batches(bundle.loader("train", batch_size=BATCH, shuffle=True, seed=0))
    warm_up_libraries(name, device)
    torch.manual_seed(0)
    with ResourceMonitor(device) as mon:
        model = build_model(name, bundle).to(device)
        step = train_step_fn(model, bundle, device)
        for _ in range(warmup):
            step(*next(batches))
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            loss = step(*next(batches))
        sync(device)
        elapsed = time.perf_counter() - start
    x, _ = bundle.batch(bundle.window_starts("train")[:BATCH])  # (64, T_in, N, 3)
    params = count_parameters(model)
    flops = count_flops(model, (x.to(device),))
    return {
        "shape": shape, "model": name, "num_nodes": bundle.num_nodes, "synthetic": bool(bundle.meta.get("synthetic")),
        "batch_size": BATCH, "steps": steps, "warmup": warmup, "time_s": elapsed,
        "ms_per_step": 1000 * elapsed / steps, "samples_per_s": steps * BATCH / elapsed,
        "peak_rss_mb": mon.peak_rss_mb, "peak_gpu_mb": mon.peak_gpu_mb,
        "params": params["total"], "flops_per_batch": flops["flops"], "final_loss": float(loss),
    }


# ----------------------------------------------------------------------------- part 2: scaling
def measure_scaling(name: str, num_nodes: int, device: str) -> dict:
    """Worker: forward + backward + Adam steps of `name` on a generated graph of `num_nodes` nodes.

    One warm-up step, then timed steps until SCALING_REPEATS of them or SCALING_TIME_S seconds (at least
    one); the time reported is their median, which a burst of load from other processes moves least.
    """
    device = torch.device(device)
    adj, coords = random_geometric_graph(num_nodes, seed=0)
    bundle = synthetic_bundle(num_steps=SCALING_STEPS, seed=0, adj=adj, coords=coords)  # SYNTHETIC
    del adj
    x, y = bundle.batch(bundle.window_starts("train")[:SCALING_BATCH])  # (4, T_in, N, 3), (4, T_out, N)
    warm_up_libraries(name, device)
    torch.manual_seed(0)
    times = []
    with ResourceMonitor(device) as mon:
        model = build_model(name, bundle).to(device)
        step = train_step_fn(model, bundle, device)
        step(x, y)  # warm-up: first-touch allocations, Adam state
        while len(times) < SCALING_REPEATS and sum(times) < SCALING_TIME_S:
            sync(device)
            start = time.perf_counter()
            step(x, y)
            sync(device)
            times.append(time.perf_counter() - start)
    return {"model": name, "num_nodes": num_nodes, "time_s": float(np.median(times)), "times_s": times,
            "peak_rss_mb": mon.peak_rss_mb, "peak_gpu_mb": mon.peak_gpu_mb, "process_peak_mb": process_peak_mb()}


def extrapolate(points: list[tuple[int, float]], n: int) -> float:
    """Value at `n` from the log-log growth of the last two (n, value) points; exponent 2 with one point."""
    (n1, v1), (n2, v2) = (points[-2], points[-1]) if len(points) > 1 else ((None, None), points[-1])
    exponent = 2.0
    if n1 is not None and v1 > 0 and v2 > 0:
        exponent = min(max(math.log(v2 / v1) / math.log(n2 / n1), 1.0), 3.0)  # clamp: noise at small N
    return v2 * (n / n2) ** exponent


def loglog_slope(rows: list[dict], key: str) -> float | None:
    pts = [(r["num_nodes"], r[key]) for r in rows if r.get(key)]
    if len(pts) < 2:
        return None
    n, v = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(n, v, 1)[0])


def scaling_sweep(name: str, sizes, device: str, time_cap_s: float, mem_cap_mb: float) -> list[dict]:
    rows, times, mems = [], [], []
    memory_key = "peak_gpu_mb" if device.startswith("cuda") else "process_peak_mb"
    for n in sizes:
        if times:
            t_next, m_next = extrapolate(times, n), extrapolate(mems, n)
            room = available_mb() - MEMORY_MARGIN_MB
            if t_next > time_cap_s or m_next > mem_cap_mb or m_next > room:
                rows.append({"model": name, "num_nodes": n, "status": "skipped (cap)",
                             "predicted_time_s": t_next, "predicted_memory_mb": m_next})
                print(f"  {name:6s} N={n:6d}  skipped (cap): predicted {t_next:.0f} s/step, {m_next:.0f} MB")
                continue
        # a step far beyond the cap means the extrapolation was wrong: give up on it rather than wait forever
        result = isolated(measure_scaling, name, n, device, timeout_s=10 * time_cap_s + 120)
        if "error" in result:
            rows.append({"model": name, "num_nodes": n, "status": "failed", "error": result["error"]})
            print(f"  {name:6s} N={n:6d}  failed: {result['error'].splitlines()[0]}")
            continue
        result["status"] = "ok"
        rows.append(result)
        times.append((n, result["time_s"]))
        mems.append((n, result[memory_key]))
        gpu = "" if result["peak_gpu_mb"] is None else f"  GPU peak {result['peak_gpu_mb']:8.1f} MB"
        print(f"  {name:6s} N={n:6d}  {result['time_s']:8.3f} s/step  step RSS peak {result['peak_rss_mb']:8.1f} MB  "
              f"process RSS peak {result['process_peak_mb']:8.1f} MB{gpu}")
    return rows


# ----------------------------------------------------------------------------- report
def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def print_training_table(rows: list[dict], shape: str, title: str) -> None:
    print(f"\n{title}")
    print("| model | params | GFLOPs / batch (fwd) | samples/s | ms / step | peak RSS MB | peak GPU MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r.get("shape") != shape:
            continue
        if "error" in r:
            print(f"| {r['model']} | failed: {r['error'].splitlines()[0]} ||||||")
            continue
        print(f"| {r['model']} | {r['params']:,} | {r['flops_per_batch'] / 1e9:.2f} | {r['samples_per_s']:.1f} | "
              f"{r['ms_per_step']:.0f} | {_fmt(r['peak_rss_mb'], '.0f')} | {_fmt(r['peak_gpu_mb'], '.0f')} |")


def print_scaling_table(rows: list[dict], sizes) -> dict:
    by = {(r["model"], r["num_nodes"]): r for r in rows}
    print(f"\nScaling: batch {SCALING_BATCH}, s per forward + backward + Adam step (median of up to {SCALING_REPEATS}), "
          "GENERATED random geometric graphs")
    header = " | ".join(f"{m} s/step | {m} peak MB" for m in SCALING_MODELS)
    print(f"| N | {header} |")
    print("|---:|" + "---:|---:|" * len(SCALING_MODELS))
    for n in sizes:
        cells = []
        for m in SCALING_MODELS:
            r = by.get((m, n))
            if r is None or r["status"] != "ok":
                status = "-" if r is None else r["status"]
                cells += [status, status]
            else:
                memory = r["peak_gpu_mb"] if r["peak_gpu_mb"] is not None else r["peak_rss_mb"]
                cells += [f"{r['time_s']:.3f}", f"{memory:.0f}"]
        print(f"| {n} | " + " | ".join(cells) + " |")
    slopes = {}
    for m in SCALING_MODELS:
        ok = [r for r in rows if r["model"] == m and r["status"] == "ok"]
        memory_key = "peak_gpu_mb" if ok and ok[0]["peak_gpu_mb"] is not None else "peak_rss_mb"
        top = ok[-TAIL_POINTS:]
        slopes[m] = {"time": loglog_slope(ok, "time_s"), "memory": loglog_slope(ok, memory_key),
                     "time_tail": loglog_slope(top, "time_s"), "memory_tail": loglog_slope(top, memory_key),
                     "points": len(ok), "tail_nodes": [r["num_nodes"] for r in top]}
        print(f"log-log slope vs N, {m}: time {_fmt(slopes[m]['time'], '.2f')}, "
              f"memory {_fmt(slopes[m]['memory'], '.2f')} (all {len(ok)} points); "
              f"time {_fmt(slopes[m]['time_tail'], '.2f')}, memory {_fmt(slopes[m]['memory_tail'], '.2f')} "
              f"(largest {len(top)}: N = {', '.join(str(r['num_nodes']) for r in top)})")
    return slopes


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 timed steps, 1 warm-up, nodes <= 2000")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per model (default 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2)")
    parser.add_argument("--models", nargs="*", default=None, help="learnable models to time (default: all)")
    parser.add_argument("--skip-training", action="store_true", help="only the scaling study")
    parser.add_argument("--skip-scaling", action="store_true", help="only the per-model table")
    parser.add_argument("--time-cap", type=float, default=60.0, help="skip scaling points predicted above this s/step")
    parser.add_argument("--mem-cap", type=float, default=8192.0, help="skip scaling points predicted above this MB")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=OUT, help="JSON output path")
    args = parser.parse_args(argv)
    steps = args.steps or (2 if args.quick else 5)  # 5 steps: > 1 s of work for the cheapest model
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)  # 2: Adam state + allocator
    sizes = [n for n in SCALING_NODES if n <= 2000] if args.quick else list(SCALING_NODES)
    names = args.models or learnable_models()

    result = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "batch_size": BATCH, "steps": steps, "warmup": warmup, "training": [], "scaling": [], "slopes": {}}
    if not args.skip_training:
        for shape in ("metr-la-week", "pems-bay-graph"):
            for name in names:
                row = isolated(measure_training, shape, name, steps, warmup, args.device, timeout_s=3600)
                row.setdefault("shape", shape)
                row.setdefault("model", name)
                result["training"].append(row)
                status = row.get("error", "").splitlines()[0] if "error" in row else f"{row['samples_per_s']:.1f} samples/s"
                print(f"  {shape:15s} {name:9s} {status}")
        device_note = f"{args.device}, {result['threads']} threads"
        print_training_table(result["training"], "metr-la-week",
                             f"metr-la-week (REAL data, 207 nodes): batch {BATCH}, {steps} timed Adam steps after "
                             f"{warmup} warm-up ({device_note})")
        print_training_table(result["training"], "pems-bay-graph",
                             f"pems-bay-graph (REAL PEMS-BAY graph, 325 nodes, SYNTHETIC signal): batch {BATCH}, "
                             f"{steps} timed Adam steps after {warmup} warm-up ({device_note})")
    if not args.skip_scaling:
        print(f"\nscaling sweep (caps: {args.time_cap:.0f} s/step, {args.mem_cap:.0f} MB)")
        for name in SCALING_MODELS:
            result["scaling"] += scaling_sweep(name, sizes, args.device, args.time_cap, args.mem_cap)
        result["slopes"] = print_scaling_table(result["scaling"], sizes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return result


if __name__ == "__main__":
    main()
