"""The stage loop on tiny synthetic cities: scheduler stops, strategies, budgets, per-stage checks."""

from __future__ import annotations

import pytest
import torch

from graphtune.data.synthetic import synthetic_bundle
from graphtune.config import BudgetConfig, ExperimentConfig, TrainConfig, TransferConfig, stage_value
from graphtune.models import build_model
from graphtune.transfer.stages import Observer, prompt_steps, run_experiment

ONE = TrainConfig(epochs=[1], lrs=[0.003], batch_size=64)
GWNET_TINY = {"residual_channels": 4, "dilation_channels": 4, "skip_channels": 8, "end_channels": 8}


def run(cities, model="baseline", *, kwargs=None, strategy="full", train=ONE, budgets=BudgetConfig(), observer=None,
        **transfer):
    """run_experiment with the params sections built from keyword arguments (transfer: TransferConfig's)."""
    return run_experiment(list(cities), ExperimentConfig(model=model, model_kwargs=kwargs or {}, strategy=strategy),
                          train, TransferConfig(**transfer), budgets=budgets, observer=observer)


@pytest.fixture(scope="module")
def cities():
    return synthetic_bundle(num_nodes=6, num_steps=500, seed=0, name="a"), \
        synthetic_bundle(num_nodes=9, num_steps=500, seed=1, name="b")


class Recorder(Observer):
    def __init__(self):
        self.events = []

    def stage(self, index, kind, city):
        self.events.append(("stage", index, kind, city))
        return super().stage(index, kind, city)

    def budget(self, index, city, fraction):
        self.events.append(("budget", index, fraction))
        return super().budget(index, city, fraction)


def test_scheduler_stops_the_curve_and_records_saved_budget(cities):
    rec = Recorder()
    result = run(cities, fractions=[0.1, 0.3, 1.0], min_gain_rate=1e9, min_rel_improve=1e9, patience=0, observer=rec)
    transfer = result.stages[1]
    assert [p["fraction"] for p in transfer.curve] == [0.1]  # the first step is flat -> stop
    assert transfer.stopped_reason == "budget_scheduler"
    assert transfer.scheduler["stopped_at"] == 0.1
    assert transfer.scheduler["saved_budget"] == pytest.approx(1.3)
    assert rec.events == [("stage", 0, "pretrain", "a"), ("stage", 1, "transfer", "b"), ("budget", 1, 0.1)]


def test_whole_curve_runs_when_gains_never_flatten(cities):
    result = run(cities, fractions=[0.2, 0.6], min_gain_rate=-1e9, min_rel_improve=-1e9)
    t = result.stages[1]
    assert [p["fraction"] for p in t.curve] == [0.2, 0.6]
    assert [p["windows"] for p in t.curve] == [round(0.2 * cities[1].num_windows("train")),
                                               round(0.6 * cities[1].num_windows("train"))]
    assert t.scheduler["saved_budget"] == 0.0 and t.zero_rmse is not None
    assert t.test_rmse == t.curve[-1]["test_rmse"]


def test_strategies_change_what_trains(cities):
    curve = {"fractions": [0.5], "min_gain_rate": -1e9, "min_rel_improve": -1e9}
    full = run(cities, "gwnet", kwargs=GWNET_TINY, strategy="full", **curve)
    frozen = run(cities, "gwnet", kwargs=GWNET_TINY, strategy="freeze-transferred", **curve)
    scratch = run(cities, "gwnet", kwargs=GWNET_TINY, strategy="scratch", **curve)
    f, z = full.stages[1], frozen.stages[1]
    assert f.static_eff["params_trainable"] == f.static_eff["params_total"]
    node_params = 2 * 9 * 10  # the two adaptive-adjacency embeddings (N x node_emb_dim) re-created for city b
    assert z.static_eff["params_trainable"] == node_params
    assert f.zero_rmse == z.zero_rmse  # same transferred start
    # frozen weights need no weight gradients: the measured training step costs less
    assert z.flops["train_flops"] < f.flops["train_flops"] and z.flops["flops"] == f.flops["flops"]
    # scratch loads nothing: no pretraining stage, no zero-shot point, nothing transferred
    assert [st.kind for st in scratch.stages] == ["transfer"] and scratch.stages[0].stage == 1
    s = scratch.stages[0]
    assert s.transfer["transferred"] is False and f.transfer["transferred"] is True
    assert s.zero_rmse is None and s.zero_shot_data is None and s.score["zero_skill"] == 0.0


def test_time_budget_is_enforced(cities):
    result = run(cities, train=TrainConfig(epochs=[50], lrs=[0.003]), fractions=[0.5, 1.0],
                 budgets=BudgetConfig(time_sec=1e-6, enforce=True))
    assert result.stages[0].stopped_reason == "time_budget"
    assert len(result.stages[0].history) == 1  # stopped after the first step's epoch
    assert result.stages[1].stopped_reason == "time_budget"


