"""GPD node prompts (graphtune.data.prompts): exact small cases, cross-checks and leakage checks.

Every series built here is SYNTHETIC (hand-made arrays or graphtune.data.synthetic), except the last test,
which reads the real METR-LA week sample's graph.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from graphtune.data.prompts import (
    SPATIAL_FEATURES,
    TEMPORAL_FEATURES,
    PromptScaler,
    check_prompts,
    ego_members,
    node_prompts,
    spatial_prompts,
    temporal_prompts,
    visible_steps,
)
from graphtune.errors import DataError

# A 4-node hand graph, row = from, column = to. Edges 0->1 (1.0), 0->3 (0.5), 1->0 (0.5), 1->2 (2.0),
# 2->0 (1.0), and a self loop 0->0 that every feature must ignore. Node 3 has no out-edge (dangling).
HAND = np.array(
    [
        [1.0, 1.0, 0.0, 0.5],
        [0.5, 0.0, 2.0, 0.0],
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
    ],
    dtype=np.float32,
)
COL = {name: i for i, name in enumerate(SPATIAL_FEATURES)}


def _hand_pagerank() -> np.ndarray:
    """PageRank of HAND solved directly (no power iteration) from its equations, written out by hand.

    Row-normalised: 0 -> 1 (2/3), 0 -> 3 (1/3); 1 -> 0 (1/5), 1 -> 2 (4/5); 2 -> 0 (1); 3 dangling (1/4 each).
    r_j = d * (sum_i r_i P_ij + r_3 / 4) + (1 - d) / 4 with d = 0.85.
    """
    d = 0.85
    a = np.array(
        [
            [1.0, -d / 5, -d, -d / 4],
            [-d * 2 / 3, 1.0, 0.0, -d / 4],
            [0.0, -d * 4 / 5, 1.0, -d / 4],
            [-d / 3, 0.0, 0.0, 1.0 - d / 4],
        ]
    )
    return np.linalg.solve(a, np.full(4, (1 - d) / 4))


# --------------------------------------------------------------------------- ego_members
def test_ego_members_orders_by_strength_pads_and_drops_self_loops():
    # strength max(adj[i,j], adj[j,i]): 0-1: 1, 0-2: 1 (only the in-edge 2->0), 0-3: 0.5, 1-2: 2
    got = ego_members(HAND, 2)
    assert got.dtype == np.int64 and got.shape == (4, 3)
    np.testing.assert_array_equal(got, [[0, 1, 2], [1, 2, 0], [2, 1, 0], [3, 0, -1]])  # 0-1/0-2 tie: lower index
    wide = ego_members(HAND, 5)  # more slots than nodes: padded with -1
    np.testing.assert_array_equal(wide, [[0, 1, 2, 3, -1, -1], [1, 2, 0, -1, -1, -1],
                                         [2, 1, 0, -1, -1, -1], [3, 0, -1, -1, -1, -1]])
    np.testing.assert_array_equal(ego_members(HAND, 0), [[0], [1], [2], [3]])


def test_ego_members_union_of_in_and_out_neighbours():
    adj = np.zeros((4, 4))
    adj[0, 1] = 3.0  # out-neighbour of 0
    adj[2, 0] = 5.0  # in-neighbour of 0, stronger
    adj[0, 3] = 1.0
    adj[3, 0] = 4.0  # both directions: counted once, at the stronger weight 4
    adj[1, 1] = 9.0  # a self loop is never a neighbour
    np.testing.assert_array_equal(ego_members(adj, 3), [[0, 2, 3, 1], [1, 0, -1, -1], [2, 0, -1, -1],
                                                        [3, 0, -1, -1]])
    assert adj[1, 1] == 9.0  # the caller's matrix is left as it was


# --------------------------------------------------------------------------- spatial prompts
def test_spatial_prompts_on_the_hand_graph():
    got = spatial_prompts(HAND, None, 2)
    assert got.dtype == np.float32 and got.shape == (4, len(SPATIAL_FEATURES))
    np.testing.assert_array_equal(got[:, COL["out_degree"]], [2, 2, 1, 0])
    np.testing.assert_array_equal(got[:, COL["in_degree"]], [2, 1, 1, 1])
    np.testing.assert_allclose(got[:, COL["out_weight"]], [1.5, 2.5, 1.0, 0.0])
    np.testing.assert_allclose(got[:, COL["in_weight"]], [1.5, 1.0, 2.0, 0.5])
    np.testing.assert_array_equal(got[:, COL["ego_size"]], [4, 3, 3, 2])
    # undirected view: triangle 0-1-2 plus the pendant 3; node 0 has 3 neighbours and 1 of their 3 pairs linked
    np.testing.assert_allclose(got[:, COL["clustering"]], [1 / 3, 1.0, 1.0, 0.0])
    pagerank = got[:, COL["pagerank"]].astype(np.float64)
    np.testing.assert_allclose(pagerank, 4 * _hand_pagerank(), rtol=1e-6)
    assert pagerank.sum() == pytest.approx(4.0, abs=1e-5)  # times N: sums to N, mean 1
    np.testing.assert_array_equal(got[:, [COL[f] for f in ("east_km", "north_km", "distance_km")]], 0.0)


def test_spatial_prompts_self_loops_do_not_matter():
    no_loop = HAND.copy()
    np.fill_diagonal(no_loop, 0.0)
    with_loops = no_loop + np.eye(4, dtype=np.float32)
    np.testing.assert_array_equal(spatial_prompts(no_loop, None, 2), spatial_prompts(with_loops, None, 2))


def test_spatial_positions_relative_to_the_centroid():
    coords = np.array([[34.0, -118.0], [34.0, -118.2], [34.2, -118.0], [34.2, -118.2]])  # lat, lon
    got = spatial_prompts(HAND, coords, 2).astype(np.float64)
    radius = 6371.0088
    east = radius * np.radians([0.1, -0.1, 0.1, -0.1]) * np.cos(np.radians(34.1))
    north = radius * np.radians([-0.1, -0.1, 0.1, 0.1])
    np.testing.assert_allclose(got[:, COL["east_km"]], east, rtol=1e-5)
    np.testing.assert_allclose(got[:, COL["north_km"]], north, rtol=1e-5)
    np.testing.assert_allclose(got[:, COL["distance_km"]], np.hypot(east, north), rtol=1e-5)
    assert 10.0 < got[0, COL["distance_km"]] < 16.0  # ~9.2 km east, ~11.1 km north: not degrees
    # a shift of the whole city changes nothing: no raw latitude/longitude in the prompt
    moved = spatial_prompts(HAND, coords + np.array([0.0, 5.0]), 2).astype(np.float64)
    np.testing.assert_allclose(moved, got, rtol=1e-6, atol=1e-6)


def test_spatial_prompts_match_networkx():
    nx = pytest.importorskip("networkx")
    rng = np.random.default_rng(3)
    adj = rng.random((30, 30)) * (rng.random((30, 30)) < 0.15)  # SYNTHETIC sparse weighted digraph
    adj[5] = 0.0  # a dangling node
    np.fill_diagonal(adj, 1.0)  # self loops, which the prompts leave out
    plain = adj.copy()
    np.fill_diagonal(plain, 0.0)
    graph = nx.from_numpy_array(plain, create_using=nx.DiGraph)
    got = spatial_prompts(adj, None, 4).astype(np.float64)
    ranks = nx.pagerank(graph, alpha=0.85, tol=1e-13, max_iter=10_000, weight="weight")
    np.testing.assert_allclose(got[:, COL["pagerank"]], [30 * ranks[i] for i in range(30)], rtol=1e-5)
    clustering = nx.clustering(graph.to_undirected(as_view=False))  # unweighted: no weight argument
    np.testing.assert_allclose(got[:, COL["clustering"]], [clustering[i] for i in range(30)], rtol=1e-6)
    np.testing.assert_array_equal(got[:, COL["out_degree"]], [graph.out_degree(i) for i in range(30)])
    np.testing.assert_array_equal(got[:, COL["in_degree"]], [graph.in_degree(i) for i in range(30)])


# --------------------------------------------------------------------------- temporal prompts
def _names(bins: int) -> dict[str, int]:
    return {name: i for i, name in enumerate(TEMPORAL_FEATURES(bins))}


def test_temporal_feature_names():
    assert TEMPORAL_FEATURES(3) == ("profile_0", "profile_1", "profile_2", "mean", "std", "acf_1step", "acf_1h",
                                    "acf_1d", "missing")
    with pytest.raises(ValueError):
        TEMPORAL_FEATURES(0)


def test_temporal_prompts_of_a_synthetic_daily_sinusoid():
    per_day, days, bins = 288, 4, 8  # 5-minute readings
    t = np.arange(per_day * days)
    tod = (t % per_day) / per_day
    target = np.column_stack([50 + 10 * np.sin(2 * np.pi * tod), 30 - 5 * np.cos(2 * np.pi * tod)])  # SYNTHETIC
    got = temporal_prompts(target.astype(np.float32), tod, t, 5.0, bins=bins).astype(np.float64)
    c = _names(bins)
    assert got.shape == (2, len(TEMPORAL_FEATURES(bins)))
    np.testing.assert_allclose(got[:, c["acf_1d"]], 1.0, atol=1e-6)  # one day later: the same value
    np.testing.assert_allclose(got[:, c["acf_1h"]], np.cos(2 * np.pi / 24), atol=5e-3)  # a 15-degree shift
    np.testing.assert_allclose(got[:, c["mean"]], [50.0, 30.0], atol=1e-4)
    np.testing.assert_allclose(got[:, c["std"]], [10 / np.sqrt(2), 5 / np.sqrt(2)], rtol=1e-4)
    assert got[0, c["missing"]] == 0.0
    # the profile follows the sine: each bin is the mean of the sine over its 36 slots ...
    slots = np.arange(per_day).reshape(bins, -1) / per_day
    expected = 50 + 10 * np.sin(2 * np.pi * slots).mean(axis=1)
    profile = got[0, [c[f"profile_{b}"] for b in range(bins)]]
    np.testing.assert_allclose(profile, expected, rtol=1e-5)
    # ... which is close to the continuous bin average, above the mean while the sine is positive
    edges = np.arange(bins + 1) / bins
    continuous = 50 + 10 * bins / (2 * np.pi) * (np.cos(2 * np.pi * edges[:-1]) - np.cos(2 * np.pi * edges[1:]))
    np.testing.assert_allclose(profile, continuous, atol=0.2)
    assert (profile[:4] > 50).all() and (profile[4:] < 50).all() and set(np.argsort(profile)[[0, -1]]) <= {1, 2, 5, 6}


def test_autocorrelation_uses_only_pairs_with_both_steps_given():
    # SYNTHETIC hourly series; steps 3 and 4 are not given (hidden) and hold extreme values
    x = np.array([1.0, 2.0, 4.0, 100.0, -100.0, 3.0, 5.0, 4.0, 8.0, 6.0])
    target = np.column_stack([x, x])
    target[6, 1] = np.nan  # node 1 also misses one given reading: pairs touching it drop out
    tod = (np.arange(10) % 24) / 24
    steps = np.array([0, 1, 2, 5, 6, 7, 8, 9])
    got = temporal_prompts(target, tod, steps, 60.0, bins=2).astype(np.float64)
    c = _names(2)
    pairs = [(0, 1), (1, 2), (5, 6), (6, 7), (7, 8), (8, 9)]  # (2, 3) and (4, 5) need a hidden step
    first, second = (np.array(s) for s in zip(*pairs))
    expected = np.corrcoef(x[first], x[second])[0, 1]
    assert got[0, c["acf_1step"]] == pytest.approx(expected, abs=1e-6)
    assert got[0, c["acf_1h"]] == pytest.approx(expected, abs=1e-6)  # at 60 minutes, 1 hour is 1 step
    everything = np.corrcoef(x[:-1], x[1:])[0, 1]
    assert abs(everything - expected) > 0.1  # including the hidden pairs would change the value
    kept = [(a, b) for a, b in pairs if 6 not in (a, b)]
    first, second = (np.array(s) for s in zip(*kept))
    assert got[1, c["acf_1step"]] == pytest.approx(np.corrcoef(x[first], x[second])[0, 1], abs=1e-6)
    assert np.isnan(got[:, c["acf_1d"]]).all()  # a 24-step lag has no pair in 10 steps: undefined
    # the hidden readings enter nothing else either
    assert got[0, c["mean"]] == pytest.approx(x[steps].mean(), abs=1e-5)
    changed = target.copy()
    changed[[3, 4]] = [[7.0, 7.0], [-3.0, 9.0]]
    np.testing.assert_array_equal(temporal_prompts(changed, tod, steps, 60.0, bins=2), got.astype(np.float32))


def test_missing_share_empty_bins_and_constant_nodes():
    nan = np.nan
    target = np.array(  # SYNTHETIC, 4 nodes x 8 steps; step 2 and step 7 are not given: their NaNs do not count
        [
            [1.0, nan, 5.0, 5.0],
            [2.0, nan, nan, 5.0],
            [nan, nan, 9.0, 5.0],
            [3.0, nan, 6.0, 5.0],
            [nan, nan, 5.0, 5.0],
            [nan, nan, 7.0, 5.0],
            [5.0, nan, 4.0, 5.0],
            [nan, nan, nan, 5.0],
        ]
    )
    tod = np.arange(8) / 8  # bins of 4: steps {0, 1}, {3}, {4, 5}, {6} among the given ones
    steps = np.array([0, 1, 3, 4, 5, 6])
    got = temporal_prompts(target, tod, steps, 5.0, bins=4)
    c = _names(4)
    np.testing.assert_allclose(got[:, c["missing"]], [2 / 6, 1.0, 1 / 6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(got[0, [c["profile_0"], c["profile_1"], c["profile_3"]]], [1.5, 3.0, 5.0])
    assert np.isnan(got[0, c["profile_2"]])  # both of its steps are missing for node 0
    assert np.isnan(got[1]).sum() == got.shape[1] - 1  # no readings: everything NaN but the missing share
    assert got[3, c["std"]] == 0.0 and np.isnan(got[3, c["acf_1step"]])  # constant: no correlation defined
    assert got[2, c["mean"]] == pytest.approx(np.mean([5.0, 6.0, 5.0, 7.0, 4.0]))


def test_a_node_without_readings_is_reported_by_check_prompts():
    rng = np.random.default_rng(0)
    target = rng.normal(50, 5, (48, 3))  # SYNTHETIC: two days of hourly readings
    target[:, 1] = np.nan  # node b has none
    tod = (np.arange(48) % 24) / 24
    got = temporal_prompts(target, tod, np.arange(48), 60.0, bins=4)
    assert np.isfinite(got[[0, 2]]).all() and np.isnan(got[1, :-1]).all() and got[1, -1] == 1.0
    with pytest.raises(DataError) as err:
        check_prompts(got, TEMPORAL_FEATURES(4), ["a", "b", "c"], "city x")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("city x:") and "node b" in message and "'profile_0'" in message
    assert "1 of 3 nodes" in message and "no readings in the visible data" in message


def test_check_prompts_names_the_first_bad_node_and_passes_finite_prompts():
    names = TEMPORAL_FEATURES(1)
    prompts = np.zeros((3, len(names)), dtype=np.float32)
    check_prompts(prompts, names, ["x", "y", "z"], "somewhere")  # finite: no error
    prompts[1, names.index("mean")] = np.nan
    prompts[2, names.index("std")] = np.inf
    with pytest.raises(DataError, match=r"^berlin\.h5: .*'mean' is NaN for node y \(no readings in the visible "
                                        r"data\); 2 of 3 nodes affected$"):
        check_prompts(prompts, names, ["x", "y", "z"], "berlin.h5")
    spatial = np.zeros((2, len(SPATIAL_FEATURES)))
    spatial[1, COL["east_km"]] = np.nan
    with pytest.raises(DataError, match="node s1 .*coordinates"):
        check_prompts(spatial, SPATIAL_FEATURES, ["s0", "s1"], "city")


# --------------------------------------------------------------------------- bundles: visible data only
@pytest.fixture
def synthetic():
    from graphtune.data.synthetic import synthetic_bundle

    return synthetic_bundle(num_nodes=6, num_steps=600, seed=1)  # SYNTHETIC signal and graph


def test_visible_steps_of_a_bundle_and_of_a_view(synthetic):
    lo, hi = synthetic.splits["train"]
    np.testing.assert_array_equal(visible_steps(synthetic), np.arange(lo, hi))
    starts = synthetic.window_starts("train")
    view = synthetic.restrict(starts[[0, 100]], prompt_steps=30)
    span = synthetic.t_in + synthetic.t_out
    expected = np.r_[lo : lo + span, lo + 100 : lo + 100 + span, hi - 30 : hi]
    np.testing.assert_array_equal(visible_steps(view), expected)


def test_node_prompts_of_a_view_see_only_its_visible_steps(synthetic):
    bins, k = 6, 4
    starts = synthetic.window_starts("train")[[0, 100]]
    view = synthetic.restrict(starts, prompt_steps=30)
    lo, _ = synthetic.splits["train"]
    steps = np.flatnonzero(synthetic.visible_train_steps(starts, 30).numpy()) + lo
    tod = synthetic.time_features[:, 0].numpy()
    spatial, temporal = node_prompts(view, k, bins=bins)
    expected = temporal_prompts(synthetic.target.numpy(), tod, steps, synthetic.interval_minutes, bins=bins)
    np.testing.assert_array_equal(temporal, expected)
    np.testing.assert_array_equal(spatial, spatial_prompts(synthetic.adj, synthetic.coords, k))
    assert np.isfinite(spatial).all() and temporal.shape == (6, len(TEMPORAL_FEATURES(bins)))

    # Change every reading the view must not show: validation, test and hidden training steps.
    hidden = np.ones(synthetic.num_steps, dtype=bool)
    hidden[steps] = False
    rng = np.random.default_rng(0)
    changed = synthetic.target.clone()
    changed[torch.from_numpy(hidden)] = torch.from_numpy(rng.normal(0, 100, (int(hidden.sum()), 6)).astype(np.float32))
    other = replace(synthetic, target=changed).restrict(starts, prompt_steps=30)
    np.testing.assert_array_equal(node_prompts(other, k, bins=bins)[1], temporal)
    # ... while a change inside the visible steps does show: the comparison above can fail
    seen = synthetic.target.clone()
    seen[steps[5]] += 50.0
    moved = replace(synthetic, target=seen).restrict(starts, prompt_steps=30)
    assert not np.array_equal(node_prompts(moved, k, bins=bins)[1], temporal)


def test_node_prompts_parts(synthetic):
    spatial, temporal = node_prompts(synthetic, 3, bins=4, parts="spatial")
    assert temporal is None and spatial.shape == (6, len(SPATIAL_FEATURES))
    spatial, temporal = node_prompts(synthetic, 3, bins=4, parts="temporal")
    assert spatial is None and temporal.shape == (6, len(TEMPORAL_FEATURES(4))) and temporal.dtype == np.float32
    full = temporal_prompts(synthetic.target.numpy(), synthetic.time_features[:, 0].numpy(),
                            np.arange(*synthetic.splits["train"]), synthetic.interval_minutes, bins=4)
    np.testing.assert_array_equal(temporal, full)  # the whole training split, and nothing after it
    with pytest.raises(ValueError, match="parts"):
        node_prompts(synthetic, 3, parts="all")


# --------------------------------------------------------------------------- scaler
def test_prompt_scaler_fit_transform_round_trip():
    source = np.array([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0], [5.0, 5.0, 9.0]])  # column 1 is constant
    scaler = PromptScaler.fit(source)
    np.testing.assert_allclose(scaler.mean, [3.0, 5.0, 5.0])
    np.testing.assert_allclose(scaler.std, [np.sqrt(8 / 3), 1.0, np.sqrt(26 / 3)])
    assert scaler.mean.dtype == np.float64
    z = scaler.transform(source)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(z[:, 1], 0.0)
    np.testing.assert_allclose(scaler.transform(np.array([[6.0, 7.0, 5.0]])),
                               [[3 / np.sqrt(8 / 3), 2.0, 0.0]], rtol=1e-6)
    back = PromptScaler.from_dict(json.loads(json.dumps(scaler.to_dict())))
    assert back == scaler
    np.testing.assert_array_equal(back.transform(source), z)
    with pytest.raises(ValueError):
        PromptScaler.fit(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError):
        scaler.transform(np.zeros((2, 2)))


# --------------------------------------------------------------------------- the real sample
def test_spatial_prompts_of_the_metr_la_week_sample(week_bundle):
    spatial, _ = node_prompts(week_bundle, 8, parts="spatial")
    assert spatial.shape == (207, len(SPATIAL_FEATURES)) and np.isfinite(spatial).all()
    check_prompts(spatial, SPATIAL_FEATURES, week_bundle.sensor_ids, "metr-la-week")
    assert spatial[:, COL["pagerank"]].mean() == pytest.approx(1.0, abs=1e-5)
    assert spatial[:, COL["distance_km"]].max() < 100.0  # a city, in km
    members = ego_members(week_bundle.adj, 8)
    assert members.shape == (207, 9) and (members[:, 0] == np.arange(207)).all()
