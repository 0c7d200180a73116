"""Every registered model on two node counts (the timm pattern), plus exact checks of the graph helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from graphtune.checks import Check, integer
from graphtune.data.synthetic import synthetic_bundle
from graphtune.errors import ConfigError
from graphtune.models import build_model, list_models, model_defaults
from graphtune.transfer.state import load_partial_state
from graphtune.models.registry import check_model_kwargs, model_options, register_model
from graphtune.models.layers import daily_profile, graph_statistics, propagate, random_walk_supports
from graphtune.transfer.state import SKIP_NODE, is_node_specific

BATCH = 4


@pytest.fixture(scope="module")
def bundles():
    """SYNTHETIC cities of 7 and 11 nodes (different graphs, coordinates and series)."""
    return {n: synthetic_bundle(num_nodes=n, num_steps=600, seed=n) for n in (7, 11)}


def batch(bundle):
    """x (B, T_in, N, 3) and the scaled target (B, T_out, N) with NaN = missing."""
    x, y = bundle.batch(bundle.window_starts("train")[:BATCH])
    return x, (y - bundle.scaler.mean) / bundle.scaler.std


def learnable(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("num_nodes", [7, 11])
def test_forward_shape_and_gradients(name, num_nodes, bundles):
    bundle = bundles[num_nodes]
    torch.manual_seed(0)
    model = build_model(name, bundle)
    model.train()
    x, target = batch(bundle)
    out = model(x, torch.nan_to_num(target))  # teacher-forcing models get missing targets as the mean (0)
    assert out.shape == (BATCH, bundle.t_out, num_nodes)
    assert torch.isfinite(out).all()

    params = learnable(model)
    if not params:  # the historical average and persistence: fitted or fixed, not trained
        assert name in ("ha", "persistence") and not out.requires_grad
        return
    mask = ~torch.isnan(target)
    loss = (out - torch.nan_to_num(target)).abs()[mask].mean()
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reaches {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient on {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient on {pname}"


@pytest.mark.parametrize("name", list_models())
def test_transfer_between_node_counts(name, bundles):
    torch.manual_seed(0)
    source = build_model(name, bundles[7])
    torch.manual_seed(1)
    target = build_model(name, bundles[11])
    state = source.state_dict()
    report = load_partial_state(target, state)

    # The naming contract: the only tensors that fail to transfer are the node-specific ones.
    assert all(reason == SKIP_NODE for reason in report.skipped.values()), report.skipped
    assert set(report.skipped) == {k for k in target.state_dict() if is_node_specific(k)}
    for key in report.copied:
        assert torch.equal(target.state_dict()[key], state[key])
    if name == "node-gwn":  # one model per node: every tensor is node-specific, it transfers only through gpd
        assert report.share == 0.0 and report.copied == []
    elif learnable(target):
        assert report.share >= 0.9, f"{name}: only {report.share:.1%} of parameters transfer"
    target.eval()
    x, _ = batch(bundles[11])
    with torch.no_grad():
        assert torch.isfinite(target(x)).all()


@pytest.mark.parametrize("name", list_models())
def test_same_city_state_roundtrip_reproduces_outputs(name, bundles):
    """Loading a state into a differently initialised model of the same city reproduces its forecasts."""
    bundle = bundles[7]
    torch.manual_seed(0)
    trained = build_model(name, bundle).eval()
    torch.manual_seed(1)
    fresh = build_model(name, bundle).eval()
    report = load_partial_state(fresh, trained.state_dict(), same_nodes=True)
    assert report.skipped == {}
    assert report.share == 1.0
    x, _ = batch(bundle)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)


def test_hypernet_and_baselines_transfer_every_parameter(bundles):
    for name in ("hypernet", "baseline"):
        model = build_model(name, bundles[11])
        report = load_partial_state(model, build_model(name, bundles[7]).state_dict())
        assert report.share == 1.0 and report.skipped == {}


def test_bigst_forward_flops_grow_linearly_with_nodes():
    """Exact FLOP counts: doubling N at most ~doubles BigST's cost, while GWNet's dense N x N grows ~4x."""

    def flops(name, num_nodes):
        bundle = synthetic_bundle(num_nodes=num_nodes, num_steps=160, seed=0, t_in=12, t_out=12)
        model = build_model(name, bundle).eval()
        x, _ = bundle.batch(bundle.window_starts("train")[:1])
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        return counter.get_total_flops()

    bigst_ratio = flops("bigst", 2000) / flops("bigst", 1000)
    assert bigst_ratio < 2.2
    assert flops("gwnet", 400) / flops("gwnet", 200) > 3.0  # the check can tell quadratic from linear


@pytest.mark.parametrize("name", list_models())
def test_every_option_declares_a_check_that_its_default_passes(name):
    options, defaults = model_options(name), model_defaults(name)
    assert set(options) == set(defaults)
    for key, check in options.items():
        assert isinstance(check, Check)
        assert check(defaults[key], key) == defaults[key]
    assert check_model_kwargs(name, {}) == defaults


@pytest.mark.parametrize("name, kwargs, message", [
    ("hypernet", {"hidden": -4}, "experiment.model_kwargs.hidden: expected an integer >= 1, got -4"),
    ("baseline", {"dropout": -0.1}, "experiment.model_kwargs.dropout: expected a finite number in [0, 1), got -0.1"),
    ("hypernet", {"dropout": 1.0}, "experiment.model_kwargs.dropout: expected a finite number in [0, 1), got 1.0"),
    ("gwnet", {"blocks": 2.5}, "experiment.model_kwargs.blocks: expected an integer >= 1, got 2.5"),
    ("gwnet", {"adaptive": 1}, "experiment.model_kwargs.adaptive: expected true or false, got 1"),
    ("bigst", {"tau": 0}, "experiment.model_kwargs.tau: expected a finite number > 0, got 0"),
    ("dcrnn", {"hidden": True}, "experiment.model_kwargs.hidden: expected an integer >= 1, got True"),
    ("ha", {"slots_per_day": 0}, "experiment.model_kwargs.slots_per_day: expected null or an integer >= 1, got 0"),
    ("hypernet", {"hiden": 8}, "experiment.model_kwargs: model 'hypernet' has no option(s) hiden; "
                               "its options are: dropout, hidden, profile_bins, prompt_hidden, seasonal"),
    ("persistence", {"hidden": 8}, "experiment.model_kwargs: model 'persistence' has no option(s) hidden; "
                                   "its options are: none"),
])
def test_out_of_range_model_kwargs_fail_before_building(name, kwargs, message, bundles):
    with pytest.raises(ConfigError) as err:
        check_model_kwargs(name, kwargs)
    assert str(err.value) == message
    with pytest.raises(ConfigError) as err:
        build_model(name, bundles[7], **kwargs)
    assert str(err.value) == message


def test_model_kwargs_are_named_after_the_option_they_come_from():
    with pytest.raises(ConfigError, match=r"^source\.model_kwargs\.hidden: expected an integer >= 1, got 0$"):
        check_model_kwargs("hypernet", {"hidden": 0}, option="source.model_kwargs")
    with pytest.raises(ConfigError, match=r"^experiment\.model_kwargs: expected a mapping, got \[\('hidden', 8\)\]$"):
        check_model_kwargs("hypernet", [("hidden", 8)])
    with pytest.raises(ConfigError, match=r"^experiment\.model: unknown model 'transformerxl'; known models: "):
        check_model_kwargs("transformerxl", {})
    assert check_model_kwargs("hypernet", {"hidden": 8}) == {**model_defaults("hypernet"), "hidden": 8}


def _sized(bundle, *, hidden=4):
    return None


def _unsized(bundle, *, hidden):
    return None


def _loose(bundle, **kwargs):
    return None


@pytest.mark.parametrize("builder, options, message", [
    (_sized, {}, "option 'hidden' declares no check in register_model(options=...)"),
    (_sized, {"hidden": integer(min=8)}, "the default fails its own check: hidden: expected an integer >= 8, got 4"),
    (_sized, {"hidden": integer(), "depth": integer()}, "checks for option(s) the builder does not take: depth"),
    (_unsized, {"hidden": integer()}, "option 'hidden' has no default"),
    (_loose, {}, "*kwargs cannot be checked; name every option"),
])
def test_registration_rejects_undeclared_or_invalid_options(builder, options, message):
    with pytest.raises(ValueError) as err:
        register_model("test-invalid", options=options)(builder)
    assert str(err.value) == f"model 'test-invalid' ({builder.__module__}.{builder.__name__}): {message}"
    assert "test-invalid" not in list_models()  # a failed registration registers nothing


def test_random_walk_supports_exact():
    adj = np.array([[0, 2, 0], [1, 0, 1], [0, 0, 0]], dtype=np.float32)  # node 2 has no out-edges
    forward, backward = random_walk_supports(adj)
    torch.testing.assert_close(forward, torch.tensor([[0, 1, 0], [0.5, 0, 0.5], [0, 0, 0]]))
    torch.testing.assert_close(backward, torch.tensor([[0, 1.0, 0], [1, 0, 0], [0, 1, 0]]))  # D_in^-1 A^T


def test_propagate_sends_features_along_out_edges():
    support = torch.tensor([[0, 1.0, 0], [0.5, 0, 0.5], [0, 0, 0]])
    x = torch.tensor([[1.0], [10.0], [100.0]])  # (N, F)
    # node 1 receives all of node 0 (1.0); node 0 and node 2 each receive half of node 1 (5.0)
    torch.testing.assert_close(propagate(x, support), torch.tensor([[5.0], [1.0], [5.0]]))
    torch.testing.assert_close(propagate(x.t(), support, node_dim=-1), torch.tensor([[5.0, 1.0, 5.0]]))


def test_graph_statistics_ignore_self_loops():
    adj = np.array([[1, 2, 0], [1, 1, 1], [0, 0, 1]], dtype=np.float32)
    stats = torch.expm1(graph_statistics(adj))
    expected = torch.tensor([[1, 1, 2, 1], [2, 1, 2, 2], [0, 1, 0, 1]], dtype=torch.float32)  # out/in deg, out/in w
    torch.testing.assert_close(stats, expected)


def test_historical_average_matches_a_direct_computation(bundles):
    bundle = bundles[7]
    model = build_model("ha", bundle)
    lo, hi = bundle.splits["train"]
    raw = bundle.target[lo:hi].double().numpy()
    slots = np.rint(bundle.time_features[lo:hi, 0].double().numpy() * bundle.steps_per_day).astype(int)
    starts = bundle.window_starts("val")[:3]
    x, _ = bundle.batch(starts)
    out = model(x)
    for b, start in enumerate(starts.tolist()):
        for h in range(bundle.t_out):
            step = start + bundle.t_in + h
            slot = int(round(float(bundle.time_features[step, 0]) * bundle.steps_per_day)) % bundle.steps_per_day
            expected = (raw[slots == slot].mean(0) - bundle.scaler.mean) / bundle.scaler.std  # (N,)
            np.testing.assert_allclose(out[b, h].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_historical_average_falls_back_to_the_node_mean_for_unseen_slots():
    bundle = synthetic_bundle(num_nodes=3, num_steps=200, seed=3)  # train = steps 0..139: slots 140.. never seen
    profile, mean, std = daily_profile(bundle, bundle.steps_per_day)
    assert torch.isfinite(profile[:140]).all() and torch.isnan(profile[140:]).all()
    lo, hi = bundle.splits["train"]
    scaled = (bundle.target[lo:hi].double() - bundle.scaler.mean) / bundle.scaler.std
    torch.testing.assert_close(mean, scaled.mean(0).float())
    torch.testing.assert_close(std, scaled.std(0, unbiased=False).float())

    x, _ = bundle.batch(bundle.window_starts("test")[:2])  # targets at steps 172.., slots 172..
    out = build_model("ha", bundle)(x)
    torch.testing.assert_close(out, mean.expand_as(out))


def test_persistence_repeats_the_last_observed_value(bundles):
    """Scaled 0.0 marks a missing input; a node with no observed step is forecast at 0.0 (the train mean)."""
    x = torch.zeros(2, 12, 3, 3)
    x[0, :, 0, 0] = torch.arange(1.0, 13.0)  # observed at every step: the last one, 12
    x[0, :5, 1, 0] = torch.arange(1.0, 6.0)  # observed up to step 4, missing after: 5
    x[1, 3, 2, 0] = -0.7  # observed once, negative (below the train mean)
    x[..., 1] = 0.5  # time features must not leak into the forecast
    x[..., 2] = 3.0
    out = build_model("persistence", bundles[7])(x)  # node count comes from x, not from the bundle
    expected = torch.tensor([[12.0, 5.0, 0.0], [0.0, 0.0, -0.7]])[:, None, :].expand(2, 12, 3)
    torch.testing.assert_close(out, expected)


def test_hypernet_prompts_without_coordinates(bundles):
    from graphtune.models.hypernet import node_prompts

    city = bundles[7]
    bare = synthetic_bundle(num_nodes=7, num_steps=600, seed=7, adj=city.adj, coords=None)
    prompts = node_prompts(bare, profile_bins=6)
    assert prompts.shape == (7, 2 + 4 + 2 + 6)
    assert torch.equal(prompts[:, :2], torch.zeros(7, 2))  # no coordinates: every node at the centre
    torch.testing.assert_close(prompts[:, 2:6], graph_statistics(city.adj))
    torch.testing.assert_close(prompts[:, 2:], node_prompts(city, profile_bins=6)[:, 2:])
    x, _ = batch(bare)
    assert torch.isfinite(build_model("hypernet", bare)(x)).all()
