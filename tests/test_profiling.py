import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from graphtune.data.bundle import DatasetBundle, Scaler
from graphtune import profiling
from graphtune.data.synthetic import synthetic_bundle
from graphtune.profiling import (
    ResourceMonitor,
    count_flops,
    count_parameters,
    difficulty_proxy,
    graph_difficulty,
    ha_difficulty,
    profile_model,
    thop_flops,
)

NAN = math.nan


class HandBuilt(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(3, 4)  # 12 + 4 = 16 trainable
        self.again = self.shared  # the same module twice: counted once
        self.frozen = nn.Parameter(torch.zeros(5), requires_grad=False)  # 5, not trainable
        self.register_buffer("stats", torch.zeros(10))  # persistent: in the size
        self.register_buffer("stats64", torch.zeros(2, dtype=torch.float64))  # 16 bytes
        self.register_buffer("scratch", torch.zeros(100), persistent=False)  # not in the size


class GraphLayer(nn.Module):
    """A Linear followed by propagation over a fixed adjacency with einsum (invisible to thop)."""

    def __init__(self, n=5, c=8):
        super().__init__()
        self.lin = nn.Linear(c, c)
        self.node_emb = nn.Parameter(torch.randn(n, 3))  # a bare Parameter: thop misses it too
        self.register_buffer("adj", torch.rand(n, n))

    def forward(self, x):  # (B, T, N, C)
        return torch.einsum("nm,btmc->btnc", self.adj, self.lin(x))


class LinearOverTime(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 12)

    def forward(self, x):  # (B, T_in, N, C) -> (B, T_out, N)
        return self.proj(x[..., 0].transpose(1, 2)).transpose(1, 2)


def test_count_parameters_exact():
    stats = count_parameters(HandBuilt())
    assert stats["total"] == 21 and stats["trainable"] == 16
    assert stats["size_mb"] == (21 * 4 + 10 * 4 + 2 * 8) / 2**20


def test_flops_of_a_linear_are_2_b_in_out():
    b, d_in, d_out = 5, 4, 3
    assert count_flops(nn.Linear(d_in, d_out), torch.randn(b, d_in)) == {"flops": 2 * b * d_in * d_out, "macs": 60}
    assert count_flops(nn.Linear(7, 2), (torch.randn(3, 4, 7),))["flops"] == 2 * 3 * 4 * 7 * 2


def test_count_flops_restores_training_mode():
    model = nn.Linear(2, 2).train()
    count_flops(model, torch.randn(1, 2))
    assert model.training


def test_thop_runs_on_a_copy():
    model = GraphLayer()
    keys = list(model.state_dict())
    result = thop_flops(model, torch.randn(2, 4, 5, 8))
    assert list(model.state_dict()) == keys  # no total_ops / total_params buffers left behind
    assert result == {"macs": 2 * 4 * 5 * 8 * 8, "params": 8 * 8 + 8}  # the Linear only


def test_thop_failure_is_a_warning_not_an_error():
    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            if hasattr(self.lin, "total_ops"):  # only thop adds this buffer
                raise RuntimeError("no thop here")
            return self.lin(x)

    with pytest.warns(UserWarning, match="thop could not profile Picky: RuntimeError: no thop here"):
        assert thop_flops(Picky(), torch.randn(1, 2)) is None
    assert count_flops(Picky(), torch.randn(1, 2))["flops"] == 8


def test_flop_counter_sees_the_graph_matmul_thop_misses():
    x = torch.randn(2, 4, 5, 8)
    model = GraphLayer()
    flops = count_flops(model, x)["flops"]
    linear, propagation = 2 * 2 * 4 * 5 * 8 * 8, 2 * 2 * 4 * 5 * 5 * 8
    assert flops == linear + propagation
    assert flops - 2 * thop_flops(model, x)["macs"] == propagation


def test_profile_model_on_a_bundle():
    bundle = synthetic_bundle(num_nodes=6, num_steps=300, seed=0)
    stats = profile_model(LinearOverTime(), bundle, batch_size=16, thop=True)
    assert stats["batch_size"] == 16
    assert (stats["params_total"], stats["params_trainable"]) == (156, 156)
    assert stats["flops"] == 2 * 16 * 6 * 12 * 12 and stats["macs"] == 16 * 6 * 12 * 12
    assert stats["thop_macs"] == stats["macs"] and stats["thop_params"] == 156
    # a training step: the forward, and in the backward the weight gradient (the input needs none)
    assert stats["train_flops"] == 2 * stats["flops"]
    assert profile_model(LinearOverTime(), bundle, batch_size=16)["thop_macs"] is None  # thop only when asked


_MONITOR_SCRIPT = """
import time
import numpy as np
from graphtune.profiling import ResourceMonitor
with ResourceMonitor("cpu") as mon:
    block = np.ones(50_000_000, dtype=np.float32)  # 200 MB, written so the pages are resident
    time.sleep(0.05)
first = (mon.peak_rss_mb, mon.peak_gpu_mb, mon.elapsed_s)
del block
with ResourceMonitor("cpu") as mon:  # freed before the block ends: only the sampler can see it
    block = np.ones(50_000_000, dtype=np.float32)
    time.sleep(0.5)  # long enough for the sampler thread to run even when other processes load every core
    del block
print(*first, mon.peak_rss_mb, mon.as_dict()["time_s"] == mon.elapsed_s)
"""


def test_resource_monitor_sees_a_200_mb_block_on_cpu():
    # In a fresh process: inside the test suite, memory earlier tests freed can be handed out again without new
    # resident pages (seen on full-suite runs), so the RSS difference would not show the block.
    out = subprocess.run([sys.executable, "-c", _MONITOR_SCRIPT], capture_output=True, text=True, check=True)
    peak1, gpu, elapsed, peak2, same_time = out.stdout.split()
    assert float(peak1) > 150
    assert gpu == "None"  # no CUDA device measured
    assert float(elapsed) >= 0.05
    assert float(peak2) > 150
    assert same_time == "True"


def test_rss_fallback_reads_proc_statm(monkeypatch):
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("no /proc on this platform")
    with_psutil = profiling._rss_bytes()
    monkeypatch.setattr(profiling, "psutil", None)
    without = profiling._rss_bytes()
    assert without > 0 and abs(without - with_psutil) < 50 * 2**20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resource_monitor_gpu_peak():
    with ResourceMonitor("cuda") as mon:
        block = torch.ones(50_000_000, device="cuda")
        del block
    assert mon.peak_gpu_mb >= 190


def test_difficulty_proxy_on_a_three_node_graph():
    adj = np.array([[1.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.0, 1.0]], dtype=np.float32)
    # off-diagonal nonzeros per row: 1, 2, 0 -> mean degree 1; self-loops and weights don't count
    assert difficulty_proxy(adj) == pytest.approx(3 * math.log(2))
    assert difficulty_proxy(torch.from_numpy(adj)) == pytest.approx(3 * math.log(2))
    assert difficulty_proxy(np.eye(4)) == 0.0


def _hand_bundle():
    # 4 days at 6-hour steps (4 time-of-day slots per day), 3 nodes; train = days 1-2, val = day 3, test = day 4
    train = [
        [10, NAN, NAN], [20, 5, NAN], [30, 5, NAN], [40, NAN, NAN],  # day 1
        [12, 5, NAN], [22, 5, NAN], [32, 5, NAN], [42, NAN, NAN],  # day 2
    ]
    val = [[1, 1, 1]] * 4
    test = [[11, 5, 50], [21, 0, 50], [31, 7, 50], [45, 6, 50]]  # node 1 slot 1 reads 0 = missing
    target = torch.tensor(train + val + test, dtype=torch.float32)
    steps = torch.arange(16)
    return DatasetBundle(
        name="hand", values=torch.zeros(16, 3), target=target,
        time_features=torch.stack([(steps % 4) / 4.0, (steps // 4).float()], dim=1),
        adj=np.eye(3, dtype=np.float32), sensor_ids=["a", "b", "c"], interval_minutes=360.0,
        splits={"train": (0, 8), "val": (8, 12), "test": (12, 16)}, scaler=Scaler(mean=20.0, std=10.0),
        t_in=1, t_out=1,
    )


def test_ha_difficulty_hand_computed():
    # node 0: history [11, 21, 31, 41], test errors 0 0 0 4
    # node 1: history [5, 5, 5, node mean 5] (slot 3 never observed), test errors 0, -, 2, 1
    # node 2: never observed in training -> the scaler mean 20, test errors 30 x 4
    # MAE = 127 / 11 observed readings; mean reading = 326 / 11
    assert ha_difficulty(_hand_bundle()) == pytest.approx(127 / 326)


def test_graph_difficulty_has_both_measures():
    bundle = _hand_bundle()
    assert graph_difficulty(bundle) == pytest.approx({"difficulty_proxy": 0.0, "difficulty_ha": 127 / 326})


@pytest.mark.parametrize("name", ["baseline", "bigst", "dcrnn", "dgcrn", "gwnet", "hypernet"])
def test_flop_counter_counts_as_torchs_flop_counter_mode(name):
    """GraphTune's FlopCounter reuses FlopCounterMode's formulas without its dynamo import: same numbers."""
    from torch.utils.flop_counter import FlopCounterMode

    from graphtune.models import build_model
    from graphtune.profiling import count_train_flops

    bundle = synthetic_bundle(num_nodes=7, num_steps=200, seed=0)
    kwargs = {"dgcrn": {"hidden": 4}, "dcrnn": {"hidden": 4}}.get(name, {})
    model = build_model(name, bundle, **kwargs)
    x, _ = bundle.batch(bundle.window_starts("train")[:4])
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as reference:
        model(x)
    assert count_flops(model, (x,))["flops"] == reference.get_total_flops() > 0
    with FlopCounterMode(display=False) as reference:
        model(x).float().mean().backward()
    model.zero_grad(set_to_none=True)
    assert count_train_flops(model, (x,)) == reference.get_total_flops()


def test_counting_flops_does_not_load_torch_dynamo():
    code = ("import sys, torch; from graphtune.profiling import count_flops; "
            "count_flops(torch.nn.Linear(3, 2), (torch.ones(4, 3),)); print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False", done.stderr
