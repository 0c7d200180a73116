"""Tracker against real sqlite stores: run structure, statuses, params, metrics, artifacts, checkpoints.

Every assertion reads the store back through MlflowClient, not through the Tracker.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from graphtune.errors import ConfigError
from graphtune.plots import transfer_curve_figure
from graphtune.tracking import (
    MAX_PARAM_VALUE,
    Terminated,
    Tracker,
    flatten,
    git_info,
    graphtune_tags,
    load_checkpoint,
    resolve_tracking_uri,
    run_exists,
    search_runs,
)


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    """An empty, fully migrated MLflow sqlite file. Creating one runs MLflow's schema migrations
    (~5 s); tests copy this file instead, so each still starts from an empty store of its own."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, migrated_db) -> str:
    """An empty store at the URI conftest puts in $MLFLOW_TRACKING_URI for this test."""
    shutil.copy(migrated_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


def _logged(metrics: dict) -> dict:
    """A run's metrics as the test logged them: without the liveness heartbeat every top-level run carries
    (tests/test_liveness.py checks the heartbeat itself)."""
    from graphtune.tracking.liveness import HEARTBEAT

    return {k: v for k, v in metrics.items() if k != HEARTBEAT}


def _runs_by_name(client: MlflowClient, experiment_name: str = "graphtune") -> dict:
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    return {run.info.run_name: run for run in runs}


def _tags(kind: str, **extra) -> dict:
    return graphtune_tags(kind, model="gwnet", strategy="finetune", datasets=["metr-la", "pems-bay"], seed=0, **extra)


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


def test_flatten_joins_keys_and_keeps_leaves():
    nested = {"model": {"hidden": 32, "layers": [1, 2], "opt": {"lr": 0.01}}, "seed": 0, "empty": {}}
    assert flatten(nested) == {
        "model.hidden": 32,
        "model.layers": [1, 2],
        "model.opt.lr": 0.01,
        "seed": 0,
        "empty": {},
    }
    assert flatten({"a": {"b": 1}}, prefix="cfg.") == {"cfg.a.b": 1}


def test_graphtune_tags():
    tags = graphtune_tags("budget", model="m", strategy="s", datasets=("a", "b"), seed=3, stage=1, city="b",
                          fraction=0.1)
    assert tags == {
        "graphtune.kind": "budget",
        "graphtune.model": "m",
        "graphtune.strategy": "s",
        "graphtune.datasets": "a,b",
        "graphtune.seed": "3",
        "graphtune.stage": "1",
        "graphtune.city": "b",
        "graphtune.fraction": "0.1",
    }
    with pytest.raises(ValueError, match="run kind"):
        graphtune_tags("sweep", model="m", strategy="s", datasets="a", seed=0)


def test_reading_tags_and_formatting_boards_import_no_mlflow():
    code = ("import sys; import graphtune.compare, graphtune.tracking.tags; "
            "print('mlflow' in sys.modules, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"], done.stdout + done.stderr


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///runs/mlflow.db") == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("store.db") == f"sqlite:///{tmp_path}/store.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path}/env.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    for file_store in ("mlruns", "file:///tmp/mlruns"):
        with pytest.raises(ConfigError, match="file store"):
            resolve_tracking_uri(file_store)


def test_git_info(tmp_path):
    assert git_info(tmp_path) == {"git.commit": "unknown", "git.dirty": "unknown"}
    if shutil.which("git") is None:
        pytest.skip("git is not installed")

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    assert git_info(tmp_path) == {"git.commit": "unknown", "git.dirty": "unknown"}  # no commit yet
    (tmp_path / "a.txt").write_text("a")
    git("add", "a.txt")
    git("commit", "-q", "-m", "a")
    head = git("rev-parse", "HEAD")
    assert git_info(tmp_path) == {"git.commit": head, "git.dirty": "false"}
    (tmp_path / "a.txt").write_text("b")
    assert git_info(tmp_path) == {"git.commit": head, "git.dirty": "true"}


# ---------------------------------------------------------------------------------------------
# The run tree
# ---------------------------------------------------------------------------------------------


def test_nested_structure_params_metrics_artifacts(store, tmp_path):
    tracker = Tracker()  # the store comes from $MLFLOW_TRACKING_URI (set by conftest)
    assert tracker.tracking_uri == store
    params = {"model": {"hidden": 32, "layers": [2, 2]}, "train": {"lr": 0.001}, "note": "x" * 7000}
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1.5])}
    history = [{"epoch": e, "loss": 1.0 / (e + 1), "val_mae": 2.0 - 0.5 * e} for e in range(3)]

    with tracker.run("exp", tags={**_tags("experiment"), "device": "cpu", "dvc.data_hashes": {"pems-bay": "ab12"}},
                     params=params, description="a test run") as parent_id:
        with tracker.run("stage0-metr-la", nested=True, tags=_tags("stage", stage=0, city="metr-la")) as stage0_id:
            tracker.log_history(history, prefix="train/")
            tracker.log_checkpoint(state)
        with tracker.run("stage1-pems-bay", nested=True, tags=_tags("stage", stage=1, city="pems-bay")) as stage1_id:
            budget_ids = {}
            for fraction, rmse in ((0.1, 5.0), (1.0, 4.0)):
                with tracker.run(f"budget-{fraction}", nested=True,
                                 tags=_tags("budget", stage=1, city="pems-bay", fraction=fraction)) as budget_id:
                    tracker.log_metrics({"test": {"rmse": rmse}})
                    budget_ids[fraction] = budget_id
            tracker.log_metrics({"zero_shot_rmse": 6.0}, step=1)
        tracker.log_metrics({"S_uep": 0.75, "final_test_mae": 2.5, "missing": None, "nan": float("nan")})
        tracker.log_metrics_to(stage0_id, {"stage_score": 0.5})  # into a stage run that has already ended
        tracker.log_dict({"curve": [[0.0, 6.0], [0.1, 5.0]], "n": torch.tensor(3)}, "results/summary.json")
        curve = {"pems-bay": [(0.0, 6.0), (0.1, 5.0), (1.0, 4.0)]}
        tracker.log_figure(transfer_curve_figure(curve), "plots/transfer.png")
        config_file = tmp_path / "params.yaml"
        config_file.write_text("a: 1\n")
        tracker.log_artifact(config_file)
    assert mlflow.active_run() is None

    client = MlflowClient(store)
    runs = _runs_by_name(client)
    assert set(runs) == {"exp", "stage0-metr-la", "stage1-pems-bay", "budget-0.1", "budget-1.0"}
    assert {run.info.status for run in runs.values()} == {"FINISHED"}
    parent = runs["exp"]
    assert parent.info.run_id == parent_id
    assert "mlflow.parentRunId" not in parent.data.tags
    assert runs["stage0-metr-la"].data.tags["mlflow.parentRunId"] == parent_id
    assert runs["stage1-pems-bay"].data.tags["mlflow.parentRunId"] == parent_id
    for fraction, budget_id in budget_ids.items():
        run = runs[f"budget-{fraction}"]
        assert run.info.run_id == budget_id
        assert run.data.tags["mlflow.parentRunId"] == stage1_id
        assert run.data.tags["graphtune.fraction"] == str(fraction)
        assert run.data.tags["graphtune.kind"] == "budget"
    assert runs["budget-0.1"].data.metrics == {"test.rmse": 5.0}

    # Tags: standard ones, git on the parent only, JSON for a dict value, description.
    tags = parent.data.tags
    assert tags["graphtune.kind"] == "experiment"
    assert tags["graphtune.datasets"] == "metr-la,pems-bay"
    assert tags["graphtune.seed"] == "0"
    assert tags["device"] == "cpu"
    assert tags["dvc.data_hashes"] == '{"pems-bay":"ab12"}'
    assert tags["git.commit"] == "unknown" or len(tags["git.commit"]) == 40
    assert tags["git.dirty"] in ("true", "false", "unknown")
    assert tags["mlflow.note.content"] == "a test run"
    assert "git.commit" not in runs["stage0-metr-la"].data.tags
    assert runs["stage1-pems-bay"].data.tags["graphtune.stage"] == "1"
    assert runs["stage1-pems-bay"].data.tags["graphtune.city"] == "pems-bay"

    # Params: flattened, stringified, truncated to MLflow's limit.
    assert parent.data.params == {
        "model.hidden": "32",
        "model.layers": "[2, 2]",
        "train.lr": "0.001",
        "note": "x" * MAX_PARAM_VALUE,
    }

    # Metrics: None skipped, NaN logged as NaN; the history has one point per epoch at step = epoch.
    metrics = _logged(parent.data.metrics)
    assert math.isnan(metrics.pop("nan"))
    assert metrics == {"S_uep": 0.75, "final_test_mae": 2.5}
    losses = client.get_metric_history(stage0_id, "train/loss")
    assert sorted((m.step, m.value) for m in losses) == [(0, 1.0), (1, 0.5), (2, 1.0 / 3.0)]
    maes = client.get_metric_history(stage0_id, "train/val_mae")
    assert sorted((m.step, m.value) for m in maes) == [(0, 2.0), (1, 1.5), (2, 1.0)]
    assert [m.step for m in client.get_metric_history(stage1_id, "zero_shot_rmse")] == [1]
    assert runs["stage0-metr-la"].data.metrics["stage_score"] == 0.5

    # Artifacts: beside the sqlite file (not in ./mlruns), and what was logged is there.
    assert parent.info.artifact_uri.startswith((tmp_path / "mlartifacts" / "graphtune").as_uri())
    assert {a.path for a in client.list_artifacts(parent_id)} == {"results", "plots", "params.yaml"}
    assert [a.path for a in client.list_artifacts(parent_id, "plots")] == ["plots/transfer.png"]
    assert client.list_artifacts(parent_id, "plots")[0].file_size > 1000
    summary = json.loads(Path(client.download_artifacts(parent_id, "results/summary.json", str(tmp_path))).read_text())
    assert summary == {"curve": [[0.0, 6.0], [0.1, 5.0]], "n": 3}
    assert [a.path for a in client.list_artifacts(stage0_id)] == ["best.pt"]

    # Checkpoint round trip, through the tracker and through the module function.
    for loaded in (tracker.load_checkpoint(stage0_id), load_checkpoint(stage0_id, tracking_uri=store)):
        assert set(loaded) == {"w", "b"}
        assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])

    # search_runs / run_exists read the same store.
    frame = search_runs(store, ["graphtune"], parent_run_id=stage1_id)
    assert set(frame["run_id"]) == set(budget_ids.values())
    assert run_exists(parent_id, store)
    assert not run_exists("0" * 32, store)


