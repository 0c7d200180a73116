"""What a model costs (parameters, FLOPs, time, peak memory) and how hard a city's graph is.

Static cost
    count_parameters  total / trainable parameters, size of parameters + persistent buffers in MB.
    count_flops       forward FLOPs with torch.utils.flop_counter.FlopCounterMode (MACs = FLOPs / 2).
    thop_flops        the thop cross-check, run on a deep copy (thop adds `total_ops`/`total_params`
                      buffers to every module it profiles and leaves them there).
    profile_model     all three for one batch of the bundle's training windows.

Why the two FLOP counts disagree. FlopCounterMode counts at the level of aten ops, so every
matrix product is counted wherever it comes from: nn.Linear, but also torch.matmul / einsum /
bmm on the adjacency inside a graph convolution, attention products, and the products inside
nn.GRU/LSTM cells (FLOPs = 2 x MACs for each). It counts no elementwise work (activations,
gates, additions, normalisation). thop counts per nn.Module through forward hooks, one MAC per
multiply-add of the layers it has rules for (Linear, Conv, norms, activations, RNN cells); a
torch.matmul or einsum written in a forward() is not a module, so the graph propagation of
diffusion convolutions, adaptive-adjacency products and linearized attention is invisible to
thop. thop's `params` likewise only counts the parameters of modules it has a rule for: node
embeddings or adaptive-adjacency tensors held directly as nn.Parameter are missed. For a model
made only of Linear layers the two agree exactly (flops == 2 * thop macs, up to the bias adds
thop leaves out); graph models show flops > 2 * thop macs, and the gap is the graph matmuls.

Dynamic cost
    ResourceMonitor   wall time, peak GPU memory, peak process RSS above the starting level.

Graph difficulty
    difficulty_proxy  GraphTune-lite's structural proxy N * log(1 + mean degree).
    ha_difficulty     data-based: relative test error of the time-of-day historical average.

MB means 2**20 bytes throughout (what torch.cuda memory statistics and most tools print as MB).
"""

from __future__ import annotations

import copy
import math
import os
import threading
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, _FlopCounterMode

from graphtune.data.bundle import DatasetBundle
from graphtune.engine import EVAL_BATCH
from graphtune.errors import DataError, GraphTuneNotice
from graphtune.metrics import valid_mask

try:  # optional: psutil reads RSS portably; /proc/self/statm serves on Linux without it
    import psutil
except ImportError:  # pragma: no cover - depends on the environment
    psutil = None

MB = 2**20


# ----------------------------------------------------------------------------- static cost
def count_parameters(model: nn.Module) -> dict:
    """{"total", "trainable", "size_mb"}: parameter counts (shared tensors once) and the size in MB of
    parameters plus persistent buffers, i.e. of what the state_dict holds."""
    params = list(model.parameters())
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}  # shared tensors once
    return {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "size_mb": sum(t.numel() * t.element_size() for t in tensors.values()) / MB,
    }


def _as_args(example_inputs) -> tuple:
    return example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


class _CountingMode(_FlopCounterMode):
    """FlopCounterMode's own dispatch mode and formulas, without the lazy `import torch._dynamo` that its base
    class pays on the first dispatch of a process (about a second on 2 cores; dynamo guards compiled code,
    and nothing here is compiled). The counts are FlopCounterMode's, op for op (tested)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # so TorchDispatchMode does not wrap __torch_dispatch__ in torch._disable_dynamo

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _FlopCounterMode.__torch_dispatch__.__wrapped__(self, func, types, args, kwargs)


class FlopCounter(FlopCounterMode):
    """torch.utils.flop_counter.FlopCounterMode, counting through `_CountingMode`; same API and numbers."""

    def __enter__(self):
        self.flop_counts.clear()
        self.mod_tracker.__enter__()
        self.mode = _CountingMode(self)
        self.mode.__enter__()
        return self


def count_flops(model: nn.Module, example_inputs) -> dict:
    """{"flops", "macs"} of one forward pass on `example_inputs` (a tensor or a tuple of arguments),
    in eval mode without gradients. Only matrix products and convolutions are counted (see module doc)."""
    was_training = model.training
    model.eval()
    counter = FlopCounter(display=False)
    with torch.no_grad(), counter:
        model(*_as_args(example_inputs))
    model.train(was_training)
    flops = int(counter.get_total_flops())
    return {"flops": flops, "macs": flops // 2}  # FlopCounterMode counts a multiply-add as 2 FLOPs


def count_train_flops(model: nn.Module, example_inputs) -> int:
    """FLOPs of one training step's forward + backward on `example_inputs`, as the model's trainable set stands.

    Counted by FlopCounterMode like `count_flops`, so the backward's matrix products are included and
    frozen parameters cost no weight gradients: a strategy that trains less really counts less. Run in
    eval mode (dropout and teacher forcing change no matrix product) on a stand-in loss (the mean of
    the output); gradients are cleared afterwards, so the model is left as it was. 0 when nothing trains.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        return 0
    was_training = model.training
    model.eval()
    saved = [p.grad for p in trainable]
    counter = FlopCounter(display=False)
    try:
        with torch.enable_grad(), counter:
            model(*_as_args(example_inputs)).float().mean().backward()
    finally:
        for p, grad in zip(trainable, saved):
            p.grad = grad
        model.train(was_training)
    return int(counter.get_total_flops())


