"""What a newcomer's first `make run` shows: the budget curve, the leaderboard, and how long it takes.

Runs `mlflow run . --env-manager local` (exactly what `make run` runs, params.yaml as it is) against a fresh
sqlite store in a temporary folder, then `graphtune compare` on that store, and records the wall time, the
transfer stage's curve (zero-shot, then each budget fraction) and the leaderboard's rows. The installation
is not timed: `make run` installs once, then this is what every later run costs.

    python bench/bench_first_run.py          # about half a minute on 2 CPU cores; bench/results/first_run.json
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "first_run.json"


def _torch_threads(bin_dir: Path) -> int:
    """The intra-op threads torch uses in a fresh process of this environment (as the run's own did)."""
    code = "import torch; print(torch.get_num_threads())"
    return int(subprocess.run([str(bin_dir / "python"), "-c", code], capture_output=True, text=True,
                              check=True).stdout)


def main() -> None:
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{tmp}/mlflow.db"
        env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               "GIT_PYTHON_REFRESH": "quiet", "MLFLOW_DISABLE_TELEMETRY": "true"}
        # a copy of the project, so that the run writes its outputs/ there and not into this checkout
        project = Path(tmp) / "project"
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        for name in filter(None, files.decode().split("\0")):
            if (ROOT / name).is_file():
                (project / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, project / name)
        start = time.perf_counter()
        run = subprocess.run([str(bin_dir / "mlflow"), "run", ".", "--env-manager", "local", "--experiment-name",
                              "graphtune"], cwd=project, env=env, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - start
        if run.returncode != 0:
            raise SystemExit(f"bench_first_run: mlflow run failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
        compare = subprocess.run([str(bin_dir / "graphtune"), "compare", "--output-dir", f"{tmp}/board"],
                                 cwd=project, env=env, capture_output=True, text=True, timeout=600, check=True)
        results = json.loads((project / "outputs" / "experiment" / "results.json").read_text())
        board = (Path(tmp) / "board" / "leaderboard.csv").read_text()
    target = results["stages"][-1]
    curve = [{"fraction": 0.0, "test_rmse": target["zero_rmse"]}] + [
        {"fraction": p["fraction"], "test_rmse": p["test_rmse"], "best_epoch": p["best_epoch"]}
        for p in target["curve"]]
    record = {"command": "mlflow run . --env-manager local (make run, after installation)", "wall_s": wall,
              "cpu_cores": len(os.sched_getaffinity(0)), "torch_threads": _torch_threads(bin_dir),
              "model": results["model"], "datasets": results["datasets"], "score": results["score"],
              "curve": curve, "improves_on_zero_shot": curve[-1]["test_rmse"] < curve[0]["test_rmse"],
              "references": results["references"], "leaderboard_csv": board, "compare_output": compare.stdout}
    print(f"make run: {wall:.1f} s; curve (fraction: test RMSE): "
          + ", ".join(f"{p['fraction']:g}: {p['test_rmse']:.3f}" for p in curve))
    print(compare.stdout)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"written {OUT}")


if __name__ == "__main__":
    main()
