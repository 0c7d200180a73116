"""Adapters and budget allocation on the REAL METR-LA week (regions of its 207 sensors): `bench/results/adapt.json`.

Part 1, strategies (`--part strategies`): for gwnet and bigst, pretrain on metr-la-west (103 sensors) once per
seed, then transfer to metr-la-east (104 sensors) with each strategy: full, freeze-transferred, adapter at
rank 4 and 8, topology-adapter and scratch, at budget fractions 0.1 / 0.3 / 1.0 (every point kept: the
scheduler is off). Reported per point: test MAE, trainable parameters, peak memory (RSS: CPU) and fine-tuning
time. Every strategy of a (model, seed) starts from the same pretrained source.

Part 2, allocation (`--part allocation`): one fine-tuning budget (30% of all targets' training windows) over
three target regions (metr-la-r1, -r2, -r3) after pretraining on metr-la-west, with hypernet (the `make run`
model; a GWNet run of this part takes about 10 minutes here): uniform (every target at 30%)
against diagnostics (graphtune.transfer.allocation), same seeds, same total windows. Reported: each target's
share, windows and test MAE, and the mean test MAE over the targets.

Training follows params.yaml (the `make run` protocol: 6 pretraining epochs, 3 per budget point, Adam, batch
64) on the real data; 2 CPU cores, so the models keep their default widths but the runs are short. Peak memory
is the process's RSS high-water mark over the point's window (ResourceMonitor), which includes the allocator's
cached blocks: differences between strategies below a few MB are noise.

    python bench/bench_adapt.py                       # both parts, 3 seeds
    python bench/bench_adapt.py --part allocation --seeds 0
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from graphtune.config import load_params  # noqa: E402
from graphtune.data.prepare import prepare_dataset  # noqa: E402
from graphtune.transfer.stages import pretrain_stage, run_experiment  # noqa: E402
from graphtune.transfer.strategies import get_strategy  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "adapt.json"
MODELS = ("gwnet", "bigst")
# (label, strategy, params overrides applied before the strategy's check)
VARIANTS = (("full", "full", {}), ("freeze-transferred", "freeze-transferred", {}),
            # rank 8 trains ~15% of gwnet's and bigst's node-independent parameters: above the default 10% cap
            ("adapter r=4", "adapter", {"rank": 4}), ("adapter r=8", "adapter", {"rank": 8, "max_share": 0.2}),
            ("topology-adapter", "topology-adapter", {}), ("scratch", "scratch", {}))
SEEDS = (0, 1, 2)


def _params(model: str, seed: int):
    params = load_params(ROOT / "params.yaml")
    params.experiment.model, params.experiment.seed = model, seed
    params.transfer.fractions = [0.1, 0.3, 1.0]
    params.transfer.patience = 3  # every point kept: the comparison is per fraction
    return params


def _prepare(city: str, params):
    return prepare_dataset(city, params.prepare, cities=params.cities, root=ROOT)


def strategies(seeds, models, save=lambda rows: None, variants=None) -> list[dict]:
    rows = []
    for seed in seeds:  # seed outermost: a stopped run still has every model at the seeds it finished
        for model in models:
            params = _params(model, seed)
            west, east = _prepare("metr-la-west", params), _prepare("metr-la-east", params)
            start = time.perf_counter()
            chosen = [v for v in VARIANTS if not variants or v[0] in variants]
            source = None
            if any(get_strategy(strategy).loads_source for _, strategy, _ in chosen):  # scratch alone needs none
                _, source = pretrain_stage(west, params.experiment, params.train, n_stages=2)
            pre_s = time.perf_counter() - start
            for label, strategy, overrides in VARIANTS:
                if variants and label not in variants:
                    continue
                p = copy.deepcopy(params)
                p.experiment.strategy = strategy
                for key, value in overrides.items():
                    setattr(p.adapter, key, value)
                impl = get_strategy(strategy)
                impl.check(p, ["metr-la-east"])  # the strategy's own settings (adapter rank, ...) as the CLI sets them
                start = time.perf_counter()
                if impl.loads_source:  # east is the target of the pretrained source: stage 1
                    result = run_experiment([east], p.experiment, p.train, p.transfer, p.score, p.budgets,
                                            sources=(source,))
                else:  # scratch: west only names the source (nothing is pretrained), east is stage 1's target
                    result = run_experiment([west, east], p.experiment, p.train, p.transfer, p.score, p.budgets)
                stage = result.stages[-1]
                row = {"model": model, "seed": seed, "variant": label, "strategy": strategy,
                       "trainable_params": stage.static_eff["params_trainable"],
                       "total_params": stage.static_eff["params_total"],
                       "trainable_share": stage.static_eff["params_trainable"] / stage.static_eff["params_total"],
                       "zero_shot_test_mae": (stage.zero_shot_test or {}).get("mae"),
                       "points": [{"fraction": pt["fraction"], "test_mae": pt["test_mae"],
                                   "peak_rss_mb": pt["peak_rss_mb"], "train_time_s": pt["train_time_s"],
                                   "windows": pt["windows"]} for pt in stage.curve],
                       "wall_s": time.perf_counter() - start, "pretrain_s": pre_s}
                rows.append(row)
                print(f"{model:6s} s{seed} {label:18s} trainable {row['trainable_params']:>7d} "
                      f"({100 * row['trainable_share']:5.1f}%)  test MAE "
                      + " / ".join(f"{pt['test_mae']:.3f}" for pt in row["points"])
                      + f"  {row['wall_s']:.0f} s", flush=True)
                save(rows)  # every finished run is kept, even if the benchmark is stopped later
    return rows


def allocation(seeds, model: str, save=lambda rows: None) -> list[dict]:
    rows = []
    for seed in seeds:
        for rule in ("uniform", "diagnostics"):
            params = _params(model, seed)
            params.transfer.allocation, params.transfer.total_budget = rule, 0.3
            cities = ["metr-la-west", "metr-la-r1", "metr-la-r2", "metr-la-r3"]
            bundles = [_prepare(c, params) for c in cities]
            start = time.perf_counter()
            result = run_experiment(bundles, params.experiment, params.train, params.transfer, params.score,
                                    params.budgets)
            targets = [{"city": s.city, "share": result.allocation["shares"][s.city],
                        "windows": s.curve[-1]["windows"], "available": int(bundles[i + 1].window_starts("train").numel()),
                        "test_mae": s.test["mae"], "zero_shot_test_mae": s.zero_shot_test["mae"],
                        "ha_test_mae": s.reference["ha"]["mae"]} for i, s in enumerate(result.stages[1:])]
            row = {"seed": seed, "rule": rule, "model": model, "targets": targets,
                   "mean_test_mae": statistics.fmean(t["test_mae"] for t in targets),
                   "total_windows": sum(t["windows"] for t in targets),
                   "diagnostics": result.allocation.get("targets", []), "wall_s": time.perf_counter() - start}
            rows.append(row)
            print(f"{model} s{seed} {rule:11s} shares " + ", ".join(f"{t['city'][-2:]} {t['share']:.2f}" for t in targets)
                  + f"  windows {row['total_windows']}  mean test MAE {row['mean_test_mae']:.4f}", flush=True)
            save(rows)
    return rows


def _summary_strategies(rows: list[dict]) -> list[dict]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        full = {r["seed"]: r for r in rows if r["model"] == model and r["variant"] == "full"}
        for variant in dict.fromkeys(r["variant"] for r in rows if r["model"] == model):
            runs = [r for r in rows if r["model"] == model and r["variant"] == variant]
            entry = {"model": model, "variant": variant, "seeds": len(runs),
                     "trainable_params": runs[0]["trainable_params"], "trainable_share": runs[0]["trainable_share"]}
            for i, fraction in enumerate(pt["fraction"] for pt in runs[0]["points"]):
                maes = [r["points"][i]["test_mae"] for r in runs]
                entry[f"test_mae@{fraction:g}"] = statistics.fmean(maes)
                entry[f"test_mae_sd@{fraction:g}"] = statistics.stdev(maes) if len(maes) > 1 else 0.0
                entry[f"peak_rss_mb@{fraction:g}"] = statistics.fmean(r["points"][i]["peak_rss_mb"] or 0 for r in runs)
                entry[f"train_time_s@{fraction:g}"] = statistics.fmean(r["points"][i]["train_time_s"] for r in runs)
                if full:
                    ratios = [r["points"][i]["test_mae"] / full[r["seed"]]["points"][i]["test_mae"] for r in runs
                              if r["seed"] in full]
                    entry[f"vs_full@{fraction:g}"] = statistics.fmean(ratios) - 1.0
            out.append(entry)
    return out


def _summary_allocation(rows: list[dict]) -> dict:
    by_rule = {rule: [r for r in rows if r["rule"] == rule] for rule in ("uniform", "diagnostics")}
    out = {rule: {"mean_test_mae": statistics.fmean(r["mean_test_mae"] for r in runs),
                  "total_windows": statistics.fmean(r["total_windows"] for r in runs)}
           for rule, runs in by_rule.items() if runs}
    if all(by_rule.values()):
        pairs = list(zip(by_rule["uniform"], by_rule["diagnostics"]))
        out["diagnostics_minus_uniform"] = [d["mean_test_mae"] - u["mean_test_mae"] for u, d in pairs]
        cities = [t["city"] for t in by_rule["uniform"][0]["targets"]]
        out["per_target"] = {c: {rule: statistics.fmean(next(t["test_mae"] for t in r["targets"] if t["city"] == c)
                                                         for r in runs) for rule, runs in by_rule.items()}
                             for c in cities}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("strategies", "allocation", "both"), default="both")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--allocation-model", default="hypernet")
    parser.add_argument("--variants", nargs="+", default=None, help="only these strategy variants (labels); their "
                        "runs replace the same ones in the JSON, the others are kept")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    os.chdir(ROOT)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    record = json.loads(args.out.read_text()) if args.out.is_file() else {}
    record["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(part: str, summarise):
        def write(rows):
            import fcntl

            # merge with what another invocation wrote meanwhile (e.g. the other part run side by side)
            fd = os.open(args.out.parent, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                current = json.loads(args.out.read_text()) if args.out.is_file() else {}
                current["machine"] = record["machine"]
                # runs of this invocation replace the same (model, seed, variant or rule) of earlier ones
                key = (lambda r: (r["model"], r["seed"], r.get("variant", r.get("rule"))))
                mine = {key(r) for r in rows}
                kept = [r for r in current.get(part, {}).get("runs", []) if key(r) not in mine
                        and r.get("points", True)]  # a strategies run without budget points measured nothing
                merged = sorted(kept + rows, key=lambda r: (r["seed"], r["model"]))
                current[part] = {"runs": merged, "summary": summarise(merged),
                                 "seeds": sorted({r["seed"] for r in merged})}
                tmp = args.out.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
                os.replace(tmp, args.out)
            finally:
                os.close(fd)
        return write

    if args.part in ("strategies", "both"):
        rows = strategies(args.seeds, args.models, save("strategies", _summary_strategies), args.variants)
        for entry in _summary_strategies(rows):
            print(json.dumps(entry))
    if args.part in ("allocation", "both"):
        rows = allocation(args.seeds, args.allocation_model, save("allocation", _summary_allocation))
        print(json.dumps(_summary_allocation(rows), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
