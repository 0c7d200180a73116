"""`graphtune compress` and the transfer strategy `compress`, end to end on real data (digits, METR-LA week)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from graphtune.cli import cli

REPO = Path(__file__).resolve().parents[1]
PARAMS = ["--params", str(REPO / "params.yaml")]


def _invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compress")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
    result = CliRunner().invoke(cli, ["compress", *PARAMS, "--ratio", "0.5", "--rounds", "3", "--epochs", "3",
                                      "--output-dir", str(tmp / "out")], catch_exceptions=False)
    mp.undo()
    assert result.exit_code == 0, result.output
    return tmp, result.output


def test_command_writes_one_row_per_round_and_a_strict_model(lenet_run):
    tmp, output = lenet_run
    out = tmp / "out"
    assert {p.name for p in out.iterdir()} >= {"rounds_C0.5_k3_lbyl.csv", "model.pt", "base.pt", "results.json"}
    rows = list(csv.DictReader((out / "rounds_C0.5_k3_lbyl.csv").read_text().splitlines()))
    assert list(rows[0])[:3] == ["iteration", "compression_rate", "cumulative_compression"]
    assert {"accuracy", "num_parameters", "flops", "lambda1", "lambda2", "seed"} <= set(rows[0])
    assert [int(r["iteration"]) for r in rows] == [0, 1, 2, 3]
    assert float(rows[-1]["cumulative_compression"]) == 0.5
    params = [int(r["num_parameters"]) for r in rows]
    assert params == sorted(params, reverse=True) and params[-1] < params[0] / 2
    assert json.loads(rows[-1]["widths"]) == {"fc1": 150, "fc2": 50}

    from graphtune.compression.checkpoint import load_compressed
    from graphtune.compression.vision import build_network

    model, payload = load_compressed(out / "model.pt", lambda kind, name, config: build_network(config))
    assert payload["config"]["widths"] == [150, 50] and model.fc1.out_features == 150
    results = json.loads((out / "results.json").read_text())
    assert results["final"]["accuracy"] == pytest.approx(float(rows[-1]["accuracy"]))


def test_command_logs_every_round_as_a_step(lenet_run):
    tmp, _ = lenet_run
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["graphtune.kind"] == "compress"
    history = client.get_metric_history(runs[0].info.run_id, "accuracy")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]


def test_command_compresses_a_given_checkpoint_without_training(lenet_run, tmp_path):
    tmp, _ = lenet_run
    r = _invoke("compress", *PARAMS, "--checkpoint", str(tmp / "out" / "base.pt"), "--method", "prune-only",
                "--ratio", "0.7", "--output-dir", str(tmp_path / "again"), "--no-tracking")
    assert r.exit_code == 0, r.output
    assert "trained the base model" not in r.output
    assert not (tmp_path / "again" / "base.pt").exists()
    rows = list(csv.DictReader((tmp_path / "again" / "rounds_C0.7_k1_prune-only.csv").read_text().splitlines()))
    base = json.loads((tmp / "out" / "results.json").read_text())["base"]
    assert float(rows[0]["accuracy"]) == pytest.approx(base["accuracy"])  # the same base network


@pytest.mark.parametrize("args, message", [
    (["--ratio", "1.0"], r"compress\.ratio: expected a compression ratio in \[0, 1\)"),
    (["--rounds", "0"], r"compress\.rounds"),
    (["--model", "baseline", "--dataset", "metr-la-west"], "declares no prunable group"),
    (["--model", "nope"], "compress.model: unknown model 'nope'"),
    (["--method", "magic"], "compress.method"),
    (["--lbyl-variant", "upstream"], "compress.lbyl_variant"),
    (["--dataset", "/no/such/cifar"], "no/such/cifar"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    before = _listing(tmp_path)
    r = CliRunner().invoke(cli, ["compress", *PARAMS, "--epochs", "1", "--output-dir", str(tmp_path / "out"),
                                 "--set", f"prepare.processed_dir={tmp_path}/processed", *args])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphtune: error:"), r.output
    import re

    assert re.search(message, lines[0]), lines[0]
    assert _listing(tmp_path) - before <= {"mlflow.db"}  # no output folder, no run


def test_checkpoint_whose_widths_do_not_match_its_config_is_refused(lenet_run, tmp_path):
    tmp, _ = lenet_run
    payload = torch.load(tmp / "out" / "model.pt", weights_only=True)
    payload["config"]["widths"] = [151, 50]
    torch.save(payload, tmp_path / "edited.pt")
    r = CliRunner().invoke(cli, ["compress", *PARAMS, "--checkpoint", str(tmp_path / "edited.pt"), "--no-tracking",
                                 "--output-dir", str(tmp_path / "out")])
    assert r.exit_code == 2
    assert "edited.pt: shapes do not match its config: fc1.weight has shape (150, 64) in the file, the config " \
           "builds (151, 64)" in r.output
    assert not (tmp_path / "out").exists()


def _experiment(tmp_path, *sets):
    from graphtune.config import load_params
    from graphtune.transfer.experiment import execute, plan_experiment

    params = load_params(REPO / "params.yaml", [
        "experiment.datasets=[metr-la-west,metr-la-east]", "experiment.model=gwnet", "experiment.strategy=compress",
        "train.epochs=[1,1]", "transfer.fractions=[0.1]", "prepare.stride=4", "train.batch_size=128",
        f"prepare.processed_dir={tmp_path}/processed",
        "experiment.model_kwargs={residual_channels: 8, dilation_channels: 8, skip_channels: 32, end_channels: 64}",
        *sets])
    return execute(plan_experiment(params), echo=lambda _: None, tracking=False, output_dir=tmp_path / "out")[0]


@pytest.mark.slow
def test_strategy_compresses_before_zero_shot_and_its_costs_flow_into_the_stage(tmp_path):
    result = _experiment(tmp_path, "compress.ratio=0.5", "compress.rounds=2")
    target = result.stages[-1]
    info = target.transfer["compress"]
    assert info["widths"] == {"skip": 16, "end": 32} and info["rounds"] == 2
    assert target.zero_shot_test is not None  # compression used no target data: the zero-shot point stays
    full = _experiment(tmp_path / "full", "experiment.strategy=full").stages[-1]
    assert target.static_eff["params_total"] < full.static_eff["params_total"]
    assert target.flops["flops"] < full.flops["flops"]
    assert target.cost["trainable_params"] < full.cost["trainable_params"]


def test_budget_asks_for_the_smallest_ratio_that_meets_it(tmp_path):
    from graphtune.compression.strategy import Compress
    from graphtune.config import load_params
    from graphtune.data.synthetic import synthetic_bundle
    from graphtune.models import build_model, model_defaults
    from graphtune.transfer.strategies import SourceModel, StrategyContext

    params = load_params(REPO / "params.yaml", ["experiment.model=gwnet", "compress.ratio=budget",
                                                "budgets.trainable_m=0.1"])
    strategy = Compress()
    strategy.check(params, ["metr-la-east"])
    bundle = synthetic_bundle(num_nodes=6, num_steps=300, seed=0)
    full = build_model("gwnet", bundle)
    assert sum(p.numel() for p in full.parameters()) > 0.1e6
    source = SourceModel("gwnet", {}, full.state_dict(), "synthetic", list(bundle.sensor_ids),
                         bundle.scaler.to_dict())
    ctx = StrategyContext(sources=(source,), target=bundle, model="gwnet", model_kwargs={}, seed=0, device="cpu",
                          fraction=0.0)
    adapted = strategy.adapt(ctx)
    ratio = adapted.report.extra["compress"]["ratio"]
    n = sum(p.numel() for p in adapted.model.parameters())
    assert n <= 0.1e6
    rebuilt = build_model("gwnet", bundle, **adapted.model_kwargs)
    rebuilt.load_state_dict(adapted.model.state_dict(), strict=True)
    config = model_defaults("gwnet")
    less = {**config, "skip_channels": round(config["skip_channels"] * (1 - ratio + 0.01)),
            "end_channels": round(config["end_channels"] * (1 - ratio + 0.01))}
    assert sum(p.numel() for p in build_model("gwnet", bundle, **less).parameters()) > 0.1e6  # 0.01 less misses it


def test_strategy_refuses_a_model_without_groups_before_any_run(tmp_path):
    from graphtune.config import load_params
    from graphtune.errors import ConfigError
    from graphtune.transfer.experiment import plan_experiment

    params = load_params(REPO / "params.yaml", ["experiment.datasets=[metr-la-west,metr-la-east]",
                                                "experiment.model=bigst", "experiment.strategy=compress"])
    with pytest.raises(ConfigError, match="experiment.model 'bigst' declares no prunable group"):
        plan_experiment(params)


@pytest.mark.slow
def test_compression_suite_runs_real_jobs_and_plots_one_line_per_method_and_rounds(tmp_path):
    import yaml

    doc = yaml.safe_load((REPO / "suites" / "compression.yaml").read_text())
    doc["options"] |= {"epochs": 2, "params": str(REPO / "params.yaml")}
    doc["grid"] = {"ratio": [0.5], "rounds": [2], "method": ["prune-only", "lbyl"]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    r = _invoke("suite", "run", str(tmp_path / "s.yaml"), "--output-dir", str(tmp_path / "suite"))
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((tmp_path / "suite" / "summary_all.csv").read_text().splitlines()))
    assert len(rows) == 2 and {row["status"] for row in rows} == {"finished"}
    assert {(row["method"], row["rounds"]) for row in rows} == {("prune-only", "2"), ("lbyl", "2")}
    jobs = tmp_path / "suite" / "jobs"
    base = {json.loads((jobs / row["job"] / "out" / "results.json").read_text())["base"]["accuracy"] for row in rows}
    assert len(base) == 1  # every job compressed the same seeded base network
    assert all(float(row["parameters"]) < 50610 for row in rows)
    assert (tmp_path / "suite" / "summary.png").stat().st_size > 1000
