"""The experiment end to end on the real sample sub-cities, asserting on the tracking store's contents."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from graphtune.cli import cli

REPO = Path(__file__).resolve().parents[1]
# one epoch of the tiny baseline, every 4th training window: seconds, not minutes
FAST = ["--model", "baseline", "--epochs", "1", "--set", "prepare.stride=4", "--set", "train.batch_size=128",
        "--params", str(REPO / "params.yaml")]
NEVER_STOP = ["--set", "transfer.min_gain_rate=-1000"]  # every step counts as a gain: the whole curve runs


def _invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _store(tmp_path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")


def _uri(tmp):
    """MLflow's fluent API pointed at the test store for the block (and $MLFLOW_TRACKING_URI put back after)."""
    from graphtune.tracking.store import _global_tracking_uri

    return _global_tracking_uri(f"sqlite:///{tmp}/mlflow.db")


def _all_runs(client: MlflowClient):
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One tracked two-city experiment, shared by the structure tests (module scope keeps CI fast)."""
    tmp = tmp_path_factory.mktemp("exp")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
    mp.chdir(REPO)
    result = CliRunner().invoke(cli, ["experiment", *FAST, *NEVER_STOP, "--fractions", "0.1,0.5",
                                      "--set", f"prepare.processed_dir={tmp}/processed",
                                      "--output-dir", str(tmp / "out")])
    mp.undo()
    assert result.exit_code == 0, result.output
    return tmp, result.output


def test_nested_run_structure(tracked):
    tmp, output = tracked
    client = _store(tmp)
    runs = _all_runs(client)
    by_kind = {}
    for r in runs:
        by_kind.setdefault(r.data.tags["graphtune.kind"], []).append(r)
    assert {k: len(v) for k, v in by_kind.items()} == {"experiment": 1, "stage": 2, "budget": 2}
    assert all(r.info.status == "FINISHED" for r in runs)
    parent = by_kind["experiment"][0]
    stages = sorted(by_kind["stage"], key=lambda r: int(r.data.tags["graphtune.stage"]))
    assert [s.data.tags["mlflow.parentRunId"] for s in stages] == [parent.info.run_id] * 2
    assert [s.data.tags["graphtune.city"] for s in stages] == ["metr-la-west", "metr-la-east"]
    budgets = sorted(by_kind["budget"], key=lambda r: float(r.data.tags["graphtune.fraction"]))
    assert [b.data.tags["mlflow.parentRunId"] for b in budgets] == [stages[1].info.run_id] * 2
    assert [b.data.tags["graphtune.fraction"] for b in budgets] == ["0.1", "0.5"]

    # the parent: S_uep, every param flattened, code and data versions, artifacts
    p = parent.data
    assert 0 < p.metrics["S_uep"] <= 1.25 and -1 < p.metrics["score"] <= 1
    assert p.metrics["reference/ha/score"] == 0.0 and p.metrics["data/windows"] > 0
    assert p.tags["graphtune.run_type"] == "transfer" and len(p.tags["graphtune.config_hash"]) == 16
    assert p.tags["graphtune.targets"] == "metr-la-east" and json.loads(p.tags["graphtune.config"])["model"] == "baseline"
    assert all(r.data.tags["graphtune.config_hash"] == p.tags["graphtune.config_hash"] for r in runs)
    assert p.params["experiment.model"] == "baseline" and p.params["transfer.fractions"] == "[0.1, 0.5]"
    assert p.params["prepare.stride"] == "4"
    assert "git.commit" in p.tags and p.tags["device"] == "cpu"
    hashes = json.loads(p.tags["dvc.data_hashes"])
    assert set(hashes) == {"metr-la-west", "metr-la-east"} and hashes["metr-la-east"]["series"].startswith("6b4e7959")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.json", "results.csv", "transfer_curve.png", "stage_scores.png", "params.yaml",
            "config.json"} <= artifacts

    # stage runs: final/per-horizon/zero-shot metrics, efficiency, difficulty, score parts, checkpoint
    s1 = stages[1].data.metrics
    for key in ("test_mae", "test_rmse", "test_mape", "test_mae_h3", "test_rmse_h12", "zero_test_rmse",
                "zero_val_mae", "params_total", "params_trainable", "flops", "train_time_s", "peak_rss_mb",
                "difficulty_proxy", "difficulty_ha", "transfer_share", "score/skill", "score/transfer_auc",
                "score/cost_share", "score/stage_score", "score/difficulty_weight", "S_uep/transfer_auc",
                "S_uep/stage_score", "S_uep/eff_norm", "S_uep/budget_penalty", "S_uep/difficulty_weight",
                "reference/ha/test_rmse", "reference/persistence/test_rmse", "cost/train_flops", "data/windows",
                "data/readings", "zero_data/windows"):
        assert key in s1, key
    assert s1["zero_data/windows"] == 0 and s1["data/windows"] > 0  # zero-shot saw no training window
    assert s1["peak_rss_mb"] >= 0 and s1["flops"] > 0 and s1["transfer_share"] == 1.0
    assert "source_model.pt" in {a.path for a in client.list_artifacts(stages[0].info.run_id)}
    # per-epoch metrics with steps inside a budget run; the transfer curve with step = percent of data
    # the MLflow UI: the experiment opens on its runs, params are resolved values, datasets and models are logged
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert not [k for k, v in p.params.items() if v in ("", "''")], "a param logged as an empty string"
    assert p.params["experiment.name"] == parent.info.run_name and p.params["experiment.device"] == "cpu"
    inputs = {(d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"])
              for d in parent.inputs.dataset_inputs}
    assert inputs == {("metr-la-west", "source"), ("metr-la-east", "target")}
    assert all(len(d.dataset.digest) == 16 for d in parent.inputs.dataset_inputs)
    assert [d.dataset.name for d in stages[1].inputs.dataset_inputs] == ["metr-la-east"]
    import mlflow

    with _uri(tmp):
        logged = mlflow.search_logged_models(experiment_ids=[parent.info.experiment_id], output_format="list")
    assert sorted(m.source_run_id for m in logged) == sorted(s.info.run_id for s in stages)
    for b in budgets:  # each budget point's own cost
        assert {"train_flops", "steps", "samples", "peak_rss_mb", "wall_time_s"} <= set(b.data.metrics)
        assert b.data.metrics["train_flops"] > 0
    b0 = budgets[0].data.metrics
    assert b0["data/windows"] < budgets[1].data.metrics["data/windows"] and b0["data/days"] > 0
    history = client.get_metric_history(budgets[0].info.run_id, "epoch/val_mae")
    assert [m.step for m in history] == [1]
    assert [m.step for m in client.get_metric_history(stages[0].info.run_id, "epoch/train_loss")] == [1]
    curve = client.get_metric_history(stages[1].info.run_id, "curve_test_rmse")
    assert sorted(m.step for m in curve) == [0, 10, 50]


def test_results_files_and_live_leaderboard(tracked):
    tmp, output = tracked
    results = json.loads((tmp / "out" / "results.json").read_text())
    assert [s["kind"] for s in results["stages"]] == ["pretrain", "transfer"]
    keys = {"zero_rmse", "test_rmse", "curve_rmse", "static_eff", "dynamic_eff", "flops", "difficulty", "score",
            "S_uep", "reference", "cost", "data"}
    for stage in results["stages"]:
        assert keys <= set(stage)
    pre, tra = results["stages"]
    assert pre["zero_rmse"] is None and len(tra["curve_rmse"]) == 2
    # S_uep as GraphTune-lite defines it: every stage, difficulty-weighted
    assert sum(s["S_uep"]["difficulty_weight"] for s in results["stages"]) == pytest.approx(1.0)
    assert results["S_uep"] == pytest.approx(sum(s["S_uep"]["difficulty_weight"] * s["S_uep"]["stage_score"]
                                                 for s in results["stages"]))
    # the comparable score: the transfer stage only (the source model is taken as given)
    assert tra["score"]["difficulty_weight"] == 1.0 and pre["score"]["difficulty_weight"] == 0.0
    assert results["score"] == pytest.approx(tra["score"]["stage_score"])
    q = tra["test_rmse"] / tra["reference"]["ha"]["rmse"]  # one epoch on a quarter of the windows: worse than HA
    assert tra["score"]["skill"] == pytest.approx(1 - q if q <= 1 else 1 / q - 1)
    # what each point used
    assert [p["data"]["windows"] for p in tra["curve"]] == [p["windows"] for p in tra["curve"]]
    assert tra["zero_shot_data"]["readings"] == 0 and tra["data"] == tra["curve"][-1]["data"]
    assert results["references"]["ha"]["score"] == 0.0 and results["config_hash"]
    assert output.count("stage score") == 2  # the live leaderboard after each stage
    assert (tmp / "out" / "results.csv").read_text().count("\n") == 3


def test_same_seed_same_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        r = _invoke("experiment", *FAST, "--fractions", "0.2", "--no-tracking", "--output-dir", str(out))
        assert r.exit_code == 0, r.output
        outs.append(json.loads((out / "results.json").read_text()))
    for a, b in zip(outs[0]["stages"], outs[1]["stages"]):
        assert a["test"] == b["test"] and a["zero_rmse"] == b["zero_rmse"] and a["curve_rmse"] == b["curve_rmse"]
    # the ranking score reads no clock and no memory gauge: the same configuration, the same score
    assert outs[0]["score"] == outs[1]["score"] and outs[0]["config_hash"] == outs[1]["config_hash"]


@pytest.mark.parametrize("args,message", [
    (["--fractions", "0.5,1.5"], "fractions"),
    (["--fractions", "0"], "fractions"),
    (["--datasets", "metr-la-west", "--fractions", "0.5"], "transfer-only"),
    (["--epochs", "1,0"], "train.epochs"),
    (["--model", "transformerxl"], "unknown model 'transformerxl'"),
    (["--datasets", "metr-la-west,atlantis"], "unknown city 'atlantis'"),
    (["--set", "transfer.fewshot_mode=some"], "fewshot_mode"),
    (["--set", "experiment.strategy=magic"], "unknown strategy"),
    (["--set", "train.clip_grad=-1"], "train.clip_grad"),
    (["--lrs", "inf"], "train.lrs"),
    (["--set", "train.weight_decay=-1"], "train.weight_decay"),
    (["--set", "experiment.model_kwargs={hidden: -4}"], "experiment.model_kwargs.hidden"),
    (["--set", "transfer.prompt_days=-1"], "transfer.prompt_days"),
])
def test_bad_input_fails_before_any_run(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(REPO)
    r = CliRunner().invoke(cli, ["experiment", *FAST, *args, "--output-dir", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.output
    assert not (tmp_path / "out").exists()
    db = tmp_path / "mlflow.db"
    assert not db.exists() or _all_runs(_store(tmp_path)) == []


def test_finetune_from_missing_run_id(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    r = CliRunner().invoke(cli, ["finetune", "--from", "0123456789abcdef0123456789abcdef", "--datasets",
                                 "metr-la-east", *FAST])
    assert r.exit_code == 2 and "no run with id" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "mlflow.db").exists() or _all_runs(_store(tmp_path)) == []


def test_pretrain_then_finetune_from_run_and_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    r = _invoke("pretrain", "--city", "metr-la-west", *FAST, "--output-dir", str(tmp_path / "pre"))
    assert r.exit_code == 0, r.output
    run_id = r.output.strip().splitlines()[-1].split("run ")[1].split(":")[0]
    r2 = _invoke("finetune", "--from", run_id, "--datasets", "metr-la-east", *FAST, "--fractions", "0.3",
                 "--output-dir", str(tmp_path / "ft"))
    assert r2.exit_code == 0, r2.output
    ft = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert [s["kind"] for s in ft["stages"]] == ["transfer"] and ft["stages"][0]["transfer"]["share"] == 1.0
    client = _store(tmp_path)
    parents = [r for r in _all_runs(client) if r.data.tags["graphtune.kind"] == "experiment"]
    assert len(parents) == 2
    # the same source from a checkpoint file
    ckpt = client.download_artifacts(
        next(r.info.run_id for r in _all_runs(client) if r.data.tags.get("graphtune.kind") == "stage"
             and r.data.tags.get("graphtune.city") == "metr-la-west"), "source_model.pt", str(tmp_path))
    r3 = _invoke("finetune", "--from", ckpt, "--datasets", "metr-la-east", *FAST, "--fractions", "0.3",
                 "--no-tracking", "--output-dir", str(tmp_path / "ft2"))
    assert r3.exit_code == 0, r3.output
    ft2 = json.loads((tmp_path / "ft2" / "results.json").read_text())
    assert ft2["stages"][0]["zero_rmse"] == ft["stages"][0]["zero_rmse"]
    # fine-tuning continues the source's model: naming another one is an error, not silently ignored
    r4 = CliRunner().invoke(cli, ["finetune", "--from", ckpt, "--datasets", "metr-la-east", *FAST, "--model",
                                  "hypernet", "--no-tracking", "--output-dir", str(tmp_path / "ft3")])
    assert r4.exit_code == 2 and r4.output.strip() == (
        f"graphtune: error: --model: the source {ckpt} is a baseline model, and fine-tuning continues it; drop "
        "--model hypernet, or pretrain a hypernet first"), r4.output
    assert not (tmp_path / "ft3").exists()


def _board(tmp_path):
    r = _invoke("compare", "--output-dir", str(tmp_path / "board"), "--params", str(REPO / "params.yaml"))
    assert r.exit_code == 0, r.output
    board = pd.read_csv(tmp_path / "board" / "leaderboard.csv", keep_default_na=False, na_values=[""],
                        dtype={"config": str, "differs": str, "seeds": str})
    return board, r.output


def _experiment(tmp_path, name, *args):
    r = _invoke("experiment", *FAST, "--fractions", "0.3", *args, "--output-dir", str(tmp_path / name))
    assert r.exit_code == 0, r.output
    return json.loads((tmp_path / name / "results.json").read_text())


def test_runs_differing_in_epochs_are_two_rows_and_another_run_changes_no_score(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    results = {e: _experiment(tmp_path, f"e{e}", "--epochs", e) for e in ("1", "2")}
    board, output = _board(tmp_path)
    assert output.splitlines()[0].startswith("Transfer: ranked by score, comparable across runs")
    runs = board[board["strategy"] != "reference"]
    assert list(runs["model"]) == ["baseline", "baseline"] and list(runs["n_runs"]) == [1, 1]
    by_hash = {r["config_hash"]: r for r in results.values()}
    assert set(runs["config_hash"]) == set(by_hash)  # one row per configuration, keyed by its hash
    for _, row in runs.iterrows():
        assert row["score_mean"] == by_hash[row["config_hash"]]["score"]
        epochs = 1 if row["config_hash"] == results["1"]["config_hash"] else 2
        assert row["differs"] == f"train[0].epochs={epochs}, train[1].epochs={epochs}"
    assert list(runs["score_mean"]) == sorted(runs["score_mean"], reverse=True)  # ranked by the score
    # another run in the store (another model) changes neither score
    _experiment(tmp_path, "other", "--model", "hypernet")
    again, _ = _board(tmp_path)
    scores = dict(zip(again["config_hash"], again["score_mean"]))
    assert all(scores[h] == r["score"] for h, r in by_hash.items())
    assert "hypernet" in set(again["model"]) and len(again[again["strategy"] != "reference"]) == 3


def test_a_pretrain_run_has_its_own_board(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    r = _invoke("pretrain", "--city", "metr-la-west", *FAST, "--output-dir", str(tmp_path / "pre"))
    assert r.exit_code == 0, r.output
    _experiment(tmp_path, "transfer")
    board, output = _board(tmp_path)
    pretrain = board[board["board"] == "pretrain"]
    assert sorted(pretrain["strategy"]) == ["full", "reference", "reference"]
    assert set(pretrain["datasets"]) == {"metr-la-west"} and list(pretrain["rank"]) == [1, 2, 3]
    assert (board[board["board"] == "transfer"]["datasets"] != "metr-la-west").all()
    assert "Pretraining (source models on one city)" in output




def test_a_diverged_run_fails_with_one_line_and_never_ranks(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["experiment", *FAST, "--lrs", "1e30", "--output-dir", str(out)])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("graphtune: error:")]
    assert len(errors) == 1 and "training diverged" in errors[0] and "train.lrs" in errors[0], r.output
    assert "Traceback" not in r.output and not out.exists()
    runs = _all_runs(_store(tmp_path))
    assert runs and all(run.info.status == "FAILED" for run in runs)
    parent = next(run for run in runs if run.data.tags["graphtune.kind"] == "experiment")
    assert "TrainingDiverged" in parent.data.tags["graphtune.error"]
    board, _ = _board(tmp_path)
    assert board.empty


def test_output_dir_with_foreign_files_is_refused_before_any_run(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    r = CliRunner().invoke(cli, ["experiment", *FAST, "--output-dir", str(out)])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "notes.txt" in r.output and "did not write" in r.output
    assert (out / "notes.txt").read_text() == "keep me\n" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "mlflow.db").exists() or _all_runs(_store(tmp_path)) == []
    # the working directory itself is never an output folder (a new, scratch one here: nothing else at risk)
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("mine\n")
    monkeypatch.chdir(work)
    r = CliRunner().invoke(cli, ["experiment", *FAST, "--output-dir", "."])
    assert r.exit_code == 2 and "refusing to replace the working directory" in r.output, r.output
    assert (work / "mine.txt").read_text() == "mine\n"


def test_a_graphtune_output_folder_is_replaced_and_its_stale_files_go(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("results.json", "results.csv", "transfer_curve.png"):  # what an older GraphTune left there
        (out / name).write_text("old\n")
    (out / "stale.png").write_text("old\n")
    r = CliRunner().invoke(cli, ["experiment", *FAST, "--no-tracking", "--output-dir", str(out)])
    assert r.exit_code == 2 and "stale.png" in r.output  # not one of GraphTune's names: refused
    (out / "stale.png").unlink()
    r = _invoke("experiment", *FAST, "--no-tracking", "--fractions", "0.3", "--output-dir", str(out))
    assert r.exit_code == 0, r.output
    assert json.loads((out / "results.json").read_text())["config_hash"]
    assert (out / ".graphtune-output.json").is_file()


@pytest.mark.slow
def test_scratch_ranks_below_full_transfer_and_ha_below_a_better_model(tmp_path, monkeypatch):
    """hypernet moved west -> east with the default epochs (seeded, deterministic on CPU): the transfer
    beats the historical average; scratch, trained only on the target, ends with a worse error."""
    monkeypatch.chdir(REPO)
    args = ["--model", "hypernet", "--set", "prepare.stride=2", "--fractions", "0.3", "--params",
            str(REPO / "params.yaml")]
    for strategy in ("full", "scratch"):
        r = _invoke("experiment", *args, "--strategy", strategy, "--output-dir", str(tmp_path / strategy))
        assert r.exit_code == 0, r.output
    scratch = json.loads((tmp_path / "scratch" / "results.json").read_text())
    assert [s["kind"] for s in scratch["stages"]] == ["transfer"]  # no pretraining: scratch loads nothing
    board, _ = _board(tmp_path)
    rows = board.set_index(["model", "strategy"])
    full, scr, ha = rows.loc[("hypernet", "full")], rows.loc[("hypernet", "scratch")], rows.loc[("ha", "reference")]
    assert scr["final_test_rmse_mean"] >= full["final_test_rmse_mean"] and scr["rank"] > full["rank"]
    for _, row in board[board["strategy"] != "reference"].iterrows():
        if row["final_test_rmse_mean"] < ha["final_test_rmse_mean"]:
            assert row["rank"] < ha["rank"], row
    assert full["rank"] < ha["rank"] and ha["score_mean"] == 0.0
    # GraphTune-lite's within-run S_uep, still logged as it was, ranked these the other way round
    assert scr["S_uep"] > full["S_uep"]


def test_finetune_from_a_registered_model(tmp_path, monkeypatch):
    """A stage's model is an MLflow model: once registered, `--from models:/NAME/VERSION` fine-tunes from it."""
    import mlflow

    monkeypatch.chdir(REPO)
    r = _invoke("pretrain", "--city", "metr-la-west", *FAST, "--output-dir", str(tmp_path / "pre"))
    assert r.exit_code == 0, r.output
    client = _store(tmp_path)
    stage = next(run for run in _all_runs(client) if run.data.tags.get("graphtune.kind") == "stage")
    with _uri(tmp_path):
        (model,) = mlflow.search_logged_models(filter_string=f"source_run_id = '{stage.info.run_id}'",
                                               experiment_ids=[stage.info.experiment_id], output_format="list")
        version = mlflow.register_model(model.model_uri, "west-baseline")
    r = _invoke("finetune", "--from", f"models:/west-baseline/{version.version}", "--datasets", "metr-la-east",
                *FAST, "--fractions", "0.3", "--no-tracking", "--output-dir", str(tmp_path / "ft"))
    assert r.exit_code == 0, r.output
    ft = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert ft["stages"][0]["transfer"]["transferred"] is True
    r = CliRunner().invoke(cli, ["finetune", "--from", "models:/west-baseline/7", "--datasets", "metr-la-east", *FAST])
    assert r.exit_code == 2 and "no registered model models:/west-baseline/7" in r.output, r.output


