"""The stage loop on tiny synthetic cities: scheduler stops, strategies, budgets, per-stage checks."""

from __future__ import annotations

import pytest
import torch

from graphtune.data.synthetic import synthetic_bundle
from graphtune.errors import ConfigError
from graphtune.stages import CurveSettings, Observer, TrainSettings, per_stage, run_experiment

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
    f, z, s = full.stages[1], frozen.stages[1], scratch.stages[1]
    assert f.static_eff["params_trainable"] == f.static_eff["params_total"]
    node_params = 2 * 9 * 10  # the two adaptive-adjacency embeddings (N x node_emb_dim) re-created for city b
    assert z.static_eff["params_trainable"] == node_params
    assert f.zero_rmse == z.zero_rmse  # same transferred start
    assert s.transfer["transferred"] is False and f.transfer["transferred"] is True
    assert s.zero_rmse != f.zero_rmse


def test_time_budget_is_enforced(cities):
    result = run_experiment(list(cities), model="baseline", train=[TrainSettings(epochs=50, lr=0.003)] * 2,
                            curve=CurveSettings(fractions=(0.5, 1.0)), enforce_time_s=1e-6)
    assert result.stages[0].stopped_reason == "time_budget"
    assert len(result.stages[0].history) == 1  # stopped after the first step's epoch
    assert result.stages[1].stopped_reason == "time_budget"


def test_transferred_seq2seq_model_finetunes_free_running(cities, monkeypatch):
    import graphtune.stages as stages

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