def thop_flops(model: nn.Module, example_inputs) -> dict | None:
    """{"macs", "params"} from thop.profile on a deep copy of `model` (the model itself is untouched).

    Returns None when thop is not installed, or (with a warning) when thop fails on this model:
    it is a cross-check, not a number anything depends on. Misses graph matmuls (see module doc).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # thop 0.1.1 still uses distutils' LooseVersion
            import thop

            macs, params = thop.profile(copy.deepcopy(model), inputs=_as_args(example_inputs), verbose=False)
    except ModuleNotFoundError:
        return None
    except Exception as exc:  # thop's hooks can trip over unusual modules; the primary count stands
        warnings.warn(f"thop could not profile {type(model).__name__}: {type(exc).__name__}: {exc}",
                      GraphTuneNotice, stacklevel=2)
        return None
    return {"macs": int(macs), "params": int(params)}


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def profile_model(model: nn.Module, bundle: DatasetBundle, batch_size: int = EVAL_BATCH, *, thop: bool = False) -> dict:
    """Static cost of `model` on `bundle`: parameters, size and forward FLOPs/MACs per batch.

    The batch is the first `batch_size` training windows (x of shape (B, T_in, N, C)), or validation
    windows when the bundle allows none for training (a zero-shot view). Keys: params_total,
    params_trainable, size_mb, batch_size, flops, macs (FlopCounterMode, per batch), train_flops (one
    training step's forward + backward, per batch, see `count_train_flops`), thop_macs, thop_params
    (the thop cross-check, only with `thop=True`: it deep-copies the model; None otherwise or without thop).
    """
    for split in ("train", "val", "test"):
        starts = bundle.window_starts(split)[:batch_size]
        if starts.numel():
            break
    else:
        raise DataError(f"{bundle.name}: no windows in any split to profile on")
    x, _ = bundle.batch(starts)  # (B, T_in, N, C)
    x = x.to(_model_device(model))
    params = count_parameters(model)
    flops = count_flops(model, (x,))
    train_flops = count_train_flops(model, (x,))
    thop_result = (thop_flops(model, (x,)) if thop else None) or {"macs": None, "params": None}
    return {
        "params_total": params["total"],
        "params_trainable": params["trainable"],
        "size_mb": params["size_mb"],
        "batch_size": int(starts.numel()),
        "flops": flops["flops"],
        "macs": flops["macs"],
        "train_flops": train_flops,
        "thop_macs": thop_result["macs"],
        "thop_params": thop_result["params"],
    }


# ----------------------------------------------------------------------------- dynamic cost
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int | None:
    """Resident set size of this process in bytes, or None where it cannot be read."""
    if psutil is not None:
        return psutil.Process().memory_info().rss  # not cached: stays right in a forked child
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE  # 2nd field: resident pages
    except OSError:
        return None


class ResourceMonitor:
    """Measure a block: wall time, peak GPU memory, peak process RSS above the level at entry.

        with ResourceMonitor(device) as mon:
            fit(...)
        mon.elapsed_s, mon.peak_rss_mb, mon.peak_gpu_mb

    - elapsed_s: wall time; on CUDA the device is synchronized before both clock reads.
    - peak_gpu_mb: torch.cuda.max_memory_allocated after resetting the peak at entry, so the peak of
      this block (absolute: it includes tensors that already existed, e.g. the model). None when the
      device is not CUDA: there is no GPU memory to measure.
    - peak_rss_mb: a background thread samples the process RSS every `interval_s`; the result is the
      highest sample minus the RSS at entry (never negative). This is what a CPU run costs in memory;
      memory the allocator reuses from before the block is invisible to it. None if RSS can't be read.
    """

    def __init__(self, device=None,
                 interval_s: float = 0.01):  # 10 ms catches short-lived peaks; one sample costs ~20 us
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.elapsed_s = 0.0
        self.peak_rss_mb: float | None = None
        self.peak_gpu_mb: float | None = None

    def __enter__(self) -> "ResourceMonitor":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start_rss = _rss_bytes()
        self._peak_rss = self._start_rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="graphtune-rss-sampler", daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample_once()

    def __exit__(self, *exc) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.elapsed_s = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self._sample_once()
        if self._start_rss is not None:
            self.peak_rss_mb = max(0, self._peak_rss - self._start_rss) / MB
        if self.device.type == "cuda":
            self.peak_gpu_mb = torch.cuda.max_memory_allocated(self.device) / MB
        return False  # exceptions propagate

    def _sample_once(self) -> None:
        rss = _rss_bytes()
        if rss is not None and self._peak_rss is not None:
            self._peak_rss = max(self._peak_rss, rss)

    def as_dict(self) -> dict:
        return {"time_s": self.elapsed_s, "peak_rss_mb": self.peak_rss_mb, "peak_gpu_mb": self.peak_gpu_mb}


# ----------------------------------------------------------------------------- graph difficulty
def difficulty_proxy(adj) -> float:
    """GraphTune-lite's structural difficulty: N * log(1 + mean degree).

    adj: (N, N) weighted adjacency (numpy or torch). Degree of a node = number of nonzero
    off-diagonal entries in its row (its out-neighbours; self-loops do not count, weights do not
    matter). On a directed graph the mean out-degree equals the mean in-degree (both are
    edges / N), so the choice of rows over columns does not change the result. Natural log.
    """
    adj = np.asarray(adj.detach().cpu() if isinstance(adj, torch.Tensor) else adj)
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1]:
        raise ValueError(f"adjacency must be square (N, N), got shape {adj.shape}")
    n = adj.shape[0]
    off_diagonal = (adj != 0) & ~np.eye(n, dtype=bool)
    mean_degree = off_diagonal.sum() / n if n else 0.0
    return float(n * math.log1p(mean_degree))


def ha_difficulty(bundle: DatasetBundle) -> float:
    """Data-based difficulty: test MAE of the time-of-day historical average / mean test reading.

    The historical average predicts each (time-of-day slot, node) by the mean of its observed
    training readings (falling back to the node's training mean, then the global one, for slots
    never observed). Errors are taken over every observed reading of the test split (each time
    step once, not per window), with the metrics' missing-value mask. Dividing by the mean observed
    test reading makes it unit-free, so a speed city and a flow city compare: 0.1 means the best
    purely periodic forecast is off by 10 % of a typical reading; higher is harder.
    """
    spd = bundle.steps_per_day
    slot = torch.round(bundle.time_features[:, 0].double() * spd).long() % spd  # (T,) time-of-day index
    target = bundle.target.double()  # (T, N) raw, NaN = missing
    lo, hi = bundle.splits["train"]
    train, train_mask = target[lo:hi], valid_mask(target[lo:hi], bundle.null_value)
    sums = torch.zeros(spd, bundle.num_nodes, dtype=torch.float64)
    sums.index_add_(0, slot[lo:hi], torch.where(train_mask, train, 0.0))
    counts = torch.zeros_like(sums).index_add_(0, slot[lo:hi], train_mask.double())
    node_mean = sums.sum(0) / counts.sum(0)  # (N,), NaN for a node never observed in training
    node_mean = torch.nan_to_num(node_mean, nan=bundle.scaler.mean)
    history = torch.where(counts > 0, sums / counts, node_mean)  # (steps_per_day, N)
    lo, hi = bundle.splits["test"]
    test, test_mask = target[lo:hi], valid_mask(target[lo:hi], bundle.null_value)
    if not test_mask.any():
        raise DataError(f"{bundle.name}: the test split has no observed readings to measure difficulty on")
    errors = (history[slot[lo:hi]] - test).abs()[test_mask]
    return float(errors.mean() / test[test_mask].abs().mean())


def graph_difficulty(bundle: DatasetBundle) -> dict:
    """Both difficulty measures of a bundle: {"difficulty_proxy", "difficulty_ha"}."""
    return {"difficulty_proxy": difficulty_proxy(bundle.adj), "difficulty_ha": ha_difficulty(bundle)}


def profile_models(bundle: DatasetBundle, target: DatasetBundle | None = None, names=None,
                   batch_size: int = EVAL_BATCH, seed: int = 0) -> list[dict]:
    """Build every registered model (or `names`) for `bundle`: parameters, FLOPs per batch, thop cross-check,
    and the share of parameters that `load_partial_state` transfers to the same model built for `target`."""
    from graphtune.models import build_model, list_models
    from graphtune.transfer.state import load_partial_state

    rows = []
    for name in names or list_models():
        torch.manual_seed(seed)
        model = build_model(name, bundle)
        prof = profile_model(model, bundle, batch_size=batch_size, thop=True)
        row = {"model": name, **prof}
        if target is not None:
            other = build_model(name, target)
            row["transfer_share"] = load_partial_state(other, model.state_dict(),
                                                       same_nodes=target.sensor_ids == bundle.sensor_ids).share
        rows.append(row)
    return rows