def test_exception_marks_every_open_run_failed(store):
    tracker = Tracker()
    ids = []
    with pytest.raises(ValueError, match="diverged"):
        with tracker.run("exp", tags=_tags("experiment")) as parent_id:
            ids.append(parent_id)
            with tracker.run("stage1", nested=True) as stage_id:
                ids.append(stage_id)
                with tracker.run("budget-0.5", nested=True) as budget_id:
                    ids.append(budget_id)
                    tracker.log_metrics({"loss": 1.0})
                    raise ValueError("loss diverged\nat epoch 3")
    assert mlflow.active_run() is None
    assert tracker.active_run_id is None
    client = MlflowClient(store)
    for run_id in ids:
        run = client.get_run(run_id)
        assert run.info.status == "FAILED"
        assert run.info.end_time is not None
        assert run.data.tags["graphtune.error"] == "ValueError: loss diverged"

    # The tracker is usable again after the failure, and a finished sibling is FINISHED.
    with tracker.run("exp2") as again:
        pass
    assert client.get_run(again).info.status == "FINISHED"


def test_keyboard_interrupt_marks_runs_killed(store):
    tracker = Tracker()
    with pytest.raises(KeyboardInterrupt):
        with tracker.run("exp") as parent_id:
            with tracker.run("stage0", nested=True) as stage_id:
                raise KeyboardInterrupt
    client = MlflowClient(store)
    assert client.get_run(parent_id).info.status == "KILLED"
    assert client.get_run(stage_id).info.status == "KILLED"
    assert mlflow.active_run() is None


