"""Our window pipeline (bundle.loader) against a re-implementation of GraphTune-lite's, on the REAL METR-LA week.

The issue: batches must come from index arithmetic on tensors already in memory (one gather per batch),
not a per-sample __getitem__ plus collate, with nothing copied per sample to build time features; aim for
at least 1.5x the reference's CPU training throughput at equal or better accuracy.

THE REFERENCE (re-implemented below, in `reference_pipeline` and `ReferenceDataset`), after GraphTune-lite
(github.com/myongsung/graphtune-lite: graphtune/utils/sequences.py, data/loaders.py, data/datasets.py):
  - every window is copied out of the series up front with a Python loop and np.stack: X (S, T_in, N) and
    Y (S, T_out, N) float32 over the whole series, then sliced per split;
  - the scaler is fitted on the concatenation of the training X and Y windows (observed = nonzero readings),
    and every split's X is z-scored into a new array; a 0/1 mask (S, T_out, N) is materialized as well;
  - a torch Dataset whose __getitem__ builds the time-of-day and day-of-week channels in numpy for each
    sample (np.repeat over the nodes, np.stack with the values) and returns tensors (x, y, mask);
  - torch DataLoader(batch_size=64, shuffle=True, default collate, num_workers=0).
  Deliberate differences, so that only the data path differs: it uses our split's windows (GraphTune-lite
  splits by window counts, so some of its windows straddle split boundaries), our bundle's time features
  (it derives them from the row index, as if the series began on a Monday at midnight), one global
  mean/std (it keeps one per node, which our models' loss does not expect), and it returns x as
  (T_in, N, 3), our models' layout, instead of (N, T_in, 3), so no transpose is charged to it.

OURS: prepare_dataset("metr-la-week") -> DatasetBundle; bundle.loader gathers each batch of windows from the
(T, N) values and (T, 2) time features with one index op (see graphtune.data.bundle).

Measured, each pipeline with the same engine-like step (forward, masked MAE in mph, backward, clip 5, Adam):
  (a) loader only: samples/s over one shuffled epoch of the training windows (median of --repeats epochs);
  (b) training: samples/s over --steps optimizer steps (more for fast models: about --min-seconds per side)
      after 2 warm-up steps per model (--models), run in
      alternating rounds so that load from other processes on the shared machine hits both pipelines alike;
  (c) accuracy: val MAE after --epochs epochs from the same initial weights and seed, for --seeds seeds
      (the two shuffles differ: torch's DataLoader draws a worker seed from its generator first), plus an
      exact check that both pipelines build the same windows for the same start indices;
  (d) memory: peak RSS above the starting level while each pipeline is built from the raw HDF5 file
      (read, windows, scaling, loaders, first batch), each in a fresh process; on the real week and on the
      full METR-LA shape (34272 x 207, GENERATED values with 8% missing, written to a temporary file);
  (e) whole implementations: GraphTune's pipeline and model against the reference data path with
      GraphTune-lite's OWN implementation of the same model (bench/reference_models.py: baseline, hypernet,
      dcrnn, bigst; built at the same widths), training throughput as in (b) and val MAE after --impl-epochs
      epochs for --impl-seeds seeds. (b) isolates the data path; (e) is what a user of either tool gets.

    python bench/bench_training.py          # prints tables, writes bench/results/training.json
"""

from __future__ import annotations

import os

# GNU OpenMP's default spin-wait makes a thread that lost its core to another process stall every parallel
# op: on a shared 2-core machine that slowed small ops 10-100x. Passive waiting costs microseconds when
# the machine is idle. It must be set before torch loads libgomp; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from graphtune.config import TrainConfig  # noqa: E402
from graphtune.data.bundle import Scaler  # noqa: E402
from graphtune.engine import TrainStep  # noqa: E402
from graphtune.data.prepare import prepare_dataset  # noqa: E402
from graphtune.metrics import MetricAccumulator  # noqa: E402
from graphtune.models import build_model, model_defaults  # noqa: E402
from graphtune.profiling import ResourceMonitor  # noqa: E402
from generated_city import METR_LA_SHAPE, NAME as GENERATED, city_entry, write_generated_city  # noqa: E402  (bench/)
from isolation import isolated  # noqa: E402
from reference_models import OURS, build_reference  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WEEK = ROOT / "data" / "sample" / "metr-la-week" / "metr-la-week.h5"
OUT = ROOT / "bench" / "results" / "training.json"

