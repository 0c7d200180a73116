import copy
import dataclasses
import math

import pytest
import torch
import torch.nn as nn

from graphtune.data.synthetic import synthetic_bundle
from graphtune.config import TrainConfig
from graphtune.engine import FitResult, evaluate, fit
from graphtune.errors import DataError, TrainingDiverged
from graphtune.metrics import MetricAccumulator


class LinearOverTime(nn.Module):
    """A tiny stand-in forecaster: one linear map from the T_in scaled values to T_out, shared by all nodes."""

    def __init__(self, t_in: int = 12, t_out: int = 12, dropout: float = 0.0):
        super().__init__()
        self.proj = nn.Linear(t_in, t_out)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):  # (B, T_in, N, C)
        values = self.dropout(x[..., 0]).transpose(1, 2)  # (B, N, T_in)
        return self.proj(values).transpose(1, 2)  # (B, T_out, N)


class RecordingModel(LinearOverTime):
    """Records what it is called with in training mode, and takes teacher-forcing targets."""

    takes_targets = True  # the ForecastModel hook: the train step passes scaled targets

    def __init__(self):
        super().__init__()
        self.train_inputs, self.train_targets, self.eval_targets = [], [], []

    def forward(self, x, targets=None):
        (self.train_targets if self.training else self.eval_targets).append(targets)
        if self.training:
            self.train_inputs.append(x.detach().clone())
        return super().forward(x)


class Constant(nn.Module):
    """No trainable parameters (like the historical average): always predicts the scaled value `c`."""

    def __init__(self, c: float = 0.0):
        super().__init__()
        self.register_buffer("c", torch.tensor(c))

    def forward(self, x):
        return self.c.expand(x.shape[0], 12, x.shape[2])


@pytest.fixture(scope="module")
def bundle():
    # 400 steps, 70/10/20 split: 257 train windows, 17 val, 57 test; 6 nodes
    return synthetic_bundle(num_nodes=6, num_steps=400, seed=0)


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return LinearOverTime(**kwargs)


def _metrics(history):
    return [{k: v for k, v in e.items() if not k.endswith("time_s")} for e in history]


def test_evaluate_constant_prediction_matches_direct_computation(bundle):
    metrics = evaluate(Constant(0.0), bundle, "test", batch_size=10)
    _, y = bundle.batch(bundle.window_starts("test"))  # (57, 12, 6) raw
    mean = torch.tensor(bundle.scaler.mean, dtype=torch.float32).double()  # scaled 0 is the train mean (float32)
    err = (y.double() - mean).abs()
    assert metrics["mae"] == pytest.approx(err.mean().item(), rel=1e-9)
    assert metrics["mae_h3"] == pytest.approx(err[:, 2].mean().item(), rel=1e-9)
    assert metrics["rmse_h12"] == pytest.approx(err[:, 11].square().mean().sqrt().item(), rel=1e-9)


def test_evaluate_on_explicit_starts(bundle):
    starts = bundle.window_starts("test")[:7]
    acc = MetricAccumulator(mape_floor=getattr(bundle, "mape_floor", 1.0), interval_minutes=bundle.interval_minutes)
    _, y = bundle.batch(starts)
    acc.update(torch.full_like(y, bundle.scaler.mean), y)
    assert evaluate(Constant(0.0), bundle, "test", starts=starts) == pytest.approx(acc.compute(), rel=1e-9)


