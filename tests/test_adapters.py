"""Low-rank adapters: the layer, its merge and naming, the layouts, the capacity rule and both strategies."""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import graphtune.adapters  # noqa: F401 - registers adapter and topology-adapter
from graphtune.adapters.capacity import (CapacitySettings, Diagnostics, adapter_parameters, choose_capacity,
                                         prompt_distance, saturate, wasserstein_1d)
from graphtune.adapters.layouts import LAYOUTS, Layer, core_layers, select
from graphtune.adapters.lowrank import LowRankAdapter, adaptable, add_adapters, adapters_of, merge
from graphtune.adapters.strategy import Adapter, TopologyAdapter
from graphtune.config import ExperimentConfig, TrainConfig, TransferConfig, load_params
from graphtune.data.synthetic import synthetic_bundle
from graphtune.engine import TrainStep, evaluate
from graphtune.errors import ConfigError
from graphtune.models import build_model
from graphtune.transfer.stages import Observer, run_experiment
from graphtune.transfer.strategies import SourceModel, StrategyContext

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small():
    return synthetic_bundle(num_nodes=6, num_steps=300, seed=0, name="small")


def _example(bundle, n=4):
    return bundle.batch(bundle.window_starts("val")[:n])[0]


def _perturb(model: nn.Module, seed: int = 1) -> None:
    """Give every adapter a non-zero update (B starts at zero, where every check would pass trivially)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapters_of(model).values():
            adapter.lora_B.copy_(0.05 * torch.randn(adapter.lora_B.shape, generator=g))


def _context(model: str, source_bundle, target, state: dict, fraction: float = 0.0) -> StrategyContext:
    source = SourceModel(model, {}, state, source_bundle.name, list(source_bundle.sensor_ids),
                         source_bundle.scaler.to_dict())
    return StrategyContext(sources=(source,), target=target, model=model, model_kwargs={}, seed=0, device="cpu",
                           fraction=fraction)


def _params(*sets, tmp_path=None):
    extra = [f"prepare.processed_dir={tmp_path}/processed"] if tmp_path is not None else []
    return load_params(None, ["experiment.datasets=[metr-la-r2,metr-la-r1]", *extra, *sets])


# ----------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("name", ["gwnet", "hypernet", "bigst", "dcrnn"])
def test_adapted_model_keeps_names_and_merges_to_the_same_outputs(small, name):
    torch.manual_seed(0)
    model = build_model(name, small).eval()
    x = _example(small)
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(x)
    layers = select(core_layers(model, name), ["temporal", "graph"])
    add_adapters(model, [layer.name for layer in layers], rank=2, alpha=4.0)
    with torch.no_grad():
        assert torch.equal(model(x), before)  # B = 0: the adapted model starts as the source model
    _perturb(model)
    with torch.no_grad():
        unmerged_nograd = model(x)
    unmerged_grad = model(x)  # the low-rank training path (A and B need gradients)
    plain = merge(model)
    with torch.no_grad():
        merged = plain(x)
    assert not torch.allclose(unmerged_nograd, before, atol=1e-4)  # the update takes effect (dcrnn reads .weight)
    torch.testing.assert_close(unmerged_grad.detach(), merged, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unmerged_nograd, merged, rtol=1e-4, atol=1e-5)
    assert list(model.state_dict()) == keys and list(plain.state_dict()) == keys
    assert not adapters_of(plain) and adapters_of(model)  # merge copies; the adapted model keeps its adapters
    fresh = build_model(name, small).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)  # the adapted model's state IS a plain model's
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), merged, rtol=1e-4, atol=1e-5)


def test_merged_model_costs_the_plain_models_flops_and_size(small):
    from graphtune.profiling import count_flops, count_parameters

    model = build_model("gwnet", small)
    x = _example(small)
    plain = (count_flops(model, x), count_parameters(model)["size_mb"])
    add_adapters(model, [layer.name for layer in select(core_layers(model, "gwnet"), ["temporal", "graph"])], 4, 8.0)
    assert (count_flops(model, x), count_parameters(model)["size_mb"]) == plain  # fresh: B = 0, nothing to merge
    _perturb(model)  # trained: the first forward merges once (r in out per layer), every later one costs nothing extra
    merging = count_flops(model, x)["flops"] - plain[0]["flops"]
    assert merging == sum(2 * 4 * 64 * 64 for _ in range(8)) + sum(2 * 4 * 224 * 32 for _ in range(7))
    assert (count_flops(model, x), count_parameters(model)["size_mb"]) == plain


def test_one_by_one_convolutions_are_adapted_and_merged_and_others_refused():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(6, 8, 1, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1, bias=False))
    conv1d = nn.Conv1d(4, 7, 1, dilation=2)
    x2, x1 = torch.randn(2, 6, 5, 5), torch.randn(2, 4, 9)
    keys = list(net.state_dict())
    add_adapters(net, ["0", "2"], rank=3, alpha=3.0)
    wrapped = LowRankAdapter(conv1d, rank=2, alpha=2.0)
    holder = nn.Sequential(wrapped)
    _perturb(net)
    _perturb(holder, seed=2)
    for module, x in ((net, x2), (holder, x1)):
        fast = module(x)  # low-rank path
        with torch.no_grad():
            torch.testing.assert_close(merge(module)(x), fast.detach(), rtol=1e-4, atol=1e-5)
    assert list(net.state_dict()) == keys and isinstance(merge(net)[0], nn.Conv2d)
    assert not adaptable(nn.Conv2d(3, 3, 3)) and not adaptable(nn.Conv2d(4, 4, 1, groups=2))
    with pytest.raises(ValueError, match="rank 9 is outside"):
        LowRankAdapter(nn.Linear(9, 8), rank=9, alpha=1.0)


def test_loading_a_state_makes_the_module_compute_it_and_restarts_the_update(small):
    torch.manual_seed(0)
    model = build_model("hypernet", small).eval()
    add_adapters(model, [layer.name for layer in core_layers(model, "hypernet")], 2, 4.0)
    x = _example(small)
    _perturb(model, seed=3)
    saved = {k: v.clone() for k, v in model.state_dict().items()}  # what fit keeps as its best state
    with torch.no_grad():
        best = model(x)
    _perturb(model, seed=4)  # training goes on and gets worse
    model.load_state_dict(saved)  # fit's restore at the end
    with torch.no_grad():
        torch.testing.assert_close(model(x), best, rtol=1e-5, atol=1e-6)
    assert all(torch.count_nonzero(a.lora_B) == 0 for a in adapters_of(model).values())
    with pytest.raises(RuntimeError, match="Unexpected key"):
        model.load_state_dict(saved | {"graph.mlp.lora_A": torch.zeros(1)})


# ----------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_layout_pattern_names_layers_of_its_model(small, name):
    model = build_model(name, small)
    layers = core_layers(model, name)  # ValueError if a pattern matches nothing
    assert layers and all("node_" not in layer.name for layer in layers)
    wrapped = build_model(name, small, seasonal=True)
    assert [layer.name for layer in core_layers(wrapped, name)] == ["core." + layer.name for layer in layers]


def test_a_model_without_a_layout_is_refused_in_one_line(small):
    with pytest.raises(ConfigError, match="experiment.model: .*node-gwn has no adapter layout"):
        core_layers(build_model("node-gwn", small), "node-gwn")


# ----------------------------------------------------------------------------- the adapter strategy
def _adapted(small_source, target, *sets, model="gwnet", fraction=0.0):
    strategy = Adapter()
    strategy.check(_params(f"experiment.model={model}", *sets), [])
    torch.manual_seed(1)
    source = build_model(model, small_source)
    ctx = _context(model, small_source, target, source.state_dict(), fraction)
    return strategy.adapt(ctx), source


def test_source_weights_stay_frozen_through_a_training_step(small):
    target = synthetic_bundle(num_nodes=9, num_steps=300, seed=1, name="target")
    adapted, source = _adapted(small, target)
    model, report = adapted.model, adapted.report
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = TrainStep.for_config(model, target, TrainConfig(), "cpu", lr=0.01)
    for x, y in itertools.islice(target.loader("train", batch_size=16, shuffle=True, seed=0), 2):
        step(x, y)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert {n for n in trainable if not re.search(r"lora_[AB]$", n)} == {"node_emb_source", "node_emb_target"}
    assert any(n.endswith("lora_B") for n in changed) and "node_emb_source" in changed
    params, adapted_layers = dict(model.named_parameters()), set(adapters_of(model))
    checked = 0
    for name, tensor in source.state_dict().items():  # every parameter loaded from the source is as it was
        layer, _, leaf = name.rpartition(".")
        key = f"{layer}.base_weight" if layer in adapted_layers and leaf == "weight" else name
        if key in params and "node_" not in name:
            assert torch.equal(params[key], tensor), name
            checked += 1
    assert checked > 30 and "node_emb_source" not in report.loaded


def test_trainable_share_is_the_adapters_and_the_node_tensors(small):
    target = synthetic_bundle(num_nodes=9, num_steps=300, seed=1, name="target")
    adapted, source = _adapted(small, target)
    plain = build_model("gwnet", target)
    # gwnet's defaults: 8 temporal convolutions Linear(64, 64), 7 graph convolutions Linear(224, 32); rank 4
    lowrank = 8 * 4 * (64 + 64) + 7 * 4 * (224 + 32)
    assert lowrank == 11264
    node = 2 * 9 * 10  # the adaptive-adjacency embeddings, re-created for the 9 target nodes
    total = sum(p.numel() for p in plain.parameters()) + lowrank
    r = adapted.report
    assert (r.trainable_params, r.total_params) == (lowrank + node, total)
    assert r.trainable_share == pytest.approx((lowrank + node) / total)
    assert r.summary(False)["trainable_share"] == pytest.approx(r.trainable_share)
    info = r.extra["adapter"]
    shared = sum(p.numel() for n, p in plain.named_parameters() if "node_" not in n)
    assert info["adapter_params"] == lowrank and info["adapter_share"] == pytest.approx(lowrank / shared)
    assert info["adapter_share"] < 0.1  # adapter.max_share's default
    assert sorted(n for n in r.created if "lora" not in n) == ["node_emb_source", "node_emb_target"]
    biased, _ = _adapted(small, target, "adapter.bias=adapted")
    assert biased.report.trainable_params == lowrank + node + 8 * 64 + 7 * 32  # plus the adapted layers' biases


@pytest.mark.parametrize("sets, message", [
    (["adapter.rank=0"], r"adapter.rank: expected an integer >= 1, got 0"),
    (["experiment.model=gwnet", "adapter.targets=[head]"],
     r"adapter.rank: rank 4 exceeds the width 3 of gwnet layer start_conv \(Linear 3 -> 32\)"),
    (["adapter.rank=16"],
     r"adapter.rank: rank 16 exceeds the width 15 of hypernet layer encoder.0 \(Linear 15 -> 32\)"),
    (["experiment.model=gwnet", "adapter.targets=[prompt]"], r"adapter.targets: gwnet has no prompt layers"),
    (["adapter.rank=8"], r"adapter.rank: rank 8 on temporal, graph gives hypernet 2424 adapter parameters, .* above "
                         r"adapter.max_share=0.1"),
    (["experiment.strategy=topology-adapter", "adapter.rank_min=5", "adapter.rank_max=4"],
     r"adapter.rank_min: 5 is above adapter.rank_max=4"),
    (["experiment.strategy=topology-adapter", "adapter.rank_max=16"],
     r"adapter.rank_max: rank 16 exceeds the width 15 of hypernet layer encoder.0"),
    (["experiment.strategy=topology-adapter", "adapter.topology_kinds=[head]"],
     r"adapter.topology_kinds: hypernet has none of head"),
    (["experiment.strategy=topology-adapter", "adapter.w_nodes=0", "adapter.w_difficulty=0", "adapter.w_error=0",
      "adapter.w_shift=0"], r"adapter.w_error: the weights .* are all 0"),
])
def test_bad_settings_fail_in_one_line_before_any_run(sets, message):
    from graphtune.transfer.experiment import plan_experiment

    with pytest.raises(ConfigError, match=message) as err:
        plan_experiment(load_params(None, ["experiment.strategy=adapter", *sets]))
    assert "\n" not in str(err.value)


def test_run_settings_are_the_strategy_s_own_and_hashed_only_when_used():
    from graphtune.transfer.experiment import Plan, _strategy_settings, logged_params

    params = _params("experiment.strategy=adapter")
    used = _strategy_settings(Plan(params=params, datasets=["metr-la-r2", "metr-la-r1"], device="cpu"))
    assert set(used["adapter"]) == {"rank", "targets", "alpha", "bias", "max_share"}
    params.experiment.strategy = "topology-adapter"
    plan = Plan(params=params, datasets=["metr-la-r2", "metr-la-r1"], device="cpu")
    assert "rank_max" in _strategy_settings(plan)["adapter"] and "rank" not in _strategy_settings(plan)["adapter"]
    params.experiment.strategy = "full"
    assert "adapter" not in logged_params(Plan(params=params, datasets=["a", "b"], device="cpu"), None)


# ----------------------------------------------------------------------------- the stage loop
class Keep(Observer):
    def stage_done(self, result, source, model=None, example=None):
        self.result, self.source, self.model = result, source, model


def test_the_stage_loop_saves_a_plain_state_and_evaluated_what_it_saved():
    a = synthetic_bundle(num_nodes=6, num_steps=400, seed=0, name="a")
    b = synthetic_bundle(num_nodes=9, num_steps=400, seed=1, name="b")
    from graphtune.transfer.strategies import get_strategy

    get_strategy("adapter").check(_params(), [])  # the run's settings: the defaults, on hypernet
    keep = Keep()
    run_experiment([a, b], ExperimentConfig(model="hypernet", strategy="adapter"),
                   TrainConfig(epochs=[1], lrs=[0.01], batch_size=64), TransferConfig(fractions=[0.5]), observer=keep)
    stage, source = keep.result, keep.source
    assert list(source.state) == list(build_model("hypernet", b).state_dict())  # the next stage's source and the
    #                                                                            checkpoint hold plain names
    # the model the stage logs (MLflow model) is the exported one: adapters merged, nothing extra to run
    assert not adapters_of(keep.model) and list(keep.model.state_dict()) == list(source.state)
    plain = merge(keep.model)  # a plain hypernet with the stage's node prompts (non-persistent: built per view)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_()
    plain.load_state_dict(source.state, strict=True)
    plain.eval()
    x = _example(b, 16)
    with torch.no_grad():  # ... and its saved state, in a plain model, forecasts exactly what was evaluated
        torch.testing.assert_close(plain(x), keep.model.eval()(x), rtol=1e-5, atol=1e-6)
    assert evaluate(plain, b, "test")["mae"] == pytest.approx(evaluate(keep.model, b, "test")["mae"], rel=1e-6)
    assert stage.transfer["trainable_share"] < 0.1 and stage.static_eff["params_trainable"] == \
        stage.transfer["adapter"]["adapter_params"]  # hypernet has no node tensor: only the adapters train


# ----------------------------------------------------------------------------- the capacity rule
LAYERS = (Layer("g1", ("graph",), 64, 32, 32, "Linear"), Layer("g2", ("graph",), 64, 32, 32, "Linear"),
          Layer("t1", ("temporal",), 32, 32, 32, "Linear"), Layer("h1", ("head",), 32, 12, 12, "Linear"))
SETTINGS = CapacitySettings(rank_min=1, rank_max=8, kinds=("graph", "temporal", "head"), max_share=0.1)


def _facts(**facts):
    base = {"num_nodes": 100, "difficulty": 200.0, "error_ratio": 1.0, "prompt_distance": 0.5}
    return Diagnostics(**(base | facts), layers=LAYERS, shared_params=40_000, bias_params=100)


@pytest.mark.parametrize("fact, values", [
    ("num_nodes", [0, 5, 30, 100, 300, 1000, 10**6]), ("difficulty", [0.0, 10.0, 100.0, 400.0, 1e4, 1e7]),
    ("error_ratio", [0.0, 0.3, 0.9, 1.0, 1.5, 4.0, float("inf")]), ("prompt_distance", [0.0, 0.1, 0.5, 2.0, 50.0])])
@pytest.mark.parametrize("max_share", [1.0, 0.1, 0.02])
def test_capacity_never_falls_as_a_fact_rises_and_stays_in_bounds(fact, values, max_share):
    settings = dataclasses.replace(SETTINGS, max_share=max_share)
    chosen = [choose_capacity(_facts(**{fact: v}), settings) for v in values]
    needs = [c.need for c in chosen]
    assert needs == sorted(needs) and all(0.0 <= n < 1.0 for n in needs) and len(set(needs)) > 1
    assert [c.adapter_params for c in chosen] == sorted(c.adapter_params for c in chosen)
    for c in chosen:
        assert settings.rank_min <= c.rank <= settings.rank_max
        assert c.kinds == settings.kinds[: len(c.kinds)]  # a prefix of the order
        assert c.adapter_params == adapter_parameters(select(list(LAYERS), c.kinds), c.rank, "none")
        assert c.share <= max_share
    if max_share == 1.0:  # without a binding cap, rank and kinds both rise with need
        assert [c.rank for c in chosen] == sorted(c.rank for c in chosen)
        assert [len(c.kinds) for c in chosen] == sorted(len(c.kinds) for c in chosen)


def test_capacity_extremes_cap_and_purity():
    low = choose_capacity(_facts(num_nodes=0, difficulty=0.0, error_ratio=0.0, prompt_distance=0.0),
                          dataclasses.replace(SETTINGS, max_share=1.0))
    assert (low.rank, low.kinds, low.need) == (1, ("graph",), 0.0)
    huge = _facts(num_nodes=10**9, difficulty=1e12, error_ratio=float("inf"), prompt_distance=1e9)
    high = choose_capacity(huge, dataclasses.replace(SETTINGS, max_share=1.0))
    assert (high.rank, high.kinds) == (8, ("graph", "temporal", "head")) and high.need > 0.99
    capped = choose_capacity(huge, SETTINGS)  # 8 x (96 + 96 + 64 + 44) = 2400 > 0.1 x 40000 ... fits; 0.05 does not
    tight = choose_capacity(huge, dataclasses.replace(SETTINGS, max_share=0.05))
    assert not capped.capped and tight.capped and tight.adapter_params <= 2000 < capped.adapter_params
    assert choose_capacity(huge, SETTINGS) == capped  # pure: same inputs, same decision
    only_error = dataclasses.replace(SETTINGS, weights={"nodes": 0.0, "difficulty": 0.0, "error": 1.0, "shift": 0.0})
    c = choose_capacity(dataclasses.replace(_facts(error_ratio=1.0), difficulty=None, prompt_distance=None), only_error)
    assert set(c.signals) == {"error"} and c.need == pytest.approx(0.5)
    with pytest.raises(ValueError, match="above the cap"):
        choose_capacity(huge, dataclasses.replace(SETTINGS, max_share=0.001))
    assert saturate(3.0, 3.0) == 0.5 and saturate(float("inf"), 1.0) == 1.0


def test_prompt_distance_is_wasserstein_in_source_standard_deviations():
    assert wasserstein_1d([0.0, 1.0], [1.0, 2.0]) == pytest.approx(1.0)
    assert wasserstein_1d([0.0], [0.0, 3.0]) == pytest.approx(1.5)
    rng = np.random.default_rng(0)
    source = rng.normal(size=(400, 3)) * [1.0, 2.0, 5.0]
    assert prompt_distance(source, source) == 0.0
    shifted = source + 0.5 * source.std(axis=0)  # every feature half a source std away
    assert prompt_distance(source, shifted) == pytest.approx(0.5)
    shifted[0, 1] = np.nan  # a node without a value is left out of that feature
    assert prompt_distance(source, shifted) == pytest.approx(0.5, abs=0.01)


# ----------------------------------------------------------------------------- the topology-adapter strategy
def test_topology_adapter_decides_once_per_city_from_what_zero_shot_sees(tmp_path):
    from graphtune.data.prepare import prepare_dataset

    params = _params("experiment.strategy=topology-adapter", tmp_path=tmp_path)
    source_bundle = prepare_dataset("metr-la-r2", params.prepare, root=REPO, use_processed=False)
    target = prepare_dataset("metr-la-r1", params.prepare, root=REPO, use_processed=False)
    strategy = TopologyAdapter()
    strategy.check(params, params.experiment.datasets)
    torch.manual_seed(0)
    state = build_model("hypernet", source_bundle).state_dict()
    zero_view = target.restrict(target.window_starts("train")[:0], fallback_scaler=source_bundle.scaler)
    first = strategy.adapt(_context("hypernet", source_bundle, zero_view, state))
    later = strategy.adapt(_context("hypernet", source_bundle, target.restrict(target.window_starts("train")[:300]),
                                    state, fraction=0.3))
    decision = first.report.extra["adapter"]["capacity"]
    assert later.report.extra["adapter"]["capacity"] == decision and decision["decided_at_fraction"] == 0.0
    facts = decision["facts"]
    assert facts["num_nodes"] == 36 and facts["prompt_distance"] > 0 and 0 < facts["error_ratio"] < 100
    assert first.report.extra["adapter"]["adapter_share"] <= 0.1
    assert first.report.trainable_params == decision["adapter_params"]  # hypernet: only the adapters train
    assert list(adapters_of(first.model)) == decision["layers"]
    same = strategy.adapt(_context("hypernet", target, zero_view, build_model("hypernet", target).state_dict()))
    assert same.report.extra["adapter"]["capacity"]["facts"]["prompt_distance"] == 0.0  # the city's own prompts


@pytest.mark.slow
def test_experiment_runs_end_to_end_and_reports_the_trainable_share(tmp_path):
    from graphtune.transfer.experiment import execute, plan_experiment

    params = load_params(REPO / "params.yaml", [
        "experiment.datasets=[metr-la-r2,metr-la-r1]", "experiment.strategy=topology-adapter", "train.epochs=[1,1]",
        "transfer.fractions=[0.3]", f"prepare.processed_dir={tmp_path}/processed"])
    result = execute(plan_experiment(params), echo=lambda _: None, tracking=False, output_dir=tmp_path / "out")[0]
    target = result.stages[-1]
    info = target.transfer["adapter"]
    assert target.zero_shot_test is not None and target.curve and 0 < target.transfer["trainable_share"] < 0.1
    assert target.static_eff["params_trainable"] == info["adapter_params"] == info["capacity"]["adapter_params"]
    assert (tmp_path / "out" / "results.json").is_file()
