"""The experiment end to end on the real sample sub-cities, asserting on the tracking store's contents."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert 0 < p.metrics["S_uep"] <= 1.25
    assert p.params["experiment.model"] == "baseline" and p.params["transfer.fractions"] == "[0.1, 0.5]"
    assert p.params["prepare.stride"] == "4"
    assert "git.commit" in p.tags and p.tags["device"] == "cpu"
    hashes = json.loads(p.tags["dvc.data_hashes"])
    assert set(hashes) == {"metr-la-west", "metr-la-east"} and hashes["metr-la-east"]["series"].startswith("6b4e7959")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.json", "results.csv", "transfer_curve.png", "stage_scores.png", "params.yaml"} <= artifacts

    # stage runs: final/per-horizon/zero-shot metrics, efficiency, difficulty, score parts, checkpoint
    s1 = stages[1].data.metrics
    for key in ("test_mae", "test_rmse", "test_mape", "test_mae_h3", "test_rmse_h12", "zero_test_rmse",
                "zero_val_mae", "params_total", "params_trainable", "flops", "train_time_s", "peak_rss_mb",
                "difficulty_proxy", "difficulty_ha", "transfer_share", "transfer_auc", "stage_score",
                "eff_norm", "budget_penalty", "difficulty_weight"):
        assert key in s1, key
    assert s1["peak_rss_mb"] >= 0 and s1["flops"] > 0 and s1["transfer_share"] == 1.0
    assert "source_model.pt" in {a.path for a in client.list_artifacts(stages[0].info.run_id)}
    # per-epoch metrics with steps inside a budget run; the transfer curve with step = percent of data
    history = client.get_metric_history(budgets[0].info.run_id, "epoch/val_mae")
    assert [m.step for m in history] == [1]
    assert [m.step for m in client.get_metric_history(stages[0].info.run_id, "epoch/train_loss")] == [1]
    curve = client.get_metric_history(stages[1].info.run_id, "curve_test_rmse")
    assert sorted(m.step for m in curve) == [0, 10, 50]


def test_results_files_and_live_leaderboard(tracked):
    tmp, output = tracked
    results = json.loads((tmp / "out" / "results.json").read_text())
    assert [s["kind"] for s in results["stages"]] == ["pretrain", "transfer"]
    keys = {"zero_rmse", "test_rmse", "curve_rmse", "static_eff", "dynamic_eff", "flops", "difficulty",
            "difficulty_weight", "transfer_auc", "eff_norm", "budget_penalty", "stage_score"}
    for stage in results["stages"]:
        assert keys <= set(stage)
    assert results["stages"][0]["zero_rmse"] is None and len(results["stages"][1]["curve_rmse"]) == 2
    weights = [s["difficulty_weight"] for s in results["stages"]]
    assert sum(weights) == pytest.approx(1.0)
    assert results["S_uep"] == pytest.approx(sum(s["difficulty_weight"] * s["stage_score"]
                                                 for s in results["stages"]))
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


@pytest.mark.parametrize("args,message", [
    (["--fractions", "0.5,1.5"], "fractions"),
    (["--fractions", "0"], "fractions"),
    (["--datasets", "metr-la-west", "--fractions", "0.5"], "transfer-only"),
    (["--epochs", "1,2,3"], "train.epochs"),
    (["--model", "transformerxl"], "unknown model 'transformerxl'"),
    (["--datasets", "metr-la-west,atlantis"], "unknown city 'atlantis'"),
    (["--set", "transfer.fewshot_mode=some"], "fewshot_mode"),
    (["--set", "experiment.strategy=magic"], "unknown strategy"),
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


def test_compare_after_two_models(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    for model in ("baseline", "ha"):
        r = _invoke("experiment", *FAST, "--model", model, "--fractions", "0.3", "--output-dir",
                    str(tmp_path / model))
        assert r.exit_code == 0, r.output
    r = _invoke("compare", "--output-dir", str(tmp_path / "board"), "--params", str(REPO / "params.yaml"))
    assert r.exit_code == 0, r.output
    assert "baseline" in r.output and "ha" in r.output
    board = (tmp_path / "board" / "leaderboard.csv").read_text().splitlines()
    assert len(board) == 3  # header + two models
    assert (tmp_path / "board" / "leaderboard.png").stat().st_size > 0