def test_sigterm_unwinds_and_marks_runs_killed(store):
    """A `timeout` or CI cancel sends SIGTERM: the runs must end KILLED, and the exit code stay 143."""
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    tracker = Tracker()
    with pytest.raises(Terminated) as excinfo:
        with tracker.run("exp") as parent_id:
            with tracker.run("stage0", nested=True) as stage_id:
                # Only send the signal once our handler is in place (else it would end pytest).
                assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises in this thread long before this returns
    assert excinfo.value.code == 143
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored
    client = MlflowClient(store)
    for run_id in (parent_id, stage_id):
        run = client.get_run(run_id)
        assert run.info.status == "KILLED"
        assert run.data.tags["graphtune.error"] == "Terminated: SIGTERM (exit code 143)"


def test_run_left_open_inside_is_ended_with_its_parent(store):
    """A run started with the plain fluent API inside ours and never ended is not left RUNNING."""
    tracker = Tracker()
    with pytest.raises(RuntimeError):
        with tracker.run("exp") as parent_id:
            stray = mlflow.start_run(run_name="stray", nested=True, experiment_id=tracker.experiment_id())
            raise RuntimeError("boom")
    client = MlflowClient(store)
    assert client.get_run(stray.info.run_id).info.status == "FAILED"
    assert client.get_run(parent_id).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_a_resumed_mlflow_run_keeps_the_whole_tree_in_its_experiment(store, monkeypatch):
    """`mlflow run` starts the project's run in its own experiment and passes it on as MLFLOW_RUN_ID: the runs
    opened inside it land there too, whatever tracking.experiment_name says."""
    client = MlflowClient(store)
    outer = client.create_run(client.create_experiment("project")).info
    monkeypatch.setenv("MLFLOW_RUN_ID", outer.run_id)
    tracker = Tracker(experiment_name="mine")
    with tracker.run("exp") as parent_id:
        with tracker.run("stage", nested=True) as stage_id:
            pass
    assert parent_id == outer.run_id
    assert client.get_run(stage_id).info.experiment_id == outer.experiment_id
    assert client.get_run(stage_id).data.tags["mlflow.parentRunId"] == parent_id
    assert client.get_experiment_by_name("mine") is None  # nothing was split off into another experiment


