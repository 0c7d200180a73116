"""Memory-aware training: pick how a training step runs so that its measured peak memory fits a budget.

`train.memory_budget_mb` asks `TrainStep.for_config` (so `fit`, before its first step) for a plan:

    plan = plan_memory(model, bundle, train, device, lr=lr)
    plan.grad_accum, plan.micro_batch, plan.checkpointing   # what the step then runs
    plan.measured_mb, plan.budget_mb, plan.candidates       # what was measured, for the run's logs

A plan is a number of micro-batches per optimizer step (train.grad_accum: batch_size stays the optimizer's
batch, each micro-batch is batch_size / grad_accum windows) and activation checkpointing on or off. The
cheapest plan comes first: the fewest micro-batches (each extra one runs smaller, slower GEMMs), and, for a
number of micro-batches, checkpointing only when it is needed (it recomputes every block's forward in
backward). The planner never goes below what the section asks for: at least train.grad_accum
micro-batches, and checkpointing always on when train.activation_checkpointing is true.

Every candidate is judged by MEASURING a real training step (`TrainStep`, the code `fit` runs) on a deep
copy of the model with a fresh optimizer (what `fit` starts with), on the first batch_size training windows
(fewer when the split or `starts` has fewer). A plan of two or more micro-batches is probed with a step over
its first two: the second micro-batch repeats the first's allocations with the gradients already held, and
every later one repeats the second's, so the step's peak is reached by then and the probe costs two
micro-batches, not the whole batch (the rest of the batch is counted as held, as the real step holds it).
The torch random state is restored after every probe, and the copy is dropped, so the training that
follows is exactly the one without a budget: same dropout masks, same weights, same BatchNorm statistics
and curriculum counters.

What is measured (`measure_step_mb`), in MB of tensor memory:

- CUDA: torch.cuda.max_memory_allocated during the step minus the memory allocated before it, plus the
  bytes of the copy's parameters and buffers and of the batch. Allocator caching and fragmentation
  (memory_reserved) and the CUDA context are not counted.
- CPU: the peak of the running sum of every allocation and free the CPU allocator reports to
  torch.profiler (profile_memory=True) during the step, plus the same static bytes. This is every tensor
  the step holds at its peak (activations and the tensors saved for backward, temporaries inside ops,
  gradients, the optimizer's state, created in the probe's first step); it is deterministic for a model,
  batch and plan, unlike the process RSS (graphtune.profiling.ResourceMonitor), which also moves with the
  allocator's caching, the interpreter and whatever else the process holds. Library scratch memory that
  bypasses torch's allocator (some oneDNN/MKL workspaces) is not seen. torch's profiler prints a start and
  a stop line on stderr per probe.

  The process RSS can stay well above it under glibc malloc's defaults: glibc raises its mmap threshold
  (up to 32 MiB) whenever a mapped block is freed, after which activation-sized blocks come from the
  heap, which keeps freed memory in its middle. bench/bench_memory.py (gwnet, METR-LA's 207 sensors, batch
  64): tensor peak 1442 MB plain, 681 MB checkpointed; RSS growth 1718 / 1534 MB with glibc's defaults,
  1467 / 710 MB with MALLOC_MMAP_THRESHOLD_=131072 in the environment (fixed: large blocks go back to the
  system when freed). Set it (or use another allocator) when a CPU run's RSS must follow the plan.

The budget is per training step. Validation in `fit` runs a no-grad forward at train.batch_size outside
the plan (no activations are kept for backward, typically well below a training step).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from graphtune.config import TrainConfig
from graphtune.data.bundle import DatasetBundle
from graphtune.errors import ConfigError, DataError

MB = 2**20
CPU_MEASURE = "cpu-profiler: peak tensor bytes the CPU allocator reported during one step + parameters, buffers, batch"
CUDA_MEASURE = "cuda: max_memory_allocated growth during one step + parameters, buffers, batch"


@dataclass
class MemoryPlan:
    """How the training steps run under train.memory_budget_mb, and the measurements that chose it."""

    micro_batch: int  # windows per forward: batch_size / grad_accum
    grad_accum: int  # micro-batches per optimizer step
    checkpointing: bool  # activation checkpointing of the model's blocks
    measured_mb: float  # the chosen plan's measured peak of one training step (see `measure`)
    budget_mb: float  # train.memory_budget_mb
    batch_size: int  # train.batch_size, the optimizer's batch
    probe_windows: int  # windows in the probed batch: batch_size, or fewer when training has fewer
    measure: str  # what measured_mb counts: CPU_MEASURE or CUDA_MEASURE
    # every probed candidate in probing order: grad_accum, micro_batch, checkpointing, measured_mb, fits
    candidates: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs: the plan, its measurement against the budget, the number of probes."""
        return (f"{self.grad_accum} micro-batch(es) of {self.micro_batch}, checkpointing "
                f"{'on' if self.checkpointing else 'off'}: {self.measured_mb:.1f} MB measured <= "
                f"{self.budget_mb:g} MB budget ({len(self.candidates)} plan(s) probed)")

    def as_dict(self) -> dict:
        """Every field, candidates included (JSON-ready), for results files and run logs."""
        return dataclasses.asdict(self)


