"""Data-free compression: PA-DFCR's schedule, LBYL's compensation (derivation and upstream's variant),
the surgery on declared groups, and strict rebuilds. All weights here are synthetic (seeded random)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from graphtune.compression.groups import PruneGroup
from graphtune.compression.lbyl import BatchNormStats, scales_bn, scales_plain
from graphtune.compression.prune import CompressSettings, compress, groups_of, prune_group
from graphtune.compression.schedule import (cumulative_rate, format_ratio, per_round_rate, schedule, width_after)
from graphtune.errors import ConfigError


# ---------------------------------------------------------------- schedule

@pytest.mark.parametrize("ratio", [0.1, 0.29, 0.5, 0.5000000000000004, 0.7, 0.9, 0.95])
def test_schedule_reaches_the_ratio_and_rounds_widths(ratio):
    for k in range(1, 51):
        p = per_round_rate(ratio, k)
        assert abs((1 - p) ** k - (1 - ratio)) < 1e-12
        for n0 in (7, 64, 100, 300, 512):
            widths = [width_after(n0, ratio, k, t) for t in range(0, k + 1)]
            assert widths[0] == n0
            assert widths[-1] == max(1, round(n0 * (1 - ratio)))
            assert all(a >= b for a, b in zip(widths, widths[1:]))  # never grows back


def test_upstream_floor_bug_is_not_copied():
    assert int(512 * (1 - 0.5000000000000004)) == 255  # upstream's width
    assert width_after(512, 0.5000000000000004, 1, 1) == 256
    assert format_ratio(0.29) == "0.29" and int(0.29 * 100) == 28  # upstream names this file 28
    assert format_ratio(0.5) == "0.5" and format_ratio(0.125) == "0.125"


def test_lambdas_follow_the_cumulative_rate_from_round_two():
    rounds = schedule(0.9, 5, 0.1, 0.2)
    assert (rounds[0].lambda1, rounds[0].lambda2) == (0.1, 0.2)
    for r in rounds[1:]:
        assert r.lambda1 == pytest.approx(0.1 * math.exp(0.2 * r.cumulative))
        assert r.lambda2 == pytest.approx(0.2 * math.exp(-0.1 * r.cumulative))
    assert rounds[-1].cumulative == 0.9
    assert cumulative_rate(0.9, 5, 2) == pytest.approx(1 - (1 - per_round_rate(0.9, 5)) ** 2)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "half", True])
def test_bad_ratio_is_one_line(bad):
    with pytest.raises(ConfigError, match=r"compress\.ratio: expected a compression ratio in \[0, 1\)"):
        CompressSettings(ratio=bad).check()


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_bad_rounds_is_one_line(bad):
    with pytest.raises(ConfigError, match=r"compress\.rounds: expected a whole number of rounds >= 1"):
        CompressSettings(rounds=bad).check()


# ---------------------------------------------------------------- compensation math

def _consistent_bn(rng, n, kept, i, t):
    """BN stats over n channels whose offsets c satisfy c_i = c_J . t (the pruned channel's offset agrees)."""
    gamma = rng.uniform(0.5, 2.0, n)
    beta = rng.normal(0, 0.5, n)
    sigma = rng.uniform(0.5, 2.0, n)
    mu = rng.normal(0, 1.0, n)
    c = mu - sigma * beta / gamma
    mu[i] = float(c[kept] @ t) + sigma[i] * beta[i] / gamma[i]
    return BatchNormStats(gamma, beta, mu, sigma)


def test_bn_compensation_reconstructs_an_exact_combination():
    rng = np.random.default_rng(0)
    n, d = 8, 30
    w = rng.normal(size=(n, d))
    kept, i = np.array([0, 2, 3, 5, 6]), 4
    t = rng.normal(size=len(kept))
    w[i] = t @ w[kept]
    bn = _consistent_bn(rng, n, kept, i, t)
    s = scales_bn(w, kept, np.array([i]), bn, lambda1=1.0, lambda2=1e-12)
    k = (bn.gamma[i] * bn.sigma[kept]) / (bn.gamma[kept] * bn.sigma[i])
    np.testing.assert_allclose(s[0], k * t, atol=1e-5)
    # ... so the BN outputs (pre-activations) agree: a_i = sum_j s_ij a_j for any input
    x = rng.normal(size=(d, 50))
    a = (bn.gamma[:, None] / bn.sigma[:, None]) * (w @ x - bn.mu[:, None]) + bn.beta[:, None]
    np.testing.assert_allclose(a[i], s[0] @ a[kept], atol=1e-5)


def test_plain_compensation_reconstructs_an_exact_combination():
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(6, 21))  # [w | b]
    kept, i = np.array([0, 1, 3, 5]), 2
    t = rng.normal(size=len(kept))
    rows[i] = t @ rows[kept]
    s = scales_plain(rows, kept, np.array([i]), lambda2=1e-12)
    np.testing.assert_allclose(s[0], t, atol=1e-5)


