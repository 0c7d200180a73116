"""Peak training memory of Graph WaveNet on METR-LA's real graph under the memory options of `train:`.

The issue: activation checkpointing should cut gwnet's peak training memory by at least 30% at batch 64 on
the METR-LA shape. Measured on the REAL METR-LA week sample (207 sensors, METR-LA's own graph), gwnet at its
default widths, batch 64, the engine's own TrainStep (what `fit` runs) with the training options:

  plain      grad_accum 1, activation_checkpointing false
  ckpt       grad_accum 1, activation_checkpointing true
  accum4     grad_accum 4 (4 micro-batches of 16), checkpointing false
  both       grad_accum 4, checkpointing true

Each plan runs in a FRESH process (bench/isolation.py), side by side in one run, from the same seeded
weights, on the same first training batches (seeded shuffle), with the same dropout seed. Memory, two ways:

  - peak RSS growth: ru_maxrss after the steps minus the RSS before the first one (data, model and the
    batches already loaded), so what the training steps themselves added to the process, allocator caching
    and all: what a CPU run costs. Measured twice per plan, under glibc malloc's defaults and with
    MALLOC_MMAP_THRESHOLD_=131072 (fixed, so every block of 128 KiB or more is mapped on allocation and
    returned to the system when freed). By default glibc raises that threshold each time a mapped block
    is freed, up to 32 MiB, so activation-sized blocks soon come from the heap, and the heap keeps what
    is freed in its middle: the RSS then stays near the high-water of everything a step ever allocated
    in whatever order, and a smaller live peak (checkpointing) shows much less than it saves.
  - tensor peak: graphtune.memory.measure_step_mb, the planner's deterministic measure (the peak of the
    tensor bytes the CPU allocator reports to torch.profiler during one step, plus parameters and batch).

The first steps' losses are shown for every plan. Checkpointing replays every operation and random draw,
so its losses equal the plain ones exactly; accumulation does not: GWNet's BatchNorm normalises each
micro-batch with its own statistics and dropout draws its masks per micro-batch, so accum4's first loss
differs from plain's by that (not by the loss weighting, which tests/test_memory.py checks to 1e-5 on
models without batch statistics).

Then CPU bfloat16 autocast (train.amp on) against float32 (off): the median time of a training step and the
validation MAE after the same short fit (--amp-epochs epochs of --amp-steps steps, seed 0) of each.

    python bench/bench_memory.py          # prints tables, writes bench/results/memory.json
"""

from __future__ import annotations

import os

# as bench_training.py: GNU OpenMP's spin-wait stalls a thread that lost its core on a shared 2-core machine
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from graphtune.config import TrainConfig  # noqa: E402
from graphtune.data.prepare import prepare_dataset  # noqa: E402
from graphtune.engine import TrainStep, fit  # noqa: E402
from graphtune.memory import measure_step_mb  # noqa: E402
from graphtune.models.registry import build_model, model_defaults  # noqa: E402
from isolation import isolated  # noqa: E402  (bench/, next to this script)

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results" / "memory.json"
MB = 2**20
CITY, MODEL, BATCH = "metr-la-week", "gwnet", 64
TARGET_CUT = 0.30  # the issue: checkpointing cuts the peak training memory by at least 30% at batch 64
PLANS = {"plain": (1, False), "ckpt": (1, True), "accum4": (4, False), "both": (4, True)}
MALLOC = {"default": None, "mmap128k": "131072"}  # glibc's MALLOC_MMAP_THRESHOLD_ in the plan's process
LR = 0.001  # params.yaml's fine-tuning learning rate


