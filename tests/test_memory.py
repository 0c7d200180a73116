"""Memory-aware training: gradient accumulation, activation checkpointing, CPU bfloat16 and the memory planner.

Everything runs tiny models on a small SYNTHETIC bundle, so the whole file takes seconds on 2 CPU cores.
Equivalences are checked against what the option claims: accumulation = one batch up to float rounding
(relative 1e-5 on the loss and the gradients; an Adam step then moves a parameter by about lr = 3e-3, and a
near-zero gradient's rounding can move it by up to lr itself, so parameters are compared at 5e-5 absolute),
checkpointing = bit-identical numbers (the recomputation replays the same operations and random state).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from graphtune.config import TrainConfig, load_params
from graphtune.data.synthetic import synthetic_bundle
from graphtune.engine import TrainStep, fit
from graphtune.errors import ConfigError
from graphtune.memory import MemoryPlan, _measure, candidate_plans, measure_step_mb, plan_memory
from graphtune.models.registry import build_model

# small widths: every model keeps its structure (gwnet 4 blocks x 2 layers with BatchNorm and dropout)
TINY = {
    "gwnet": {"residual_channels": 8, "dilation_channels": 8, "skip_channels": 16, "end_channels": 16},
    "bigst": {"hidden": 16, "node_emb_dim": 4, "time_emb_dim": 4, "random_feature_dim": 8},
    "dcrnn": {"hidden": 8},
    "dgcrn": {"hidden": 8, "node_dim": 4},
}
BATCH = 12


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP's waiting made the
    recurrent models' many small ops up to 100x slower (dgcrn: 3 s a step with 2 threads, 0.04 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bundle():
    return synthetic_bundle(num_nodes=10, num_steps=300, seed=0)


def _with_missing(bundle) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch with missing labels spread unevenly: 3 windows wholly missing (NaN), part of another at the
    null value. A mean of micro-batch means would weigh those micro-batches wrongly."""
    x, y = bundle.batch(bundle.window_starts("train")[:BATCH])
    y = y.clone()
    y[:3] = float("nan")
    y[5, :, :4] = 0.0  # the synthetic bundle's null_value
    return x, y


@pytest.fixture(scope="module")
def batch(bundle):
    return _with_missing(bundle)


@pytest.fixture(scope="module")
def data(bundle, batch):
    """name -> (bundle, batch): the recurrent models get 4-step windows (a step per forward costs them most)."""
    short = synthetic_bundle(num_nodes=10, num_steps=300, seed=0, t_in=4, t_out=4)
    short_batch = _with_missing(short)
    return lambda name: (short, short_batch) if name in ("dcrnn", "dgcrn") else (bundle, batch)


def _model(name: str, bundle, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, bundle, **{**TINY[name], **kwargs})


def _step(model, bundle, x, y, seed: int = 1, **train) -> tuple[torch.Tensor, dict, dict]:
    """One TrainStep of `train` on a copy of `model`: (loss, gradients, state dict after the step: parameters and
    buffers such as BatchNorm's running statistics)."""
    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    step = TrainStep.for_config(model, bundle, TrainConfig(batch_size=BATCH, **train), "cpu")
    loss = step(x, y)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert not getattr(model, "_checkpointing", False)  # checkpointing is on only inside the step
    return loss, grads, copy.deepcopy(model.state_dict())


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("override, message", [
    ("train.grad_accum=0", "train.grad_accum: expected an integer >= 1, got 0"),
    ("train.grad_accum=1.5", "train.grad_accum: expected an integer >= 1, got 1.5"),
    ("train.activation_checkpointing=1", "train.activation_checkpointing: expected true or false, got 1"),
    ("train.memory_budget_mb=0", "train.memory_budget_mb: expected null or a finite number > 0, got 0"),
])
def test_bad_options_are_one_line_errors_naming_them(repo_root, override, message):
    with pytest.raises(ConfigError) as err:
        load_params(repo_root / "params.yaml", [override])
    assert str(err.value) == message