def test_misuse_is_reported(store):
    tracker = Tracker()
    with pytest.raises(RuntimeError, match="outside Tracker.run"):
        tracker.log_metrics({"a": 1.0})
    with pytest.raises(RuntimeError, match=r"Tracker.log_model called outside Tracker.run"):
        tracker.log_model(torch.nn.Linear(2, 1), torch.zeros(1, 2))
    with tracker.run("exp"):
        with pytest.raises(RuntimeError, match="nested=True"):
            with tracker.run("second-top-level"):
                pass
        with pytest.raises(TypeError, match="'name'"):
            tracker.log_metrics({"name": "gwnet"})
        with pytest.raises(ValueError, match="PNG"):
            tracker.log_figure(transfer_curve_figure({}), "plot.svg")
        with pytest.raises(FileNotFoundError):
            tracker.log_artifact("/no/such/file")


def test_many_metrics_land_in_batches(store):
    """2500 metrics in one call: more than MLflow's 1000 per log_batch request, all must land."""
    tracker = Tracker()
    metrics = {f"horizon/{h:02d}/node_{n:03d}": h + n / 1000 for h in range(12) for n in range(208)}
    metrics["np"] = np.float32(2.5)  # a numpy scalar is a number too
    metrics["flag"] = True
    history = [{"loss": 1.0 + e, "val": {"mae": 2.0 * e}} for e in range(400)]  # 800 points, no "epoch" key
    with tracker.run("exp") as run_id:
        tracker.log_metrics(metrics, step=7)
        tracker.log_history(history)
    client = MlflowClient(store)
    logged = _logged(client.get_run(run_id).data.metrics)
    assert len(logged) == 12 * 208 + 2 + 2
    assert logged["horizon/11/node_207"] == 11.207
    assert logged["np"] == 2.5 and logged["flag"] == 1.0
    assert [m.step for m in client.get_metric_history(run_id, "horizon/00/node_000")] == [7]
    val = client.get_metric_history(run_id, "val.mae")
    assert len(val) == 400 and {(m.step, m.value) for m in val} == {(e, 2.0 * e) for e in range(400)}


def test_load_checkpoint_errors_name_the_run(store):
    tracker = Tracker()
    missing = "f" * 32
    with pytest.raises(ConfigError, match=missing) as excinfo:
        load_checkpoint(missing, tracking_uri=store)
    assert "\n" not in str(excinfo.value)
    with pytest.raises(ConfigError, match="not-a-run-id"):
        tracker.load_checkpoint("not-a-run-id")
    with tracker.run("exp") as run_id:
        tracker.log_checkpoint({"w": torch.zeros(1)}, name="checkpoints/last.pt")
    with pytest.raises(ConfigError, match="'best.pt'.*checkpoints"):
        tracker.load_checkpoint(run_id)
    assert torch.equal(tracker.load_checkpoint(run_id, "checkpoints/last.pt")["w"], torch.zeros(1))


def test_reading_a_store_that_does_not_exist_creates_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path}/nothing-here.db"
    with pytest.raises(ConfigError, match="no such sqlite file"):
        search_runs(uri)
    assert not run_exists("f" * 32, uri)
    with pytest.raises(ConfigError, match="no such run"):
        load_checkpoint("f" * 32, tracking_uri=uri)
    assert list(tmp_path.iterdir()) == []


def test_search_runs_unknown_experiment(store):
    with Tracker().run("exp"):
        pass
    with pytest.raises(ConfigError, match="'nope'.*graphtune"):
        search_runs(store, ["nope"])
    assert len(search_runs(store)) == 1  # None = every active experiment


