"""The command line as a user meets it: fast listings, one-line errors, per-stage settings in fine-tuning."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from graphtune.cli import cli
from graphtune.errors import DataNotice, format_warning

REPO = Path(__file__).resolve().parents[1]
FAST = ["--model", "baseline", "--set", "prepare.stride=4", "--set", "train.batch_size=128",
        "--params", str(REPO / "params.yaml")]


def _invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _imports_after(*argv: str) -> set[str]:
    """The heavy libraries loaded by running `graphtune <argv>` in a fresh interpreter."""
    code = ("import sys; from graphtune.cli import main; sys.argv = ['graphtune', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(' '.join(m for m in ('torch', 'mlflow', 'pandas') if m in sys.modules), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    return set(done.stderr.strip().splitlines()[-1].split()) if done.stderr.strip() else set()


def test_help_and_cities_load_neither_torch_nor_mlflow():
    assert _imports_after("--help") == set()
    assert _imports_after("experiment", "--help") == set()
    assert not {"torch", "mlflow"} & _imports_after("cities")


def test_cities_lists_user_cities_and_bad_entries_fail_in_one_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"cities": {"toy": {"directory": "raw", "series": "s.csv", "units": "km/h",
                                                          "interval_minutes": 15}}}))
    r = CliRunner().invoke(cli, ["cities", "--params", str(params)])
    assert r.exit_code == 0 and "toy" in r.output and "15 min" in r.output, r.output
    params.write_text(yaml.safe_dump({"cities": {"toy": {"directory": "raw", "colour": "red"}}}))
    r = CliRunner().invoke(cli, ["cities", "--params", str(params)])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert r.output.strip().splitlines() == [
        "graphtune: error: cities.toy: unknown key(s) colour; allowed: description, directory, facts, graph, "
        "graph_format, interval_minutes, locations, mape_floor, nan_as_missing, null_value, series, series_options, "
        "subset, units"]


def test_a_params_file_named_on_the_command_line_must_exist(tmp_path, monkeypatch):
    missing = tmp_path / "nope.yaml"
    for command in (["cities"], ["models"], ["compare"], ["prepare"]):
        r = CliRunner().invoke(cli, [*command, "--params", str(missing)])
        assert r.exit_code == 2, (command, r.output)
        assert r.output.strip() == f"graphtune: error: {missing}: params file not found", (command, r.output)
    # without --params, a listing outside a project still works from the built-in defaults
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["cities"])
    assert r.exit_code == 0 and "metr-la-week" in r.output, r.output


def test_finetune_gives_every_target_the_transfer_stage_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    r = _invoke("pretrain", "--city", "metr-la-west", *FAST, "--epochs", "2,1", "--output-dir", str(tmp_path / "pre"))
    assert r.exit_code == 0, r.output
    pre = json.loads((tmp_path / "pre" / "results.json").read_text())
    assert len(pre["stages"][0]["history"]) == 2  # pretraining is stage 0: the first of [2, 1]
    run_id = r.output.strip().splitlines()[-1].split("run ")[1].split(":")[0]
    r = _invoke("finetune", "--from", run_id, "--datasets", "metr-la-east,metr-la-week", *FAST, "--epochs", "2,1",
                "--fractions", "0.3", "--no-tracking", "--output-dir", str(tmp_path / "ft"))
    assert r.exit_code == 0, r.output
    ft = json.loads((tmp_path / "ft" / "results.json").read_text())
    # both targets are transfer stages 1 and 2, so both get the transfer entry of [2, 1] (the first used to get 2)
    assert [s["stage"] for s in ft["stages"]] == [1, 2]
    assert [s["curve"][0]["epochs"] for s in ft["stages"]] == [1, 1]


def test_one_city_runs_with_params_yaml_per_stage_lists(tmp_path, monkeypatch):
    """params.yaml says epochs [6, 3] for two stages; one city on the command line pretrains with the first."""
    monkeypatch.chdir(REPO)
    r = _invoke("experiment", "--datasets", "metr-la-week", *FAST, "--no-tracking", "--output-dir", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "o" / "results.json").read_text())
    assert result["run_type"] == "pretrain" and len(result["stages"][0]["history"]) == 6


def test_user_cities_without_coordinates_and_hourly_go_through_prepare_experiment_and_compare(tmp_path, monkeypatch):
    """Two cities added as the README says: a GENERATED 15-minute speed city without locations, and the
    Montevideo boardings (hourly counts) described by the user. One-line notices, named lead times."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    raw = tmp_path / "speeds"
    raw.mkdir()
    index = pd.date_range("2024-03-04", periods=4 * 96, freq="15min")  # four days at 15 minutes
    day = np.sin(2 * np.pi * (index.hour * 60 + index.minute).to_numpy() / 1440.0)
    frame = pd.DataFrame({f"s{i}": 60 + 10 * day + rng.normal(0, 2, len(index)) for i in range(6)}, index=index)
    frame.index.name = "time"
    frame.round(2).to_csv(raw / "speeds.csv")
    np.savetxt(raw / "adj.csv", np.eye(6, k=1) + np.eye(6, k=-1), delimiter=",", fmt="%d")  # a chain, no header
    bus = REPO / "data" / "sample" / "montevideo-bus"
    params = {"prepare": {"processed_dir": str(tmp_path / "processed"), "stride": 2},
              "cities": {"speeds-15": {"directory": str(raw), "series": "speeds.csv", "graph": "adj.csv",
                                       "graph_format": "dense", "series_options": {"timestamp_column": "time"},
                                       "units": "km/h", "null_value": 0},
                         "my-buses": {"directory": str(bus), "series": "bus_inflow.csv", "graph": "links.csv",
                                      "graph_format": "links", "locations": "stops.csv",
                                      "series_options": {"timestamp_column": "time"}, "units": "boardings/hour",
                                      "null_value": None}}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    runner = CliRunner()
    monkeypatch.chdir(REPO)
    with pytest.warns(DataNotice) as record:
        r = runner.invoke(cli, ["prepare", "--params", str(path), "--city", "speeds-15,my-buses"])
    assert r.exit_code == 0, r.output
    notices = [format_warning(w.message, w.category, w.filename, w.lineno) for w in record]
    assert any("speeds-15" in n and "spectral" in n for n in notices), notices
    assert all(n.startswith("graphtune: notice: ") and n.count("\n") == 1 for n in notices)  # one line each
    for name in ("speeds-15", "my-buses"):
        r = runner.invoke(cli, ["experiment", "--params", str(path), "--datasets", f"metr-la-west,{name}",
                                "--model", "baseline", "--epochs", "1", "--fractions", "1.0",
                                "--output-dir", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
    speeds = json.loads((tmp_path / "speeds-15" / "results.json").read_text())["stages"][-1]
    buses = json.loads((tmp_path / "my-buses" / "results.json").read_text())["stages"][-1]
    assert {"mae_45min", "mae_90min", "mae_180min"} <= set(speeds["test"])  # steps 3, 6, 12 at 15 minutes
    assert {"mae_180min", "mae_360min", "mae_720min"} <= set(buses["test"])  # ... and hourly
    assert all(math.isfinite(buses["test"][k]) for k in ("mape", "wape"))
    r = runner.invoke(cli, ["compare", "--params", str(path), "--output-dir", str(tmp_path / "board")])
    assert r.exit_code == 0, r.output
    board = (tmp_path / "board" / "leaderboard.csv").read_text()
    assert "metr-la-west -> speeds-15" in board and "metr-la-west -> my-buses" in board