def rss_mb() -> float:
    """Resident set size of this process now (Linux /proc/self/statm, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def max_rss_mb() -> float:
    """Peak RSS of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def measure_plan(grad_accum: int, checkpointing: bool, steps: int) -> dict:
    """Worker (fresh process): `steps` training steps of one plan; RSS growth, tensor peak, losses, step times."""
    bundle = prepare_dataset(CITY, root=ROOT, use_processed=False)  # REAL data
    torch.manual_seed(0)
    model = build_model(MODEL, bundle)
    model.after_transfer()  # fine-tuning: a no-op for gwnet (a step's memory does not depend on the weights' origin)
    train = TrainConfig(batch_size=BATCH, lrs=[LR], grad_accum=grad_accum, activation_checkpointing=checkpointing)
    step = TrainStep.for_config(model, bundle, train, "cpu")
    loader = iter(bundle.loader("train", batch_size=BATCH, shuffle=True, seed=0))
    batches = [next(loader) for _ in range(steps)]  # loaded before the baseline: the steps' memory alone
    gc.collect()
    rss_before, max_before = rss_mb(), max_rss_mb()
    torch.manual_seed(0)  # the same dropout draws for every plan
    losses, times = [], []
    for x, y in batches:
        start = time.perf_counter()
        losses.append(float(step(x, y)))
        times.append(time.perf_counter() - start)
    max_after = max_rss_mb()
    tensor_mb = measure_step_mb(model, bundle, train, "cpu")  # after the RSS reading: the profiler allocates too
    return {"grad_accum": grad_accum, "micro_batch": BATCH // grad_accum, "checkpointing": checkpointing,
            "rss_before_mb": rss_before, "max_rss_before_mb": max_before, "max_rss_after_mb": max_after,
            "rss_growth_mb": max_after - rss_before, "setup_peak_hides_steps": max_after <= max_before,
            "tensor_peak_mb": tensor_mb, "first_losses": losses, "step_times_s": times,
            "median_step_s": statistics.median(times[1:] or times)}  # the first step also creates Adam's state


def measure_amp(amp: str, epochs: int, steps_per_epoch: int) -> dict:
    """Worker (fresh process): a short fit with train.amp = `amp`; step time and validation MAE."""
    bundle = prepare_dataset(CITY, root=ROOT, use_processed=False)
    torch.manual_seed(0)
    model = build_model(MODEL, bundle)
    train = TrainConfig(epochs=[epochs], lrs=[0.003], batch_size=BATCH, amp=amp)
    result = fit(model, bundle, train, seed=0, max_steps_per_epoch=steps_per_epoch)
    return {"amp": amp, "steps": result.steps, "ms_per_step": 1000 * result.train_time_s / result.steps,
            "start_val_mae": result.start_val["mae"], "val_mae_last": result.history[-1]["val_mae"],
            "val_mae_best": result.best_val_mae, "train_loss": [e["train_loss"] for e in result.history]}


