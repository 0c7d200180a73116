"""The CSV series task: dataset memory, training throughput, and the backbones against the reference on real data.

Three parts, each in its own table, all written to bench/results/series.json:

1. Memory (GENERATED values, labelled synthetic everywhere). A 31-channel case of 200 series x 20,000 steps
   (float32: 496e6 bytes = 473 MB, the tables' MB being 2**20 bytes as in graphtune.profiling) is built directly in memory as a SeriesArray (random walks plus a daily sine; writing it
   as 31 channel CSVs would be ~2.5 GB of text). In a fresh process, after the array exists, we measure the
   peak while building the dataset exactly as a run does: make_splits + fit_rule + the train / val / test
   WindowData, context 64, label rule "quantile 0.9" on channel 0. Two meters: process RSS sampled every 5 ms
   (graphtune.profiling.ResourceMonitor) and tracemalloc (numpy's buffers), both started after the array was
   built, so both are the peak ABOVE the raw array; reported as a ratio to the raw array's bytes (target: at
   most 2x, as bench_prepare_memory.py). The holdout split is the target case; group and rolling are shown
   too. What a training run allocates next (the 20,000-window normalisation sample, measured; the reference's
   flattened training matrix and materialised windows, computed from the shapes, not allocated) is listed
   beside it. CSV parsing is measured separately on one generated channel of 200 x 20,000 (read_channels:
   time and peak RSS above the level before, in a fresh process).
2. Training throughput on the same generated case (context 64, all 31 channels, classify with
   "quantile 0.9"), batch 4096: windows per second of a full training step (gather the batch from the
   WindowData, forward through the standardising SeriesModel, classify loss, backward, Adam step) after a
   few warm-up steps, per backbone (conv, ttm), with torch.set_num_threads(1) and (2), each in a fresh
   process. The gather's share is reported separately.
3. Accuracy on REAL data against the scikit-learn reference fitted on the same windows, seeds 0, 1, 2:
   the embedded METR-LA week exported with `graphtune series export --city metr-la-week` (channels speed,
   neighbour_mean, time_of_day; 207 sensors x 2016 five-minute steps), context 12, label channel 0 (speed):
   classify congestion at the next step (`--bin-rule "lt 40"`, mph) and regress the next-step speed, with
   backbones conv and ttm at their default options; and the count city (montevideo-bus: hourly boardings at
   675 stops, 80% real zeros), `--bin-rule nonzero`, context 24 (will a stop have any boarding in the next
   hour?), conv. Splits: group (whole sensors per split, shuffled by the seed), then holdout (chronological)
   for METR-LA with --holdout-seeds while the --budget-min allows. Every run is
   run_series(SeriesOptions(...), tracking=False) with defaults (batch 1024, Adam 1e-3, alpha 0.5, global
   pos_weight) and the epochs below, artifacts in a temporary folder. Reported per (city, task, split,
   backbone): mean +- sample std over seeds of F1 at best_tau (tau chosen on validation; also ROC / PR AUC)
   or RMSE (also MAE, R2), the reference's on the same test windows, and on how many seeds the backbone beat
   the reference (F1 higher; RMSE lower).

The numbers are measured on whatever machine runs this; on a shared 2-core machine timings move with the other
load (the JSON records the load average at start and end). OMP_WAIT_POLICY=PASSIVE is set (as in the other
benchmarks): with OpenMP's default active wait, 2 threads on 2 busy cores ran a conv epoch ~9x slower.

    python bench/bench_series.py                  # full run (~30 min on 2 CPU cores): bench/results/series.json
    python bench/bench_series.py --quick          # smoke run: 1 seed, 1 epoch, smaller generated case
    python bench/bench_series.py --skip-memory --skip-throughput --seeds 0 --out /tmp/series.json

Only the full default run writes bench/results/series.json; a quick or partial run prints its tables and
writes JSON only where --out says.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_accuracy.py: shared 2-core machines

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from graphtune.profiling import MB, ResourceMonitor  # noqa: E402
from graphtune.series.data import (  # noqa: E402
    CHANNEL_FILES,
    LabelRule,
    SeriesArray,
    WindowData,
    WindowSpec,
    fit_rule,
    make_splits,
    read_channels,
)
from isolation import isolated  # noqa: E402  (bench/, next to this script)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "series.json"
SPLITS = ("train", "val", "test")

GEN_SHAPE = (200, 31, 20_000)  # series, channels, steps: float32 496 MB (GENERATED values)
GEN_CONTEXT = 64
GEN_RULE = "quantile 0.9"
CSV_SHAPE = (200, 20_000)  # one generated channel, parsed from CSV
TARGET_EXTRA = 2.0  # the target: peak above the raw array <= 2x the raw array
BATCH = 4096
BACKBONES = ("conv", "ttm")
SEEDS = (0, 1, 2)
EPOCHS = {"conv": 3, "ttm": 3}  # measured: one METR-LA run ~45 s (conv) / ~100 s (ttm) on 2 busy cores
COUNT_EPOCHS = 3  # montevideo-bus, conv: ~80 s a run
NORM_SAMPLE = 20_000  # graphtune.series.commands.NORM_SAMPLE
REFERENCE_MAX_TRAIN = 200_000  # graphtune.series.reference.Reference.max_train

METR = {"city": "metr-la-week", "context_len": 12}
COUNT = {"city": "montevideo-bus", "context_len": 24, "bin_rule": "nonzero"}
CLASSIFY_KEYS = ("f1_at_best_tau", "roc_auc", "pr_auc", "best_tau", "f1", "precision_at_best_tau",
                 "recall_at_best_tau", "n", "positives")
REGRESS_KEYS = ("rmse", "mae", "r2", "n")


# ============================================================================ generated data (synthetic)
def generated_array(n: int, c: int, t: int, seed: int = 0) -> SeriesArray:
    """A SYNTHETIC SeriesArray (n, c, t) float32, filled in place (no temporary of the whole size): per series
    and channel a Gaussian random walk (step 0.05) plus a daily sine (288 steps a day) of amplitude 1..5."""
    values = np.empty((n, c, t), dtype=np.float32)
    rng = np.random.default_rng(seed)
    daily = np.sin(2 * np.pi * np.arange(t, dtype=np.float64) / 288).astype(np.float32)
    for i in range(n):
        block = values[i]
        rng.standard_normal(out=block, dtype=np.float32)
        np.cumsum(block, axis=1, out=block)
        block *= np.float32(0.05)
        block += daily * np.float32(1 + i % 5)
    return SeriesArray(values=values, files=[f"generated_ch{k:02d}.csv" for k in range(c)],
                       series_ids=[f"s{i}" for i in range(n)], timestamps=None)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MB


# ============================================================================ 1. memory
def measure_memory(shape: tuple, context_len: int, split: str, rule_text: str, seed: int) -> dict:
    """Peak above the raw array while building the dataset (make_splits + fit_rule + 3 WindowData), in a fresh
    process; then what a training run allocates next. Runs in an isolated child."""
    n, c, t = shape
    began = time.perf_counter()
    array = generated_array(n, c, t, seed)
    generate_s = time.perf_counter() - began
    raw = array.values.nbytes
    spec = WindowSpec(context_len)
    rule = LabelRule.parse(rule_text)
    gc.collect()
    rss_before = _rss_mb()
    tracemalloc.start()
    with ResourceMonitor("cpu", interval_s=0.005) as mon:
        folds = make_splits(array, spec, split, seed=seed)
        for fold in folds:  # a rolling run builds its folds' data one after the other
            data = None
            fitted = fit_rule(rule, array, spec, fold.train)
            data = {s: WindowData(array, spec, getattr(fold, s), fitted) for s in SPLITS}
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    gc.collect()
    retained_mb = _rss_mb() - rss_before
    index_bytes = sum(getattr(f, s).series.nbytes + getattr(f, s).start.nbytes for f in folds for s in SPLITS)
    windows = {s: len(data[s]) for s in SPLITS}
    # what a training run allocates next: the normalisation sample (measured), the reference's training matrix
    # and materialised windows (computed from the shapes; not allocated)
    from graphtune.series.commands import _statistics

    with ResourceMonitor("cpu", interval_s=0.005) as stats_mon:
        _statistics(data["train"], "classify", seed)
    features = c * context_len
    ref_rows = min(REFERENCE_MAX_TRAIN, windows["train"])
    all_windows = sum(windows.values())
    return {
        "synthetic": True, "shape": list(shape), "split": split, "folds": len(folds), "context_len": context_len,
        "rule": fitted.text, "rule_threshold": fitted.threshold, "raw_mb": raw / MB, "generate_s": generate_s,
        "windows": windows, "build_s": mon.elapsed_s,
        "peak_rss_extra_mb": mon.peak_rss_mb, "peak_rss_extra_over_raw": mon.peak_rss_mb * MB / raw,
        "peak_traced_extra_mb": traced_peak / MB, "peak_traced_extra_over_raw": traced_peak / raw,
        "retained_rss_extra_mb": retained_mb, "index_mb": index_bytes / MB,
        "target_extra_over_raw": TARGET_EXTRA,
        "meets_target": max(mon.peak_rss_mb * MB, traced_peak) / raw <= TARGET_EXTRA,
        "run_extras": {
            "statistics_sample_peak_rss_mb": stats_mon.peak_rss_mb,
            "statistics_sample_over_raw": stats_mon.peak_rss_mb * MB / raw,
            "statistics_windows": min(NORM_SAMPLE, windows["train"]),
            "batch_4096_mb_computed": BATCH * features * 4 / MB,
            "reference_train_rows": ref_rows, "reference_features": features,
            "reference_matrix_mb_computed": ref_rows * features * (4 + 8) / MB,
            "reference_matrix_note": "computed, not allocated: the float32 gather plus the float64 copy "
                                     "Reference._features makes (scikit-learn's scaling copies come on top)",
            "materialised_windows_mb_computed": all_windows * features * 4 / MB,
            "materialised_windows_over_raw": all_windows * features * 4 / raw,
        },
    }


def write_channel_csv(path: Path, n: int, t: int, seed: int = 1) -> float:
    """One SYNTHETIC channel as a CSV like export_city's (header "sensor_id" + step names, an id per row); MB."""
    rng = np.random.default_rng(seed)
    daily = np.sin(2 * np.pi * np.arange(t) / 288)
    with open(path, "w", newline="") as f:
        f.write(",".join(["sensor_id", *(f"t{j}" for j in range(t))]) + "\n")
        for i in range(n):
            row = (np.cumsum(rng.standard_normal(t)) * 0.05 + daily * (1 + i % 5)).astype(np.float32)
            f.write(f"s{i}," + ",".join(row.astype(str).tolist()) + "\n")
    return path.stat().st_size / MB


