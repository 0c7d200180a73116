"""Leaderboard from a real tracking store (sqlite, and an `mlflow server` over HTTP), tables and plots."""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.image import imread
from mlflow import MlflowClient

from graphtune.compare import (
    COLUMNS,
    aggregate_runs,
    format_number,
    format_table,
    leaderboard,
    live_leaderboard,
    write_leaderboard,
)
from graphtune.errors import ConfigError
from graphtune.plots import leaderboard_figure, transfer_curve_figure, transfer_curve_png
from graphtune.tracking import Tracker, graphtune_tags, load_checkpoint, run_exists

DATASETS = "metr-la,pems-bay"

# Hand-set final metrics per (model, strategy, seed): S_uep, MAE, RMSE, MAPE, AUC, time, RSS, params, GFLOPs.
FINAL = {
    ("gwnet", "finetune", 0): (0.8, 2.0, 4.0, 0.05, 0.3, 10.0, 100.0, 1000, 0.5),
    ("gwnet", "finetune", 1): (0.6, 2.2, 4.4, 0.07, 0.5, 14.0, 120.0, 1000, 0.5),
    ("dcrnn", "finetune", 0): (0.9, 1.8, 3.6, 0.04, 0.2, 30.0, 200.0, 3000, 2.0),
    ("dcrnn", "finetune", 1): (0.7, 2.4, 4.8, 0.06, 0.4, 34.0, 220.0, 3000, 2.0),
}
SWEEP = {  # experiment runs nested under one "sweep" run
    ("bigst", "zero-shot", 0): (0.95, 1.5, 3.0, 0.03, 0.1, 5.0, 50.0, 500, 0.25),
    ("bigst", "zero-shot", 1): (0.85, 1.7, 3.2, 0.05, 0.3, 7.0, 70.0, 500, 0.25),
}
NAMES = ("S_uep", "final_test_mae", "final_test_rmse", "final_test_mape", "mean_transfer_auc",
         "total_train_time_s", "peak_rss_mb", "trainable_params", "flops_g")


def _experiment_run(tracker, model, strategy, seed, values, nested=False, checkpoint=False):
    tags = graphtune_tags("experiment", model=model, strategy=strategy, datasets=DATASETS, seed=seed)
    with tracker.run(f"{model}-{strategy}-s{seed}", tags=tags, nested=nested) as run_id:
        # A stage run with a huge S_uep: must not count (only experiment-kind runs do).
        with tracker.run("stage1", nested=True, tags=graphtune_tags(
                "stage", model=model, strategy=strategy, datasets=DATASETS, seed=seed, stage=1, city="pems-bay")):
            tracker.log_metrics({"S_uep": 50.0})
        tracker.log_metrics(dict(zip(NAMES, values)))
        if checkpoint:
            tracker.log_checkpoint({"w": torch.full((2,), float(seed))})
    return run_id