def test_grad_accum_must_divide_the_batch_before_training(bundle):
    train = TrainConfig(epochs=[1], batch_size=10, grad_accum=3)
    with pytest.raises(ConfigError, match=r"^train\.grad_accum: 3 does not divide train\.batch_size 10;") as err:
        train.check_stages(range(1), 1)  # the experiment's pre-run check
    assert "\n" not in str(err.value)
    model = _model("bigst", bundle)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="does not divide"):
        fit(model, bundle, train, seed=0, on_epoch_end=lambda *_: pytest.fail("trained"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert TrainConfig(batch_size=12, grad_accum=4).micro_batch_size == 3


# ----------------------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("name, kwargs, micro_batches", [
    ("bigst", {"dropout": 0.0}, (2, 4, 12)),  # 12: one window per micro-batch, three of them with no label at all
    ("dcrnn", {}, (4, 12)),
    ("dgcrn", {}, (4,)),  # the slowest forward: one split is enough
])
def test_accumulation_equals_one_batch(data, name, kwargs, micro_batches):
    """k micro-batches: same loss (the masked MAE of the whole batch), gradients and parameters as one batch.
    BatchNorm-free models with no random draw: bigst without dropout, the recurrent models past their
    curriculum (after_transfer: no teacher forcing, as in fine-tuning)."""
    bundle, batch = data(name)
    model = _model(name, bundle, **kwargs)
    model.after_transfer()
    loss, grads, params = _step(model, bundle, *batch, grad_accum=1)
    for k in micro_batches:
        loss_k, grads_k, params_k = _step(model, bundle, *batch, grad_accum=k)
        assert loss_k.item() == pytest.approx(loss.item(), rel=1e-5)
        for n, g in grads.items():
            assert torch.allclose(grads_k[n], g, rtol=1e-5, atol=1e-5 * float(g.abs().max())), (k, n)
        for n, p in params.items():
            assert torch.allclose(params_k[n], p, rtol=0, atol=5e-5), (k, n)  # parameters and buffers


def test_accumulation_loss_is_not_a_mean_of_micro_batch_means(bundle, batch):
    """The weighting matters here: 3 windows without labels make micro-batch means differ from the batch's."""
    x, y = batch
    model = _model("bigst", bundle, dropout=0.0)
    loss, _, _ = _step(model, bundle, x, y, grad_accum=4)
    means = [_step(model, bundle, x[i:i + 3], y[i:i + 3], grad_accum=1)[0] for i in range(0, BATCH, 3)]
    assert abs(float(torch.stack(means).mean()) - loss.item()) > 1e-3 * loss.item()


def test_partial_last_batch_splits_into_the_micro_batches_it_needs(bundle, batch):
    x, y = batch
    model = _model("bigst", bundle, dropout=0.0)
    loss, _, params = _step(model, bundle, x[:7], y[:7], grad_accum=1)
    loss_k, _, params_k = _step(model, bundle, x[:7], y[:7], grad_accum=4)  # micro 3: 3 + 3 + 1 windows
    assert loss_k.item() == pytest.approx(loss.item(), rel=1e-5)
    assert all(torch.allclose(params_k[n], p, rtol=0, atol=5e-5) for n, p in params.items())


def test_curriculum_counts_optimizer_batches_not_micro_batches(data):
    bundle, batch = data("dcrnn")
    model = _model("dcrnn", bundle)
    step = TrainStep.for_config(model, bundle, TrainConfig(batch_size=BATCH, grad_accum=4), "cpu")
    for _ in range(3):
        step(*batch)
    assert model.batches_seen == 3
    model.train()
    model(batch[0])  # a plain training forward afterwards still counts
    assert model.batches_seen == 4