def measure_csv(path: str, n: int, t: int) -> dict:
    """read_channels of one channel CSV in a fresh process: time and peak RSS above the level before."""
    gc.collect()
    with ResourceMonitor("cpu", interval_s=0.005) as mon:
        array = read_channels([path])
    raw = array.values.nbytes
    assert array.values.shape == (n, 1, t), array.values.shape
    return {"synthetic": True, "shape": [n, 1, t], "file_mb": Path(path).stat().st_size / MB, "array_mb": raw / MB,
            "read_s": mon.elapsed_s, "cells_per_s": n * t / mon.elapsed_s, "peak_rss_extra_mb": mon.peak_rss_mb,
            "peak_rss_extra_over_array": mon.peak_rss_mb * MB / raw}


# ============================================================================ 2. throughput
def measure_throughput(shape: tuple, context_len: int, rule_text: str, backbones: list, threads: int, batch: int,
                       warmup: int, steps: int, seed: int) -> dict:
    """Windows per second of full training steps per backbone, torch.set_num_threads(threads); isolated child."""
    from graphtune.series.commands import SeriesModel, _statistics
    from graphtune.series.losses import classify_loss, global_pos_weight
    from graphtune.series.models import build_backbone

    torch.set_num_threads(threads)
    n, c, t = shape
    array = generated_array(n, c, t, seed)
    spec = WindowSpec(context_len)
    fold = make_splits(array, spec, "holdout")[0]
    rule = fit_rule(LabelRule.parse(rule_text), array, spec, fold.train)
    train = WindowData(array, spec, fold.train, rule)
    pw = float(global_pos_weight(train.labels()))
    x_mean, x_std, _, _ = _statistics(train, "classify", seed)
    rows = []
    for name in backbones:
        torch.manual_seed(seed)
        model = SeriesModel(build_backbone(name, channels=c, context_len=context_len, task="classify"), c,
                            "classify")
        with torch.no_grad():
            model.x_mean.copy_(x_mean)
            model.x_std.copy_(x_std)
        model.train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        gather, step, losses = [], [], []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            x, y = train.batch(order[i * batch:(i + 1) * batch])
            t1 = time.perf_counter()
            loss = classify_loss(model(x), y, alpha=0.5, pos_weight=pw)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            t2 = time.perf_counter()
            losses.append(float(loss.detach()))
            if i >= warmup:
                gather.append(t1 - t0)
                step.append(t2 - t1)
        total = sum(gather) + sum(step)
        rows.append({"backbone": name, "threads": threads, "batch": batch, "warmup_steps": warmup,
                     "timed_steps": steps, "params": sum(p.numel() for p in model.parameters()),
                     "samples_per_s": batch * steps / total, "model_samples_per_s": batch * steps / sum(step),
                     "gather_share": sum(gather) / total, "step_s_median": statistics.median(
                         [g + s for g, s in zip(gather, step)]), "losses": losses})
    return {"synthetic": True, "shape": list(shape), "context_len": context_len, "rule": rule.text,
            "threads": threads, "train_windows": len(train), "pos_weight": pw, "rows": rows}


