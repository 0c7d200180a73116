"""The command line as a user meets it: fast listings, one-line errors, per-stage settings in fine-tuning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from graphtune.cli import cli

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
