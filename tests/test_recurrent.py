"""The recurrent seq2seq models (DCRNN, DGCRN): shapes, gradients, teacher forcing, scheduled sampling,
transferability of the weights and a short overfit, on tiny SYNTHETIC bundles."""

from __future__ import annotations

import math

import pytest
import torch

from graphtune.data.synthetic import synthetic_bundle
from graphtune.models.dcrnn import diffuse
from graphtune.models.seq2seq import teacher_forcing_probability
from graphtune.models.dgcrn import MIX_WEIGHTS, future_time_of_day
from graphtune.models.layers import propagate, random_walk_supports
from graphtune.models.registry import build_model
from graphtune.transfer.state import transferable_share

MODELS = ["dcrnn", "dgcrn"]
NODE_COUNTS = [7, 11]


def scaled_batch(bundle, size: int = 3):
    """The first `size` training windows: x (B, T_in, N, 3) and scaled targets (B, T_out, N)."""
    x, y = bundle.batch(bundle.window_starts("train")[:size])
    return x, bundle.scaler.transform(y)


def masked_mae(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    mask = ~torch.isnan(target)
    return (prediction[mask] - target[mask]).abs().mean()


@pytest.fixture(scope="module", params=NODE_COUNTS, ids=lambda n: f"N{n}")
def bundle(request):
    # short windows (T_in != T_out, so the output length is checked) keep the recurrences cheap
    return synthetic_bundle(num_nodes=request.param, num_steps=200, seed=request.param, t_in=5, t_out=4)


@pytest.mark.parametrize("name", MODELS)
def test_decoder_length_follows_t_out_and_gradients_are_finite(name, bundle):
    """tests/test_models.py covers T_in = T_out = 12; here T_in = 5, T_out = 4 and teacher forcing is on."""
    torch.manual_seed(0)
    model = build_model(name, bundle).train()
    x, y = scaled_batch(bundle, size=3)
    out = model(x, y)
    assert out.shape == (3, 4, bundle.num_nodes)
    assert torch.isfinite(out).all()
    masked_mae(out, y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", MODELS)
def test_teacher_forcing_only_in_training(name, bundle):
    torch.manual_seed(0)
    model = build_model(name, bundle)
    x, y = scaled_batch(bundle, size=2)

    def run(targets):
        torch.manual_seed(123)  # same coin flips for both runs
        model.batches_seen = 0  # p(teacher) = k / (k + 1): nearly every step is teacher-forced
        with torch.no_grad():
            return model(x, targets)

    model.train()
    forced, free = run(y), run(None)
    assert not torch.equal(forced, free)
    assert torch.equal(forced[:, 0], free[:, 0])  # the first step always starts from the GO symbol
    model.eval()
    assert torch.equal(run(y), run(None))
    assert torch.equal(run(None), free)  # no dropout: free running in train mode is the eval output


@pytest.mark.parametrize("name", MODELS)
def test_missing_targets_are_fed_as_zero(name, bundle):
    torch.manual_seed(0)
    model = build_model(name, bundle).train()
    x, y = scaled_batch(bundle, size=2)
    outputs = []
    for targets in (torch.full_like(y, float("nan")), torch.zeros_like(y)):
        torch.manual_seed(7)
        model.batches_seen = 0
        with torch.no_grad():
            outputs.append(model(x, targets))
    assert torch.isfinite(outputs[0]).all()
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("name", MODELS)
def test_batches_seen_counts_training_forwards_only(name, bundle):
    model = build_model(name, bundle, cl_decay_steps=100.0)
    x, y = scaled_batch(bundle, size=1)
    assert model.batches_seen == 0
    assert model.teacher_forcing_probability() == pytest.approx(100 / 101, rel=1e-12)
    model.train()
    with torch.no_grad():
        model(x, y)
        model(x)  # a training forward without targets still counts
    model.eval()
    with torch.no_grad():
        model(x, y)
    assert model.batches_seen == 2
    assert "batches_seen" not in model.state_dict()  # a plain attribute, not a parameter or persistent buffer
    assert model.teacher_forcing_probability() == pytest.approx(100 / (100 + math.exp(0.02)), rel=1e-12)


@pytest.mark.parametrize(
    "batches_seen, decay_steps, expected",
    [
        (0, 100, 0.9900990099009901),  # 100 / 101
        (100, 100, 0.9735365333213165),  # 100 / (100 + e)
        (460, 100, 0.5012925436177946),  # about k ln k: one half
        (1000, 100, 0.004519474593338395),
        (2000, 2000, 0.9986427038425109),  # the paper's k after one k of batches
        (0, 1, 0.5),
        (10**9, 100, 0.0),  # exp would overflow; the probability is 0
    ],
)
def test_teacher_forcing_probability_inverse_sigmoid(batches_seen, decay_steps, expected):
    assert teacher_forcing_probability(batches_seen, decay_steps) == pytest.approx(expected, rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("num_nodes", [207, 325])  # METR-LA and PEMS-BAY sizes
def test_default_weights_are_mostly_node_independent(name, num_nodes):
    model = build_model(name, synthetic_bundle(num_nodes=num_nodes, num_steps=60))
    assert transferable_share(model) >= 0.9
    assert "node_supports" not in model.state_dict()  # derived from the graph: rebuilt, never saved


def test_dcrnn_has_no_node_specific_parameter():
    model = build_model("dcrnn", synthetic_bundle(num_nodes=7, num_steps=100))
    assert transferable_share(model) == 1.0


def test_dgcrn_node_parameters_are_the_two_embeddings():
    model = build_model("dgcrn", synthetic_bundle(num_nodes=7, num_steps=100), node_dim=5)
    per_node = {name: tuple(p.shape) for name, p in model.named_parameters() if "node_" in name}
    assert per_node == {"node_emb_source": (7, 5), "node_emb_target": (7, 5)}


def test_diffuse_matches_random_walk_powers():
    bundle = synthetic_bundle(num_nodes=7, num_steps=100)
    supports = random_walk_supports(bundle.adj)
    supports_t = torch.stack([p.t() for p in supports])
    torch.manual_seed(0)
    z = torch.randn(7, 2, 3)  # (N, B, F)
    out = diffuse(z, supports_t, steps=2)  # (N, B, 5 * F)
    by_batch = z.transpose(0, 1)  # (B, N, F) for layers.propagate
    expected = [by_batch]
    for p in supports:
        once = propagate(by_batch, p)
        expected += [once, propagate(once, p)]
    expected = torch.cat(expected, dim=-1).transpose(0, 1)
    assert out.shape == (7, 2, 15)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_dgcrn_dynamic_graph_is_nonnegative_and_one_directional():
    bundle = synthetic_bundle(num_nodes=7, num_steps=100)
    torch.manual_seed(0)
    model = build_model("dgcrn", bundle, hidden=8)
    x, _ = scaled_batch(bundle, size=2)
    h = torch.randn(2, 7, 8)
    with torch.no_grad():
        adj = model.encoder.dynamic_graph(x[:, 0, :, :2], h, model.node_emb_source, model.node_emb_target,
                                          model.node_supports)
    assert adj.shape == (2, 7, 7)
    assert (adj >= 0).all() and (adj <= 1).all()
    assert (adj * adj.transpose(1, 2)).abs().max() == 0  # never both v -> w and w -> v
    assert (adj > 0).any()


def test_dgcrn_hop_matches_the_reference_formula():
    """H' = a z + b * einsum('nvc,nvw->nwc', H, rownorm(A + I)) + g * einsum('nvc,vw->nwc', H, P), per direction."""
    torch.manual_seed(0)
    model = build_model("dgcrn", synthetic_bundle(num_nodes=6, num_steps=100))
    cell = model.encoder
    a, b, g = MIX_WEIGHTS
    adj = torch.relu(torch.randn(2, 6, 6))  # (B, N, N)
    z = torch.randn(2, 6, 3)  # (B, N, F)
    supports = model.node_supports.transpose(1, 2)  # back to the row-stochastic P_f, P_b
    for direction, (graph, support) in enumerate([(adj, supports[0]), (adj.transpose(1, 2), supports[1])]):
        dense = graph + torch.eye(6)
        dense = dense / dense.sum(dim=-1, keepdim=True)  # the reference's preprocessing
        expected, h = [z], z
        for _ in range(2):
            h = a * z + b * torch.einsum("nvc,nvw->nwc", h, dense) + g * torch.einsum("nvc,vw->nwc", h, support)
            expected.append(h)
        if direction == 0:
            args = (adj.transpose(1, 2), 1.0 / (adj.sum(dim=2, keepdim=True) + 1.0), model.node_supports[0])
        else:
            args = (adj, 1.0 / (adj.sum(dim=1).unsqueeze(-1) + 1.0), model.node_supports[1])
        for got, want in zip(cell._mix_terms(z, *args), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_future_time_of_day_wraps_at_midnight():
    last = torch.tensor([286 / 288, 0.5])  # 23:50 and 12:00
    tod = future_time_of_day(last, 3, 288)  # (3, 2)
    expected = torch.tensor([[287 / 288, 145 / 288], [0.0, 146 / 288], [1 / 288, 147 / 288]])
    assert tod.shape == (3, 2)
    gap = (tod - expected).abs()
    assert torch.minimum(gap, 1 - gap).max() < 1e-6  # distance on the daily circle: 1.0 and 0.0 are both midnight
    assert ((tod >= 0) & (tod < 1)).all()


@pytest.mark.parametrize("name", MODELS)
def test_overfits_a_tiny_batch(name):
    bundle = synthetic_bundle(num_nodes=5, num_steps=120, seed=3, t_in=4, t_out=3)
    torch.manual_seed(0)
    model = build_model(name, bundle, hidden=8)
    x, y = scaled_batch(bundle, size=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)

    def eval_mae() -> float:
        model.eval()
        with torch.no_grad():
            return float(masked_mae(model(x), y))

    initial = eval_mae()
    model.train()
    for _ in range(100):
        optimizer.zero_grad()
        masked_mae(model(x, y), y).backward()
        optimizer.step()
    final = eval_mae()
    assert final < 0.4 * initial, (initial, final)  # seen: 0.26 (dcrnn), 0.15 (dgcrn) of the initial MAE