def test_fit_is_deterministic_for_a_seed(bundle):
    runs = []
    for _ in range(2):
        model = _model(dropout=0.2)  # dropout makes the seed matter inside the model too
        result = fit(model, bundle, TrainConfig(epochs=[3], lrs=[1e-2], batch_size=32), seed=7)
        runs.append((_metrics(result.history), model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    other = fit(_model(dropout=0.2), bundle, TrainConfig(epochs=[3], lrs=[1e-2], batch_size=32), seed=8)
    assert _metrics(other.history) != runs[0][0]  # the seed does change the run


def test_trivial_model_learns(bundle):
    model = _model()
    before = evaluate(model, bundle, "test")["mae"]
    result = fit(model, bundle, TrainConfig(epochs=[15], lrs=[3e-2], batch_size=32), seed=0)
    after = evaluate(model, bundle, "test")["mae"]
    assert result.stopped_reason == "completed" and result.steps == 15 * 9  # 257 windows / 32 = 9 batches
    assert after < 0.5 * before
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_best_on_validation_state_is_restored(bundle):
    states = {}

    def sabotage(epoch, entry):  # after epoch 2, wreck the weights so later epochs validate worse
        states[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        if epoch == 2:
            with torch.no_grad():
                model.proj.weight.mul_(50.0)

    model = _model()
    result = fit(model, bundle, TrainConfig(epochs=[4], lrs=[1e-3], batch_size=32), seed=0, on_epoch_end=sabotage)
    val_maes = [e["val_mae"] for e in result.history]
    assert result.best_epoch == 1 + val_maes.index(min(val_maes)) == 2
    assert result.best_val_mae == min(val_maes)
    assert all(torch.equal(model.state_dict()[k], states[2][k]) for k in states[2])
    assert evaluate(model, bundle, "val", batch_size=32)["mae"] == pytest.approx(val_maes[1], rel=1e-6)


def test_early_stopping_with_patience(bundle):
    # lr 0 and no weight decay: nothing changes, so no epoch improves on the starting weights
    result = fit(_model(), bundle, TrainConfig(epochs=[10], lrs=[0.0], weight_decay=0.0, early_stop_patience=2), seed=0)
    assert result.stopped_reason == "early_stopping"
    assert len(result.history) == 2 and result.best_epoch == 0


def test_time_budget_stops_after_one_step(bundle):
    result = fit(_model(), bundle, TrainConfig(epochs=[5], lrs=[1e-2], batch_size=8), seed=0, time_budget_s=0.0)
    assert result.stopped_reason == "time_budget"
    assert result.steps == 1 and len(result.history) == 1 and result.history[0]["steps"] == 1
    assert result.samples == 8  # one batch of 8 windows
    assert result.train_time_s > 0


def test_max_steps_per_epoch(bundle):
    result = fit(_model(), bundle, TrainConfig(epochs=[2], lrs=[1e-2], batch_size=8), seed=0, max_steps_per_epoch=3)
    assert [e["steps"] for e in result.history] == [3, 3] and result.steps == 6


def test_few_shot_starts_subset_is_respected(bundle):
    subset = bundle.window_starts("train")[torch.tensor([3, 50, 51, 120, 200, 256])]
    model = RecordingModel()
    result = fit(model, bundle, TrainConfig(epochs=[2], lrs=[1e-2], batch_size=4), seed=0, train_starts=subset)
    assert result.steps == 4  # 6 windows in batches of 4 = 2 steps per epoch
    assert result.samples == 12  # (4 + 2) windows per epoch, 2 epochs
    seen = torch.cat(model.train_inputs)  # (12, T_in, N, C): each subset window once per epoch
    expected, _ = bundle.batch(subset)
    key = lambda x: x[:, :, :, 0].flatten(1)  # noqa: E731 - compare windows as rows, order-free
    assert torch.equal(torch.sort(key(seen), dim=0).values, torch.sort(key(torch.cat([expected] * 2)), dim=0).values)


def test_teacher_forcing_targets_are_scaled_and_only_in_training(bundle):
    holey = dataclasses.replace(bundle, target=bundle.target.clone())
    start = 40
    holey.target[start + 12 + 4, 2] = math.nan  # target step 4 of node 2 of the one training window
    model = RecordingModel()
    fit(model, holey, TrainConfig(epochs=[1], lrs=[1e-2]), seed=0, train_starts=torch.tensor([start]))
    (targets,) = model.train_targets  # (1, T_out, N)
    expected = holey.scaler.transform(bundle.target[start + 12 : start + 24])  # (T_out, N) scaled
    expected[4, 2] = 0.0  # missing -> 0, the scaled train mean, like missing inputs
    assert torch.allclose(targets[0], expected)
    assert model.eval_targets and all(t is None for t in model.eval_targets)  # validation never sees targets


def test_all_missing_labels_train_without_nan(bundle):
    holey = dataclasses.replace(bundle, target=bundle.target.clone())
    lo, hi = holey.splits["train"]
    holey.target[lo:hi] = math.nan  # no training label at all
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fit(model, holey, TrainConfig(epochs=[2], lrs=[1e-2], weight_decay=0.0), seed=0)
    assert [e["train_loss"] for e in result.history] == [0.0, 0.0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # zero gradients: no update


def test_all_missing_validation_is_a_data_error_before_training(bundle):
    holey = dataclasses.replace(bundle, target=bundle.target.clone())
    lo, hi = holey.splits["val"]
    holey.target[lo:hi] = 0.0  # null value everywhere
    model = RecordingModel()
    with pytest.raises(DataError) as err:
        fit(model, holey, TrainConfig(epochs=[2], lrs=[1e-2]), seed=0)
    assert str(err.value) == ("synthetic-6: the val split has no observed readings (every label is missing or 0), "
                              "so no epoch can be validated; check the data or prepare.split")
    assert model.train_inputs == []  # nothing was trained


def test_one_observed_validation_label_is_enough(bundle):
    holey = dataclasses.replace(bundle, target=bundle.target.clone())
    lo, hi = holey.splits["val"]
    holey.target[lo:hi] = math.nan
    holey.target[hi - 1, 3] = 50.0  # the last target step of the last val window
    model = _model()
    result = fit(model, holey, TrainConfig(epochs=[1], lrs=[1e-2]), seed=0)
    assert math.isfinite(result.history[0]["val_mae"]) and math.isfinite(result.start_val["mae"])
    assert result.best_val_mae == evaluate(model, holey, "val")["mae"]  # one label, measured exactly


def test_split_without_validation_windows_is_a_data_error():
    short = synthetic_bundle(num_nodes=4, num_steps=160, seed=0)  # val = 16 steps < T_in + T_out = 24
    with pytest.raises(DataError, match=r"^synthetic-4: no validation windows \(the val split is shorter than "
                                        r"T_in \+ T_out = 24 steps\); give prepare.split a larger val share$"):
        fit(_model(), short, TrainConfig(epochs=[1], lrs=[1e-2]), seed=0)


def test_exploding_lr_stops_with_training_diverged(bundle):
    reported = []
    with pytest.raises(TrainingDiverged) as err:
        fit(_model(), bundle, TrainConfig(epochs=[3], lrs=[1e30], batch_size=32, clip_grad=None), seed=0,
            on_epoch_end=lambda epoch, entry: reported.append(epoch))
    assert str(err.value) == ("synthetic-6: training diverged at epoch 1 (lr 1e+30): train loss nan, val MAE nan, "
                              "val RMSE nan; lower train.lrs or set train.clip_grad")
    assert reported == []  # a diverged epoch is never reported as a result


class FiniteInTrainingOnly(LinearOverTime):
    """Trains normally but forecasts inf in evaluation: only the validation metrics become non-finite."""

    def forward(self, x):
        out = super().forward(x)
        return out if self.training else torch.full_like(out, math.inf)


def test_non_finite_validation_alone_stops_the_fit(bundle):
    torch.manual_seed(0)
    with pytest.raises(TrainingDiverged) as err:
        fit(FiniteInTrainingOnly(), bundle, TrainConfig(epochs=[2], lrs=[1e-2], batch_size=32), seed=0)
    assert str(err.value) == ("synthetic-6: training diverged at epoch 1 (lr 0.01): val MAE inf, val RMSE inf; "
                              "lower train.lrs or lower train.clip_grad (now 5)")


def test_samples_count_every_window_trained_on(bundle):
    starts = bundle.window_starts("train")[:100]
    result = fit(_model(), bundle, TrainConfig(epochs=[3], lrs=[1e-2], batch_size=32), seed=0, train_starts=starts)
    assert (result.steps, result.samples) == (3 * 4, 3 * 100)  # batches of 32, 32, 32, 4
    capped = fit(_model(), bundle, TrainConfig(epochs=[3], lrs=[1e-2], batch_size=32), seed=0, train_starts=starts, max_steps_per_epoch=2)
    assert (capped.steps, capped.samples) == (3 * 2, 3 * 64)


def test_model_without_trainable_parameters_skips_training(bundle):
    model = Constant(0.5)
    result = fit(model, bundle, TrainConfig(epochs=[3], lrs=[1e-2]), seed=0)
    assert isinstance(result, FitResult)
    assert (result.stopped_reason, result.steps, result.samples, result.best_epoch, result.history) == (
        "no_trainable_parameters", 0, 0, 0, [])
    assert torch.equal(result.best_state["c"], torch.tensor(0.5))


def test_empty_training_subset_is_a_data_error(bundle):
    with pytest.raises(DataError, match="no training windows"):
        fit(_model(), bundle, TrainConfig(epochs=[1], lrs=[1e-2]), seed=0, train_starts=torch.empty(0, dtype=torch.long))


def test_amp_path_runs_on_cpu_with_bfloat16(bundle):
    # CUDA is where amp turns on by itself; forcing it on CPU exercises the same autocast code path
    model = _model()
    result = fit(model, bundle, TrainConfig(epochs=[3], lrs=[3e-2], batch_size=32, amp="on"), seed=0)
    assert all(math.isfinite(e["train_loss"]) for e in result.history)
    assert result.history[-1]["val_mae"] < result.history[0]["val_mae"]
    assert model.proj.weight.dtype == torch.float32  # autocast never changes the stored weights


def test_the_starting_weights_are_a_candidate_so_fitting_never_ends_worse_on_validation(bundle):
    """A good model that training only degrades (a too large lr) comes back as it started."""
    good = _model()
    fit(good, bundle, TrainConfig(epochs=[15], lrs=[3e-2], batch_size=32), seed=0)  # a trained start
    before = {k: v.clone() for k, v in good.state_dict().items()}
    start = evaluate(good, bundle, "val")
    result = fit(good, bundle, TrainConfig(epochs=[2], lrs=[5.0], weight_decay=0.0, clip_grad=None), seed=1)
    assert result.start_val["mae"] == pytest.approx(start["mae"])
    assert all(e["val_mae"] > start["mae"] for e in result.history)  # every epoch was worse ...
    assert result.best_epoch == 0 and result.best_val_mae == pytest.approx(start["mae"])  # ... so the start stays
    assert all(torch.equal(before[k], v) for k, v in good.state_dict().items())


# ---------------------------------------------------------------------------------------------
# evaluate: WAPE, counts, the MAPE floor, null_value None, lead-time names (issue 10)
# ---------------------------------------------------------------------------------------------

_PER_STEP = ("mae", "rmse", "mape", "wape")


def _direct_test_errors(bundle):
    """|Constant(0) - y| and y over every test label (raw, float64): the scaled 0 is the train mean."""
    _, y = bundle.batch(bundle.window_starts("test"))
    y = y.double()
    mean = torch.tensor(bundle.scaler.mean, dtype=torch.float32).double()
    return (y - mean).abs(), y


def test_evaluate_reports_wape_counts_and_lead_time_names(bundle):
    metrics = evaluate(Constant(0.0), bundle, "test", batch_size=10)
    names = ("h3", "h6", "h12", "15min", "30min", "60min")  # 5-minute sampling, T_out = 12
    assert set(metrics) == ({"count", "mape_count"} | set(_PER_STEP)
                            | {f"{m}_{h}" for m in _PER_STEP for h in names})
    err, y = _direct_test_errors(bundle)
    assert metrics["count"] == metrics["mape_count"] == 57 * 12 * 6  # synthetic speeds are all far above 1
    assert metrics["wape"] == pytest.approx(100 * err.sum().item() / y.abs().sum().item(), rel=1e-9)
    assert metrics["wape_60min"] == pytest.approx(100 * err[:, 11].sum().item() / y[:, 11].abs().sum().item(),
                                                  rel=1e-9)
    for m in _PER_STEP:
        assert (metrics[f"{m}_15min"], metrics[f"{m}_30min"], metrics[f"{m}_60min"]) == (
            metrics[f"{m}_h3"], metrics[f"{m}_h6"], metrics[f"{m}_h12"])


def test_evaluate_names_lead_times_at_15_minutes_with_4_steps():
    quarter = synthetic_bundle(num_nodes=4, num_steps=300, seed=1, t_out=4, interval_minutes=15.0)
    metrics = evaluate(_model(t_out=4), quarter, "test")
    steps = {k for k in metrics if k.startswith("mae_")}
    assert steps == {"mae_h3", "mae_h4", "mae_45min", "mae_60min"}  # 6 and 12 clip to step 4, reported once
    assert metrics["mae_60min"] == metrics["mae_h4"]


def test_evaluate_uses_the_bundle_mape_floor(bundle):
    floored = copy.copy(bundle)
    floored.mape_floor = 50.0  # raw units: about half the synthetic readings are below
    metrics = evaluate(Constant(0.0), floored, "test")
    err, y = _direct_test_errors(bundle)
    keep = y.abs() >= 50.0
    assert 0 < metrics["mape_count"] == int(keep.sum()) < metrics["count"] == y.numel()
    assert metrics["mape"] == pytest.approx(100 * (err[keep] / y[keep].abs()).mean().item(), rel=1e-9)
    assert metrics["mae"] == pytest.approx(evaluate(Constant(0.0), bundle, "test")["mae"], rel=1e-12)


def test_evaluate_with_null_value_none_keeps_zero_readings(bundle):
    zeros = copy.copy(bundle)
    zeros.target = bundle.target.clone()
    lo, hi = bundle.splits["test"]
    zeros.target[lo:hi, 0] = 0.0  # node 0 reads a real 0 throughout the test split
    _, y = zeros.batch(zeros.window_starts("test"))
    n_zero = int((y == 0).sum())
    assert n_zero == 57 * 12  # every label of node 0
    as_missing = evaluate(Constant(0.0), zeros, "test")  # null_value 0.0: the zeros are missing
    zeros.null_value = None
    as_readings = evaluate(Constant(0.0), zeros, "test")
    assert as_missing["count"] == 57 * 12 * 5 and as_readings["count"] == 57 * 12 * 6
    assert as_readings["mape_count"] == as_missing["mape_count"] == 57 * 12 * 5  # a 0 is below any floor
    err, y = _direct_test_errors(zeros)  # the zeros add |mean - 0| each to sum |e| and nothing to sum |y|
    assert as_readings["mae"] == pytest.approx(err.mean().item(), rel=1e-9)
    assert as_readings["wape"] == pytest.approx(100 * err.sum().item() / y.abs().sum().item(), rel=1e-9)
    assert as_readings["wape"] > as_missing["wape"]
    assert as_readings["mape"] == pytest.approx(as_missing["mape"], rel=1e-12)