# ============================================================================ 3. real data vs the reference
def export(city: str, out: Path) -> list[str]:
    """`graphtune series export --city CITY --out OUT` (the CLI next to this Python), from the project root."""
    cli = Path(sys.executable).parent / "graphtune"
    cmd = [str(cli), "series", "export", "--city", city, "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return [str(out / name) for name in CHANNEL_FILES]


def run_one(files: list[str], *, city: str, task: str, bin_rule: str | None, context_len: int, split: str,
            backbone: str, seed: int, epochs: int, artifacts: Path) -> dict:
    from graphtune.series.commands import SeriesOptions, run_series

    log: list[str] = []
    opts = SeriesOptions(files=files, task=task, bin_rule=bin_rule, context_len=context_len, split=split,
                         backbone=backbone, seed=seed, epochs=epochs, artifacts_dir=str(artifacts))
    began = time.perf_counter()
    folder = run_series(opts, echo=log.append, tracking=False)
    wall = time.perf_counter() - began
    result = json.loads((folder / ("metrics.json" if task == "classify" else "summary.json")).read_text())
    keys = CLASSIFY_KEYS if task == "classify" else REGRESS_KEYS
    out = {"city": city, "task": task, "bin_rule": bin_rule, "context_len": context_len, "split": split,
           "backbone": backbone, "seed": seed, "epochs": epochs, "best_epoch": result["best_epoch"],
           "wall_s": wall, "train_s": sum(e["epoch_s"] for e in result["epochs"]),
           "history": [{k: e[k] for k in ("epoch", "train_loss", "val_loss", "epoch_s")} for e in result["epochs"]],
           "metrics": {k: result["metrics"][k] for k in keys if k in result["metrics"]},
           "reference": {k: result["reference"][k] for k in keys if k in result.get("reference", {})},
           "pos_weight": result.get("pos_weight"), "rule": result.get("rule"), "log": log[0] if log else ""}
    shutil.rmtree(folder, ignore_errors=True)
    return out


def _primary(task: str) -> tuple[str, bool]:
    """The metric a win is decided on, and whether higher is better."""
    return ("f1_at_best_tau", True) if task == "classify" else ("rmse", False)


def summarise(runs: list[dict]) -> list[dict]:
    """Per (city, task, split, backbone): mean / std over seeds of backbone and reference metrics, wins."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["city"], r["task"], r["split"], r["backbone"]), []).append(r)
    rows = []
    for (city, task, split, backbone), rs in groups.items():
        key, higher = _primary(task)
        keys = ("f1_at_best_tau", "roc_auc", "pr_auc") if task == "classify" else ("rmse", "mae", "r2")
        row = {"city": city, "task": task, "split": split, "backbone": backbone, "seeds": [r["seed"] for r in rs],
               "bin_rule": rs[0]["bin_rule"], "context_len": rs[0]["context_len"], "epochs": rs[0]["epochs"],
               "wall_s_mean": statistics.fmean(r["wall_s"] for r in rs),
               "best_epochs": [r["best_epoch"] for r in rs]}
        for group in ("metrics", "reference"):
            for k in keys:
                vals = [float(r[group][k]) for r in rs]
                row[f"{group}_{k}_mean"] = statistics.fmean(vals)
                row[f"{group}_{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else math.nan
        wins = [(r["metrics"][key] > r["reference"][key]) if higher else (r["metrics"][key] < r["reference"][key])
                for r in rs]
        row["primary"] = key
        row["wins"] = int(sum(wins))
        row["n"] = len(rs)
        rows.append(row)
    return rows


def _ms(row: dict, name: str) -> str:
    mean, std = row[f"{name}_mean"], row[f"{name}_std"]
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    align = align or "l" * len(headers)
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def classify_table(summary: list[dict]) -> str:
    rows = [[r["city"], r["bin_rule"], r["context_len"], r["split"], r["backbone"], r["n"], r["epochs"],
             _ms(r, "metrics_f1_at_best_tau"), _ms(r, "reference_f1_at_best_tau"), f"{r['wins']}/{r['n']}",
             _ms(r, "metrics_roc_auc"), _ms(r, "reference_roc_auc"), _ms(r, "metrics_pr_auc"),
             _ms(r, "reference_pr_auc"), f"{r['wall_s_mean']:.0f}"]
            for r in summary if r["task"] == "classify"]
    return table(["city", "rule", "ctx", "split", "backbone", "seeds", "epochs", "F1 @ best_tau", "reference",
                  "beats ref", "ROC AUC", "reference", "PR AUC", "reference", "s / run"], rows,
                 "lllllrrrrrrrrrr")


def regress_table(summary: list[dict]) -> str:
    rows = [[r["city"], r["context_len"], r["split"], r["backbone"], r["n"], r["epochs"], _ms(r, "metrics_rmse"),
             _ms(r, "reference_rmse"), f"{r['wins']}/{r['n']}", _ms(r, "metrics_mae"), _ms(r, "reference_mae"),
             _ms(r, "metrics_r2"), _ms(r, "reference_r2"), f"{r['wall_s_mean']:.0f}"]
            for r in summary if r["task"] == "regress"]
    return table(["city", "ctx", "split", "backbone", "seeds", "epochs", "RMSE", "reference", "beats ref", "MAE",
                  "reference", "R2", "reference", "s / run"], rows, "llllrrrrrrrrrr")


def runs_table(runs: list[dict]) -> str:
    rows = []
    for r in runs:
        key, _ = _primary(r["task"])
        rows.append([r["city"], r["task"], r["split"], r["backbone"], r["seed"], f"{r['best_epoch']}/{r['epochs']}",
                     key, f"{r['metrics'][key]:.4f}", f"{r['reference'][key]:.4f}", f"{r['wall_s']:.0f}"])
    return table(["city", "task", "split", "backbone", "seed", "best/epochs", "metric", "backbone", "reference",
                  "s"], rows, "llllrrlrrr")


# ============================================================================ main
def _finite(value):
    """NaN / infinity -> None, so the JSON is strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 epoch, 50 generated series")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-csv", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-real", action="store_true", help="skip METR-LA and montevideo-bus")
    parser.add_argument("--skip-count", action="store_true", help="skip montevideo-bus")
    parser.add_argument("--skip-holdout", action="store_true")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--holdout-seeds", nargs="+", type=int, default=[0],
                        help="seeds of the METR-LA holdout runs (run last, only while --budget-min allows)")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--epochs-conv", type=int, default=None)
    parser.add_argument("--epochs-ttm", type=int, default=None)
    parser.add_argument("--epochs-count", type=int, default=None)
    parser.add_argument("--memory-splits", nargs="+", default=["holdout", "group", "rolling"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch threads of the throughput")
    parser.add_argument("--steps", type=int, default=None, help="timed throughput steps (default 5; quick 2)")
    parser.add_argument("--budget-min", type=float, default=35.0,
                        help="wall-time budget: the holdout runs are skipped when they would exceed it")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON file (default: {OUT.relative_to(ROOT)} for the full run; none otherwise)")
    args = parser.parse_args()
    partial = args.quick or any((args.skip_memory, args.skip_csv, args.skip_throughput, args.skip_real,
                                 args.skip_count, args.skip_holdout, args.seeds is not None))
    out_path = args.out or (None if partial else OUT)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else list(SEEDS))
    epochs = {"conv": args.epochs_conv or (1 if args.quick else EPOCHS["conv"]),
              "ttm": args.epochs_ttm or (1 if args.quick else EPOCHS["ttm"])}
    count_epochs = args.epochs_count or (1 if args.quick else COUNT_EPOCHS)
    gen_shape = (50, GEN_SHAPE[1], GEN_SHAPE[2]) if args.quick else GEN_SHAPE
    csv_shape = (50, CSV_SHAPE[1]) if args.quick else CSV_SHAPE
    warmup, steps = (1, args.steps or 2) if args.quick else (2, args.steps or 5)
    threads_main = max(1, min(2, os.cpu_count() or 1))
    torch.set_num_threads(threads_main)

    began = time.perf_counter()
    report: dict = {
        "config": {"quick": args.quick, "generated_shape": list(gen_shape), "generated_context_len": GEN_CONTEXT,
                   "generated_rule": GEN_RULE, "csv_shape": list(csv_shape), "batch": BATCH, "seeds": seeds,
                   "holdout_seeds": args.holdout_seeds, "backbones": args.backbones, "epochs": epochs,
                   "count_epochs": count_epochs, "throughput_warmup": warmup, "throughput_steps": steps,
                   "budget_min": args.budget_min, "metr": METR, "count": COUNT,
                   "run_defaults": "SeriesOptions defaults: batch 1024, Adam lr 1e-3, alpha 0.5, pos_weight global, "
                                   "backbone options default, tracking off",
                   "target_extra_over_raw": TARGET_EXTRA},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": threads_main, "torch": torch.__version__,
                    "python": platform.python_version(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                    "loadavg_start": list(os.getloadavg()),
                    "note": "shared machine: other jobs (e.g. bench_compression.py) may run meanwhile; timings are "
                            "as measured under that load"},
        "tables": {}, "skipped": [],
    }
    tables = report["tables"]

    def show(name: str, title: str, text: str) -> None:
        tables[name] = text
        print(f"\n{title}\n{text}", flush=True)

    # ---- 1. memory
    if not args.skip_memory:
        rows = []
        for split in args.memory_splits:
            r = isolated(measure_memory, gen_shape, GEN_CONTEXT, split, GEN_RULE, 0, timeout_s=1200)
            rows.append(r)
            print(f"memory {split}: {r.get('error') or round(r['peak_rss_extra_over_raw'], 3)}", flush=True)
        report["memory"] = rows
        ok = [r for r in rows if "error" not in r]
        show("memory", f"Dataset memory, SYNTHETIC {gen_shape[0]} series x {gen_shape[1]} channels x {gen_shape[2]} "
             f"steps (float32 {gen_shape[0] * gen_shape[1] * gen_shape[2] * 4 / MB:.0f} MB), context {GEN_CONTEXT}: "
             f"peak above the raw array while building make_splits + fit_rule + 3 WindowData",
             table(["split", "windows (train/val/test)", "build s", "peak RSS extra MB", "x raw",
                    "peak traced extra MB", "x raw", "retained MB", "target", "materialised windows x raw"],
                   [[r["split"] + (f" ({r['folds']} folds)" if r["folds"] > 1 else ""),
                     "/".join(str(r["windows"][s]) for s in SPLITS), f"{r['build_s']:.2f}",
                     f"{r['peak_rss_extra_mb']:.1f}", f"{r['peak_rss_extra_over_raw']:.3f}",
                     f"{r['peak_traced_extra_mb']:.1f}", f"{r['peak_traced_extra_over_raw']:.3f}",
                     f"{r['retained_rss_extra_mb']:.1f}", "met" if r["meets_target"] else "MISSED",
                     f"{r['run_extras']['materialised_windows_over_raw']:.0f}"] for r in ok],
                   "llrrrrrrlr"))
        if ok:
            e = ok[0]["run_extras"]
            show("memory_run_extras", "What a training run allocates next (same case, first split above)",
                 table(["item", "MB", "x raw", "how"],
                       [[f"normalisation sample ({e['statistics_windows']} windows)",
                         f"{e['statistics_sample_peak_rss_mb']:.1f}", f"{e['statistics_sample_over_raw']:.3f}",
                         "measured (peak RSS)"],
                        [f"one batch of {BATCH}", f"{e['batch_4096_mb_computed']:.1f}",
                         f"{e['batch_4096_mb_computed'] / ok[0]['raw_mb']:.3f}", "computed"],
                        [f"reference training matrix ({e['reference_train_rows']} x {e['reference_features']})",
                         f"{e['reference_matrix_mb_computed']:.0f}",
                         f"{e['reference_matrix_mb_computed'] / ok[0]['raw_mb']:.2f}", "computed (float32 + float64)"]],
                       "lrrl"))
    else:
        report["skipped"].append("memory")

    if not args.skip_csv:
        with tempfile.TemporaryDirectory(prefix="bench_series_csv_") as tmp:
            path = Path(tmp) / "generated_channel.csv"
            t0 = time.perf_counter()
            write_channel_csv(path, *csv_shape)
            write_s = time.perf_counter() - t0
            r = isolated(measure_csv, str(path), *csv_shape, timeout_s=1200)
        r["write_s"] = write_s
        report["csv"] = r
        if "error" in r:
            print(f"csv: {r['error']}")
        else:
            show("csv", f"CSV parsing, one SYNTHETIC channel {csv_shape[0]} x {csv_shape[1]} (read_channels)",
                 table(["file MB", "array MB", "read s", "cells / s", "peak RSS extra MB", "x array"],
                       [[f"{r['file_mb']:.1f}", f"{r['array_mb']:.1f}", f"{r['read_s']:.2f}",
                         f"{r['cells_per_s']:.3g}", f"{r['peak_rss_extra_mb']:.1f}",
                         f"{r['peak_rss_extra_over_array']:.1f}"]], "rrrrrr"))
    else:
        report["skipped"].append("csv")

    # ---- 2. throughput
    if not args.skip_throughput:
        results = []
        for threads in args.threads:
            r = isolated(measure_throughput, gen_shape, GEN_CONTEXT, GEN_RULE, args.backbones, threads, BATCH,
                         warmup, steps, 0, timeout_s=1800)
            results.append(r)
            if "error" in r:
                print(f"throughput, {threads} threads: {r['error']}", flush=True)
        report["throughput"] = results
        rows = [row for r in results if "error" not in r for row in r["rows"]]
        show("throughput", f"Training throughput, SYNTHETIC {gen_shape[1]} channels, context {GEN_CONTEXT}, batch "
             f"{BATCH} (gather + forward + backward + Adam; {warmup} warm-up + {steps} timed steps)",
             table(["backbone", "params", "torch threads", "windows / s", "model only windows / s", "gather share",
                    "s / step (median)"],
                   [[r["backbone"], r["params"], r["threads"], f"{r['samples_per_s']:.0f}",
                     f"{r['model_samples_per_s']:.0f}", f"{r['gather_share']:.0%}", f"{r['step_s_median']:.2f}"]
                    for r in sorted(rows, key=lambda r: (r["backbone"], r["threads"]))], "lrrrrrr"))
    else:
        report["skipped"].append("throughput")

    # ---- 3. real data
    runs: list[dict] = []
    report["runs"] = runs

    def record(r: dict) -> None:
        runs.append(r)
        key, _ = _primary(r["task"])
        print(f"{r['city']:14s} {r['task']:8s} {r['split']:7s} {r['backbone']:4s} seed {r['seed']}: {key} "
              f"{r['metrics'][key]:.4f} (reference {r['reference'][key]:.4f}), best epoch {r['best_epoch']}/"
              f"{r['epochs']}, {r['wall_s']:.0f} s", flush=True)

    if not args.skip_real:
        with tempfile.TemporaryDirectory(prefix="bench_series_") as tmp:
            work = Path(tmp)
            metr = export(METR["city"], work / "metr")
            report["config"]["export"] = f"graphtune series export --city {METR['city']} --out <tmp>/metr"
            tasks = [("classify", "lt 40"), ("regress", None)]
            for split, split_seeds in (("group", seeds), ("holdout", args.holdout_seeds)):
                if split == "holdout":
                    if args.skip_holdout or args.quick:
                        report["skipped"].append("holdout")
                        break
                    done = [r for r in runs if r["split"] == "group"]
                    estimate = statistics.fmean(r["wall_s"] for r in done) * len(tasks) * len(args.backbones) * \
                        len(split_seeds) if done else 0.0
                    spent = time.perf_counter() - began
                    if spent + estimate > args.budget_min * 60:
                        report["skipped"].append(f"holdout (time: {spent / 60:.1f} min spent, ~{estimate / 60:.1f} "
                                                 f"min more needed, budget {args.budget_min:g} min)")
                        print(f"holdout skipped: {report['skipped'][-1]}")
                        break
                for task, rule in tasks:
                    for backbone in args.backbones:
                        for seed in split_seeds:
                            record(run_one(metr, city=METR["city"], task=task, bin_rule=rule,
                                           context_len=METR["context_len"], split=split, backbone=backbone, seed=seed,
                                           epochs=epochs[backbone], artifacts=work / "artifacts"))
                if split == "group" and not args.skip_count:  # the count city before the optional holdout
                    count = export(COUNT["city"], work / "count")
                    for seed in seeds:
                        record(run_one(count, city=COUNT["city"], task="classify", bin_rule=COUNT["bin_rule"],
                                       context_len=COUNT["context_len"], split="group", backbone="conv", seed=seed,
                                       epochs=count_epochs, artifacts=work / "artifacts"))
                elif split == "group":
                    report["skipped"].append("count city")
        summary = summarise(runs)
        report["summary"] = summary
        # the reference is fitted on the same windows whatever the backbone: same seed and split, same numbers
        same = {}
        for r in runs:
            same.setdefault((r["city"], r["task"], r["split"], r["seed"]), set()).add(
                json.dumps(r["reference"], sort_keys=True))
        report["reference_identical_across_backbones"] = all(len(v) == 1 for v in same.values())
        show("runs", "Every run (REAL data; test split)", runs_table(runs))
        show("classify", "Classify on REAL data, test split: backbone vs the scikit-learn reference on the same "
             "windows (mean ± sample std over seeds)", classify_table(summary))
        show("regress", "Regress the next-step speed on REAL METR-LA (mph), test split (mean ± sample std over seeds)",
             regress_table(summary))
    else:
        report["skipped"].append("real data")

    report["machine"]["loadavg_end"] = list(os.getloadavg())
    report["wall_s"] = time.perf_counter() - began
    print(f"\nwall time {report['wall_s'] / 60:.1f} min")
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(_finite(report), indent=1, default=str) + "\n")
        print(f"written {out_path}")
    else:
        print("not written (a quick or partial run; pass --out to keep it)")


if __name__ == "__main__":
    main()
