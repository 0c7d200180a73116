"""Leaderboard from a real tracking store (sqlite, and an `mlflow server` over HTTP), tables and plots."""

from __future__ import annotations

import json
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
from graphtune.errors import ConfigError, OutputError
from graphtune.plots import leaderboard_figure, transfer_curve_figure, transfer_curve_png
from graphtune.tracking import Tracker, graphtune_tags, load_checkpoint, run_exists

DATASETS = "metr-la,pems-bay"
SHOWN = "metr-la -> pems-bay"  # how a row names its cities

# Hand-set final metrics per (model, strategy, seed): score, MAE, RMSE, MAPE, AUC, time, RSS, params, TFLOPs.
FINAL = {
    ("gwnet", "full", 0): (0.3, 2.0, 4.0, 5.0, 0.3, 10.0, 100.0, 1000, 0.5),
    ("gwnet", "full", 1): (0.1, 2.2, 4.4, 7.0, 0.5, 14.0, 120.0, 1000, 0.5),
    ("dcrnn", "full", 0): (0.4, 1.8, 3.6, 4.0, 0.2, 30.0, 200.0, 3000, 2.0),
    ("dcrnn", "full", 1): (0.2, 2.4, 4.8, 6.0, 0.4, 34.0, 220.0, 3000, 2.0),
}
SWEEP = {  # experiment runs nested under one "sweep" run
    ("bigst", "freeze-transferred", 0): (0.45, 1.5, 3.0, 3.0, 0.1, 5.0, 50.0, 500, 0.25),
    ("bigst", "freeze-transferred", 1): (0.35, 1.7, 3.2, 5.0, 0.3, 7.0, 70.0, 500, 0.25),
}
NAMES = ("score", "final_test_mae", "final_test_rmse", "final_test_mape", "mean_transfer_auc",
         "total_train_time_s", "peak_rss_mb", "trainable_params", "finetune_tflops")
REFERENCE = {"reference/ha/score": 0.0, "reference/ha/final_test_rmse": 9.0, "reference/ha/final_test_mae": 5.0,
             "reference/persistence/score": 0.05, "reference/persistence/final_test_rmse": 8.5,
             "reference/persistence/final_test_mae": 4.4}


def _config(model, strategy, epochs=(6, 3)) -> dict:
    return {"model": model, "strategy": strategy, "train": [{"epochs": e} for e in epochs], "datasets": DATASETS}


def _experiment_run(tracker, model, strategy, seed, values, nested=False, checkpoint=False, epochs=(6, 3),
                    run_type="transfer", legacy=False):
    tags = graphtune_tags("experiment", model=model, strategy=strategy, datasets=DATASETS, seed=seed)
    config = _config(model, strategy, epochs)
    if not legacy:  # runs from before the comparable score carry none of these
        tags |= {"graphtune.config_hash": f"{model}-{strategy}-{'-'.join(map(str, epochs))}-{run_type}",
                 "graphtune.run_type": run_type, "graphtune.score_version": "2",
                 "graphtune.config": json.dumps(config), "graphtune.targets": "pems-bay" if run_type == "transfer"
                 else "metr-la", "graphtune.reference_key": f"refs-{run_type}"}
    with tracker.run(f"{model}-{strategy}-s{seed}", tags=tags, nested=nested) as run_id:
        # A stage run with a huge score: must not count (only experiment-kind runs do).
        with tracker.run("stage1", nested=True, tags=graphtune_tags(
                "stage", model=model, strategy=strategy, datasets=DATASETS, seed=seed, stage=1, city="pems-bay")):
            tracker.log_metrics({"score": 50.0})
        tracker.log_metrics(dict(zip(NAMES, values)) | {"S_uep": 0.5} | REFERENCE)
        if checkpoint:
            tracker.log_checkpoint({"w": torch.full((2,), float(seed))})
    return run_id


