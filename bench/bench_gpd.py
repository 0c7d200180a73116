"""GPD leave-one-region-out on the REAL METR-LA week: generated node models against their baselines.

The five k-means regions metr-la-r1..r5 (28-52 sensors each) take turns as the target; the other four are
the sources. Per seed, every region's node models are collected once (one grouped fit per region, the
`gpd collect` settings of params.yaml), and each fold's denoiser trains on the four source regions' vectors,
its checkpoint chosen on their held-out nodes. Each initialisation then goes through the real stage loop
(`transfer_stage`): zero-shot on the target's test split from the last `gpd.prompt_days` of its training
split, then fine-tuning on the most recent 1 and 3 days (GPD's target_days), each point selected on the
target's validation split and reported on its test split:

    gpd:<variant>   diffusion with each of the five registered conditioning variants
    random          the node models' seeded initialisation (no source)
    mean            the mean source vector for every node
    nearest         the source node with the nearest prompt, copied
    shuffled        diffusion (the default variant) from another target node's prompts
    gwnet-full      whole-graph Graph WaveNet pretrained on the four source regions' induced graph, `full`
    oracle          node models trained on the target's whole training split (the collection's settings)

Time and peak memory per step (collect, diffuse, each init's transfer stage) are recorded. A separate
measurement compares shared against independent initialisation of the node models (one fold, one seed).

    python bench/bench_gpd.py                 # the full run: bench/results/gpd.json
    python bench/bench_gpd.py --seeds 0 --regions metr-la-r1 --quick    # a smoke run (not for the README)
    python bench/bench_gpd.py --sampling outputs/gpd/generator/generator.pt   # sampling 200 nodes: gpd_sampling.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared 2-core machines

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from graphtune.config import ExperimentConfig, TrainConfig, load_params  # noqa: E402
from graphtune.data.bundle import Scaler  # noqa: E402
from graphtune.data.prepare import prepare_dataset  # noqa: E402
from graphtune.engine import evaluate, fit  # noqa: E402
from graphtune.generative.denoiser import list_denoisers  # noqa: E402
from graphtune.generative.paramset import ParamSet  # noqa: E402
from graphtune.generative.pipeline import NODE_MODEL, collect, diffuse, node_model_kwargs, prompt_view  # noqa: E402
from graphtune.models import build_model  # noqa: E402
from graphtune.profiling import ResourceMonitor  # noqa: E402
from graphtune.transfer.stages import pretrain_stage, transfer_stage  # noqa: E402
from graphtune.transfer.strategies import SourceModel  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "gpd.json"
REGIONS = ("metr-la-r1", "metr-la-r2", "metr-la-r3", "metr-la-r4", "metr-la-r5")
BASELINES = ("random", "mean", "nearest", "shuffled")


def induced(bundle, sensor_ids: list[str], name: str):
    """The city restricted to `sensor_ids` (the induced subgraph), its scaler refitted on the training split."""
    idx = [bundle.sensor_ids.index(s) for s in sensor_ids]
    target = bundle.target[:, idx].clone()
    lo, hi = bundle.splits["train"]
    scaler = Scaler.fit(target[lo:hi].numpy())
    values = torch.nan_to_num(scaler.transform(target), nan=0.0).to(torch.float32)
    return dataclasses.replace(bundle, name=name, values=values, target=target, adj=bundle.adj[np.ix_(idx, idx)],
                               sensor_ids=list(sensor_ids), scaler=scaler,
                               coords=None if bundle.coords is None else bundle.coords[idx], meta={})


def cached_collect(bundle, gpd, batch_size: int, seed: int, cache: Path | None):
    """One region's node models: from `cache` when another process (or an earlier run) collected them with the
    same settings, else collected now (and cached). Returns (ParamSet, seconds, peak MB or None, from_cache)."""
    if cache is None:
        ps, sec, mem = measured(lambda: collect([bundle], gpd, batch_size=batch_size, seed=seed))
        return ps, sec, mem, False
    key = json.dumps([bundle.name, seed, batch_size, dataclasses.asdict(gpd)], sort_keys=True)
    folder = cache / f"{bundle.name}-s{seed}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    lock = folder.with_suffix(".lock")
    while lock.exists():  # another process is collecting it
        time.sleep(5)
    if (folder / "meta.json").exists():
        return ParamSet.load(folder), 0.0, None, True
    lock.touch()
    try:
        ps, sec, mem = measured(lambda: collect([bundle], gpd, batch_size=batch_size, seed=seed))
        ps.save(folder)
        (folder / "time.json").write_text(json.dumps({"time_s": sec, "peak_rss_mb": mem}))
    finally:
        lock.unlink()
    return ps, sec, mem, False


def measured(fn):
    """(result, seconds, peak RSS MB above the start) of fn()."""
    with ResourceMonitor("cpu") as monitor:
        out = fn()
    return out, monitor.elapsed_s, monitor.peak_rss_mb


def stage_row(stage) -> dict:
    row = {"zero_mae": stage.zero_shot_test["mae"], "zero_rmse": stage.zero_shot_test["rmse"]}
    for p in stage.curve:
        row[f"mae_{p['target_days']:g}d"] = p["test_mae"]
        row[f"rmse_{p['target_days']:g}d"] = p["test_rmse"]
    return row


def run(args) -> dict:
    params = load_params(ROOT / "params.yaml")
    gpd = params.gpd
    if args.quick:
        gpd = dataclasses.replace(gpd, collect_epochs=2, iterations=60, eval_every=30, diffusion_steps=50,
                                  ddim_steps=10)
    gpd = dataclasses.replace(gpd, iterations=args.iterations or gpd.iterations)
    train = dataclasses.replace(params.train, epochs=[args.pretrain_epochs, args.finetune_epochs])
    transfer = dataclasses.replace(params.transfer, target_days=[1.0, 3.0], prompt_days=gpd.prompt_days,
                                   min_gain_rate=-1e9, min_rel_improve=-1e9, patience=10)  # every point runs
    zero_only = dataclasses.replace(transfer, target_days=[], fractions=[])
    kwargs = node_model_kwargs(gpd)
    bundles = {r: prepare_dataset(r, params.prepare) for r in REGIONS}
    week = prepare_dataset("metr-la-week", params.prepare)
    variants = list_denoisers() if not args.variants else args.variants.split(",")
    rows, timings = [], []
    for seed in ([] if args.init_effect_only else args.seeds):
        sets = {}
        for r in REGIONS:  # each region's node models once per seed; every fold reuses them
            ps, sec, mem, cached = cached_collect(bundles[r], gpd, train.batch_size, seed, args.cache)
            sets[r] = ps
            if not cached:
                timings.append({"seed": seed, "step": "collect", "city": r, "nodes": bundles[r].num_nodes,
                                "time_s": sec, "peak_rss_mb": mem})
            print(f"seed {seed}: collected {r} ({bundles[r].num_nodes} nodes) in {sec:.0f} s"
                  + (" (cached)" if cached else ""), flush=True)
        for target_name in args.regions:
            target = bundles[target_name]
            sources = [r for r in REGIONS if r != target_name]
            ps = ParamSet.merge([sets[r] for r in sources])
            exp = ExperimentConfig(datasets=[target_name], model=NODE_MODEL, model_kwargs=kwargs, strategy="gpd",
                                   seed=seed)

            def transfer_with(generator, init, method):
                src = SourceModel(NODE_MODEL, kwargs, {}, "+".join(sources), [], {"mean": 0.0, "std": 1.0},
                                  generator=dict(generator, init=init, samples=generator.get("samples", gpd.samples)))
                curve = transfer if method not in args.zero_only else zero_only  # zero-shot only: no budget point
                stage, _ = transfer_stage(target, (src,), exp, train, curve, index=1, n_stages=2)
                return stage

            default_generator = None
            for variant in variants:
                g = dataclasses.replace(gpd, conditioning=variant)
                res, sec, mem = measured(lambda g=g: diffuse(ps, g, seed=seed))
                timings.append({"seed": seed, "target": target_name, "step": f"diffuse:{variant}", "time_s": sec,
                                "peak_rss_mb": mem, "sample_time_s": res.sample_time_s,
                                "sampled_nodes": int((~ps.train_mask).sum())})
                if variant == gpd.conditioning:
                    default_generator = res.generator
                stage, sec, mem = measured(lambda: transfer_with(res.generator, "diffusion", f"gpd:{variant}"))
                timings.append({"seed": seed, "target": target_name, "step": f"transfer:gpd:{variant}", "time_s": sec,
                                "peak_rss_mb": mem})
                rows.append({"seed": seed, "target": target_name, "method": f"gpd:{variant}",
                             "heldout_mse": min(h["heldout_mse"] for h in res.history),
                             "mean_vector_mse": res.history[-1]["mean_baseline_mse"], **stage_row(stage)})
                print(f"  {target_name} gpd:{variant}: {rows[-1]}", flush=True)
            default_generator = default_generator or res.generator
            for init in [b for b in BASELINES if b not in args.skip]:
                stage, sec, mem = measured(lambda init=init: transfer_with(default_generator, init, init))
                timings.append({"seed": seed, "target": target_name, "step": f"transfer:{init}", "time_s": sec,
                                "peak_rss_mb": mem})
                rows.append({"seed": seed, "target": target_name, "method": init, **stage_row(stage)})
                print(f"  {target_name} {init}: {rows[-1]}", flush=True)
            if "gwnet-full" not in args.skip:
                rest = [s for s in week.sensor_ids if s not in set(target.sensor_ids)]
                source_city = induced(week, rest, f"metr-la-week-minus-{target_name}")
                gw = ExperimentConfig(datasets=[source_city.name, target_name], model="gwnet", strategy="full",
                                      seed=seed, model_kwargs=args.gwnet_kwargs)
                (pre, src), sec1, mem1 = measured(lambda: pretrain_stage(source_city, gw, train, n_stages=2))
                (stage, _), sec2, mem2 = measured(lambda: transfer_stage(target, (src,), gw, train, transfer, index=1,
                                                                         n_stages=2))
                timings.append({"seed": seed, "target": target_name, "step": "gwnet-full", "time_s": sec1 + sec2,
                                "peak_rss_mb": max(mem1 or 0, mem2 or 0)})
                rows.append({"seed": seed, "target": target_name, "method": "gwnet-full", **stage_row(stage)})
                if args.partial:
                    Path(args.partial).write_text(json.dumps({"rows": rows, "timings": timings}, indent=1) + "\n")
                print(f"  {target_name} gwnet-full: {rows[-1]}", flush=True)
            # the oracle: node models trained on the target's whole training split, as a source city's are
            def oracle():
                torch.manual_seed(seed)
                net = build_model(NODE_MODEL, target, **kwargs)
                cfg = TrainConfig(epochs=[gpd.collect_epochs], lrs=[gpd.collect_lr], batch_size=train.batch_size,
                                  weight_decay=0.0, clip_grad=None)
                fit(net, target, cfg, seed=seed, train_starts=target.window_starts("train")[::gpd.collect_stride])
                return evaluate(net, target, "test")
            if "oracle" not in args.skip:
                test, sec, mem = measured(oracle)
                timings.append({"seed": seed, "target": target_name, "step": "oracle", "time_s": sec,
                                "peak_rss_mb": mem})
                rows.append({"seed": seed, "target": target_name, "method": "oracle", "mae_full": test["mae"],
                             "rmse_full": test["rmse"]})
                print(f"  {target_name} oracle: {rows[-1]}", flush=True)
            if args.partial:  # every finished fold on disk: a killed run keeps what it measured
                Path(args.partial).write_text(json.dumps({"rows": rows, "timings": timings}, indent=1) + "\n")
            ha = evaluate(build_model("ha", target), target, "test")
            rows.append({"seed": seed, "target": target_name, "method": "ha", "mae_full": ha["mae"],
                         "rmse_full": ha["rmse"]})
            print(f"  {target_name} HA MAE {ha['mae']:.3f}", flush=True)
            if args.partial:
                Path(args.partial).write_text(json.dumps({"rows": rows, "timings": timings}, indent=1) + "\n")
    init_effect = None if args.skip_init_effect else shared_vs_independent(bundles, gpd, train, args.seeds[0],
                                                                           args.cache)
    return {"rows": rows, "timings": timings, "init_effect": init_effect}


def shared_vs_independent(bundles, gpd, train, seed, cache) -> dict:
    """The effect of one seeded initialisation for every node model: collect metr-la-r2..r5 both ways, and compare
    the spread of the vectors across nodes and the mean-vector model's zero-shot MAE on metr-la-r1."""
    out = {}
    target = bundles["metr-la-r1"]
    for shared in (True, False):
        g = dataclasses.replace(gpd, model_kwargs=dict(gpd.model_kwargs, shared_init=shared))
        ps = ParamSet.merge([cached_collect(bundles[r], g, train.batch_size, seed, cache)[0] for r in REGIONS[1:]])
        view = prompt_view(target, gpd.prompt_days)
        torch.manual_seed(seed)
        net = build_model(NODE_MODEL, view, **node_model_kwargs(g))
        net.load_vectors(torch.from_numpy(np.tile(ps.mean, (view.num_nodes, 1))))
        spread = float(np.mean(ps.vectors.std(0)))
        out["shared" if shared else "independent"] = {
            "mean_vector_zero_shot_mae": evaluate(net, view, "test")["mae"],
            "mean_std_across_nodes": spread,
            "mean_abs_weight": float(np.abs(ps.vectors).mean()),
            "source_val_mae": {c: f["val_mae"] for c, f in ps.extra["fits"].items()}}
    return out