def test_concurrent_runs_get_their_own_folders_and_latest_links_the_newest(tmp_path):
    """The default output is a folder per run: two experiments started together never write the same folder."""
    import subprocess
    import sys

    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "graphtune", "experiment", *FAST, "--fractions", "0.3",
           "--output-dir", str(tmp_path / "runs" / "{run}")]
    procs = [subprocess.Popen(cmd + ["--seed", str(seed)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name != "latest")
    assert len(folders) == 2 and all((tmp_path / "runs" / f / "results.json").is_file() for f in folders)
    seeds = sorted(json.loads((tmp_path / "runs" / f / "results.json").read_text())["seed"] for f in folders)
    assert seeds == [0, 1]
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and os.readlink(latest) in folders


def test_a_misplaced_run_placeholder_is_one_line(tmp_path):
    r = CliRunner().invoke(cli, ["experiment", *FAST, "--no-tracking", "--output-dir", str(tmp_path / "{run}" / "x")])
    assert r.exit_code == 2 and "must be the whole last folder name" in r.output


def test_latest_is_a_link_made_atomically_and_a_users_latest_is_left_alone(tmp_path):
    from graphtune.errors import GraphTuneNotice
    from graphtune.transfer.experiment import output_folder, point_latest

    assert output_folder("outputs/runs/{run}") == (Path("outputs/runs"), True)
    assert output_folder("outputs/experiment") == (Path("outputs/experiment"), False)
    (tmp_path / "a-1").mkdir()
    (tmp_path / "b-2").mkdir()
    point_latest(tmp_path, "a-1")
    point_latest(tmp_path, "b-2")
    assert os.readlink(tmp_path / "latest") == "b-2" and sorted(os.listdir(tmp_path)) == ["a-1", "b-2", "latest"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "latest").write_text("my notes")
    with pytest.warns(GraphTuneNotice, match="not a link GraphTune made"):
        point_latest(mine, "a-1")
    assert (mine / "latest").read_text() == "my notes"
