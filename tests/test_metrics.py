import math

import pytest
import torch

from graphtune.metrics import (
    HORIZONS,
    MetricAccumulator,
    horizon_minutes,
    horizon_names,
    masked_mae_loss,
    report_steps,
    valid_mask,
)

NAN = math.nan

# (B=1, T_out=2, N=2): observed entries are (h0, n0) with error 1 and (h1, n1) with error 4
PRED = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
TARGET = torch.tensor([[[2.0, 0.0], [NAN, 8.0]]])


def test_horizon_minutes_follow_the_interval():
    assert HORIZONS == (3, 6, 12)
    assert [horizon_minutes(h, 5.0) for h in HORIZONS] == [15.0, 30.0, 60.0]
    assert horizon_minutes(3, 15.0) == 45.0


def test_valid_mask_drops_nan_zero_and_almost_zero():
    target = torch.tensor([NAN, 0.0, 1e-6, -1e-6, 0.01, 65.0])
    assert valid_mask(target).tolist() == [False, False, False, False, True, True]
    assert valid_mask(torch.tensor([5.0, 7.0]), null_value=5.0).tolist() == [False, True]


def test_masked_mae_loss_hand_computed():
    # mask [1, 0, 0, 1] / mean 0.5 = [2, 0, 0, 2]; mean of [1*2, 0, 0, 4*2] = 2.5
    assert masked_mae_loss(PRED, TARGET).item() == pytest.approx(2.5)


def test_masked_mae_loss_gradient_is_finite_with_nan_labels():
    pred = PRED.clone().requires_grad_(True)
    masked_mae_loss(pred, TARGET).backward()
    # d/dpred of mean(|pred - y| * mask): sign(pred - y) * mask / 4 at observed entries, 0 elsewhere
    assert pred.grad.tolist() == [[[-0.5, 0.0], [0.0, -0.5]]]


def test_masked_mae_loss_all_missing_is_zero_not_nan():
    pred = torch.randn(2, 3, 4, requires_grad=True)
    target = torch.full((2, 3, 4), NAN)
    target[0, 0, 0] = 1e-7  # almost 0: missing as well
    loss = masked_mae_loss(pred, target)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_accumulator_hand_computed():
    acc = MetricAccumulator(horizons=(1, 2))
    acc.update(PRED, TARGET)
    m = acc.compute()
    assert m["mae"] == pytest.approx(2.5)
    assert m["rmse"] == pytest.approx(math.sqrt((1 + 16) / 2))
    assert m["mape"] == pytest.approx(100 * (1 / 2 + 4 / 8) / 2)  # percent
    assert (m["mae_h1"], m["rmse_h1"], m["mape_h1"]) == pytest.approx((1.0, 1.0, 50.0))
    assert (m["mae_h2"], m["rmse_h2"], m["mape_h2"]) == pytest.approx((4.0, 4.0, 50.0))
    assert acc.per_step()["mae"] == pytest.approx([1.0, 4.0])


def test_accumulator_clips_horizons_to_t_out():
    acc = MetricAccumulator()  # HORIZONS 3, 6, 12 but T_out = 2: all three clip to step 2, reported once
    acc.update(PRED, TARGET)
    assert set(acc.compute()) == {"mae", "rmse", "mape", "wape", "count", "mape_count",
                                  "mae_h2", "rmse_h2", "mape_h2", "wape_h2"}


def test_accumulator_near_zero_labels_are_missing():
    acc = MetricAccumulator(horizons=())
    acc.update(torch.tensor([[[5.0, 5.0]]]), torch.tensor([[[1e-5, 4.0]]]))
    assert acc.compute() == pytest.approx({"mae": 1.0, "rmse": 1.0, "mape": 25.0, "wape": 25.0, "count": 1,
                                           "mape_count": 1})


def test_accumulator_all_missing_batch_contributes_nothing():
    acc = MetricAccumulator(horizons=(1, 2))
    acc.update(PRED, TARGET)
    acc.update(torch.full((3, 2, 2), 100.0), torch.full((3, 2, 2), NAN))
    assert acc.compute()["mae"] == pytest.approx(2.5)
    empty = MetricAccumulator()
    empty.update(torch.ones(1, 2, 2), torch.zeros(1, 2, 2))
    result = empty.compute()
    assert (result.pop("count"), result.pop("mape_count")) == (0, 0)
    assert all(math.isnan(v) for v in result.values())  # nothing observed: undefined, not 0