def candidate_plans(batch_size: int, grad_accum: int = 1, checkpointing: bool = False,
                    can_checkpoint: bool = True) -> list[tuple[int, bool]]:
    """(grad_accum, checkpointing) pairs from the cheapest to the least memory-hungry.

    Micro-batch counts are the divisors of batch_size from `grad_accum` on; for each, checkpointing off
    before on (only on when `checkpointing` is forced, never on when the model has no checkpointable block).
    """
    modes = [True] if checkpointing else ([False, True] if can_checkpoint else [False])
    return [(k, mode) for k in range(grad_accum, batch_size + 1) if batch_size % k == 0 for mode in modes]


def plan_memory(model: nn.Module, bundle: DatasetBundle, train: TrainConfig, device="cpu", *,
                lr: float | None = None, starts: torch.Tensor | None = None) -> MemoryPlan:
    """The cheapest plan (see the module doc) whose measured step fits train.memory_budget_mb.

    The least memory-hungry candidate (micro-batches of one window, checkpointing when the model has blocks)
    is probed first: when even it exceeds the budget, ConfigError names the measured minimum before any
    other probe. Then candidates are probed from the cheapest on until one fits. `starts` are the training
    windows `fit` trains on (default: the whole train split); `lr` the step's learning rate (any value:
    the optimizer's state has the same size). Raises ConfigError when grad_accum does not divide
    batch_size or the budget is missing, DataError when there is no training window to probe with.
    """
    budget = train.memory_budget_mb
    if budget is None:
        raise ConfigError("train.memory_budget_mb: null, so there is no budget to plan for; give it in MB")
    train.micro_batch_size  # ConfigError unless grad_accum divides batch_size
    device = torch.device(device)
    x, y = _probe_batch(bundle, train.batch_size, starts, device)
    can_checkpoint = bool(getattr(model, "checkpoint_blocks", lambda: [])())
    plans = candidate_plans(train.batch_size, train.grad_accum, train.activation_checkpointing, can_checkpoint)
    measured: dict[tuple[int, bool], float] = {}
    candidates: list[dict] = []

    def probe(plan: tuple[int, bool]) -> float:
        k, mode = plan
        measured[plan] = _measure(model, bundle, _plan_config(train, k, mode), device, lr, x, y,
                                  _probe_windows(x.shape[0], train.batch_size // k))
        candidates.append({"grad_accum": k, "micro_batch": train.batch_size // k, "checkpointing": mode,
                           "measured_mb": measured[plan], "fits": measured[plan] <= budget})
        return measured[plan]

    minimum = probe(plans[-1])
    if minimum > budget:
        k, mode = plans[-1]
        raise ConfigError(f"train.memory_budget_mb: {budget:g} MB is below the measured minimum of {minimum:.1f} MB "
                          f"for one training step ({train.batch_size // k}-window micro-batches, checkpointing "
                          f"{'on' if mode else 'off'}); raise the budget or lower train.batch_size")
    # the first that fits; the minimum, already measured, fits, so the search always ends
    k, mode = next(plan for plan in plans if (measured[plan] if plan in measured else probe(plan)) <= budget)
    return MemoryPlan(micro_batch=train.batch_size // k, grad_accum=k, checkpointing=mode,
                      measured_mb=measured[(k, mode)], budget_mb=float(budget), batch_size=train.batch_size,
                      probe_windows=int(x.shape[0]), measure=CUDA_MEASURE if device.type == "cuda" else CPU_MEASURE,
                      candidates=candidates)


def measure_step_mb(model: nn.Module, bundle: DatasetBundle, train: TrainConfig, device="cpu", *,
                    lr: float | None = None, starts: torch.Tensor | None = None) -> float:
    """Measured peak MB of one training step as `train` runs it (its grad_accum and activation_checkpointing;
    any memory budget ignored), on a copy of `model`, random state restored: see the module doc."""
    device = torch.device(device)
    x, y = _probe_batch(bundle, train.batch_size, starts, device)
    return _measure(model, bundle, _plan_config(train, train.grad_accum, train.activation_checkpointing),
                    device, lr, x, y, _probe_windows(x.shape[0], train.micro_batch_size))


def _probe_windows(batch: int, micro_batch: int) -> int:
    """Windows a probe steps over: the whole batch in one forward, else its first two micro-batches."""
    return min(batch, 2 * micro_batch) if micro_batch < batch else batch


def _plan_config(train: TrainConfig, grad_accum: int, checkpointing: bool) -> TrainConfig:
    return dataclasses.replace(train, grad_accum=grad_accum, activation_checkpointing=checkpointing,
                               memory_budget_mb=None)


def _probe_batch(bundle: DatasetBundle, batch_size: int, starts: torch.Tensor | None,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first batch_size training windows (of `starts` when given), on `device`."""
    starts = bundle.window_starts("train") if starts is None else starts
    if starts.numel() == 0:
        raise DataError(f"{bundle.name}: no training windows to measure train.memory_budget_mb's plans with")
    x, y = bundle.batch(starts[:batch_size])
    return x.to(device), y.to(device)


def _measure(model: nn.Module, bundle: DatasetBundle, train: TrainConfig, device: torch.device,
             lr: float | None, x: torch.Tensor, y: torch.Tensor, windows: int) -> float:
    """MB of a real TrainStep over the first `windows` of the batch x, y on a deep copy of `model` (no
    gradients, fresh optimizer), counting the whole batch as held; RNG restored."""
    from graphtune.engine import TrainStep  # engine imports this module for `fit`

    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    probe = copy.deepcopy(model)
    try:
        for p in probe.parameters():
            p.grad = None  # as at the start of fit; a freed pre-existing gradient would be invisible to the profiler
        step = TrainStep.for_config(probe, bundle, train, device, lr=lr)
        static = _storage_bytes([*probe.parameters(), *probe.buffers()]) + x.nbytes + y.nbytes  # the whole batch
        if step.takes_targets:  # the step's scaled copy of the targets, of the windows the probe leaves out
            static += (y.shape[0] - windows) * y[0].numel() * y.element_size()
        x, y = x[:windows], y[:windows]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            step(x, y)
            torch.cuda.synchronize(device)
            grown = torch.cuda.max_memory_allocated(device) - before
        else:
            grown = _cpu_step_peak(lambda: step(x, y))
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return (static + grown) / MB


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (a tied weight or a view is counted once)."""
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def _cpu_step_peak(run) -> int:
    """Peak of the running sum of the CPU allocator's allocations (+) and frees (-) while `run()` runs.

    torch.profiler records each allocation and free as an event (profile_memory=True); ordered by time, their
    sizes summed give the bytes the step added at every moment, and the largest of those sums is its peak.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events, stack = [], list(reversed(prof.profiler.kineto_results.experimental_event_tree()))
    while stack:  # depth-first in recording order; the index breaks ties between equal timestamps
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, len(events), node.extra_fields.alloc_size))
        stack.extend(reversed(node.children))
    peak = total = 0
    for _, _, size in sorted(events):
        total += size
        peak = max(peak, total)
    return peak