def sampling_time(generator_path: str, nodes: int = 200, repeats: int = 3) -> dict:
    """Seconds to sample `nodes` parameter vectors with the generator's denoiser: DDIM at 50 steps and DDPM at all
    of them (prompts drawn from the source rows it trained on, tiled to `nodes`; the time does not depend on them)."""
    from graphtune.generative.pipeline import _sample, load_generator

    generator = torch.load(generator_path, map_location="cpu", weights_only=True)
    net, schedule = load_generator(generator)
    prompts = generator["train_prompts"]
    rows = prompts[torch.arange(nodes) % prompts.shape[0]]
    ds = generator["denoiser"]["spatial_dim"]
    s, t = rows[:, :ds], rows[:, ds:]
    out = {"nodes": nodes, "numel": int(generator["mean"].numel()), "denoiser": generator["denoiser"],
           "torch_threads": torch.get_num_threads()}
    for sampler, steps in (("ddim", 50), ("ddpm", schedule.steps)):
        times = []
        for _ in range(repeats if sampler == "ddim" else 1):  # DDPM's 500 steps: one timing is enough
            start = time.perf_counter()
            _sample(net, schedule, sampler, steps, s, t, 0, "cpu")
            times.append(time.perf_counter() - start)
        out[f"{sampler}_{steps}_steps_s"] = min(times)
        print(f"sampling {nodes} nodes, {sampler} {steps} steps: {min(times):.2f} s (best of {len(times)})")
    return out


