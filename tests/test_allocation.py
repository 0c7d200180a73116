"""One fine-tuning budget across several targets: the allocation rule, its checks, and a run through the experiment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from graphtune.cli import cli
from graphtune.transfer.allocation import Diagnostics, allocate, diagnostics_shares

REPO = Path(__file__).resolve().parents[1]
FAST = ["--model", "baseline", "--epochs", "1", "--set", "prepare.stride=4", "--params", str(REPO / "params.yaml"),
        "--no-tracking"]


def _spent(shares, windows):
    return sum(shares[k] * windows[k] for k in shares)


def test_equal_needs_give_every_target_the_total():
    windows = {"a": 100, "b": 300, "c": 50}
    shares = allocate({"a": 1.0, "b": 1.0, "c": 1.0}, windows, 0.3, floor=0.1)
    assert shares == pytest.approx({"a": 0.3, "b": 0.3, "c": 0.3})


def test_shares_spend_exactly_the_budget_within_floor_and_one():
    windows = {"a": 100, "b": 300, "c": 50}
    shares = allocate({"a": 5.0, "b": 1.0, "c": 0.01}, windows, 0.4, floor=0.1)
    assert _spent(shares, windows) == pytest.approx(0.4 * 450, rel=1e-6)
    assert shares["c"] == pytest.approx(0.1)  # at the floor: the probe every target spends
    assert shares["a"] == pytest.approx(1.0)  # capped at all of its data; the rest goes to b
    assert 0.1 < shares["b"] < 1.0


def test_more_need_never_gets_less():
    windows = {"a": 100, "b": 100}
    low = allocate({"a": 1.0, "b": 1.0}, windows, 0.3, floor=0.1)["a"]
    high = allocate({"a": 2.0, "b": 1.0}, windows, 0.3, floor=0.1)["a"]
    assert high > low


def test_the_need_grows_with_the_remaining_gap_and_the_probe_gain():
    base = Diagnostics("a", 100, zero=5.0, probe=4.0, ha=4.0, difficulty=1.0, probe_fraction=0.1)
    worse = Diagnostics("a", 100, zero=5.0, probe=4.0, ha=2.0, difficulty=1.0, probe_fraction=0.1)
    faster = Diagnostics("a", 100, zero=5.0, probe=3.0, ha=3.0, difficulty=1.0, probe_fraction=0.1)
    assert worse.need(1.0) > base.need(1.0)
    assert faster.gain > base.gain
    shares, table = diagnostics_shares([base, Diagnostics("b", 100, 5.0, 5.0, 5.0, 1.0, 0.1)], 0.3, 0.1)
    assert shares["a"] > shares["b"] and [row["city"] for row in table] == ["a", "b"]


@pytest.mark.parametrize("args, message", [
    (["--datasets", "metr-la-west,metr-la-r1", "--set", "transfer.allocation=uniform"], "needs at least two"),
    (["--datasets", "metr-la-west,metr-la-r1,metr-la-r2", "--set", "transfer.allocation=diagnostics",
      "--set", "transfer.total_budget=0.05"], "below the probe fraction"),
    (["--datasets", "metr-la-west,metr-la-r1,metr-la-r2", "--set", "transfer.allocation=uniform",
      "--target-days", "1"], "drop transfer.target_days"),
    (["--set", "transfer.allocation=greedy"], "transfer.allocation"),
])
def test_bad_allocations_are_one_line_before_any_work(tmp_path, args, message):
    r = CliRunner().invoke(cli, ["experiment", *FAST, *args, "--output-dir", str(tmp_path / "out")])
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["uniform", "diagnostics"])
def test_an_allocated_run_spends_the_total_budget(tmp_path, rule):
    r = CliRunner().invoke(cli, ["experiment", *FAST, "--datasets", "metr-la-west,metr-la-r1,metr-la-r2",
                                 "--set", f"transfer.allocation={rule}", "--set", "transfer.total_budget=0.3",
                                 "--output-dir", str(tmp_path / "out")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    shares = result["allocation"]["shares"]
    assert set(shares) == {"metr-la-r1", "metr-la-r2"}
    stages = result["stages"][1:]
    for stage in stages:
        share = shares[stage["city"]]
        assert stage["curve_fraction"][0] == pytest.approx(0.1)  # the probe comes first
        assert stage["curve_fraction"][-1] == pytest.approx(max(share, 0.1))
    if rule == "uniform":
        assert all(s == pytest.approx(0.3) for s in shares.values())
    else:
        assert len(result["allocation"]["targets"]) == 2
    total = sum(s["curve"][-1]["windows"] for s in stages)
    available = sum(round(s["curve"][-1]["windows"] / s["curve_fraction"][-1]) for s in stages)
    assert total == pytest.approx(0.3 * available, rel=0.05)  # equal total budget (windows round per target)