def _log_runs(uri: str) -> dict:
    """The same set of runs in any store; returns the ids the tests need."""
    tracker = Tracker(uri)
    ids = {}
    # An earlier run of gwnet seed 0, replaced by the later one below.
    _experiment_run(tracker, "gwnet", "finetune", 0, (0.1, 9.0, 9.0, 0.9, 0.9, 1.0, 1.0, 1000, 0.5))
    time.sleep(0.01)  # start times are in ms: keep the rerun strictly later
    for (model, strategy, seed), values in FINAL.items():
        ids[(model, seed)] = _experiment_run(tracker, model, strategy, seed, values, checkpoint=(model == "dcrnn"))
    # A FAILED run with the best score of all: must not count.
    with pytest.raises(RuntimeError):
        with tracker.run("dcrnn-crash", tags=graphtune_tags(
                "experiment", model="dcrnn", strategy="finetune", datasets=DATASETS, seed=2)):
            tracker.log_metrics({"S_uep": 0.99})
            raise RuntimeError("out of memory")
    with tracker.run("sweep", tags={"graphtune.kind": "sweep"}) as sweep_id:
        for (model, strategy, seed), values in SWEEP.items():
            _experiment_run(tracker, model, strategy, seed, values, nested=True)
    ids["sweep"] = sweep_id
    # Another experiment: read only when asked for.
    other = Tracker(uri, experiment_name="other")
    _experiment_run(other, "baseline", "none", 0, (0.2, 5.0, 8.0, 0.2, 0.0, 0.1, 10.0, 0, 0.0))
    return ids


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for the whole module: (uri, run ids, an empty migrated copy for the server test).

    Creating a sqlite store runs MLflow's schema migrations (~5 s); it is done once here.
    """
    folder = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{folder}/mlflow.db"
    MlflowClient(uri).search_experiments()  # creates the schema
    shutil.copy(folder / "mlflow.db", folder / "empty.db")
    return uri, _log_runs(uri), folder / "empty.db"


def _expected_rows():
    """(model, strategy, n_runs, S_uep mean, S_uep std, RMSE mean) in rank order."""
    return [
        ("bigst", "zero-shot", 2, 0.9, math.sqrt(0.005), 3.1),
        ("dcrnn", "finetune", 2, 0.8, math.sqrt(0.02), 4.2),
        ("gwnet", "finetune", 2, 0.7, math.sqrt(0.02), 4.2),
    ]


def _check_board(board: pd.DataFrame) -> None:
    assert list(board.columns) == COLUMNS
    assert list(board["rank"]) == [1, 2, 3]
    for row, (model, strategy, n, mean, std, rmse) in zip(board.itertuples(), _expected_rows()):
        assert (row.model, row.strategy, row.datasets, row.n_runs, row.seeds) == (model, strategy, DATASETS, n, "0,1")
        assert row.S_uep_mean == pytest.approx(mean, abs=1e-12)
        assert row.S_uep_std == pytest.approx(std, abs=1e-12)
        assert row.final_test_rmse_mean == pytest.approx(rmse, abs=1e-12)
    gwnet = board.set_index("model").loc["gwnet"]
    assert gwnet["final_test_mae_mean"] == pytest.approx(2.1)
    assert gwnet["final_test_mae_std"] == pytest.approx(math.sqrt(0.02))
    assert gwnet["final_test_mape_mean"] == pytest.approx(0.06)
    assert gwnet["final_test_mape_std"] == pytest.approx(math.sqrt(0.0002))
    assert gwnet["mean_transfer_auc"] == pytest.approx(0.4)
    assert gwnet["total_train_time_s"] == pytest.approx(12.0)
    assert gwnet["peak_rss_mb"] == pytest.approx(110.0)
    assert gwnet["trainable_params"] == 1000
    assert gwnet["flops_g"] == 0.5


# ---------------------------------------------------------------------------------------------
# From the store
# ---------------------------------------------------------------------------------------------


def test_leaderboard_ranks_and_aggregates(store):
    uri, _, _ = store
    _check_board(leaderboard(uri))


def test_leaderboard_filters(store):
    uri, ids, _ = store
    only_dcrnn = leaderboard(uri, tags={"graphtune.model": "dcrnn"})
    assert list(only_dcrnn["model"]) == ["dcrnn"]
    assert only_dcrnn.loc[0, "seeds"] == "0,1"  # the FAILED seed-2 run is not there

    swept = leaderboard(uri, parent_run_id=ids["sweep"])
    assert list(swept["model"]) == ["bigst"] and swept.loc[0, "n_runs"] == 2
    one = leaderboard(uri, parent_run_id=ids[("gwnet", 1)])  # an experiment run on its own
    assert list(zip(one["model"], one["seeds"], one["S_uep_mean"])) == [("gwnet", "1", 0.6)]

    # A per-run metric filter: only runs above 0.75 (gwnet keeps seed 0, dcrnn seed 0, bigst both).
    high = leaderboard(uri, filter_string="metrics.S_uep > 0.75")
    high = high.set_index("model")
    assert sorted(zip(high.index, high["n_runs"], high["seeds"])) == [
        ("bigst", 2, "0,1"), ("dcrnn", 1, "0"), ("gwnet", 1, "0")]
    assert high.loc["dcrnn", "S_uep_mean"] == 0.9 and high.loc["gwnet", "S_uep_mean"] == 0.8
    assert math.isnan(high.loc["dcrnn", "S_uep_std"])  # one seed: no std
    assert high.loc["gwnet", "rank"] == 3

    everything = leaderboard(uri, experiment_names=None)
    assert list(everything["model"]) == ["bigst", "dcrnn", "gwnet", "baseline"]
    assert leaderboard(uri, experiment_names=["other"])["model"].tolist() == ["baseline"]
    assert leaderboard(uri, tags={"graphtune.model": "no-such-model"}).empty
    with pytest.raises(ConfigError, match="'nope'"):
        leaderboard(uri, experiment_names=("nope",))


def test_write_leaderboard_outputs(store, tmp_path):
    uri, _, _ = store
    board = leaderboard(uri)
    paths = write_leaderboard(board, tmp_path / "out")
    assert set(paths) == {"csv", "md", "png"}

    back = pd.read_csv(paths["csv"], dtype={"seeds": str})
    assert list(back.columns) == COLUMNS
    pd.testing.assert_frame_equal(back, board, check_dtype=False)

    lines = paths["md"].read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("| # | model | strategy | datasets | seeds | S_uep |")
    assert lines[1].startswith("|---:|:---|:---|:---|---:|---:|")
    assert lines[2].startswith(f"| 1 | bigst | zero-shot | {DATASETS} | 2 | 0.9 ± 0.07071 |")
    assert lines[4].startswith(f"| 3 | gwnet | finetune | {DATASETS} | 2 | 0.7 ± 0.1414 | 2.1 ± 0.1414 |")
    assert len(lines) == 7 and lines[5] == "" and "Mean ± sample std" in lines[6]

    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    text = format_table(board).splitlines()
    assert len(text) == 5
    assert text[0].split()[:5] == ["#", "model", "strategy", "datasets", "seeds"]
    assert [line.split()[1] for line in text[2:]] == ["bigst", "dcrnn", "gwnet"]
    assert len({len(line) for line in text[:2]}) == 1  # header and rule have the same width


def test_empty_leaderboard_writes_empty_outputs(tmp_path):
    board = aggregate_runs(pd.DataFrame())
    assert board.empty and list(board.columns) == COLUMNS
    paths = write_leaderboard(board, tmp_path)
    assert paths["csv"].read_text().startswith("rank,model,strategy,datasets,n_runs,seeds,S_uep_mean")
    assert paths["md"].read_text() == "_No finished experiment runs._\n"
    assert paths["png"].stat().st_size > 0
    assert format_table(board) == "no finished experiment runs"


# ---------------------------------------------------------------------------------------------
# Pure aggregation and formatting
# ---------------------------------------------------------------------------------------------


def _frame(rows):
    """A hand-made mlflow.search_runs frame: (model, seed, start ms, S_uep, RMSE) per run."""
    return pd.DataFrame({
        "run_id": [f"r{i}" for i in range(len(rows))],
        "start_time": pd.to_datetime([r[2] for r in rows], unit="ms", utc=True),
        "tags.graphtune.model": [r[0] for r in rows],
        "tags.graphtune.strategy": "finetune",
        "tags.graphtune.datasets": "a,b",
        "tags.graphtune.seed": [r[1] for r in rows],
        "metrics.S_uep": [r[3] for r in rows],
        "metrics.final_test_rmse": [r[4] for r in rows],
    })


def test_aggregate_runs_ties_reruns_and_missing_values():
    board = aggregate_runs(_frame([
        ("a", "0", 1, 0.5, 4.0),
        ("b", "0", 2, 0.5, 3.0),   # same S_uep as a, lower RMSE -> ranked above a
        ("c", "10", 3, 0.2, 1.0),
        ("c", "2", 4, 0.4, 1.0),
        ("c", "2", 5, 0.6, 1.0),   # rerun of c seed 2: replaces the 0.4
        ("d", "0", 6, np.nan, 1.0),  # no S_uep -> last
        ("e", None, 7, 0.3, 2.0),  # no seed tag: both runs count
        ("e", None, 8, 0.5, 2.0),
    ]))
    assert list(board["model"]) == ["b", "a", "c", "e", "d"]
    assert list(board["rank"]) == [1, 2, 3, 4, 5]
    c = board.set_index("model").loc["c"]
    assert (c["n_runs"], c["seeds"]) == (2, "2,10")  # seeds sorted as numbers
    assert c["S_uep_mean"] == pytest.approx(0.4) and c["S_uep_std"] == pytest.approx(math.sqrt(0.08))
    e = board.set_index("model").loc["e"]
    assert (e["n_runs"], e["seeds"], e["S_uep_mean"]) == (2, "", pytest.approx(0.4))
    # Metrics no run logged are NaN columns, not missing columns.
    assert board["flops_g"].isna().all() and board["final_test_mae_std"].isna().all()


def test_format_number():
    assert [format_number(v) for v in (0.70710678, 3.01234, 123.456, 1234.5, 123456.0, 0, 2, None, np.nan, np.inf)] == [
        "0.7071", "3.012", "123.5", "1234", "123456", "0", "2", "-", "-", "inf"]


def test_live_leaderboard_text():
    text = live_leaderboard([
        {"stage": 0, "city": "metr-la", "test_rmse": 5.4321},
        {"stage": 1, "city": "pems-bay", "zero_shot_rmse": 7.25, "test_rmse": 4.5, "transfer_auc": 0.31234,
         "stage_score": 0.812345},
    ])
    assert text.splitlines() == [
        "stage  city      zero-shot RMSE  test RMSE  transfer AUC  stage score",
        "-----  --------  --------------  ---------  ------------  -----------",
        "    0  metr-la                -      5.432             -            -",
        "    1  pems-bay            7.25        4.5        0.3123       0.8123",
    ]


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def test_transfer_curve_figure_and_png(tmp_path):
    curves = {
        "stage1 pems-bay": [(1.0, 4.0), (0.0, 6.0), (0.05, 5.0), (0.2, float("nan")), (0.5, None)],
        "stage2 metr-la-east": [(0.0, 3.0), (0.05, 2.5), (1.0, 2.0)],
    }
    fig = transfer_curve_figure(curves, title="gwnet")
    ax = fig.axes[0]
    assert ax.get_xscale() == "symlog" and ax.get_title() == "gwnet"
    lines = ax.get_lines()
    assert len(lines) == 4  # two curves + a hollow zero-shot marker each
    assert list(lines[0].get_xdata()) == [0.0, 0.05, 1.0] and list(lines[0].get_ydata()) == [6.0, 5.0, 4.0]
    assert list(lines[1].get_xdata()) == [0.0] and lines[1].get_markerfacecolor() == "white"
    assert lines[1].get_color() == lines[0].get_color() != lines[2].get_color()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "0.05", "1"]  # 0.2 only had a NaN
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(curves)

    path = transfer_curve_png(curves, tmp_path / "plots" / "transfer.png")
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500


def test_leaderboard_figure_bars(store):
    uri, _, _ = store
    fig = leaderboard_figure(leaderboard(uri))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["bigst / zero-shot", "dcrnn / finetune", "gwnet / finetune"]
    assert [p.get_width() for p in ax.patches] == pytest.approx([0.9, 0.8, 0.7])


# ---------------------------------------------------------------------------------------------
# Over HTTP, against a real tracking server
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_leaderboard_over_http(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a dead server fails the test at once
    shutil.copy(store[2], tmp_path / "server.db")  # an empty, migrated store: skips ~5 s of migrations
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60  # server start = imports + schema migrations, ~10 s on 2 cores
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited: {(tmp_path / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after 60 s: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)

        uri = f"http://127.0.0.1:{port}"
        ids = _log_runs(uri)
        over_http = leaderboard(uri)
        _check_board(over_http)
        pd.testing.assert_frame_equal(over_http, leaderboard(store[0]))
        assert list(leaderboard(uri, parent_run_id=ids["sweep"])["model"]) == ["bigst"]

        # Artifacts go through the server's proxy (nothing written beside the client).
        loaded = load_checkpoint(ids[("dcrnn", 1)], tracking_uri=uri)
        assert torch.equal(loaded["w"], torch.full((2,), 1.0))
        assert any((tmp_path / "artifacts").rglob("best.pt"))
        assert run_exists(ids["sweep"], uri) and not run_exists("0" * 32, uri)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its worker processes, started above
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_leaderboard_figure_of_a_plain_score_table():
    """Only model, strategy and S_uep_mean are needed (e.g. per-stage scores of one experiment)."""
    table = pd.DataFrame({"model": ["0: metr-la", "1: pems-bay"], "strategy": ["pretrain", "transfer"],
                          "S_uep_mean": [0.4, 0.6]})
    ax = leaderboard_figure(table).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0: metr-la / pretrain", "1: pems-bay / transfer"]
    assert [p.get_width() for p in ax.patches] == pytest.approx([0.4, 0.6])