def _log_runs(uri: str) -> dict:
    """The same set of runs in any store; returns the ids the tests need."""
    tracker = Tracker(uri)
    ids = {}
    # An earlier run of gwnet seed 0, replaced by the later one below.
    _experiment_run(tracker, "gwnet", "full", 0, (0.01, 9.0, 9.0, 9.0, 0.9, 1.0, 1.0, 1000, 0.5))
    time.sleep(0.01)  # start times are in ms: keep the rerun strictly later
    for (model, strategy, seed), values in FINAL.items():
        ids[(model, seed)] = _experiment_run(tracker, model, strategy, seed, values, checkpoint=(model == "dcrnn"))
    # The same model and strategy with other epochs: another configuration, another row.
    _experiment_run(tracker, "gwnet", "full", 0, (0.05, 3.0, 6.0, 8.0, 0.1, 5.0, 90.0, 1000, 0.2), epochs=(2, 1))
    # A pretrain-only run: its own board, however high its score.
    _experiment_run(tracker, "gwnet", "full", 0, (0.9, 1.0, 2.0, 3.0, 0.0, 9.0, 90.0, 1000, 0.4), epochs=(6,),
                    run_type="pretrain")
    # A run from before the comparable score (no config hash): not ranked, counted.
    _experiment_run(tracker, "hypernet", "full", 0, (0.99, 1.0, 1.0, 1.0, 0.9, 1.0, 1.0, 10, 0.1), legacy=True)
    # A FAILED run with the best score of all: must not count.
    with pytest.raises(RuntimeError):
        with tracker.run("dcrnn-crash", tags=graphtune_tags(
                "experiment", model="dcrnn", strategy="full", datasets=DATASETS, seed=2)
                | {"graphtune.config_hash": "dcrnn-full-6-3-transfer", "graphtune.score_version": "2"}):
            tracker.log_metrics({"score": 0.99})
            raise RuntimeError("out of memory")
    with tracker.run("sweep", tags={"graphtune.kind": "sweep"}) as sweep_id:
        for (model, strategy, seed), values in SWEEP.items():
            _experiment_run(tracker, model, strategy, seed, values, nested=True)
    ids["sweep"] = sweep_id
    # Another experiment: read only when asked for.
    other = Tracker(uri, experiment_name="other")
    _experiment_run(other, "baseline", "full", 0, (0.2, 5.0, 8.0, 0.2, 0.0, 0.1, 10.0, 0, 0.0))
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
    """(board, model, strategy, n_runs, score mean, score std, RMSE mean) in rank order."""
    return [
        ("transfer", "bigst", "freeze-transferred", 2, 0.4, math.sqrt(0.005), 3.1),
        ("transfer", "dcrnn", "full", 2, 0.3, math.sqrt(0.02), 4.2),
        ("transfer", "gwnet", "full", 2, 0.2, math.sqrt(0.02), 4.2),
        ("transfer", "gwnet", "full", 1, 0.05, math.nan, 6.0),  # the same score as persistence, a lower RMSE
        ("transfer", "persistence", "reference", 0, 0.05, math.nan, 8.5),
        ("transfer", "ha", "reference", 0, 0.0, math.nan, 9.0),
        ("pretrain", "gwnet", "full", 1, 0.9, math.nan, 2.0),
        ("pretrain", "persistence", "reference", 0, 0.05, math.nan, 8.5),
        ("pretrain", "ha", "reference", 0, 0.0, math.nan, 9.0),
    ]


def _check_board(board: pd.DataFrame) -> None:
    assert list(board.columns) == COLUMNS
    assert list(board["rank"]) == [1, 2, 3, 4, 5, 6, 1, 2, 3]
    assert board.attrs["unranked"] == 1  # the run without a comparable score
    for row, (kind, model, strategy, n, mean, std, rmse) in zip(board.itertuples(), _expected_rows()):
        assert (row.board, row.model, row.strategy, row.n_runs) == (kind, model, strategy, n)
        assert row.score_mean == pytest.approx(mean, abs=1e-12)
        assert row.score_std == pytest.approx(std, abs=1e-12, nan_ok=True)
        assert row.final_test_rmse_mean == pytest.approx(rmse, abs=1e-12)
    learned = board[board["strategy"] != "reference"]
    assert list(learned["seeds"]) == ["0,1", "0,1", "0,1", "0", "0"]
    assert set(board.loc[board["board"] == "transfer", "datasets"]) == {SHOWN, "-> pems-bay"}
    gwnet = board[(board["model"] == "gwnet") & (board["board"] == "transfer")]
    # the two gwnet configurations differ in their epochs: each row says so
    assert list(gwnet["differs"]) == ["train[0].epochs=6, train[1].epochs=3", "train[0].epochs=2, train[1].epochs=1"]
    assert board.loc[board["model"] == "dcrnn", "differs"].tolist() == [""]
    gwnet = gwnet.iloc[0]
    assert gwnet["final_test_mae_mean"] == pytest.approx(2.1)
    assert gwnet["final_test_mae_std"] == pytest.approx(math.sqrt(0.02))
    assert gwnet["final_test_mape_mean"] == pytest.approx(6.0)
    assert gwnet["final_test_mape_std"] == pytest.approx(math.sqrt(2.0))
    assert gwnet["mean_transfer_auc"] == pytest.approx(0.4)
    assert gwnet["total_train_time_s"] == pytest.approx(12.0)
    assert gwnet["peak_rss_mb"] == pytest.approx(110.0)
    assert gwnet["trainable_params"] == 1000
    assert gwnet["finetune_tflops"] == 0.5 and gwnet["S_uep"] == 0.5