# ----------------------------------------------------------------------------- activation checkpointing
@pytest.mark.parametrize("name", ["gwnet", "bigst", "dcrnn", "dgcrn"])
def test_checkpointing_gives_identical_numbers(data, name):
    """With dropout on (gwnet, bigst) and BatchNorm (gwnet): the recomputation replays the same random draws and
    BatchNorm, outside the blocks, updates its running statistics once."""
    bundle, batch = data(name)
    model = _model(name, bundle)
    assert model.checkpoint_blocks()
    loss, grads, state = _step(model, bundle, *batch)
    loss_c, grads_c, state_c = _step(model, bundle, *batch, activation_checkpointing=True)
    assert loss_c.item() == loss.item()
    assert grads_c.keys() == grads.keys() and all(torch.equal(grads_c[n], g) for n, g in grads.items())
    assert state_c.keys() == state.keys() and all(torch.equal(state_c[n], v) for n, v in state.items())
    if name == "gwnet":  # the running statistics moved once, not twice: a recomputed norm would move them again
        assert not torch.equal(state["norms.0.running_mean"], model.state_dict()["norms.0.running_mean"])
        assert int(state_c["norms.0.num_batches_tracked"]) == 1


def test_checkpointing_cuts_measured_memory(bundle):
    for name in ("gwnet", "bigst"):
        model = _model(name, bundle)
        plain = measure_step_mb(model, bundle, TrainConfig(batch_size=BATCH))
        ckpt = measure_step_mb(model, bundle, TrainConfig(batch_size=BATCH, activation_checkpointing=True))
        assert ckpt < 0.8 * plain, (name, plain, ckpt)


def test_checkpointing_is_refused_for_a_model_without_blocks(bundle):
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(12, 12)

        def forward(self, x):
            return self.proj(x[..., 0].transpose(1, 2)).transpose(1, 2)

    for model in (Plain(), build_model("hypernet", bundle)):
        with pytest.raises(ConfigError, match=r"^train\.activation_checkpointing: \w+ marks no checkpointable block"):
            TrainStep.for_config(model, bundle, TrainConfig(activation_checkpointing=True), "cpu")


def test_run_block_is_a_plain_call_outside_training(bundle, batch):
    model = _model("gwnet", bundle)
    model.eval()
    with torch.no_grad():
        reference = model(batch[0])
        with model.activation_checkpointing():
            assert torch.equal(model(batch[0]), reference)
    with pytest.raises(RuntimeError), model.activation_checkpointing():
        raise RuntimeError("the flag is restored on the way out")
    assert not model._checkpointing


# ----------------------------------------------------------------------------- mixed precision on CPU
@pytest.mark.parametrize("name", ["gwnet", "bigst"])
def test_cpu_bfloat16_step_is_finite_and_close_to_float32(bundle, batch, name):
    model = _model(name, bundle)
    loss, _, _ = _step(model, bundle, *batch, amp="off")
    loss_bf16, grads_bf16, params_bf16 = _step(model, bundle, *batch, amp="on")
    assert torch.isfinite(loss_bf16) and all(torch.isfinite(g).all() for g in grads_bf16.values())
    assert all(v.dtype == torch.float32 for v in params_bf16.values() if v.is_floating_point())  # autocast only
    assert loss_bf16.item() == pytest.approx(loss.item(), rel=1e-2)


# ----------------------------------------------------------------------------- the planner
def test_candidates_from_cheapest():
    assert candidate_plans(12) == [(1, False), (1, True), (2, False), (2, True), (3, False), (3, True),
                                   (4, False), (4, True), (6, False), (6, True), (12, False), (12, True)]
    assert candidate_plans(8, grad_accum=2, checkpointing=True) == [(2, True), (4, True), (8, True)]
    assert candidate_plans(4, can_checkpoint=False) == [(1, False), (2, False), (4, False)]


def test_measurement_is_deterministic_and_two_micro_batches_reach_the_peak(bundle):
    """The CPU measure is the allocator's own accounting: the same step measures the same bytes every time, and a
    probe over the first two of four micro-batches measures what the whole four-micro-batch step does."""
    model = _model("gwnet", bundle)
    train = TrainConfig(batch_size=BATCH, grad_accum=4)
    first = measure_step_mb(model, bundle, train)
    assert measure_step_mb(model, bundle, train) == first
    x, y = bundle.batch(bundle.window_starts("train")[:BATCH])
    assert _measure(model, bundle, train, torch.device("cpu"), None, x, y, BATCH) == pytest.approx(first, abs=1e-9)
    assert measure_step_mb(model, bundle, TrainConfig(batch_size=BATCH)) > 1.5 * first  # more windows per forward