def _upstream_reference(w, kept, i, gamma, beta, mean, var, lam1, lam2):
    """NumPy re-implementation of upstream's Ridge_Regression._solve_cholesky as its LBYL.py calls it
    (sigma = running_var; (c^T c) added to the diagonal; t returned as is), solved with lstsq."""
    x = w[kept].T
    alpha_scale = np.array([mean[j] - var[j] * beta[j] / gamma[j] for j in kept])
    k_scale = np.array([(gamma[i] / gamma[j]) * (var[j] / var[i]) for j in kept]) ** 2
    a = x.T @ x
    xy = x.T @ w[i] + (lam1 * gamma[i] / var[i]) * ((gamma[i] * mean[i] / var[i]) - beta[i]) * alpha_scale
    a.flat[:: len(kept) + 1] += lam1 * (gamma[i] / var[i]) ** 2 * (alpha_scale @ alpha_scale) + lam2 * k_scale
    return np.linalg.lstsq(a, xy, rcond=None)[0]


def test_reference_variant_matches_upstream_reimplementation():
    rng = np.random.default_rng(2)
    n, d = 10, 12
    bn = nn.BatchNorm1d(n)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.3, 3.0)
    w = rng.normal(size=(n, d))
    kept, pruned = np.array([0, 1, 4, 5, 7, 9]), np.array([2, 3, 6, 8])
    s = scales_bn(w, kept, pruned, BatchNormStats.of(bn, "reference"), 0.3, 0.05, variant="reference")
    g, b = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    m, v = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    for row, i in enumerate(pruned):
        np.testing.assert_allclose(s[row], _upstream_reference(w, kept, i, g, b, m, v, 0.3, 0.05), rtol=1e-9)
    # ... and the derivation differs from it (c c^T, sqrt(var + eps), K * t)
    derived = scales_bn(w, kept, pruned, BatchNormStats.of(bn), 0.3, 0.05)
    assert not np.allclose(derived, s, rtol=1e-3)


# ---------------------------------------------------------------- surgery on a network

class _MLP(nn.Module):
    """fc1 -> ReLU -> fc2 -> [BN] -> ReLU -> fc3."""

    def __init__(self, widths=(8, 6), bn=False):
        super().__init__()
        self.config = {"widths": list(widths), "bn": bn}
        self.fc1 = nn.Linear(20, widths[0])
        self.fc2 = nn.Linear(widths[0], widths[1], bias=not bn)
        self.bn = nn.BatchNorm1d(widths[1]) if bn else nn.Identity()
        self.fc3 = nn.Linear(widths[1], 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.bn(self.fc2(torch.relu(self.fc1(x))))))

    def prunable_groups(self):
        return [PruneGroup("fc1", "widths.0", ("fc1",), ("fc2",)),
                PruneGroup("fc2", "widths.1", ("fc2",), ("fc3",), norm="bn" if self.config["bn"] else None)]


def test_zero_pruned_channels_is_a_bitwise_no_op():
    net = _MLP(bn=True)
    before = copy.deepcopy(net.state_dict())
    config = copy.deepcopy(net.config)
    compress(net, config, CompressSettings(ratio=0.0, rounds=3))
    assert config == net.config
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_lbyl_restores_a_pruned_neuron_that_duplicates_a_kept_one():
    torch.manual_seed(0)
    net = _MLP(widths=(8, 6))
    with torch.no_grad():  # fc1 neuron 3 = 0.5 x neuron 5 (weights and bias), and the smallest row
        net.fc1.weight[[0, 1, 2, 4, 5, 6, 7]] *= 3
        net.fc1.bias[[0, 1, 2, 4, 5, 6, 7]] *= 3
        net.fc1.weight[3] = 0.5 * net.fc1.weight[5]
        net.fc1.bias[3] = 0.5 * net.fc1.bias[5]
    x = torch.randn(64, 20)
    reference = net(x)
    group = net.prunable_groups()[0]
    restored, dropped = copy.deepcopy(net), copy.deepcopy(net)
    prune_group(restored, group, 7, method="lbyl", lambda2=1e-12)
    prune_group(dropped, group, 7, method="prune-only")
    assert restored.fc1.out_features == 7 and restored.fc2.in_features == 7
    torch.testing.assert_close(restored(x), reference, atol=1e-5, rtol=0)
    assert (dropped(x) - reference).abs().max() > 1e-3