def test_transferred_seq2seq_model_finetunes_free_running(cities, monkeypatch):
    import graphtune.transfer.stages as stages

    seen = []
    real_fit = stages.fit
    monkeypatch.setattr(stages, "fit", lambda model, *a, **k: seen.append(getattr(model, "batches_seen", None))
                        or real_fit(model, *a, **k))
    run(cities, "dcrnn", kwargs={"hidden": 4}, fractions=[0.1])
    assert seen[0] == 0 and seen[1] >= 10**9  # pretraining starts the curriculum; fine-tuning is past it


def test_per_stage_lists():
    assert [stage_value([5], k, 3, "train.epochs") for k in range(3)] == [5, 5, 5]
    assert [stage_value([1, 2], k, 2, "train.epochs") for k in range(2)] == [1, 2]
    # another length: the first value pretrains, the last serves every transfer stage
    assert [stage_value([6, 3], k, 4, "train.epochs") for k in range(4)] == [6, 3, 3, 3]
    assert [stage_value([6, 3, 2, 1], k, 4, "train.epochs") for k in range(4)] == [6, 3, 2, 1]
    assert [stage_value([6, 4, 3], k, 2, "train.epochs") for k in range(2)] == [6, 3]
    assert stage_value([6, 3], 0, 1, "train.epochs") == 6  # a pretrain-only run with params.yaml's two values


def test_deterministic_on_cpu(cities):
    a = run(cities, fractions=[0.3])
    b = run(cities, fractions=[0.3])
    assert [s.test for s in a.stages] == [s.test for s in b.stages]
    assert torch.equal(torch.tensor(a.stages[1].curve[0]["test_rmse"]), torch.tensor(b.stages[1].curve[0]["test_rmse"]))


# ----------------------------------------------------------------------------- data budgets
class _Capture(Observer):
    """Keeps each stage's trained state and every budget point."""

    def __init__(self):
        self.states, self.points, self.sources = {}, {}, {}

    def budget_done(self, index, point):
        self.points[point["fraction"]] = point

    def stage_done(self, result, source, model=None, example=None):
        self.states[result.stage] = source.state
        self.sources[result.stage] = source


def _tampered(bundle, hidden: torch.Tensor):
    """`bundle` with every training reading at the steps `hidden` (T_train,) changed, re-prepared as prepare
    would (a scaler refitted on the whole training split): what a point may not see now differs."""
    from dataclasses import replace

    from graphtune.data.bundle import Scaler

    lo, hi = bundle.splits["train"]
    target = bundle.target.clone()
    train = target[lo:hi]
    train[hidden] = train[hidden] * 3.0 + 20.0  # another level, spread and daily profile
    scaler = Scaler.fit(target[lo:hi].numpy())
    values = torch.nan_to_num(scaler.transform(target), nan=0.0).float()
    return replace(bundle, target=target, values=values, scaler=scaler)


@pytest.mark.parametrize("model", ["hypernet", "ha", "baseline"])
def test_each_point_sees_only_its_budget(cities, model):
    from graphtune.transfer.budget import sample_windows

    source, target = cities
    starts = sample_windows(target.window_starts("train"), 0.2, "subset", 0)
    hidden = ~target.visible_train_steps(starts)
    assert 0 < int(hidden.sum()) < hidden.numel()
    runs = []
    for city in (target, _tampered(target, hidden)):
        capture = _Capture()
        result = run([source, city], model, fractions=[0.2], min_gain_rate=-1e9, min_rel_improve=-1e9, observer=capture)
        runs.append((result.stages[1], capture))
    (a, cap_a), (b, cap_b) = runs
    assert a.zero_shot_test == b.zero_shot_test and a.zero_shot_val == b.zero_shot_val
    assert cap_a.points[0.2]["test"] == cap_b.points[0.2]["test"] and a.val == b.val
    assert cap_a.states[1].keys() == cap_b.states[1].keys()
    assert all(torch.equal(cap_a.states[1][k], cap_b.states[1][k]) for k in cap_a.states[1])
    # what the point used is recorded: its windows, the steps they cover, their observed readings
    data = cap_a.points[0.2]["data"]
    visible = ~hidden
    lo, hi = target.splits["train"]
    assert data["windows"] == starts.numel() and data["steps"] == int(visible.sum())
    assert data["readings"] == int((~torch.isnan(target.target[lo:hi][visible])).sum())
    assert data["days"] == pytest.approx(data["steps"] * target.interval_minutes / 1440)
    assert a.zero_shot_data["windows"] == 0 and a.zero_shot_data["readings"] == 0
    # the city's references read the whole training split (they are the yardstick, never a model's input)
    assert a.reference["ha"] != b.reference["ha"]