def test_plan_is_the_cheapest_that_fits(bundle):
    model = _model("gwnet", bundle)
    measured = {(k, c): measure_step_mb(model, bundle, TrainConfig(batch_size=BATCH, grad_accum=k,
                                                                   activation_checkpointing=c))
                for k, c in [(1, False), (1, True), (2, False)]}
    assert measured[(1, True)] < measured[(1, False)] and measured[(2, False)] < measured[(1, False)]
    budget = min(measured[(1, True)], measured[(2, False)]) + 0.01  # (1, False) exceeds it, the next one fits
    plan = plan_memory(model, bundle, TrainConfig(batch_size=BATCH, memory_budget_mb=budget), "cpu")
    assert isinstance(plan, MemoryPlan)
    expected = (1, True) if measured[(1, True)] <= budget else (2, False)
    assert (plan.grad_accum, plan.checkpointing) == expected and plan.micro_batch == BATCH // plan.grad_accum
    assert plan.measured_mb == pytest.approx(measured[expected]) and plan.budget_mb == budget
    # probed: the minimum (one window per micro-batch, checkpointing) first, then from the cheapest on
    tried = [(c["grad_accum"], c["checkpointing"]) for c in plan.candidates]
    assert tried[0] == (BATCH, True) and tried[1] == (1, False) and tried[-1] == expected
    assert [c["fits"] for c in plan.candidates[1:]] == [False] * (len(tried) - 2) + [True]
    assert "checkpointing" in plan.summary() and plan.as_dict()["candidates"] == plan.candidates


def test_fit_under_a_budget_trains_as_its_plan_says_and_probing_changes_nothing(bundle):
    """The plan is recorded in FitResult; the fit equals one run with the plan's options set by hand (dropout
    and BatchNorm included: the probes leave the random state and the model as they were)."""
    model = _model("gwnet", bundle)
    base = TrainConfig(epochs=[1], lrs=[3e-3], batch_size=BATCH)
    full = measure_step_mb(model, bundle, base)
    budget = 0.7 * full
    planned = copy.deepcopy(model)
    result = fit(planned, bundle, TrainConfig(epochs=[1], lrs=[3e-3], batch_size=BATCH, memory_budget_mb=budget),
                 seed=3, max_steps_per_epoch=3)
    plan = result.plan
    assert plan is not None and plan.measured_mb <= budget and (plan.grad_accum, plan.checkpointing) != (1, False)
    by_hand = copy.deepcopy(model)
    same = fit(by_hand, bundle, TrainConfig(epochs=[1], lrs=[3e-3], batch_size=BATCH, grad_accum=plan.grad_accum,
                                            activation_checkpointing=plan.checkpointing), seed=3, max_steps_per_epoch=3)
    assert same.plan is None
    strip = [{k: v for k, v in e.items() if not k.endswith("time_s")} for e in result.history]
    assert strip == [{k: v for k, v in e.items() if not k.endswith("time_s")} for e in same.history]
    assert all(torch.equal(v, by_hand.state_dict()[k]) for k, v in planned.state_dict().items())


def test_budget_below_the_minimum_is_a_one_line_error_before_training(bundle):
    model = _model("bigst", bundle)
    train = TrainConfig(epochs=[1], batch_size=BATCH, memory_budget_mb=0.001)
    with pytest.raises(ConfigError) as err:
        fit(model, bundle, train, seed=0, on_epoch_end=lambda *_: pytest.fail("trained"))
    message = str(err.value)
    assert message.startswith("train.memory_budget_mb: 0.001 MB is below the measured minimum of ")
    assert "1-window micro-batches, checkpointing on" in message and "\n" not in message