def test_lbyl_restores_through_batchnorm():
    torch.manual_seed(1)
    net = _MLP(widths=(8, 6), bn=True).eval()
    with torch.no_grad():  # fc2 channel 2 = 0.5 x channel 4, with BN offsets that agree: a_2 = K t a_4
        net.fc2.weight[[0, 1, 3, 4, 5]] *= 3
        net.fc2.weight[2] = 0.5 * net.fc2.weight[4]
        net.bn.weight.uniform_(0.5, 2.0)
        net.bn.bias.normal_(0, 0.3)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.running_mean.normal_()
        g, b, v = net.bn.weight, net.bn.bias, net.bn.running_var
        sigma = torch.sqrt(v + net.bn.eps)
        c4 = net.bn.running_mean[4] - sigma[4] * b[4] / g[4]
        net.bn.running_mean[2] = 0.5 * c4 + sigma[2] * b[2] / g[2]
    x = torch.randn(64, 20)
    reference = net(x)
    group = net.prunable_groups()[1]
    prune_group(net, group, 5, method="lbyl", lambda1=1.0, lambda2=1e-12)
    assert net.bn.num_features == 5 and net.fc3.in_features == 5
    torch.testing.assert_close(net(x), reference, atol=1e-5, rtol=0)


def test_compress_updates_the_config_each_round():
    net = _MLP(widths=(30, 20))
    config = copy.deepcopy(net.config)
    seen = []
    compress(net, config, CompressSettings(ratio=0.5, rounds=3), on_round=lambda r: seen.append(r.widths))
    assert seen[-1] == {"fc1": 15, "fc2": 10} and config["widths"] == [15, 10]
    assert [s["fc1"] for s in seen] == [width_after(30, 0.5, 3, t) for t in (1, 2, 3)]
    rebuilt = _MLP(widths=config["widths"])
    rebuilt.load_state_dict(net.state_dict(), strict=True)


def test_a_model_without_groups_is_refused():
    from graphtune.data.synthetic import synthetic_bundle
    from graphtune.models import build_model

    model = build_model("baseline", synthetic_bundle(num_nodes=5, num_steps=200, seed=0))
    with pytest.raises(ConfigError, match="declares no prunable group"):
        groups_of(model, "model 'baseline'")


def test_graph_wavenet_prunes_and_rebuilds_strictly(tmp_path):
    from graphtune.compression.checkpoint import load_compressed, save_compressed
    from graphtune.data.synthetic import synthetic_bundle
    from graphtune.errors import DataError
    from graphtune.models import build_model

    bundle = synthetic_bundle(num_nodes=6, num_steps=300, seed=0)
    config = {"residual_channels": 8, "dilation_channels": 8, "skip_channels": 16, "end_channels": 32}
    torch.manual_seed(0)
    model = build_model("gwnet", bundle, **config).eval()
    x = torch.randn(2, bundle.t_in, 6, 3)
    x[..., 1] = 0.3
    compress(model, config, CompressSettings(ratio=0.5, rounds=2))
    assert (config["skip_channels"], config["end_channels"]) == (8, 16)
    assert model.end_conv_1.in_features == 8 and all(c.out_features == 8 for c in model.skip_convs)
    path = save_compressed(tmp_path / "model.pt", kind="model", name="gwnet", config=config,
                           state=model.state_dict())

    def build(kind, name, cfg):
        torch.manual_seed(1)
        return build_model(name, bundle, **cfg).eval()

    rebuilt, _ = load_compressed(path, build)
    torch.testing.assert_close(rebuilt(x), model(x))
    bad = dict(config, end_channels=17)
    save_compressed(tmp_path / "bad.pt", kind="model", name="gwnet", config=bad, state=model.state_dict())
    with pytest.raises(DataError, match=r"bad\.pt: shapes do not match its config: end_conv_1\.weight"):
        load_compressed(tmp_path / "bad.pt", build)