def summarise(result: dict) -> list[dict]:
    rows = result["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    table = []
    for m in methods:
        sel = [r for r in rows if r["method"] == m]
        entry = {"method": m, "n": len(sel)}
        for key in ("zero_mae", "zero_rmse", "mae_1d", "mae_3d", "mae_full"):
            vals = [r[key] for r in sel if r.get(key) is not None]
            if vals:
                entry[key] = float(np.mean(vals))
                entry[key + "_std"] = float(np.std(vals))
        table.append(entry)
    return table


def print_table(table: list[dict]) -> None:
    cols = ("zero_mae", "zero_rmse", "mae_1d", "mae_3d", "mae_full")
    print(f"{'method':<20}" + "".join(f"{c:>14}" for c in cols))
    for e in table:
        print(f"{e['method']:<20}" + "".join(f"{e[c]:>14.3f}" if c in e else f"{'':>14}" for c in cols))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--regions", nargs="+", default=list(REGIONS))
    ap.add_argument("--variants", default="", help="comma-separated conditioning variants (default: all five)")
    ap.add_argument("--iterations", type=int, default=0, help="denoiser steps (default: gpd.iterations)")
    ap.add_argument("--pretrain-epochs", type=int, default=6, help="gwnet-full's pretraining epochs")
    ap.add_argument("--finetune-epochs", type=int, default=3, help="epochs per budget point")
    ap.add_argument("--gwnet-kwargs", type=json.loads, default={"residual_channels": 16, "dilation_channels": 16,
                                                                "skip_channels": 64, "end_channels": 128})
    ap.add_argument("--skip", nargs="*", default=[], help="methods not to run: random mean nearest shuffled "
                    "gwnet-full oracle")
    ap.add_argument("--zero-only", nargs="*", default=[], help="methods measured zero-shot only (no budget point), "
                    "e.g. gpd:adaln shuffled")
    ap.add_argument("--partial", default="", help="write rows and timings here after every fold")
    ap.add_argument("--cache", type=Path, default=None, help="folder of collected node models shared by processes")
    ap.add_argument("--skip-init-effect", action="store_true")
    ap.add_argument("--init-effect-only", action="store_true", help="only shared against independent initialisation")
    ap.add_argument("--quick", action="store_true", help="tiny settings: a smoke run, not a measurement")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--merge", nargs="+", default=[], help="merge the JSONs of runs split by seed into --out")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--sampling", default="", metavar="GENERATOR",
                    help="only time sampling 200 nodes with this generator.pt into bench/results/gpd_sampling.json")
    args = ap.parse_args()
    if args.sampling:
        result = sampling_time(args.sampling)
        result["machine"] = {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
        (ROOT / "bench" / "results" / "gpd_sampling.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        return
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        result = {"rows": [r for p in parts for r in p["rows"]], "timings": [t for p in parts for t in p["timings"]],
                  "init_effect": next((p["init_effect"] for p in parts if p.get("init_effect")), None),
                  "parts": [{"settings": p["settings"], "wall_s": p["wall_s"], "machine": p["machine"]} for p in parts]}
        result["table"] = summarise(result)
        result["wall_s"] = sum(p["wall_s"] for p in parts)
        print_table(result["table"])
        Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        return
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    start = time.perf_counter()
    result = run(args)
    result["table"] = summarise(result)
    result["wall_s"] = time.perf_counter() - start
    result["settings"] = {"seeds": args.seeds, "regions": args.regions, "quick": args.quick,
                          "iterations": args.iterations, "pretrain_epochs": args.pretrain_epochs,
                          "finetune_epochs": args.finetune_epochs, "gwnet_kwargs": args.gwnet_kwargs,
                          "skip": args.skip, "zero_only": args.zero_only,
                          "gpd": dataclasses.asdict(load_params(ROOT / "params.yaml").gpd)}
    result["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                         "python": platform.python_version(), "torch": torch.__version__,
                         "date": time.strftime("%Y-%m-%d")}
    print_table(result["table"])
    print(f"wall time {result['wall_s'] / 60:.1f} min")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
