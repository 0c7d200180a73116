"""`graphtune series train | finetune | infer`: tracked runs, artifacts, the checkpoint rule, bad input.

The CSVs here are GENERATED (synthetic, seeded): a noisy daily wave per series, plus a lagged copy and a
time-of-day channel, small enough that a run takes seconds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from graphtune.cli import cli


def _write_channels(folder: Path, n_series: int = 12, n_steps: int = 240, seed: int = 0) -> list[str]:
    """Three SYNTHETIC channel CSVs (rows = series, columns = steps) with ids and a timestamp header."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_steps)
    phase = rng.uniform(0, 2 * np.pi, (n_series, 1))
    level = 50 + 15 * np.sin(2 * np.pi * t / 48 + phase) + rng.normal(0, 3, (n_series, n_steps))
    lagged = np.roll(level, 1, axis=1)
    tod = np.broadcast_to((t % 48) / 48.0, level.shape)
    folder.mkdir(parents=True, exist_ok=True)
    stamps = [f"2026-01-01T{(i // 2) % 24:02d}:{30 * (i % 2):02d}" for i in range(n_steps)]
    paths = []
    for name, values in (("level", level), ("lagged", lagged), ("tod", tod)):
        lines = ["id," + ",".join(stamps)]
        lines += [f"s{i}," + ",".join(f"{v:.4f}" for v in row) for i, row in enumerate(values)]
        (folder / f"{name}.csv").write_text("\n".join(lines) + "\n")
        paths.append(str(folder / f"{name}.csv"))
    return paths


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _runs(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    return client, [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


FAST = ["--context-len", 8, "--epochs", 2, "--batch-size", 256]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tracked classify run (shared: module scope keeps the suite fast)."""
    tmp = tmp_path_factory.mktemp("series")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
    files = _write_channels(tmp / "data")
    r = CliRunner().invoke(cli, ["series", "train", *files, "--bin-rule", "lt 45", *map(str, FAST),
                                 "--artifacts-dir", str(tmp / "artifacts")])
    mp.undo()
    assert r.exit_code == 0, r.output
    folders = list((tmp / "artifacts").iterdir())
    assert len(folders) == 1
    return tmp, files, folders[0], r.output


def test_train_writes_the_documented_artifacts(trained):
    tmp, files, out, _ = trained
    assert out.name == "train_classify_ctx8_ch3_alpha0.5_pwglobal_conv_seed0_splitholdout"
    names = {p.name for p in out.iterdir()}
    assert {"model.pt", "model.pt.best", "preds.csv", "metrics.json", "roc_curve.png", "pr_curve.png",
            "hist_score.png"} <= names
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("precision", "recall", "f1", "accuracy", "roc_auc", "pr_auc", "best_tau", "f1_at_best_tau"):
        assert key in metrics["metrics"], key
    assert "f1" in metrics["reference"]  # the scikit-learn reference on the same windows
    header = (out / "preds.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["series_id", "time_index", "y_true", "y_score"] and header[4].startswith("y_pred@")


def test_train_is_one_finished_run_with_params_and_epoch_steps(trained):
    tmp, *_ = trained
    client, runs = _runs(tmp)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["graphtune.kind"] == "series"
    assert run.data.tags["graphtune.series.weights"] == "random"
    assert client.get_experiment(run.info.experiment_id).name == "series"
    assert run.data.params["bin_rule"] == "lt 45" and run.data.params["context_len"] == "8"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_loss")) == [1, 2]
    assert "f1_at_best_tau" in run.data.metrics and "reference_f1" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"preds.csv", "metrics.json", "model.pt.best"} <= artifacts


def test_infer_reproduces_preds_and_trains_nothing(trained, tmp_path):
    tmp, files, out, _ = trained
    r = _invoke("series", "infer", *files, "--ckpt", out, "--bin-rule", "lt 45", "--context-len", 8,
                "--batch-size", 256, "--artifacts-dir", tmp_path, "--no-tracking")  # batches as in training:
    assert r.exit_code == 0, r.output                                            # bit-identical floats
    (again,) = list(tmp_path.iterdir())
    assert again.name.startswith("infer_classify_ctx8_ch3")
    assert not (again / "model.pt").exists()
    # the same windows, the same weights (model.pt.best), the same threshold chosen on validation
    assert (again / "preds.csv").read_text() == (out / "preds.csv").read_text()


def test_checkpoint_rule_prefers_best_then_last_and_a_file_loads_itself(trained, tmp_path):
    from graphtune.series.commands import resolve_ckpt

    _, _, out, _ = trained
    assert resolve_ckpt(str(out)).name == "model.pt.best"
    only_last = tmp_path / "last"
    only_last.mkdir()
    (only_last / "model.pt").write_bytes((out / "model.pt").read_bytes())
    assert resolve_ckpt(str(only_last)).name == "model.pt"
    assert resolve_ckpt(str(out / "model.pt")) == out / "model.pt"


def test_a_wrong_shape_in_a_checkpoint_names_both_shapes(trained, tmp_path):
    tmp, files, out, _ = trained
    payload = torch.load(out / "model.pt.best", weights_only=True)
    key = next(k for k, v in payload["state"].items() if v.ndim == 3)  # a convolution weight
    payload["state"][key] = torch.zeros(*payload["state"][key].shape[:-1], payload["state"][key].shape[-1] + 1)
    torch.save(payload, tmp_path / "bad.pt")
    r = _invoke("series", "infer", *files, "--ckpt", tmp_path / "bad.pt", "--bin-rule", "lt 45",
                "--context-len", 8, "--artifacts-dir", tmp_path / "a", "--no-tracking")
    assert r.exit_code == 2
    line = r.output.strip().splitlines()[-1]
    assert re.search(rf"bad\.pt: shapes do not match its config: {re.escape(key)} has shape \(.*\) in the file, "
                     r"the config builds \(.*\)", line), line
    assert not (tmp_path / "a").exists()


def test_finetune_continues_a_checkpoint(trained, tmp_path):
    tmp, files, out, _ = trained
    r = _invoke("series", "finetune", *files, "--ckpt", out, "--bin-rule", "lt 45", *FAST,
                "--artifacts-dir", tmp_path, "--no-tracking")
    assert r.exit_code == 0, r.output
    (again,) = list(tmp_path.iterdir())
    assert again.name.startswith("finetune_classify") and (again / "model.pt").exists()


def test_same_seed_same_metrics_and_regression_outputs(tmp_path):
    files = _write_channels(tmp_path / "data")
    outs = []
    for k in range(2):
        r = _invoke("series", "train", *files, *FAST, "--drop-label-from-x", "--artifacts-dir", tmp_path / f"a{k}",
                    "--no-tracking")
        assert r.exit_code == 0, r.output
        (out,) = list((tmp_path / f"a{k}").iterdir())
        outs.append(out)
    assert outs[0].name == "train_regress_ctx8_ch2_alphana_pwna_conv_seed0_splitholdout"
    first, second = (json.loads((o / "summary.json").read_text()) for o in outs)
    assert first["metrics"] == second["metrics"]
    assert set(first["metrics"]) >= {"mae", "mse", "rmse", "r2"}
    assert {p.name for p in outs[0].iterdir()} >= {"summary.json", "residuals.png", "scatter.png", "preds.csv"}


def test_rolling_split_reports_every_fold_and_their_spread(tmp_path):
    files = _write_channels(tmp_path / "data")
    r = _invoke("series", "train", *files, "--bin-rule", "quantile 0.3", "--split", "rolling", "--folds", 2,
                *FAST, "--artifacts-dir", tmp_path / "a", "--no-tracking")
    assert r.exit_code == 0, r.output
    (out,) = list((tmp_path / "a").iterdir())
    summary = json.loads((out / "metrics.json").read_text())
    assert len(summary["folds"]) == 2 and "f1" in summary["spread"]
    assert all((out / f["fold"] / "preds.csv").exists() for f in summary["folds"])


@pytest.mark.slow
def test_compile_runs_or_falls_back_with_a_notice_and_records_which(tmp_path):
    files = _write_channels(tmp_path / "data", n_series=6, n_steps=120)
    r = _invoke("series", "train", *files, "--bin-rule", "lt 45", "--compile", "reduce-overhead", "--epochs", 1,
                "--context-len", 8, "--artifacts-dir", tmp_path / "a", "--no-tracking")
    assert r.exit_code == 0, r.output
    (out,) = list((tmp_path / "a").iterdir())
    compiled = json.loads((out / "metrics.json").read_text())["compiled"]
    assert compiled in ("compiled:reduce-overhead", "eager (compile failed)")
    if compiled.startswith("eager"):
        assert "notice: --compile reduce-overhead is not possible here" in r.output
    # a checkpoint of a compiled model loads in eager mode
    r = _invoke("series", "infer", *files, "--ckpt", out, "--bin-rule", "lt 45", "--context-len", 8,
                "--artifacts-dir", tmp_path / "b", "--no-tracking")
    assert r.exit_code == 0, r.output


def _bad_cases(tmp_path: Path):
    good = _write_channels(tmp_path / "data")
    short = _write_channels(tmp_path / "short", n_steps=60)
    text = Path(good[1]).read_text().splitlines()
    text[3] = text[3].replace(text[3].split(",")[5], "n/a", 1)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cell.csv").write_text("\n".join(text) + "\n")
    return [
        (["train", good[0], short[1]], str(Path(short[1])), "60 steps"),
        (["train", good[0], tmp_path / "bad" / "cell.csv"], "cell.csv", "row"),
        (["train", *good, "--context-len", 500], "context", "500"),
        (["train", *good, "--label-src-ch", 7], "label", "7"),
        (["train", *good, "--bin-rule", "gt"], "--bin-rule", "number"),
        (["train", *good, "--bin-rule", "gt 1000"], "training split is negative", "0 of"),
        (["finetune", *good], "--ckpt", "continues a trained model"),
        (["infer", *good, "--ckpt", tmp_path / "nothing"], "nothing", "no such"),
        (["train", *good, "--task", "classify"], "--bin-rule", "classify needs a rule"),
        (["train", *good, "--backbone", "nope"], "nope", "known"),
    ]


def test_bad_input_is_one_line_leaves_no_run_and_writes_nothing(tmp_path):
    for args, *words in _bad_cases(tmp_path):
        r = _invoke("series", *args, "--artifacts-dir", tmp_path / "artifacts")
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2, (args, r.output)
        assert len(lines) == 1 and lines[0].startswith("graphtune: error:"), (args, r.output)
        assert all(w.lower() in lines[0].lower() for w in words), (args, lines[0])
        assert not (tmp_path / "artifacts").exists(), args
    _, runs = _runs(tmp_path)
    assert runs == []


def test_another_backbone_or_channel_count_is_refused(trained, tmp_path):
    tmp, files, out, _ = trained
    for args, words in ((["--backbone", "ttm"], "conv checkpoint"), (["--drop-label-from-x"], "3 input channels")):
        r = _invoke("series", "infer", *files, "--ckpt", out, "--bin-rule", "lt 45", "--context-len", 8, *args,
                    "--artifacts-dir", tmp_path / "a", "--no-tracking")
        assert r.exit_code == 2 and words in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1


def test_series_board_ranks_runs_on_their_own(trained):
    tmp, files, out, _ = trained
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
    try:
        r = CliRunner().invoke(cli, ["compare", "--board", "series", "--output-dir", str(tmp / "board")])
    finally:
        mp.undo()
    assert r.exit_code == 0, r.output
    assert "series board: classify (test), ranked by f1_at_best_tau" in r.output
    assert (tmp / "board" / "series_board.csv").exists()


def test_infer_reuses_the_quantile_threshold_fitted_in_training(tmp_path):
    files = _write_channels(tmp_path / "data")
    r = _invoke("series", "train", *files, "--bin-rule", "quantile 0.3", *FAST, "--artifacts-dir", tmp_path / "a",
                "--no-tracking")
    assert r.exit_code == 0, r.output
    (out,) = list((tmp_path / "a").iterdir())
    trained = json.loads((out / "metrics.json").read_text())["rule"]
    r = _invoke("series", "infer", *files, "--ckpt", out, "--bin-rule", "quantile 0.3", "--context-len", 8,
                "--batch-size", 256, "--artifacts-dir", tmp_path / "b", "--no-tracking")
    assert r.exit_code == 0, r.output
    (again,) = list((tmp_path / "b").iterdir())
    assert json.loads((again / "metrics.json").read_text())["rule"] == trained  # not refitted on this data
    assert (again / "preds.csv").read_text() == (out / "preds.csv").read_text()