BATCH = 64  # the DCRNN/GWNet protocol, and GraphTune-lite's loaders in this comparison
TRAIN = TrainConfig(lrs=[3e-3])  # params.yaml's training settings at its pretraining rate
WARMUP = 2  # untimed steps per model and pipeline: Adam state and first-touch allocations
ROUNDS = 4  # (b) alternates ours / reference this many times
FULL_SHAPE = METR_LA_SHAPE  # the full METR-LA series, for the memory comparison at scale


# ----------------------------------------------------------------------------- THE REFERENCE (GraphTune-lite style)
def reference_windows(series: np.ndarray, t_in: int, t_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every window copied out with a Python loop: series (T, N) -> X (S, T_in, N), Y (S, T_out, N), starts (S,)."""
    xs, ys, starts = [], [], []
    for t in range(series.shape[0] - t_in - t_out + 1):
        xs.append(series[t : t + t_in])
        ys.append(series[t + t_in : t + t_in + t_out])
        starts.append(t)
    return np.stack(xs), np.stack(ys), np.array(starts, dtype=np.int64)


class ReferenceDataset(Dataset):
    """Materialized windows; the time-of-day and day-of-week channels are built in numpy for every sample."""

    def __init__(self, x_scaled, y_raw, mask, starts, time_of_day, day_of_week, t_in: int):
        self.x, self.y, self.mask, self.starts = x_scaled, y_raw, mask, starts  # (S, T_in, N), (S, T_out, N) x2, (S,)
        self.time_of_day, self.day_of_week = time_of_day, day_of_week  # (T,) each
        self.t_in = t_in
        self.num_nodes = x_scaled.shape[2]

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        start = int(self.starts[i])
        steps = np.arange(start, start + self.t_in)
        tod = np.repeat(self.time_of_day[steps].reshape(-1, 1), self.num_nodes, axis=1)  # (T_in, N)
        dow = np.repeat(self.day_of_week[steps].reshape(-1, 1), self.num_nodes, axis=1)  # (T_in, N)
        x = np.stack([self.x[i], tod, dow], axis=-1).astype(np.float32)  # (T_in, N, 3)
        return torch.from_numpy(x).float(), torch.from_numpy(self.y[i]).float(), torch.from_numpy(self.mask[i]).float()


def reference_pipeline(series: np.ndarray, time_features: np.ndarray, split_starts: dict, *, t_in: int = 12,
                       t_out: int = 12, seed: int = 0) -> dict:
    """series (T, N) float32 raw with 0 = missing, time_features (T, 2); split_starts: split -> window starts
    (contiguous). Returns {"loaders": {split: DataLoader}, "scaler": Scaler}."""
    x_all, y_all, _ = reference_windows(series, t_in, t_out)  # (S, T_in, N), (S, T_out, N)
    parts = {split: slice(int(s[0]), int(s[-1]) + 1) for split, s in split_starts.items()}  # views, like its slicing
    train = np.concatenate([x_all[parts["train"]].reshape(-1), y_all[parts["train"]].reshape(-1)])
    observed = train[train != 0]
    scaler = Scaler(mean=float(observed.mean()), std=float(observed.std()))
    loaders = {}
    for split, part in parts.items():
        x, y = x_all[part], y_all[part]
        x_scaled = ((x - scaler.mean) / scaler.std).astype(np.float32)  # a new array per split
        mask = (y != 0).astype(np.float32)  # (S, T_out, N)
        dataset = ReferenceDataset(x_scaled, y, mask, split_starts[split].numpy(), time_features[:, 0],
                                   time_features[:, 1], t_in)
        shuffle = split == "train"
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        loaders[split] = DataLoader(dataset, batch_size=BATCH, shuffle=shuffle, generator=generator, num_workers=0)
    return {"loaders": loaders, "scaler": scaler}


def reference_from_bundle(bundle, seed: int = 0) -> dict:
    null = 0.0 if bundle.null_value is None else bundle.null_value  # the reference only knows "0 = missing"
    series = torch.nan_to_num(bundle.target, nan=null).numpy()  # raw (T, N), 0 = missing as in the h5
    starts = {s: bundle.window_starts(s) for s in ("train", "val", "test")}
    return reference_pipeline(series, bundle.time_features.numpy(), starts, t_in=bundle.t_in, t_out=bundle.t_out,
                              seed=seed)


# ----------------------------------------------------------------------------- shared training step
def make_step(model: torch.nn.Module, scaler: Scaler, null_value: float):
    """The engine's own optimizer step (graphtune.engine.TrainStep, what `fit` runs), for either pipeline: it
    reads only the scaler and the null value of the data it trains on. Teacher-forcing targets go to the
    models that declare `takes_targets`, masked MAE in raw units, clip, Adam."""
    return TrainStep.for_config(model, SimpleNamespace(scaler=scaler, null_value=null_value), TRAIN, "cpu")


def xy(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of a batch of either pipeline (the reference's also carries its mask)."""
    return batch[0], batch[1]


def endless(loader):
    while True:
        for batch in loader:
            yield xy(batch)


@torch.no_grad()
def val_mae(model: torch.nn.Module, loader, scaler: Scaler, null_value: float) -> float:
    model.eval()
    acc = MetricAccumulator(null_value=null_value)
    for batch in loader:
        x, y = xy(batch)
        acc.update(scaler.inverse_transform(model(x)), y)
    return acc.compute()["mae"]


# ----------------------------------------------------------------------------- (a) loader only
def loader_throughput(loader, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        start, count = time.perf_counter(), 0
        for batch in loader:
            count += batch[0].shape[0]
        times.append(time.perf_counter() - start)
    return {"samples": count, "epoch_s": statistics.median(times), "samples_per_s": count / statistics.median(times)}


# ----------------------------------------------------------------------------- (b) training throughput
def training_throughput(bundle, ref: dict, builders: dict, steps: int, min_seconds: float) -> dict:
    """Each pipeline trains the model its builder makes (seeded alike); steps alternate in ROUNDS rounds.

    builders: {"ours": () -> model, "reference": () -> model}, the same builder twice to compare data paths only.
    At least `steps` timed steps per side, more for fast models so that each side runs about `min_seconds`
    (sized from the slower side's warm-up): a 20-step run of a 20 ms model is too short to time on a shared box.
    """
    pipelines = {"ours": (bundle.loader("train", batch_size=BATCH, shuffle=True, seed=0), bundle.scaler),
                 "reference": (ref["loaders"]["train"], ref["scaler"])}
    runs = {}
    for label, (loader, scaler) in pipelines.items():
        torch.manual_seed(0)
        model = builders[label]()
        step, batches = make_step(model, scaler, bundle.null_value), endless(loader)
        start = time.perf_counter()
        for _ in range(WARMUP):
            step(*next(batches))
        runs[label] = {"step": step, "batches": batches, "time_s": 0.0, "steps": 0,
                       "warmup_step_s": (time.perf_counter() - start) / WARMUP,
                       "params": sum(p.numel() for p in model.parameters())}
    slowest = max(run["warmup_step_s"] for run in runs.values())
    per_round = max(1, steps // ROUNDS, math.ceil(min_seconds / slowest / ROUNDS))
    for _ in range(ROUNDS):
        for run in runs.values():
            start = time.perf_counter()
            for _ in range(per_round):
                run["step"](*next(run["batches"]))  # the data time is inside: that is the point
            run["time_s"] += time.perf_counter() - start
            run["steps"] += per_round
    out = {label: {"steps": r["steps"], "time_s": r["time_s"], "samples_per_s": r["steps"] * BATCH / r["time_s"],
                   "params": r["params"]} for label, r in runs.items()}
    out["ratio"] = out["ours"]["samples_per_s"] / out["reference"]["samples_per_s"]
    return out


def same_model(bundle, name: str) -> dict:
    """Builders for the data-path comparison: GraphTune's `name` on both sides."""
    return {"ours": lambda: build_model(name, bundle), "reference": lambda: build_model(name, bundle)}


def whole_implementations(bundle, name: str) -> dict:
    """Builders for the whole-implementation comparison: GraphTune's `name` vs GraphTune-lite's."""
    kwargs = {**model_defaults(name), **OURS[name]}
    return {"ours": lambda: build_model(name, bundle, **OURS[name]),
            "reference": lambda: build_reference(name, bundle, kwargs)}


# ----------------------------------------------------------------------------- (c) accuracy
def same_windows(bundle, ref: dict, count: int = 64) -> dict:
    """Max differences between the windows both pipelines build for the same (validation) start indices."""
    starts = bundle.window_starts("val")[:count]
    ours_x, ours_y = bundle.batch(starts)
    dataset = ref["loaders"]["val"].dataset
    ref_x, ref_y, _ = torch.utils.data.default_collate([dataset[i] for i in range(count)])
    ours_raw = bundle.scaler.inverse_transform(ours_x[..., 0])
    ref_raw = ref["scaler"].inverse_transform(ref_x[..., 0])
    return {"value_mph": float((ours_raw - ref_raw).abs().max()),  # scalers differ slightly; raw values agree
            "time_features": float((ours_x[..., 1:] - ref_x[..., 1:]).abs().max()),
            "target_mph": float((torch.nan_to_num(ours_y) - ref_y).abs().max())}


def accuracy(bundle, name: str, builders: dict, epochs: int, seeds) -> dict:
    out = {"ours": [], "reference": []}
    for seed in seeds:
        ref = reference_from_bundle(bundle, seed=seed)
        pipelines = {"ours": (bundle.loader("train", batch_size=BATCH, shuffle=True, seed=seed),
                              bundle.loader("val", batch_size=BATCH), bundle.scaler),
                     "reference": (ref["loaders"]["train"], ref["loaders"]["val"], ref["scaler"])}
        for label, (train, val, scaler) in pipelines.items():
            torch.manual_seed(seed)
            model = builders[label]()
            step = make_step(model, scaler, bundle.null_value)
            for _ in range(epochs):
                for batch in train:
                    step(*xy(batch))
            out[label].append(val_mae(model, val, scaler, bundle.null_value))
    return {"model": name, "epochs": epochs, "seeds": list(seeds), **{f"val_mae_{k}": v for k, v in out.items()},
            "mean_ours": statistics.mean(out["ours"]), "mean_reference": statistics.mean(out["reference"])}


# ----------------------------------------------------------------------------- (d) memory, in fresh processes
def _build_ours(folder: str | None) -> None:
    if folder is None:
        bundle = prepare_dataset("metr-la-week", root=ROOT, use_processed=False)  # from the raw h5, like the reference
    else:
        bundle = prepare_dataset(GENERATED, root=folder, cities=city_entry(folder), use_processed=False)
    loaders = [bundle.loader(s, batch_size=BATCH, shuffle=s == "train") for s in ("train", "val", "test")]
    next(iter(loaders[0]))


def _build_reference(folder: str | None) -> None:
    path = WEEK if folder is None else Path(folder) / "series.h5"
    frame = pd.read_hdf(path)
    series = frame.to_numpy(dtype=np.float32)  # (T, N), 0 = missing
    minutes = (frame.index.hour * 60 + frame.index.minute).to_numpy()
    time_features = np.column_stack([minutes / 1440.0, frame.index.day_of_week.to_numpy()]).astype(np.float32)
    t = series.shape[0]
    train_end, val_end = round(t * 0.7), round(t * 0.8)  # our chronological split of the steps
    starts = {name: torch.arange(lo, hi - 24 + 1) for name, (lo, hi) in
              {"train": (0, train_end), "val": (train_end, val_end), "test": (val_end, t)}.items()}
    pipeline = reference_pipeline(series, time_features, starts)
    next(iter(pipeline["loaders"]["train"]))


def _memory_worker(which: str, folder: str | None) -> dict:
    import graphtune.data.loaders  # noqa: F401  (imported before measuring: both pipelines' modules are loaded)

    gc.collect()
    with ResourceMonitor("cpu") as mon:
        (_build_ours if which == "ours" else _build_reference)(folder)
    return {"peak_rss_mb": mon.peak_rss_mb, "time_s": mon.elapsed_s}


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["baseline", "hypernet", "gwnet"],
                        help="(b) models to train, the same model on both data paths")
    parser.add_argument("--steps", type=int, default=20, help="(b, e) timed optimizer steps per model and side, "
                        "at least")
    parser.add_argument("--min-seconds", type=float, default=8.0, help="(b, e) timed seconds per side, about")
    parser.add_argument("--repeats", type=int, default=3, help="(a) epochs per pipeline; the median counts")
    parser.add_argument("--accuracy-models", nargs="*", default=["baseline"], help="(c) models to compare")
    parser.add_argument("--epochs", type=int, default=5, help="(c) training epochs")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="(c) seeds")
    parser.add_argument("--impl-models", nargs="*", default=list(OURS), choices=list(OURS),
                        help="(e) models compared with GraphTune-lite's own implementation")
    parser.add_argument("--impl-epochs", type=int, default=5, help="(e) training epochs for the accuracy check")
    parser.add_argument("--impl-seeds", type=int, nargs="*", default=[0, 1, 2], help="(e) seeds")
    parser.add_argument("--skip-full-shape", action="store_true", help="(d) only the real week")
    parser.add_argument("--out", type=Path, default=OUT, help="JSON output path")
    args = parser.parse_args(argv)

    bundle = prepare_dataset("metr-la-week", root=ROOT)  # REAL data
    ref = reference_from_bundle(bundle)
    result = {"dataset": "metr-la-week", "synthetic": False, "threads": torch.get_num_threads(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "batch_size": BATCH}

    print(f"(a) loader only: one shuffled epoch of {bundle.num_windows('train')} training windows, batch {BATCH}")
    loaders = {"ours": bundle.loader("train", batch_size=BATCH, shuffle=True), "reference": ref["loaders"]["train"]}
    result["loader"] = {label: loader_throughput(loader, args.repeats) for label, loader in loaders.items()}
    result["loader"]["ratio"] = result["loader"]["ours"]["samples_per_s"] / result["loader"]["reference"]["samples_per_s"]

    result["training"] = {}
    for name in args.models:
        print(f"(b) training throughput, data paths only: {name}, >= {args.steps} steps per pipeline", flush=True)
        result["training"][name] = training_throughput(bundle, ref, same_model(bundle, name), args.steps, args.min_seconds)

    result["same_windows_max_abs_diff"] = same_windows(bundle, ref)
    result["accuracy"] = []
    for name in args.accuracy_models:
        print(f"(c) accuracy, data paths only: {name}, {args.epochs} epochs, seeds {args.seeds}", flush=True)
        result["accuracy"].append(accuracy(bundle, name, same_model(bundle, name), args.epochs, args.seeds))

    result["implementations"] = {}
    for name in args.impl_models:
        builders = whole_implementations(bundle, name)
        print(f"(e) whole implementations: {name}, >= {args.steps} steps, then {args.impl_epochs} epochs x seeds "
              f"{args.impl_seeds}", flush=True)
        run = training_throughput(bundle, ref, builders, args.steps, args.min_seconds)
        run["ours_kwargs"] = OURS[name]
        run["accuracy"] = accuracy(bundle, name, builders, args.impl_epochs, args.impl_seeds)
        result["implementations"][name] = run

    print("(d) memory of building each pipeline, fresh processes", flush=True)
    result["memory"] = {"metr-la-week": {w: isolated(_memory_worker, w, None, timeout_s=900)
                                         for w in ("ours", "reference")}}
    if not args.skip_full_shape:
        with tempfile.TemporaryDirectory() as tmp:
            write_generated_city(Path(tmp), FULL_SHAPE)
            folder = tmp
            result["memory"]["full-shape (SYNTHETIC)"] = {w: isolated(_memory_worker, w, folder, timeout_s=900)
                                                         for w in ("ours", "reference")}

    print_report(result, bundle)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result


def print_report(r: dict, bundle) -> None:
    print(f"\nOurs (bundle.loader: one gather per batch) vs GraphTune-lite style (materialized windows, per-sample "
          f"__getitem__ + collate), metr-la-week (REAL), batch {BATCH}, CPU, {r['threads']} threads\n")
    print("| measure | ours | reference | ours / reference |")
    print("|---|---:|---:|---:|")
    a = r["loader"]
    print(f"| (a) loader only, samples/s | {a['ours']['samples_per_s']:,.0f} | {a['reference']['samples_per_s']:,.0f} "
          f"| {a['ratio']:.1f}x |")
    for name, t in r["training"].items():
        print(f"| (b) training {name} (same model), samples/s ({t['ours']['steps']} steps) | {t['ours']['samples_per_s']:.1f} | "
              f"{t['reference']['samples_per_s']:.1f} | {t['ratio']:.2f}x |")
    for c in r["accuracy"]:
        ours = ", ".join(f"{v:.3f}" for v in c["val_mae_ours"])
        refs = ", ".join(f"{v:.3f}" for v in c["val_mae_reference"])
        print(f"| (c) {c['model']} val MAE after {c['epochs']} epochs, seeds {c['seeds']} (mean) | {ours} "
              f"({c['mean_ours']:.3f}) | {refs} ({c['mean_reference']:.3f}) | "
              f"{c['mean_ours'] - c['mean_reference']:+.3f} mph |")
    for shape, m in r["memory"].items():
        o, f = m["ours"], m["reference"]
        if "error" in o or "error" in f:
            print(f"| (d) build memory, {shape} | {o.get('error', '')[:60]} | {f.get('error', '')[:60]} | |")
            continue
        ratio = f["peak_rss_mb"] / o["peak_rss_mb"] if o["peak_rss_mb"] else float("inf")
        print(f"| (d) build peak RSS MB, {shape} | {o['peak_rss_mb']:.0f} | {f['peak_rss_mb']:.0f} | "
              f"reference uses {ratio:.1f}x |")
        print(f"| (d) build time s, {shape} | {o['time_s']:.2f} | {f['time_s']:.2f} | "
              f"{f['time_s'] / o['time_s']:.1f}x faster |")
    d = r["same_windows_max_abs_diff"]
    if r["implementations"]:
        print("\n(e) Whole implementations: GraphTune (bundle.loader + its model) vs GraphTune-lite (reference data "
              "path + its own model, bench/reference_models.py)\n")
        print("| model | params GraphTune / lite | samples/s GraphTune | samples/s lite | ratio | val MAE GraphTune "
              "(mean) | val MAE lite (mean) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, e in r["implementations"].items():
            c = e["accuracy"]
            ours = ", ".join(f"{v:.3f}" for v in c["val_mae_ours"])
            refs = ", ".join(f"{v:.3f}" for v in c["val_mae_reference"])
            print(f"| {name} | {e['ours']['params']:,} / {e['reference']['params']:,} | "
                  f"{e['ours']['samples_per_s']:.1f} | {e['reference']['samples_per_s']:.1f} | {e['ratio']:.2f}x | "
                  f"{ours} ({c['mean_ours']:.3f}) | {refs} ({c['mean_reference']:.3f}) |")
        print(f"(val MAE in mph after {c['epochs']} epochs, seeds {c['seeds']}; throughput over at least "
              f"{min(e['ours']['steps'] for e in r['implementations'].values())} timed steps per side)")
    print(f"\nsame windows from both pipelines (64 val windows): max |diff| value {d['value_mph']:.2e} mph, "
          f"time features {d['time_features']:.2e}, targets {d['target_mph']:.2e} mph")


if __name__ == "__main__":
    main()