def test_environment_is_left_as_found(tmp_path, monkeypatch, migrated_db):
    """MLflow's set_tracking_uri writes $MLFLOW_TRACKING_URI and keeps a global: neither may steer
    a later Tracker() away from the store the environment names at that time."""
    first, second = tmp_path / "a.db", tmp_path / "b.db"
    shutil.copy(migrated_db, first)
    shutil.copy(migrated_db, second)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/elsewhere.db")  # a stale global from earlier code
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{first}")
    with Tracker().run("one") as one:
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{first}"
    with Tracker(f"sqlite:///{second}").run("explicit"):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{first}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{second}")
    with Tracker().run("two") as two:
        pass
    assert run_exists(one, f"sqlite:///{first}") and not run_exists(one, f"sqlite:///{second}")
    assert run_exists(two, f"sqlite:///{second}") and not run_exists(two, f"sqlite:///{first}")
    assert not (tmp_path / "elsewhere.db").exists()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with Tracker(f"sqlite:///{second}").run("three"):
        pass
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_disabled_tracker_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracker = Tracker(enabled=False)
    with tracker.run("exp", tags=_tags("experiment"), params={"a": 1}) as run_id:
        assert run_id is None
        with tracker.run("stage", nested=True) as stage_id:
            assert stage_id is None
            tracker.log_metrics({"a": 1.0})
            tracker.log_history([{"loss": 1.0}])
            tracker.log_params({"b": 2})
            tracker.set_tags({"c": "3"})
            tracker.log_dict({"d": 4}, "d.json")
            tracker.log_figure(transfer_curve_figure({}), "f.png")
            tracker.log_checkpoint({"w": torch.zeros(1)})
            tracker.log_metrics_to(stage_id, {"a": 1.0})
    assert mlflow.active_run() is None
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlruns/, no mlartifacts/


def test_fresh_store_in_a_new_folder(tmp_path):
    """A store that does not exist yet is created (folder, schema, experiment) on the first run."""
    uri = f"sqlite:///{tmp_path}/new/folder/mlflow.db"
    tracker = Tracker(uri, experiment_name="fresh")
    with tracker.run("exp", tags=_tags("experiment")) as run_id:
        tracker.log_metrics({"S_uep": 0.5})
        tracker.set_tags({"extra": ["a", "b"]})
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert _logged(run.data.metrics) == {"S_uep": 0.5}
    assert run.data.tags["extra"] == '["a","b"]'
    assert MlflowClient(uri).get_experiment(run.info.experiment_id).name == "fresh"


def test_system_metrics_on_the_parent_only(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # MLflow's default is 10 s
    tracker = Tracker(system_metrics=True)
    with tracker.run("exp") as parent_id:
        with tracker.run("stage0", nested=True) as stage_id:
            time.sleep(1.0)  # a few sampling intervals
    client = MlflowClient(store)
    parent_metrics = client.get_run(parent_id).data.metrics
    assert "system/cpu_utilization_percentage" in parent_metrics
    assert "system/system_memory_usage_megabytes" in parent_metrics
    assert not any(key.startswith("system/") for key in client.get_run(stage_id).data.metrics)
    assert math.isfinite(parent_metrics["system/cpu_utilization_percentage"])


def test_non_finite_metrics_are_logged_as_nan_never_as_float_max(store):
    """MLflow's sqlite store writes inf as 1.797e308; NaN round-trips. Both read back as NaN here."""
    tracker = Tracker()
    values = {"nan": float("nan"), "inf": float("inf"), "neg_inf": float("-inf"), "np_inf": np.float32(np.inf),
              "t_nan": torch.tensor(float("nan")), "finite": 1.5, "missing": None}
    with tracker.run("exp") as run_id:
        tracker.log_metrics(values, step=3)
        tracker.log_history([{"epoch": 1, "loss": float("inf")}, {"epoch": 2, "loss": float("nan")},
                             {"epoch": 3, "loss": 0.5}], prefix="train/")
    client = MlflowClient(store)
    logged = _logged(client.get_run(run_id).data.metrics)
    assert set(logged) == {"nan", "inf", "neg_inf", "np_inf", "t_nan", "finite", "train/loss"}
    assert logged["finite"] == 1.5
    for key in ("nan", "inf", "neg_inf", "np_inf", "t_nan"):
        assert math.isnan(logged[key]), (key, logged[key])
        [point] = client.get_metric_history(run_id, key)
        assert point.step == 3 and math.isnan(point.value)
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    assert [step for step, _ in history] == [1, 2, 3]
    assert math.isnan(history[0][1]) and math.isnan(history[1][1]) and history[2][1] == 0.5