# ---------------------------------------------------------------------------------------------
# From the store
# ---------------------------------------------------------------------------------------------


def test_leaderboard_ranks_and_aggregates(store):
    uri, _, _ = store
    _check_board(leaderboard(uri))


def test_leaderboard_filters(store):
    uri, ids, _ = store
    only_dcrnn = leaderboard(uri, tags={"graphtune.model": "dcrnn"})
    assert list(only_dcrnn["model"]) == ["dcrnn", "persistence", "ha"]  # the references of its cities come along
    assert only_dcrnn.loc[0, "seeds"] == "0,1"  # the FAILED seed-2 run is not there

    swept = leaderboard(uri, parent_run_id=ids["sweep"])
    assert list(swept["model"]) == ["bigst", "persistence", "ha"] and swept.loc[0, "n_runs"] == 2
    one = leaderboard(uri, parent_run_id=ids[("gwnet", 1)])  # an experiment run on its own
    assert list(zip(one["model"], one["seeds"], one["score_mean"]))[0] == ("gwnet", "1", 0.1)

    # A per-run metric filter: only runs above 0.25 (gwnet keeps seed 0, dcrnn seed 0, bigst both, the pretrain run).
    high = leaderboard(uri, filter_string="metrics.score > 0.25")
    runs = high[high["strategy"] != "reference"]
    assert list(zip(runs["board"], runs["model"], runs["n_runs"], runs["seeds"])) == [
        ("transfer", "bigst", 2, "0,1"), ("transfer", "dcrnn", 1, "0"), ("transfer", "gwnet", 1, "0"),
        ("pretrain", "gwnet", 1, "0")]
    assert list(runs["score_mean"]) == [0.4, 0.4, 0.3, 0.9]
    assert math.isnan(runs.iloc[1]["score_std"])  # one seed: no std
    assert list(runs["rank"]) == [1, 2, 3, 1]  # dcrnn ties bigst on score; its RMSE is higher

    everything = leaderboard(uri, experiment_names=None)
    assert "baseline" in set(everything["model"])
    assert leaderboard(uri, experiment_names=["other"])["model"].tolist() == ["baseline", "persistence", "ha"]
    assert leaderboard(uri, tags={"graphtune.model": "no-such-model"}).empty
    with pytest.raises(ConfigError, match="'nope'"):
        leaderboard(uri, experiment_names=("nope",))


def test_a_configurations_row_does_not_depend_on_the_other_rows(store):
    """Aggregation is per configuration: nothing is normalised across the board, so filtering rows away (or
    adding runs of other configurations) leaves a row's numbers as they were. That another run leaves the scores
    themselves unchanged is tested end to end in test_experiment (two runs differing in epochs, then a third)."""
    uri, _, _ = store
    board = leaderboard(uri)
    alone = leaderboard(uri, tags={"graphtune.model": "dcrnn"})
    key = ["board", "model", "strategy", "config_hash"]
    merged = board.merge(alone, on=key, suffixes=("", "_alone"))
    assert len(merged) == 3 and (merged["score_mean"] == merged["score_mean_alone"]).all()


