"""Where the wall time of one experiment goes: import, prepare, profile, train, evaluate, tracking, files.

Each measured run is `graphtune experiment` on the embedded REAL sample with params.yaml as it is (the
`make run` protocol, `--epochs 6,3`), started in a fresh Python process so that imports count as they do for
a user. Inside it, the functions of each phase are wrapped by timers that count exclusive time (an
evaluation inside `fit` counts as evaluation, not training):

    import     loading graphtune's experiment runner and what it imports (torch, mlflow, pandas, ...)
    prepare    reading the cities (load_bundles)
    profile    parameters and FLOPs of each stage's model (stages._efficiency)
    train      optimizer steps inside `fit`
    evaluate   validation inside `fit`, zero-shot and final evaluations, the city references
    tracking   the MLflow store: creating or opening it, runs, params, metrics, artifacts, checkpoints, the
               dataset inputs and each stage's MLflow model (pickled, with its signature)
    files      results.json/csv, the PNG plots, params.yaml (write_outputs)
    other      the rest: budget views, graph difficulty, the scheduler, the command line

Two stores: a new sqlite file (a user's first run, which pays MLflow's schema migrations) and the same file
again (every later run). The target of issue 9 is that train + evaluate take at least 60% of the wall time.

It also times `graphtune --help` and `graphtune cities` (median of 5 fresh processes; target: under 1 s).

    python bench/bench_overhead.py                     # ~2 minutes on 2 CPU cores; bench/results/overhead.json
    python bench/bench_overhead.py --models baseline
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "overhead.json"
PHASES = ("import", "prepare", "profile", "train", "evaluate", "tracking", "files", "other")
MODELS = ("hypernet", "baseline")  # hypernet: what `make run` trains; baseline: the issue's own measurement


def child(model: str, store: str, work: str, epochs: str = "6,3") -> dict:
    """One experiment in this (fresh) process, timed by phase; returns {phase: seconds, "wall": seconds}."""
    start = time.perf_counter()
    import contextlib
    import functools

    import graphtune.engine as engine
    import graphtune.tracking.runs as runs
    import graphtune.transfer.experiment as experiment
    import graphtune.transfer.stages as stages
    from graphtune.config import load_params

    seconds = dict.fromkeys(PHASES, 0.0)
    seconds["import"] = time.perf_counter() - start
    stack: list[list] = []  # [phase, start, time spent in nested timed calls]

    @contextlib.contextmanager
    def timed(phase: str):
        stack.append([phase, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            _, began, nested = stack.pop()
            spent = time.perf_counter() - began
            seconds[phase] += spent - nested
            if stack:
                stack[-1][2] += spent

    def wrap(owner, name: str, phase: str):
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed_call(*args, **kwargs):
            with timed(phase):
                return original(*args, **kwargs)

        setattr(owner, name, timed_call)

    wrap(experiment, "load_bundles", "prepare")
    wrap(stages, "_efficiency", "profile")
    wrap(stages, "fit", "train")
    wrap(stages, "evaluate", "evaluate")
    wrap(engine, "evaluate", "evaluate")  # the validation inside fit
    wrap(stages, "city_references", "evaluate")
    wrap(experiment, "write_outputs", "files")
    for name in ("experiment_id", "log_params", "log_metrics", "log_metrics_to", "log_steps", "log_history",
                 "log_dict", "log_artifact", "log_figure", "log_checkpoint", "log_dataset", "log_model", "set_tags",
                 "_end"):
        wrap(runs.Tracker, name, "tracking")
    wrap(runs.mlflow, "start_run", "tracking")

    params = load_params(ROOT / "params.yaml", [f"experiment.model={model}", f"train.epochs=[{epochs}]",
                                                f"prepare.processed_dir={work}/processed", f"tracking.tracking_uri={store}"])
    os.chdir(ROOT)
    plan = experiment.plan_experiment(params)
    with timed("other"):
        experiment.execute(plan, echo=lambda _: None, output_dir=Path(work) / "out")
    seconds["wall"] = time.perf_counter() - start
    return seconds


def measure(model: str, store: str, work: str, epochs: str) -> dict:
    """child() in a fresh interpreter: the imports are as cold as a user's."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import bench_overhead as b; "
            f"print(json.dumps(b.child({model!r}, {store!r}, {work!r}, {epochs!r})))")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "GIT_PYTHON_REFRESH": "quiet",
                               "MLFLOW_DISABLE_TELEMETRY": "true"})
    if done.returncode != 0:
        raise SystemExit(f"bench_overhead: the experiment failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started  # with the interpreter's own start-up
    return result


def cli_seconds(args: list[str], repeats: int = 5) -> float:
    """Median wall time of `python -m graphtune ARGS` in a fresh interpreter, start-up included."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "graphtune", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise SystemExit(f"bench_overhead: graphtune {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--longer", default="12,6", help="epochs of one more hypernet run (existing store), to show "
                        "how the share grows with the work; empty = none")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(model, kind, "6,3") for model in args.models for kind in ("new store", "existing store")]
        if args.longer and "hypernet" in args.models:
            runs.append(("hypernet", "existing store", args.longer))
        for model, kind, epochs in runs:
            r = measure(model, f"sqlite:///{tmp}/{model}.db", tmp, epochs)
            r.update(model=model, store=kind, epochs=epochs, share_train_eval=(r["train"] + r["evaluate"]) / r["wall"])
            rows.append(r)
    cli = {"graphtune --help": cli_seconds(["--help"]), "graphtune cities": cli_seconds(["cities"])}
    header = f"| model | epochs | store | wall s | {' | '.join(PHASES)} | train + evaluate |"
    print(header + "\n|" + "---|" * (len(PHASES) + 5))
    for r in rows:
        cells = " | ".join(f"{r[p]:.2f} ({r[p] / r['wall']:.0%})" for p in PHASES)
        print(f"| {r['model']} | {r['epochs']} | {r['store']} | {r['wall']:.2f} | {cells} | {r['share_train_eval']:.0%} |")
    print("\n" + "\n".join(f"{command}: {seconds:.2f} s (median of 5, fresh process)" for command, seconds in cli.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"protocol": "graphtune experiment, params.yaml defaults with --epochs 6,3, REAL "
                                                "METR-LA week west -> east, 2 CPU threads, fresh process per run",
                                    "phases": list(PHASES), "runs": rows, "cli_s": cli}, indent=1) + "\n")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
