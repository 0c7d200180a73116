"""Window indexing against a brute-force reference, split boundaries and the scaler on tiny seeded data."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from graphtune.data.bundle import DatasetBundle, Scaler


def _tiny(t=40, n=3, t_in=4, t_out=3, stride=1) -> DatasetBundle:
    raw = np.arange(t * n, dtype=np.float32).reshape(t, n) + 1.0  # distinct value per (step, node)
    raw[5, 1] = np.nan  # one missing reading
    scaler = Scaler.fit(raw[:28])
    tod = (np.arange(t) % 288 / 288.0).astype(np.float32)
    dow = (np.arange(t) // 288 % 7).astype(np.float32)
    return DatasetBundle(
        name="tiny", values=torch.from_numpy(np.nan_to_num(scaler.transform(raw), nan=0.0)),
        target=torch.from_numpy(raw), time_features=torch.from_numpy(np.column_stack([tod, dow])),
        adj=np.eye(n, dtype=np.float32), sensor_ids=[str(i) for i in range(n)], interval_minutes=5.0,
        splits={"train": (0, 28), "val": (28, 32), "test": (32, 40)}, scaler=scaler, t_in=t_in, t_out=t_out,
        stride=stride,
    )


def _brute_force(bundle: DatasetBundle, split: str):
    lo, hi = bundle.splits[split]
    step = bundle.stride if split == "train" else 1
    xs, ys = [], []
    s = lo
    while s + bundle.t_in + bundle.t_out <= hi:
        x = np.zeros((bundle.t_in, bundle.num_nodes, 3), dtype=np.float32)
        for t in range(bundle.t_in):
            for n in range(bundle.num_nodes):
                x[t, n] = [bundle.values[s + t, n], bundle.time_features[s + t, 0], bundle.time_features[s + t, 1]]
        xs.append(x)
        ys.append(bundle.target[s + bundle.t_in: s + bundle.t_in + bundle.t_out].numpy())
        s += step
    return np.stack(xs), np.stack(ys)


@pytest.mark.parametrize("stride", [1, 3])
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_windows_match_brute_force(split, stride):
    bundle = _tiny(stride=stride)
    if split == "val":  # 4 steps cannot hold a 4 + 3 window
        assert bundle.num_windows("val") == 0
        return
    x, y = bundle.batch(bundle.window_starts(split))
    ref_x, ref_y = _brute_force(bundle, split)
    assert x.shape == ref_x.shape and y.shape == ref_y.shape
    np.testing.assert_array_equal(x.numpy(), ref_x)
    np.testing.assert_array_equal(y.numpy(), ref_y)


def test_window_counts_and_no_straddling():
    bundle = _tiny()
    # train [0, 28): starts 0..21 -> 22 windows; test [32, 40): starts 32, 33 -> 2 windows
    assert bundle.window_starts("train").tolist() == list(range(22))
    assert bundle.window_starts("test").tolist() == [32, 33]
    last = int(bundle.window_starts("train")[-1])
    assert last + bundle.t_in + bundle.t_out == 28  # the last training target is the last training step


def test_loader_covers_every_window_once_and_reshuffles():
    bundle = _tiny()
    loader = bundle.loader("train", batch_size=5, shuffle=True, seed=1)
    assert len(loader) == 5  # ceil(22 / 5)
    epoch1 = torch.cat([x[:, 0, 0, 0] for x, _ in loader])
    epoch2 = torch.cat([x[:, 0, 0, 0] for x, _ in loader])
    assert sorted(epoch1.tolist()) == sorted(bundle.values[:22, 0].tolist())
    assert not torch.equal(epoch1, epoch2)  # a new order each epoch
    again = torch.cat([x[:, 0, 0, 0] for x, _ in bundle.loader("train", batch_size=5, shuffle=True, seed=1)])
    assert torch.equal(epoch1, again)  # same seed, same order


def test_missing_reading_is_nan_target_and_zero_input():
    bundle = _tiny()
    x, y = bundle.batch(torch.tensor([2]))  # inputs steps 2..5, targets 6..8
    assert x[0, 3, 1, 0] == 0.0  # step 5, node 1: missing -> scaled 0 = the training mean
    assert torch.isnan(bundle.target[5, 1])


def test_scaler_uses_observed_values_only():
    data = np.array([[1.0, np.nan], [3.0, 5.0]])
    s = Scaler.fit(data)
    assert s.mean == pytest.approx(3.0)
    assert s.std == pytest.approx(np.std([1.0, 3.0, 5.0]))
    np.testing.assert_allclose(s.inverse_transform(s.transform(data[1])), data[1])


def test_scaler_rejects_empty_training_part():
    with pytest.raises(ValueError, match="no observed values"):
        Scaler.fit(np.full((3, 2), np.nan))


def test_window_minutes_and_the_metric_settings_a_bundle_carries():
    bundle = _tiny(t_in=4, t_out=3)  # 5-minute steps
    assert (bundle.t_in_minutes, bundle.t_out_minutes) == (20.0, 15.0)
    assert bundle.null_value == 0.0 and bundle.mape_floor == 1.0  # the DCRNN convention; one unit of the reading
    counts = replace(bundle, interval_minutes=60.0, null_value=None, mape_floor=0.5)
    assert (counts.t_in_minutes, counts.t_out_minutes) == (240.0, 180.0)
    restricted = counts.restrict(counts.window_starts("train")[:3])
    assert restricted.null_value is None and restricted.mape_floor == 0.5  # a budget point's view keeps them


def test_synthetic_bundles_take_windows_as_steps_or_durations():
    from graphtune.data.synthetic import synthetic_bundle

    hourly = synthetic_bundle(num_steps=200, t_in="1d", t_out=2, interval_minutes=60.0)
    assert (hourly.t_in, hourly.t_out, hourly.t_in_minutes) == (24, 2, 1440.0)
    assert (synthetic_bundle().t_in, synthetic_bundle().t_out) == (12, 12)  # params.yaml's defaults
