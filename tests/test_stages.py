"""The stage loop on tiny synthetic cities: scheduler stops, strategies, budgets, per-stage checks."""

from __future__ import annotations

import pytest
import torch

from graphtune.data.synthetic import synthetic_bundle
from graphtune.errors import ConfigError
from graphtune.transfer.stages import CurveSettings, Observer, TrainSettings, per_stage, prompt_steps, run_experiment

ONE = TrainSettings(epochs=1, lr=0.003, batch_size=64)


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
    curve = CurveSettings(fractions=(0.1, 0.3, 1.0), min_gain_rate=1e9, min_rel_improve=1e9, patience=0)
    rec = Recorder()
    result = run_experiment(list(cities), model="baseline", train=[ONE, ONE], curve=curve, observer=rec)
    transfer = result.stages[1]
    assert [p["fraction"] for p in transfer.curve] == [0.1]  # the first step is flat -> stop
    assert transfer.stopped_reason == "budget_scheduler"
    assert transfer.scheduler["stopped_at"] == 0.1
    assert transfer.scheduler["saved_budget"] == pytest.approx(1.3)
    assert rec.events == [("stage", 0, "pretrain", "a"), ("stage", 1, "transfer", "b"), ("budget", 1, 0.1)]


def test_whole_curve_runs_when_gains_never_flatten(cities):
    curve = CurveSettings(fractions=(0.2, 0.6), min_gain_rate=-1e9, min_rel_improve=-1e9)
    result = run_experiment(list(cities), model="baseline", train=[ONE, ONE], curve=curve)
    t = result.stages[1]
    assert [p["fraction"] for p in t.curve] == [0.2, 0.6]
    assert [p["windows"] for p in t.curve] == [round(0.2 * cities[1].num_windows("train")),
                                               round(0.6 * cities[1].num_windows("train"))]
    assert t.scheduler["saved_budget"] == 0.0 and t.zero_rmse is not None
    assert t.test_rmse == t.curve[-1]["test_rmse"]


def test_strategies_change_what_trains(cities):
    curve = CurveSettings(fractions=(0.5,), min_gain_rate=-1e9, min_rel_improve=-1e9)
    full = run_experiment(list(cities), model="gwnet", model_kwargs={"residual_channels": 4, "dilation_channels": 4,
                                                                     "skip_channels": 8, "end_channels": 8},
                          train=[ONE, ONE], curve=curve, strategy="full")
    frozen = run_experiment(list(cities), model="gwnet", model_kwargs={"residual_channels": 4,
                                                                       "dilation_channels": 4, "skip_channels": 8,
                                                                       "end_channels": 8},
                            train=[ONE, ONE], curve=curve, strategy="freeze-transferred")
    scratch = run_experiment(list(cities), model="gwnet", model_kwargs={"residual_channels": 4,
                                                                        "dilation_channels": 4, "skip_channels": 8,
                                                                        "end_channels": 8},
                             train=[ONE, ONE], curve=curve, strategy="scratch")
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
    result = run_experiment(list(cities), model="baseline", train=[TrainSettings(epochs=50, lr=0.003)] * 2,
                            curve=CurveSettings(fractions=(0.5, 1.0)), enforce_time_s=1e-6)
    assert result.stages[0].stopped_reason == "time_budget"
    assert len(result.stages[0].history) == 1  # stopped after the first step's epoch
    assert result.stages[1].stopped_reason == "time_budget"


def test_transferred_seq2seq_model_finetunes_free_running(cities, monkeypatch):
    import graphtune.transfer.stages as stages

    seen = []
    real_fit = stages.fit
    monkeypatch.setattr(stages, "fit", lambda model, *a, **k: seen.append(getattr(model, "batches_seen", None))
                        or real_fit(model, *a, **k))
    run_experiment(list(cities), model="dcrnn", model_kwargs={"hidden": 4}, train=[ONE, ONE],
                   curve=CurveSettings(fractions=(0.1,)))
    assert seen[0] == 0 and seen[1] >= 10**9  # pretraining starts the curriculum; fine-tuning is past it


def test_per_stage_lists():
    assert per_stage([5], 3, "train.epochs") == [5, 5, 5]
    assert per_stage([1, 2], 2, "train.epochs") == [1, 2]
    with pytest.raises(ConfigError, match="train.epochs: expected one value or one per stage"):
        per_stage([1, 2, 3], 2, "train.epochs")


def test_deterministic_on_cpu(cities):
    a = run_experiment(list(cities), model="baseline", train=[ONE, ONE], curve=CurveSettings(fractions=(0.3,)))
    b = run_experiment(list(cities), model="baseline", train=[ONE, ONE], curve=CurveSettings(fractions=(0.3,)))
    assert [s.test for s in a.stages] == [s.test for s in b.stages]
    assert torch.equal(torch.tensor(a.stages[1].curve[0]["test_rmse"]), torch.tensor(b.stages[1].curve[0]["test_rmse"]))


# ----------------------------------------------------------------------------- data budgets
class _Capture(Observer):
    """Keeps each stage's trained state and every budget point."""

    def __init__(self):
        self.states, self.points = {}, {}

    def budget_done(self, index, point):
        self.points[point["fraction"]] = point

    def stage_done(self, result, source):
        self.states[result.stage] = source.state


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
    curve = CurveSettings(fractions=(0.2,), min_gain_rate=-1e9, min_rel_improve=-1e9)
    starts = sample_windows(target.window_starts("train"), 0.2, "subset", 0)
    hidden = ~target.visible_train_steps(starts)
    assert 0 < int(hidden.sum()) < hidden.numel()
    runs = []
    for city in (target, _tampered(target, hidden)):
        capture = _Capture()
        result = run_experiment([source, city], model=model, train=[ONE, ONE], curve=curve, observer=capture)
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
    curve = CurveSettings(fractions=(0.2,), prompt_days=0.5)

    def zero_shot(city):
        return run_experiment([source, city], model="hypernet", train=[ONE, ONE], curve=curve).stages[1]

    base = zero_shot(target)
    assert base.zero_shot_data["steps"] == steps and base.zero_shot_data["readings"] > 0
    assert zero_shot(_tampered(target, ~window)).zero_shot_test == base.zero_shot_test  # outside: unseen
    assert zero_shot(_tampered(target, window)).zero_shot_test != base.zero_shot_test  # inside: read
    # scratch declares no prompt window: it reads nothing at zero-shot, and has no zero-shot point
    scratch = run_experiment([source, target], model="hypernet", strategy="scratch", train=[ONE, ONE], curve=curve)
    assert scratch.stages[0].curve[0]["data"]["prompt_steps"] == 0


def test_zero_shot_uses_the_source_scaler_and_points_refit_their_own(cities):
    from graphtune.transfer.budget import sample_windows

    source, target = cities
    capture = _Capture()
    result = run_experiment([source, target], model="baseline", train=[ONE, ONE],
                            curve=CurveSettings(fractions=(0.2,)), observer=capture)
    assert result.stages[1].zero_shot_data["scaler"] == "source"
    assert capture.points[0.2]["data"]["scaler"] == "visible readings"
    view = target.restrict(sample_windows(target.window_starts("train"), 0.2, "subset", 0))
    lo, hi = target.splits["train"]
    seen = view.target[lo:hi]
    assert view.scaler.mean == pytest.approx(float(seen[~torch.isnan(seen)].double().mean()))
    assert view.scaler != target.scaler
