import math

import pytest
import torch

from graphtune.config import TransferConfig
from graphtune.transfer.budget import BudgetScheduler, check_fraction, sample_windows, steps_cap
from graphtune.errors import ConfigError

STARTS = torch.arange(100, 130)  # 30 windows


def test_subset_size_order_and_membership():
    chosen = sample_windows(STARTS, 0.1, "subset", seed=0)
    assert chosen.numel() == 3
    assert torch.equal(chosen, chosen.sort().values)
    assert set(chosen.tolist()) <= set(STARTS.tolist())
    assert torch.equal(sample_windows(STARTS, 0.1, "subset", seed=0), chosen)  # seeded
    assert not torch.equal(sample_windows(STARTS, 0.5, "subset", seed=1), sample_windows(STARTS, 0.5, "subset", seed=2))


def test_subset_rounds_half_up_and_keeps_at_least_one_window():
    assert sample_windows(torch.arange(25), 0.1, "subset", seed=0).numel() == 3  # 2.5 -> 3
    assert sample_windows(torch.arange(25), 0.01, "subset", seed=0).numel() == 1  # 0.25 -> at least 1
    assert torch.equal(sample_windows(STARTS, 1.0, "subset", seed=3), STARTS)


def test_subsets_are_nested_across_fractions():
    small, mid = (set(sample_windows(STARTS, f, "both", seed=5).tolist()) for f in (0.1, 0.3))
    assert len(small) == 3 and len(mid) == 9 and small <= mid


def test_steps_mode_keeps_every_window():
    assert torch.equal(sample_windows(STARTS, 0.1, "steps", seed=0), STARTS)


def test_steps_cap():
    # 257 windows in batches of 64 = 5 batches per full epoch
    assert steps_cap(257, 64, 0.3, "steps") == 2  # 1.5 -> 2
    assert steps_cap(257, 64, 0.1, "both") == 1  # 0.5 -> 1
    assert steps_cap(257, 64, 0.01, "steps") == 1  # at least one step
    assert steps_cap(257, 64, 1.0, "steps") == 5
    assert steps_cap(257, 64, 0.3, "subset") is None


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, math.nan, "half", None])
def test_fractions_outside_0_1_are_config_errors(bad):
    with pytest.raises(ConfigError, match="fractions"):
        check_fraction(bad)
    with pytest.raises(ConfigError, match="fractions"):
        sample_windows(STARTS, bad, "subset", seed=0)
    with pytest.raises(ConfigError, match="fractions"):
        steps_cap(30, 4, bad, "steps")


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="fewshot_mode"):
        sample_windows(STARTS, 0.5, "random", seed=0)


def test_scheduler_stops_after_more_than_patience_flat_steps():
    sched = BudgetScheduler(TransferConfig(min_gain_rate=0.05, min_rel_improve=0.01, patience=1))
    assert not sched.update(0.0, 10.0)  # zero-shot: the reference error
    assert not sched.update(0.1, 9.0)  # gain 1 = 10% of the reference per 0.1 of budget: rate 1.0, not flat
    assert not sched.update(0.3, 8.95)  # gain 0.05: rate 0.005/0.2 = 0.025 < 0.05, rel 0.0056 < 0.01: flat 1
    assert sched.update(0.5, 8.94)  # gain 0.01: rate 0.005, rel 0.0011: flat 2 > patience -> stop
    assert sched.should_stop and sched.stopped_at == 0.5
    assert [s["flat"] for s in sched.steps] == [False, True, True]
    assert sched.steps[1]["gain_rate"] == pytest.approx(0.025)
    assert sched.steps[1]["rel_gain"] == pytest.approx(0.05 / 9.0)
    assert "fraction 0.5" in sched.stop_reason and "patience 1" in sched.stop_reason
    assert "min_gain_rate 0.05" in sched.stop_reason
    assert sched.saved_budget([0.1, 0.3, 0.5, 0.7, 1.0]) == pytest.approx(1.7)


def test_scheduler_flat_needs_both_rates_low_and_resets():
    sched = BudgetScheduler(TransferConfig(min_gain_rate=0.05, min_rel_improve=0.1, patience=1))
    sched.update(0.0, 10.0)
    sched.update(0.1, 9.9)  # rate (0.1 / 10) / 0.1 = 0.1 >= 0.05 although rel 0.01 < 0.1: not flat
    sched.update(0.2, 9.9)  # no gain: flat
    sched.update(0.3, 8.0)  # big gain: resets the streak
    sched.update(0.4, 8.0)  # flat again, streak 1
    assert [s["flat"] for s in sched.steps] == [False, True, False, True]
    assert not sched.should_stop and sched.stop_reason is None and sched.saved_budget([0.5, 1.0]) == 0.0


def test_scheduler_gain_is_measured_against_the_best_so_far():
    sched = BudgetScheduler(TransferConfig(min_gain_rate=0.1, min_rel_improve=0.01, patience=0))
    sched.update(0.0, 5.0)
    sched.update(0.2, 6.0)  # worse than zero-shot: negative gain, flat, patience 0 -> stop
    assert sched.steps[0]["gain"] == pytest.approx(-1.0) and sched.stopped_at == 0.2
    sched2 = BudgetScheduler(TransferConfig(min_gain_rate=1.0, min_rel_improve=0.5, patience=5))
    for f, v in [(0.0, 5.0), (0.2, 6.0), (0.4, 4.0)]:
        sched2.update(f, v)
    assert sched2.steps[1]["gain"] == pytest.approx(1.0)  # against best 5.0, not the previous 6.0
    assert sched2.steps[1]["gain_rate"] == pytest.approx(1.0)  # 1/5 of the reference error per 0.2 of budget


def test_scheduler_nan_metric_is_flat_and_fractions_must_increase():
    sched = BudgetScheduler(TransferConfig(patience=0))
    sched.update(0.0, 5.0)
    assert sched.update(0.1, math.nan)
    s = BudgetScheduler(TransferConfig())
    s.update(0.3, 1.0)
    with pytest.raises(ConfigError, match="increase"):
        s.update(0.3, 0.9)


def test_scheduler_thresholds_are_unit_free():
    """The same curve in mph, km/h and counts stops at the same point: the thresholds are shares of errors."""
    curve = [(0.0, 3.3), (0.1, 3.2), (0.3, 3.19), (1.0, 3.185)]
    stops = []
    for unit in (1.0, 1.609344, 250.0):
        sched = BudgetScheduler(TransferConfig())
        stops.append(next((f for f, v in curve if sched.update(f, v * unit)), None))
    assert stops == [0.3, 0.3, 0.3]