def _random_split(seed):
    g = torch.Generator().manual_seed(seed)
    target = 50 + 10 * torch.randn(23, 12, 5, generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = NAN
    target[torch.rand(target.shape, generator=g) < 0.1] = 0.0
    target[5:9] = NAN  # one batch below is entirely missing
    pred = target.nan_to_num(40.0) + torch.randn(target.shape, generator=g)
    return pred, target


def test_accumulating_in_one_or_many_batches_is_identical():
    pred, target = _random_split(0)
    whole = MetricAccumulator()
    whole.update(pred, target)
    parts = MetricAccumulator()
    for lo, hi in [(0, 5), (5, 9), (9, 10), (10, 23)]:
        parts.update(pred[lo:hi], target[lo:hi])
    assert set(whole.compute()) == {f"{m}{h}" for m in ("mae", "rmse", "mape", "wape")
                                    for h in ("", "_h3", "_h6", "_h12")} | {"count", "mape_count"}
    assert parts.compute() == pytest.approx(whole.compute(), rel=1e-12)


def test_accumulator_matches_direct_computation_at_horizon_12():
    pred, target = _random_split(1)
    acc = MetricAccumulator()
    acc.update(pred, target)
    p, y = pred[:, 11].double(), target[:, 11].double()  # horizon 12 = index 11
    keep = ~torch.isnan(y) & (y.abs() > 1e-4)
    err = (p - y)[keep]
    m = acc.compute()
    assert m["mae_h12"] == pytest.approx(err.abs().mean().item(), rel=1e-12)
    assert m["rmse_h12"] == pytest.approx(err.square().mean().sqrt().item(), rel=1e-12)
    assert m["mape_h12"] == pytest.approx(100 * (err.abs() / y[keep].abs()).mean().item(), rel=1e-12)


def test_accumulator_rejects_bad_shapes():
    acc = MetricAccumulator()
    with pytest.raises(ValueError, match="B, T_out, N"):
        acc.update(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="before any update"):
        acc.compute()


# ---------------------------------------------------------------------------------------------
# MAPE floor, WAPE, null_value None, lead-time names (issue 10)
# ---------------------------------------------------------------------------------------------

# (B=1, T_out=1, N=6): 0.0 is missing (null value 0), NaN is missing, 0.5 is observed but below a
# floor of 1, 1.0 sits exactly on the floor (kept), -2.0 counts by its magnitude.
FLOOR_PRED = torch.tensor([[[3.0, 1.0, 2.0, 5.0, 7.0, -1.0]]])
FLOOR_TARGET = torch.tensor([[[0.0, 0.5, 1.0, 4.0, NAN, -2.0]]])


def test_mape_leaves_out_readings_below_the_floor_and_counts_them():
    acc = MetricAccumulator(horizons=(), mape_floor=1.0)
    acc.update(FLOOR_PRED, FLOOR_TARGET)
    m = acc.compute()
    assert (m["count"], m["mape_count"]) == (4, 3)  # observed 0.5, 1, 4, -2; MAPE uses 1, 4, -2
    assert m["mae"] == pytest.approx((0.5 + 1 + 1 + 1) / 4)  # MAE still uses the reading of 0.5
    assert m["mape"] == pytest.approx(100 * (1 / 1 + 1 / 4 + 1 / 2) / 3)  # 58.33 %
    assert m["wape"] == pytest.approx(100 * 3.5 / 7.5)  # sum |e| / sum |y| over all 4 observed
    no_floor = MetricAccumulator(horizons=(), mape_floor=0.0)
    no_floor.update(FLOOR_PRED, FLOOR_TARGET)
    assert (no_floor.compute()["mape"], no_floor.compute()["mape_count"]) == (pytest.approx(68.75), 4)


def test_mape_with_no_reading_on_the_floor_is_nan_not_zero():
    acc = MetricAccumulator(horizons=(1,), mape_floor=10.0)
    acc.update(FLOOR_PRED, FLOOR_TARGET)
    m = acc.compute()
    assert (m["count"], m["mape_count"]) == (4, 0)
    assert math.isnan(m["mape"]) and math.isnan(m["mape_h1"])
    assert m["mae"] == pytest.approx(0.875)


@pytest.mark.parametrize("floor", [-1.0, NAN, math.inf])
def test_mape_floor_must_be_finite_and_not_negative(floor):
    with pytest.raises(ValueError, match="mape_floor"):
        MetricAccumulator(mape_floor=floor)


# (B=1, T_out=2, N=2): step 1 holds a real 0 and a 2, step 2 a real 0 and a NaN
ZERO_PRED = torch.tensor([[[1.0, 1.0], [0.5, 9.0]]])
ZERO_TARGET = torch.tensor([[[0.0, 2.0], [0.0, NAN]]])


def test_wape_hand_computed_with_real_zeros():
    acc = MetricAccumulator(null_value=None, horizons=(1, 2), mape_floor=1.0)
    acc.update(ZERO_PRED, ZERO_TARGET)
    m = acc.compute()
    # observed: 0 (error 1), 2 (error 1), 0 (error 0.5); sum |e| = 2.5, sum |y| = 2
    assert (m["count"], m["mape_count"]) == (3, 1)
    assert m["mae"] == pytest.approx(2.5 / 3)
    assert m["rmse"] == pytest.approx(math.sqrt((1 + 1 + 0.25) / 3))
    assert m["wape"] == pytest.approx(125.0)
    assert m["mape"] == pytest.approx(50.0)  # only the reading of 2: 1 / 2
    assert (m["mae_h1"], m["wape_h1"], m["mape_h1"]) == pytest.approx((1.0, 100.0, 50.0))
    assert m["mae_h2"] == pytest.approx(0.5)
    assert math.isnan(m["wape_h2"]) and math.isnan(m["mape_h2"])  # every reading of step 2 is 0
    assert acc.per_step()["wape"][0] == pytest.approx(100.0)


def test_null_value_none_keeps_zeros_as_readings():
    assert valid_mask(torch.tensor([NAN, 0.0, 1e-6, -3.0]), null_value=None).tolist() == [False, True, True, True]
    with_zero_null = MetricAccumulator(null_value=0.0, horizons=())
    with_zero_null.update(ZERO_PRED, ZERO_TARGET)
    assert with_zero_null.compute() == pytest.approx(
        {"mae": 1.0, "rmse": 1.0, "mape": 50.0, "wape": 50.0, "count": 1, "mape_count": 1})  # zeros missing
    # masked_mae_loss: observed (0,0,0) error 1 and (0,0,1) error 1 (the 0 is a reading), (0,1,0) error 0.5
    assert masked_mae_loss(ZERO_PRED, ZERO_TARGET, null_value=None).item() == pytest.approx(2.5 / 3)
    # PRED/TARGET above: with None the 0.0 at (0, 0, 1) is a reading with error 2
    assert masked_mae_loss(PRED, TARGET, null_value=None).item() == pytest.approx((1 + 2 + 4) / 3)
    pred = PRED.clone().requires_grad_(True)
    masked_mae_loss(pred, TARGET, null_value=None).backward()
    assert torch.isfinite(pred.grad).all()


def test_report_steps_clip_to_t_out_without_duplicates():
    assert report_steps(12) == (3, 6, 12)
    assert report_steps(24) == (3, 6, 12)
    assert report_steps(4) == (3, 4)
    assert report_steps(3) == (3,)
    assert report_steps(1) == (1,)
    assert report_steps(4, horizons=(12, 1, 4)) == (1, 4)
    with pytest.raises(ValueError, match="t_out"):
        report_steps(0)
    with pytest.raises(ValueError, match="horizons"):
        report_steps(12, horizons=(0, 3))


@pytest.mark.parametrize("interval, t_out, expected", [
    (5, 12, {3: "15min", 6: "30min", 12: "60min"}),
    (15, 12, {3: "45min", 6: "90min", 12: "180min"}),
    (60, 12, {3: "180min", 6: "360min", 12: "720min"}),
    (5, 4, {3: "15min", 4: "20min"}),
    (15, 4, {3: "45min", 4: "60min"}),
    (60, 4, {3: "180min", 4: "240min"}),
    (2.5, 12, {3: "7.5min", 6: "15min", 12: "30min"}),
    (0.1, 3, {3: "0.3min"}),  # 3 * 0.1 = 0.30000000000000004 in floats
])
def test_horizon_names_are_lead_times_in_minutes(interval, t_out, expected):
    assert horizon_names(interval, t_out) == expected


@pytest.mark.parametrize("interval", [0, -5, NAN, math.inf])
def test_horizon_names_reject_a_bad_interval(interval):
    with pytest.raises(ValueError, match="interval_minutes"):
        horizon_names(interval, 12)


def test_accumulator_names_steps_by_lead_time_too():
    pred, target = _random_split(2)  # T_out = 12
    acc = MetricAccumulator(mape_floor=1.0, interval_minutes=15.0)
    acc.update(pred, target)
    m = acc.compute()
    per_metric = ("mae", "rmse", "mape", "wape")
    assert set(m) == ({"count", "mape_count"} | set(per_metric)
                      | {f"{n}_{h}" for n in per_metric for h in ("h3", "h6", "h12", "45min", "90min", "180min")})
    for name in per_metric:
        assert (m[f"{name}_45min"], m[f"{name}_90min"], m[f"{name}_180min"]) == (
            m[f"{name}_h3"], m[f"{name}_h6"], m[f"{name}_h12"])
    short = MetricAccumulator(interval_minutes=60.0)
    short.update(pred[:, :4], target[:, :4])
    short_names = sorted(k for k in short.compute() if k.startswith("mae_"))
    assert short_names == ["mae_180min", "mae_240min", "mae_h3", "mae_h4"]
    assert short.compute()["mae_240min"] == pytest.approx(short.per_step()["mae"][3], rel=1e-12)


def test_the_readme_horizon_table_is_what_the_code_names():
    """README's table of lead times per embedded city is generated from horizon_names: they must agree."""
    from pathlib import Path

    from graphtune.data.cities import get_city
    from graphtune.metrics import horizon_names

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for city in ("metr-la-week", "montevideo-bus"):
        minutes = get_city(city).interval_minutes or get_city(city).facts["interval_minutes"]
        names = horizon_names(minutes, 12)
        table = readme[readme.index("### Horizons, metrics and what each is for"):]
        row = next(line for line in table.splitlines() if line.startswith(f"| `{city}`"))
        assert row.endswith(" | ".join(f"`{names[h]}`" for h in (3, 6, 12)) + " |"), row