def test_write_leaderboard_outputs(store, tmp_path):
    uri, _, _ = store
    board = leaderboard(uri)
    paths = write_leaderboard(board, tmp_path / "out")
    assert set(paths) == {"csv", "md", "png"}

    back = pd.read_csv(paths["csv"], dtype={"seeds": str, "config": str, "differs": str},
                       keep_default_na=False, na_values=[""])
    assert list(back.columns) == COLUMNS
    assert list(back["score_mean"]) == pytest.approx(list(board["score_mean"]))
    pd.testing.assert_frame_equal(back, board.replace("", np.nan), check_dtype=False)  # every cell round-trips

    text = paths["md"].read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0].startswith("_Transfer: ranked by score, comparable across runs")
    assert lines[2].startswith("| # | model | strategy | cities | config | differs | seeds | score |")
    assert lines[4].startswith(f"| 1 | bigst | freeze-transferred | {SHOWN} | bigst-fr | - | 2 | 0.4 ± 0.07071 |")
    assert "| 6 | ha | reference | -> pems-bay | - | - | - | 0 |" in text
    assert "_Pretraining (source models on one city)" in text
    assert "1 finished run(s) recorded before the comparable score" in text

    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    table = format_table(board).splitlines()
    assert table[0].startswith("Transfer: ranked by score")
    assert table[1].split()[:6] == ["#", "model", "strategy", "cities", "config", "differs"]
    assert [line.split()[1] for line in table[3:9]] == ["bigst", "dcrnn", "gwnet", "gwnet", "persistence", "ha"]
    assert len({len(line) for line in table[1:3]}) == 1  # header and rule have the same width
    assert any(line.startswith("Pretraining") for line in table)


def test_output_folder_with_foreign_files_is_refused(store, tmp_path):
    uri, _, _ = store
    out = tmp_path / "mine"
    out.mkdir()
    (out / "leaderboard.csv").write_text("my own table\n")  # same name as ours, but GraphTune did not write it
    (out / "notes.txt").write_text("keep me\n")
    with pytest.raises(OutputError, match="did not write"):
        write_leaderboard(leaderboard(uri), out)
    assert (out / "notes.txt").read_text() == "keep me\n"
    # a folder GraphTune wrote is replaced as a whole, atomically
    first = write_leaderboard(leaderboard(uri), tmp_path / "ours")
    again = write_leaderboard(leaderboard(uri, tags={"graphtune.model": "dcrnn"}), tmp_path / "ours")
    assert first == again and "bigst" not in again["md"].read_text()


def test_empty_leaderboard_writes_empty_outputs(tmp_path):
    board = aggregate_runs(pd.DataFrame())
    assert board.empty and list(board.columns) == COLUMNS
    paths = write_leaderboard(board, tmp_path / "board")
    assert paths["csv"].read_text().startswith("board,rank,model,strategy,datasets,config,differs,n_runs,seeds,score_mean")
    assert paths["md"].read_text() == "_No finished experiment runs._\n"
    assert paths["png"].stat().st_size > 0
    assert format_table(board) == "no finished experiment runs with a comparable score"


# ---------------------------------------------------------------------------------------------
# Pure aggregation and formatting
# ---------------------------------------------------------------------------------------------


def _frame(rows):
    """A hand-made mlflow.search_runs frame: (model, seed, start ms, score, RMSE) per run."""
    return pd.DataFrame({
        "run_id": [f"r{i}" for i in range(len(rows))],
        "start_time": pd.to_datetime([r[2] for r in rows], unit="ms", utc=True),
        "tags.graphtune.model": [r[0] for r in rows],
        "tags.graphtune.strategy": "full",
        "tags.graphtune.datasets": "a,b",
        "tags.graphtune.seed": [r[1] for r in rows],
        "tags.graphtune.config_hash": [f"h-{r[0]}" for r in rows],
        "tags.graphtune.run_type": "transfer",
        "tags.graphtune.score_version": "2",
        "metrics.score": [r[3] for r in rows],
        "metrics.final_test_rmse": [r[4] for r in rows],
    })


