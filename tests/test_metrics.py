import math

import pytest
import torch

from graphtune.metrics import HORIZONS, MetricAccumulator, horizon_minutes, masked_mae_loss, valid_mask

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


def test_accumulator_skips_horizons_beyond_t_out():
    acc = MetricAccumulator()  # HORIZONS 3, 6, 12 but T_out = 2
    acc.update(PRED, TARGET)
    assert set(acc.compute()) == {"mae", "rmse", "mape"}


def test_accumulator_near_zero_labels_are_missing():
    acc = MetricAccumulator(horizons=())
    acc.update(torch.tensor([[[5.0, 5.0]]]), torch.tensor([[[1e-5, 4.0]]]))
    assert acc.compute() == pytest.approx({"mae": 1.0, "rmse": 1.0, "mape": 25.0})


def test_accumulator_all_missing_batch_contributes_nothing():
    acc = MetricAccumulator(horizons=(1, 2))
    acc.update(PRED, TARGET)
    acc.update(torch.full((3, 2, 2), 100.0), torch.full((3, 2, 2), NAN))
    assert acc.compute()["mae"] == pytest.approx(2.5)
    empty = MetricAccumulator()
    empty.update(torch.ones(1, 2, 2), torch.zeros(1, 2, 2))
    assert all(math.isnan(v) for v in empty.compute().values())  # nothing observed: undefined, not 0


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
    assert set(whole.compute()) == {f"{m}{h}" for m in ("mae", "rmse", "mape") for h in ("", "_h3", "_h6", "_h12")}
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