def test_the_prompt_window_is_what_zero_shot_may_read(cities):
    source, target = cities
    lo, hi = target.splits["train"]
    steps = prompt_steps(target, 0.5)  # half a day at the end of the training split
    assert steps == round(0.5 * 1440 / target.interval_minutes)
    window = torch.zeros(hi - lo, dtype=torch.bool)
    window[hi - lo - steps:] = True

    def zero_shot(city):
        return run([source, city], "hypernet", fractions=[0.2], prompt_days=0.5).stages[1]

    base = zero_shot(target)
    assert base.zero_shot_data["steps"] == steps and base.zero_shot_data["readings"] > 0
    assert zero_shot(_tampered(target, ~window)).zero_shot_test == base.zero_shot_test  # outside: unseen
    assert zero_shot(_tampered(target, window)).zero_shot_test != base.zero_shot_test  # inside: read
    # scratch declares no prompt window: it reads nothing at zero-shot, and has no zero-shot point
    scratch = run([source, target], "hypernet", strategy="scratch", fractions=[0.2], prompt_days=0.5)
    assert scratch.stages[0].curve[0]["data"]["prompt_steps"] == 0


def test_zero_shot_uses_the_source_scaler_and_points_refit_their_own(cities):
    from graphtune.transfer.budget import sample_windows

    source, target = cities
    capture = _Capture()
    result = run([source, target], fractions=[0.2], observer=capture)
    assert result.stages[1].zero_shot_data["scaler"] == "source"
    # ... and the zero-shot numbers are the pretrained model's on the target scaled by the source's statistics
    from graphtune.data.bundle import Scaler
    from graphtune.engine import evaluate
    from graphtune.transfer.strategies import StrategyContext, get_strategy

    def zero_shot_mae(scaler):
        view = target.restrict(target.window_starts("train")[:0], fallback_scaler=scaler)
        ctx = StrategyContext(sources=(capture.sources[0],), target=view, model="baseline", model_kwargs={}, seed=0,
                              device="cpu", fraction=0.0)
        return evaluate(get_strategy("full").adapt(ctx).model, view, "val")["mae"]

    assert result.stages[1].zero_shot_val["mae"] == pytest.approx(zero_shot_mae(Scaler(**capture.sources[0].scaler)))
    assert result.stages[1].zero_shot_val["mae"] != pytest.approx(zero_shot_mae(target.scaler))
    assert capture.points[0.2]["data"]["scaler"] == "visible readings"
    view = target.restrict(sample_windows(target.window_starts("train"), 0.2, "subset", 0))
    lo, hi = target.splits["train"]
    seen = view.target[lo:hi]
    assert view.scaler.mean == pytest.approx(float(seen[~torch.isnan(seen)].double().mean()))
    assert view.scaler != target.scaler


def test_a_strategy_is_one_class_that_registers_itself(cities):
    """A new strategy is one class registered by name; the stage loop (and planning) look it up unchanged."""
    from graphtune.transfer.state import load_partial_state
    from graphtune.transfer.strategies import STRATEGIES, Adapted, Strategy, register_strategy, report_for

    seen = []

    @register_strategy("bias-only-test")
    class BiasOnly(Strategy):
        """BitFit: load the source, then fine-tune only the biases."""

        def adapt(self, ctx):
            seen.append((ctx.fraction, ctx.target.data_used["windows"], [s.city for s in ctx.sources]))
            model = ctx.build()
            transfer = load_partial_state(model, ctx.source.state, same_nodes=ctx.same_nodes)
            for name, p in model.named_parameters():
                p.requires_grad_(name.endswith("bias"))
            return Adapted(model, report_for(model, transfer))

    try:
        result = run(cities, strategy="bias-only-test", fractions=[0.2], min_gain_rate=-1e9, min_rel_improve=-1e9)
    finally:
        STRATEGIES.unregister("bias-only-test")
    source, target = cities
    windows = round(0.2 * target.num_windows("train"))
    assert seen == [(0.0, 0, ["a"]), (0.2, windows, ["a"])]  # the zero-shot point, then the budget point
    stage = result.stages[1]
    model = build_model("baseline", target)
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    assert stage.static_eff["params_trainable"] == biases < stage.static_eff["params_total"]
    assert stage.transfer["transferred"] and stage.transfer["trainable_share"] == pytest.approx(
        biases / stage.static_eff["params_total"])
    assert "bias-only-test" not in STRATEGIES


def test_a_stage_is_profiled_as_built_whatever_ran_before_in_the_process(cities):
    """Costs come from the model each stage built: two runs in one process whose models share every parameter
    shape but differ in an option (BigST's random features are a buffer) get their own FLOPs."""
    from graphtune.profiling import profile_model

    per_window = {}  # forward FLOPs of one window (a profile's batch is smaller when a split has fewer windows)
    for dim in (8, 64):
        result = run(cities, "bigst", kwargs={"random_feature_dim": dim}, fractions=[0.2])
        per_window[dim] = result.stages[1].cost["infer_flops_per_window"]
        prof = profile_model(build_model("bigst", cities[1], random_feature_dim=dim), cities[1],
                             batch_size=ONE.batch_size, thop=False)
        assert per_window[dim] == pytest.approx(prof["flops"] / prof["batch_size"])
    assert per_window[8] < per_window[64]