def test_aggregate_runs_ties_reruns_and_missing_values():
    board = aggregate_runs(_frame([
        ("a", "0", 1, 0.5, 4.0),
        ("b", "0", 2, 0.5, 3.0),   # same score as a, lower RMSE -> ranked above a
        ("c", "10", 3, 0.2, 1.0),
        ("c", "2", 4, 0.4, 1.0),
        ("c", "2", 5, 0.6, 1.0),   # rerun of c seed 2: replaces the 0.4
        ("d", "0", 6, np.nan, 1.0),  # no score: not comparable, not ranked
        ("e", None, 7, 0.3, 2.0),  # no seed tag: both runs count
        ("e", None, 8, 0.5, 2.0),
    ]))
    assert list(board["model"]) == ["b", "a", "c", "e"]
    assert list(board["rank"]) == [1, 2, 3, 4] and board.attrs["unranked"] == 1
    assert list(board["datasets"]) == ["a -> b"] * 4
    c = board.set_index("model").loc["c"]
    assert (c["n_runs"], c["seeds"]) == (2, "2,10")  # seeds sorted as numbers
    assert c["score_mean"] == pytest.approx(0.4) and c["score_std"] == pytest.approx(math.sqrt(0.08))
    e = board.set_index("model").loc["e"]
    assert (e["n_runs"], e["seeds"], e["score_mean"]) == (2, "", pytest.approx(0.4))
    # Metrics no run logged are NaN columns, not missing columns.
    assert board["finetune_tflops"].isna().all() and board["final_test_mae_std"].isna().all()


def test_runs_of_another_score_version_are_not_ranked():
    frame = _frame([("a", "0", 1, 0.5, 4.0), ("b", "0", 2, 0.9, 3.0)])
    frame.loc[1, "tags.graphtune.score_version"] = "1"
    board = aggregate_runs(frame)
    assert list(board["model"]) == ["a"] and board.attrs["unranked"] == 1


def test_format_number():
    assert [format_number(v) for v in (0.70710678, 3.01234, 123.456, 1234.5, 123456.0, 0, 2, None, np.nan, np.inf)] == [
        "0.7071", "3.012", "123.5", "1234", "123456", "0", "2", "-", "-", "-"]


def test_live_leaderboard_text():
    text = live_leaderboard([
        {"stage": 0, "city": "metr-la", "test_rmse": 5.4321, "ha_rmse": 9.0, "skill": 0.39643, "stage_score": 0.4},
        {"stage": 1, "city": "pems-bay", "zero_shot_rmse": 7.25, "test_rmse": 4.5, "ha_rmse": 6.0, "skill": 0.25,
         "transfer_auc": 0.31234, "stage_score": 0.212345},
    ])
    assert text.splitlines() == [
        "stage  city      zero-shot RMSE  test RMSE  HA RMSE   skill  transfer AUC  stage score",
        "-----  --------  --------------  ---------  -------  ------  ------------  -----------",
        "    0  metr-la                -      5.432        9  0.3964             -          0.4",
        "    1  pems-bay            7.25        4.5        6    0.25        0.3123       0.2123",
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
    fig = leaderboard_figure(leaderboard(uri, tags={"graphtune.run_type": "transfer"}))
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[:3] == ["bigst / freeze-transferred [bigst-fr]", "dcrnn / full [dcrnn-fu]", "gwnet / full [gwnet-fu]"]
    assert labels[-1] == "ha / reference"
    assert [p.get_width() for p in ax.patches] == pytest.approx([0.4, 0.3, 0.2, 0.05, 0.05, 0.0])


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
        assert list(leaderboard(uri, parent_run_id=ids["sweep"])["model"]) == ["bigst", "persistence", "ha"]

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
    """Only model, strategy and score_mean are needed (e.g. per-stage scores of one experiment)."""
    table = pd.DataFrame({"model": ["0: metr-la", "1: pems-bay"], "strategy": ["pretrain", "transfer"],
                          "score_mean": [0.4, 0.6]})
    ax = leaderboard_figure(table).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0: metr-la / pretrain", "1: pems-bay / transfer"]
    assert [p.get_width() for p in ax.patches] == pytest.approx([0.4, 0.6])


def test_format_number_prints_a_dash_for_every_non_finite_value():
    """inf, -inf, NaN and MLflow's sqlite spelling of inf (float max) are no measurement: "-", never 309 digits."""
    float_max = sys.float_info.max
    values = (math.inf, -math.inf, math.nan, np.float32(np.inf), np.float64(-np.inf), float_max, -float_max,
              pd.NA, -1234.5)
    assert [format_number(v) for v in values] == ["-", "-", "-", "-", "-", "-", "-", "-", "-1234"]
