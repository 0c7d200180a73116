"""Data-free compression (iterative LBYL, as in PA-DFCR) against prune-only, on REAL data.

Part 1, PA-DFCR's model families on scikit-learn's load_digits (real: 1,797 8x8 handwritten digits,
shipped with scikit-learn; stratified 60/20/20 split per seed; standardised with training statistics):
LeNet-300-100, a VGG-style CNN with BatchNorm, a ResNet-style bottleneck network (only conv1/conv2 of
each bottleneck pruned, as LBYL does). Per seed the base network is trained once (best epoch on
validation); then for every C (per-layer channel ratio) and k (rounds) it is compressed from the same
base with
    prune-only         channels dropped, nothing restored
    lbyl               LBYL's derivation with params.yaml's lambdas (compress.lambda1 / lambda2)
    lbyl-val           the same, lambdas chosen per (seed, C, k) from a small grid by VALIDATION accuracy
    lbyl-reference     upstream's code path (lbyl.py: c^T c I, running_var, t not K t, lstsq), default lambdas
and scored on the test split, which chooses nothing.

Part 2, Graph WaveNet on the real METR-LA week (metr-la-week, 207 sensors, its chronological split):
trained per seed with params.yaml's train section, then compressed at 50% of its prunable channels
(skip and end channels; the residual, dilation and graph channels are never pruned, see gwnet.py),
k = 1 and 2; the test MAE increase over the uncompressed model, per method.

Every row records parameters, FLOPs (FlopCounterMode, one input) and compression time (wall clock of
the rounds, evaluation excluded; on a shared 2-core machine, so noisy).

    python bench/bench_compression.py                  # everything: bench/results/compression.json
    python bench/bench_compression.py --families lenet-300-100 --seeds 0 --skip-gwnet
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared 2-core machines (see bench_accuracy.py)

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from graphtune.compression.prune import CompressSettings, compress  # noqa: E402
from graphtune.config import load_params  # noqa: E402
from graphtune.profiling import count_flops  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "compression.json"
FAMILIES = ("lenet-300-100", "vgg", "resnet-bottleneck")
EPOCHS = {"lenet-300-100": 30, "vgg": 15, "resnet-bottleneck": 15}
# LeNet at PA-DFCR's ratios; the CNNs also at small ones, where their 8x8 feature maps leave redundancy
RATIOS = {"lenet-300-100": (0.5, 0.7, 0.9), "vgg": (0.1, 0.2, 0.3, 0.5, 0.7, 0.9),
          "resnet-bottleneck": (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)}
ROUNDS = (1, 2, 5, 10)
LAMBDA_GRID = [(1e-3, 1e-3), (1e-3, 1e-2), (1e-3, 1e-1), (1e-2, 1e-2), (1e-2, 1e-1), (1e-1, 1.0)]
GWNET_GRID = [(0.0, 1e-3), (0.0, 1e-2), (0.0, 1e-1), (0.0, 1.0)]


def _compressed(model, config, settings):
    net, cfg = copy.deepcopy(model), copy.deepcopy(config)
    began = time.perf_counter()
    compress(net, cfg, settings)
    return net.eval(), cfg, time.perf_counter() - began


def vision(family: str, seed: int, defaults: tuple[float, float]) -> dict:
    from graphtune.compression.vision import accuracy, build_network, default_config, load_digits_split, train_classifier

    data = load_digits_split(seed)
    config = default_config(family, in_channels=data.channels, image_size=data.image_size, num_classes=data.num_classes)
    torch.manual_seed(seed)
    base = build_network(config)
    trained = train_classifier(base, data, epochs=EPOCHS[family], seed=seed)
    base.eval()
    example = data.x_train[:1]

    def measure(net, seconds):
        return {"val_accuracy": accuracy(net, data.x_val, data.y_val), "test_accuracy": accuracy(net, data.x_test, data.y_test),
                "params": sum(p.numel() for p in net.parameters()), "flops": count_flops(net, example)["flops"],
                "compress_s": seconds}

    out = {"family": family, "seed": seed, "base": measure(base, 0.0) | {"train_s": trained["train_seconds"],
                                                                       "best_epoch": trained["best_epoch"]},
           "rows": []}
    for ratio in RATIOS[family]:
        for k in ROUNDS:
            def run(method, l1, l2, variant="derivation"):
                s = CompressSettings(ratio=ratio, rounds=k, method=method, variant=variant, lambda1=l1, lambda2=l2)
                net, _, seconds = _compressed(base, config, s)
                return measure(net, seconds) | {"lambda1": l1, "lambda2": l2}

            rows = {"prune-only": run("prune-only", 0.0, 0.0), "lbyl": run("lbyl", *defaults),
                    "lbyl-reference": run("lbyl", *defaults, variant="reference")}
            grid = [run("lbyl", l1, l2) for l1, l2 in LAMBDA_GRID]
            rows["lbyl-val"] = max(grid, key=lambda r: r["val_accuracy"])  # first best on validation
            for method, row in rows.items():
                out["rows"].append({"C": ratio, "k": k, "method": method} | row)
        print(f"  {family} seed {seed} C={ratio}: " + ", ".join(
            f"{r['method']} {r['test_accuracy']:.3f}" for r in out["rows"] if r["C"] == ratio and r["k"] == 1), flush=True)
    return out


def gwnet(seed: int, epochs: int, defaults: tuple[float, float]) -> dict:
    from graphtune.data.prepare import prepare_dataset
    from graphtune.engine import evaluate, fit
    from graphtune.models import build_model, model_defaults
    from graphtune.transfer.stages import _example

    params = load_params(ROOT / "params.yaml")
    params.train.epochs = [epochs]
    bundle = prepare_dataset("metr-la-week", root=ROOT, use_processed=False)
    config = model_defaults("gwnet")
    torch.manual_seed(seed)
    base = build_model("gwnet", bundle, **config)
    began = time.perf_counter()
    fit(base, bundle, params.train, seed=seed)
    train_s = time.perf_counter() - began
    base.eval()
    example = _example(bundle, 1)

    def measure(net, seconds):
        val, test = evaluate(net, bundle, "val"), evaluate(net, bundle, "test")
        return {"val_mae": val["mae"], "test_mae": test["mae"], "test_rmse": test["rmse"],
                "params": sum(p.numel() for p in net.parameters()), "flops": count_flops(net, example)["flops"],
                "compress_s": seconds}

    out = {"seed": seed, "epochs": epochs, "base": measure(base, 0.0) | {"train_s": train_s}, "rows": []}
    for k in (1, 2):
        def run(method, l1, l2, variant="derivation"):
            s = CompressSettings(ratio=0.5, rounds=k, method=method, variant=variant, lambda1=l1, lambda2=l2)
            net, cfg, seconds = _compressed(base, config, s)
            return measure(net, seconds) | {"lambda2": l2, "widths": {"skip": cfg["skip_channels"],
                                                                       "end": cfg["end_channels"]}}

        rows = {"prune-only": run("prune-only", 0.0, 0.0), "lbyl": run("lbyl", *defaults)}
        rows["lbyl-val"] = min((run("lbyl", l1, l2) for l1, l2 in GWNET_GRID), key=lambda r: r["val_mae"])
        for method, row in rows.items():
            out["rows"].append({"C": 0.5, "k": k, "method": method,
                                "mae_increase": row["test_mae"] - out["base"]["test_mae"]} | row)
    print(f"  gwnet seed {seed}: base MAE {out['base']['test_mae']:.3f}; " + ", ".join(
        f"k{r['k']} {r['method']} +{r['mae_increase']:.3f}" for r in out["rows"]), flush=True)
    return out


def _mean_sd(values):
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: dict) -> list[str]:
    lines = []
    methods = ("prune-only", "lbyl", "lbyl-val", "lbyl-reference")
    for family in results.get("families", {}):
        runs = results["families"][family]
        lines.append(f"\n{family} on digits: base test accuracy "
                     + " / ".join(f"{r['base']['test_accuracy']:.3f}" for r in runs)
                     + f" (seeds {', '.join(str(r['seed']) for r in runs)}); test accuracy mean ± sd over seeds")
        lines.append(f"{'C':>4} {'k':>3} " + " ".join(f"{m:>16}" for m in methods)
                     + "  lbyl>prune  val>prune  params   MFLOPs  lbyl s")
        keys = sorted({(r["C"], r["k"]) for r in runs[0]["rows"]})
        for c, k in keys:
            cells, per = [], {}
            for m in methods:
                vals = [row["test_accuracy"] for run in runs for row in run["rows"]
                        if (row["C"], row["k"], row["method"]) == (c, k, m)]
                per[m] = vals
                mu, sd = _mean_sd(vals)
                cells.append(f"{mu:>9.3f} ± {sd:.3f}")
            wins = sum(a > b for a, b in zip(per["lbyl"], per["prune-only"]))
            wins_val = sum(a > b for a, b in zip(per["lbyl-val"], per["prune-only"]))
            row0 = next(r for r in runs[0]["rows"] if (r["C"], r["k"], r["method"]) == (c, k, "lbyl"))
            seconds = statistics.fmean(row["compress_s"] for run in runs for row in run["rows"]
                                       if (row["C"], row["k"], row["method"]) == (c, k, "lbyl"))
            lines.append(f"{c:>4} {k:>3} " + " ".join(cells) + f"  {wins:>4}/{len(per['lbyl'])}"
                         f"  {wins_val:>7}/{len(per['lbyl'])}  {row0['params']:>7} {row0['flops'] / 1e6:>7.3f}  {seconds:>6.3f}")
    if results.get("gwnet"):
        runs = results["gwnet"]
        lines.append("\ngwnet on metr-la-week, C = 0.5 of the skip and end channels: test MAE increase (mph) mean ± sd; "
                     "base MAE " + " / ".join(f"{r['base']['test_mae']:.3f}" for r in runs))
        for k in (1, 2):
            cells = []
            for m in ("prune-only", "lbyl", "lbyl-val"):
                mu, sd = _mean_sd([row["mae_increase"] for run in runs for row in run["rows"]
                                   if (row["k"], row["method"]) == (k, m)])
                cells.append(f"{m} +{mu:.3f} ± {sd:.3f}")
            row0 = next(r for r in runs[0]["rows"] if (r["k"], r["method"]) == (k, "lbyl"))
            lines.append(f"  k={k}: " + ", ".join(cells) + f"; params {runs[0]['base']['params']} -> {row0['params']}, "
                         f"FLOPs {runs[0]['base']['flops'] / 1e6:.1f}M -> {row0['flops'] / 1e6:.1f}M")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--gwnet-epochs", type=int, default=6)
    parser.add_argument("--skip-gwnet", action="store_true")
    parser.add_argument("--skip-vision", action="store_true")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--tables-only", action="store_true", help="reprint (and store) the tables of --out's JSON")
    args = parser.parse_args()
    if args.tables_only:
        results = json.loads(Path(args.out).read_text())
        results["table"] = summarise(results)
        print("\n".join(results["table"]))
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        return
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    params = load_params(ROOT / "params.yaml")
    defaults = (params.compress.lambda1, params.compress.lambda2)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {"data": {"digits": "scikit-learn load_digits (real)", "gwnet": "metr-la-week (real METR-LA, first week)"},
               "lambdas_default": defaults, "lambda_grid": LAMBDA_GRID, "gwnet_grid": GWNET_GRID,
               "rounds": ROUNDS, "ratios": RATIOS, "epochs": EPOCHS, "torch_threads": torch.get_num_threads(),
               "families": {}, "gwnet": []}
    began = time.perf_counter()
    if not args.skip_vision:
        for family in args.families.split(","):
            results["families"][family] = [vision(family, seed, defaults) for seed in seeds]
    if not args.skip_gwnet:
        results["gwnet"] = [gwnet(seed, args.gwnet_epochs, defaults) for seed in seeds]
    results["wall_s"] = time.perf_counter() - began
    lines = summarise(results)
    results["table"] = lines
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {args.out} ({results['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