def cpu_flags() -> list[str]:
    """The CPU's bfloat16-related instruction sets (none: bfloat16 math is converted through float32)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="training steps per plan (losses shown for all)")
    parser.add_argument("--amp-epochs", type=int, default=2)
    parser.add_argument("--amp-steps", type=int, default=10, help="optimizer steps per epoch of the amp fits")
    args = parser.parse_args(argv)

    runs = {}
    for malloc, threshold in MALLOC.items():  # a spawned process starts with this environment: glibc reads it then
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        if threshold is not None:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = threshold
        runs[malloc] = {}
        for name, (k, ckpt) in PLANS.items():
            runs[malloc][name] = row = isolated(measure_plan, k, ckpt, args.steps, timeout_s=3600)
            if "error" in row:
                raise SystemExit(f"{name} ({malloc} malloc): {row['error']}")
    os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    plans = runs["default"]
    amp = {mode: isolated(measure_amp, mode, args.amp_epochs, args.amp_steps, timeout_s=3600) for mode in ("off", "on")}
    for mode, row in amp.items():
        if "error" in row:
            raise SystemExit(f"amp {mode}: {row['error']}")

    plain = plans["plain"]
    cut = {name: {"rss": 1 - row["rss_growth_mb"] / plain["rss_growth_mb"],
                  "rss_mmap128k": 1 - runs["mmap128k"][name]["rss_growth_mb"] / runs["mmap128k"]["plain"]["rss_growth_mb"],
                  "tensor": 1 - row["tensor_peak_mb"] / plain["tensor_peak_mb"]} for name, row in plans.items()}
    first = plain["first_losses"][0]
    result = {
        "dataset": f"{CITY} (REAL: METR-LA's 207-sensor graph and readings, one week)", "model": MODEL,
        "model_kwargs": model_defaults(MODEL), "batch_size": BATCH, "lr": LR, "steps": args.steps,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "cpu_flags": cpu_flags(), "plans": plans, "plans_mmap128k": runs["mmap128k"], "cut_vs_plain": cut,
        "target_cut": TARGET_CUT, "target_met": {key: cut["ckpt"][key] >= TARGET_CUT for key in cut["ckpt"]},
        "first_loss_equal": {name: row["first_losses"] == plain["first_losses"] for name, row in plans.items()},
        "first_loss_rel_diff": {name: abs(row["first_losses"][0] - first) / first for name, row in plans.items()},
        "accum_equal_with_and_without_ckpt": plans["both"]["first_losses"] == plans["accum4"]["first_losses"],
        "amp": amp,
        "amp_slowdown": amp["on"]["ms_per_step"] / amp["off"]["ms_per_step"],
        "amp_val_mae_cost": amp["on"]["val_mae_last"] - amp["off"]["val_mae_last"],
    }

    print(f"gwnet training memory, {CITY} (REAL, {207} sensors), batch {BATCH}, CPU, {result['threads']} threads")
    print(f"  {'':15s} {'RSS growth MB (cut)':^33s}")
    print(f"  {'plan':8s} {'accum':>5s} {'ckpt':>5s} {'glibc default':>16s} {'mmap 128 KiB':>16s} "
          f"{'tensor peak MB':>16s} {'step s':>7s} {'(128k)':>7s}  first losses")
    for name, row in plans.items():
        fixed = runs["mmap128k"][name]
        losses = ", ".join(f"{v:.6f}" for v in row["first_losses"])
        print(f"  {name:8s} {row['grad_accum']:5d} {'on' if row['checkpointing'] else 'off':>5s} "
              f"{row['rss_growth_mb']:8.1f} ({cut[name]['rss']:5.1%}) {fixed['rss_growth_mb']:8.1f} "
              f"({cut[name]['rss_mmap128k']:5.1%}) {row['tensor_peak_mb']:8.1f} ({cut[name]['tensor']:5.1%}) "
              f"{row['median_step_s']:7.2f} {fixed['median_step_s']:7.2f}  {losses}")
    verdict = {True: "holds", False: "does NOT hold"}
    print(f"  target: checkpointing cuts the peak by >= {TARGET_CUT:.0%}: "
          + ", ".join(f"{label} {cut['ckpt'][key]:.1%} ({verdict[result['target_met'][key]]})" for key, label in
                      [("rss", "RSS, glibc default"), ("rss_mmap128k", "RSS, mmap threshold 128 KiB"),
                       ("tensor", "tensor peak")]))
    print(f"  first losses equal to plain: {result['first_loss_equal']}; accum4 == both: "
          f"{result['accum_equal_with_and_without_ckpt']} (BatchNorm and dropout per micro-batch: accumulation "
          f"moves gwnet's first loss by {result['first_loss_rel_diff']['accum4']:.2e} relative)")
    print(f"CPU bfloat16 autocast vs float32 ({args.amp_epochs} epochs x {args.amp_steps} steps, seed 0; "
          f"CPU flags: {', '.join(result['cpu_flags']) or 'none'})")
    for mode, row in amp.items():
        print(f"  amp {mode:3s}  {row['ms_per_step']:8.0f} ms/step   val MAE {row['val_mae_last']:.4f} "
              f"(start {row['start_val_mae']:.4f}, best {row['val_mae_best']:.4f})")
    print(f"  bfloat16: {result['amp_slowdown']:.2f}x the step time, val MAE {result['amp_val_mae_cost']:+.4f}")
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result


if __name__ == "__main__":
    main()
