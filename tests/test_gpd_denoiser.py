"""GPD denoisers: the layer-aligned token layout and the five conditioning variants, at tiny sizes."""

from __future__ import annotations

import functools
import math
from typing import Callable

import pytest
import torch
from torch import Tensor, nn

from graphtune.errors import ConfigError
from graphtune.generative.denoiser import DENOISERS, Denoiser, TokenLayout, build_denoiser, list_denoisers

# Sizes deliberately not multiples of the token size, a 1-element tensor, and graph/non-graph mixed.
TENSORS = [("embed", 37, True), ("conv.w", 40, True), ("conv.b", 5, False), ("head.w", 33, False), ("gain", 1, True)]
TOKEN = 8
SPATIAL, TEMPORAL, BATCH = 6, 4, 3
SMALL = dict(d_model=16, depth=2, heads=2, mlp_ratio=2.0)
VARIANTS = ["pre-bias", "pre", "pre-adaptive", "post-adaptive", "adaln"]


def _layout(tensors: list[tuple[str, int, bool]] = TENSORS, token_size: int = TOKEN) -> TokenLayout:
    return TokenLayout.from_tensors(tensors, token_size)


def _inputs(model: Denoiser, batch: int = BATCH, seed: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.layout.numel, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    spatial = torch.randn(batch, model.spatial_dim, generator=g)
    temporal = torch.randn(batch, model.temporal_dim, generator=g)
    return x, t, spatial, temporal


def _sgd_step(model: Denoiser, lr: float = 0.5) -> None:
    """One SGD step on a random regression target: moves adaLN-Zero's zero modulation off zero."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, t, s, c = _inputs(model, seed=7)
    loss = (model(x, t, s, c) - torch.randn_like(x)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


@functools.cache  # built once per (variant, spatial_dim): the tests using it never change its weights
def _model(name: str, spatial_dim: int = SPATIAL) -> Denoiser:
    """A variant after one SGD step, so every variant (adaln included) really uses attention and conditions."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # the same model whichever test builds it first
    model = build_denoiser(name, _layout(), spatial_dim, TEMPORAL, **SMALL)
    _sgd_step(model)
    torch.random.set_rng_state(generator_state)
    return model.eval()


def _missing_gradients(model: Denoiser) -> list[str]:
    model.zero_grad(set_to_none=True)
    x, t, s, c = _inputs(model)
    model(x, t, s, c).pow(2).sum().backward()
    return [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]


def _first_sample_depends_on_rest(fn: Callable[[Tensor], Tensor], batch_a: Tensor, batch_b: Tensor) -> bool:
    """Whether sample 0's output changes when only the other samples of its batch change."""
    assert torch.equal(batch_a[0], batch_b[0]) and not torch.equal(batch_a[1:], batch_b[1:])
    return not torch.allclose(fn(batch_a)[0], fn(batch_b)[0], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# TokenLayout
# ---------------------------------------------------------------------------------------------------------


def test_layout_counts_tokens_per_tensor():
    layout = _layout()
    assert layout.numel == sum(n for _, n, _ in TENSORS) == 116
    assert layout.num_tokens == sum(math.ceil(n / TOKEN) for _, n, _ in TENSORS) == 5 + 5 + 1 + 5 + 1
    assert layout.names == tuple(n for n, _, _ in TENSORS) and layout.token_size == TOKEN
    assert _layout(token_size=1).num_tokens == layout.numel  # one value per token
    assert _layout(token_size=64).num_tokens == len(TENSORS)  # every tensor fits one token, none shared
    owner = layout.token_tensor
    assert owner.dtype == torch.long and owner.tolist() == [0] * 5 + [1] * 5 + [2] + [3] * 5 + [4]
    assert layout.graph_tokens.tolist() == [TENSORS[i][2] for i in owner.tolist()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layout_round_trip_is_bit_exact(dtype):
    layout = _layout()
    vec = torch.randn(4, layout.numel, dtype=dtype) * 1e3
    tokens = layout.tokenize(vec)
    assert tokens.shape == (4, layout.num_tokens, TOKEN) and tokens.dtype == dtype
    assert torch.equal(layout.detokenize(tokens), vec)


def test_every_token_holds_one_tensor_and_zero_padding():
    layout = _layout()
    # Value = tensor index + 1, so a padded slot (0) is told apart from tensor 0.
    vec = torch.cat([torch.full((n,), i + 1.0) for i, (_, n, _) in enumerate(TENSORS)])[None]
    tokens = layout.tokenize(vec)[0]
    owner = layout.token_tensor
    first = 0
    for index, (_, numel, _) in enumerate(TENSORS):
        own = (owner == index).nonzero().flatten()
        assert own.tolist() == list(range(first, first + len(own)))  # contiguous, in flatten order
        real = tokens[own].flatten()[:numel]
        pad = tokens[own].flatten()[numel:]
        assert torch.equal(real, torch.full_like(real, index + 1.0))
        assert len(pad) < TOKEN and torch.equal(pad, torch.zeros_like(pad))  # only the last token is padded
        first += len(own)


def test_layout_is_differentiable_and_rejects_bad_input():
    layout = _layout()
    vec = torch.randn(2, layout.numel, requires_grad=True)
    layout.detokenize(layout.tokenize(vec) * 3).sum().backward()
    assert torch.equal(vec.grad, torch.full_like(vec, 3.0))
    with pytest.raises(ValueError, match="token_size"):
        _layout(token_size=0)
    with pytest.raises(ValueError, match="elements"):
        _layout([("a", 4, True), ("b", 0, False)])
    with pytest.raises(ValueError, match="at least one"):
        _layout([])
    with pytest.raises(ValueError, match="shape"):
        layout.tokenize(torch.zeros(2, layout.numel + 1))


# ---------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------


def test_exactly_the_five_variants_are_registered():
    assert sorted(VARIANTS) == list_denoisers()
    for name in VARIANTS:
        model = build_denoiser(name, _layout(), SPATIAL, TEMPORAL, **SMALL)
        assert type(model) is DENOISERS.get(name) and model.name == name
    with pytest.raises(ConfigError, match="gpd.conditioning") as err:
        build_denoiser("cross", _layout(), SPATIAL, TEMPORAL)
    assert "'cross'" in str(err.value) and "adaln" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------
# Each variant
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_denoisers())
def test_output_shape_and_finite(name):
    model = _model(name)
    out = model(*_inputs(model))
    assert out.shape == (BATCH, model.layout.numel) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", [n for n in list_denoisers() if n != "adaln"])
def test_every_parameter_gets_gradient_at_init(name):
    model = build_denoiser(name, _layout(), SPATIAL, TEMPORAL, **SMALL)
    assert _missing_gradients(model) == []


def test_adaln_every_parameter_gets_gradient_after_one_step():
    model = build_denoiser("adaln", _layout(), SPATIAL, TEMPORAL, **SMALL)
    # adaLN-Zero: with zero gates, the blocks' attention/MLP and the prompts get no gradient at first...
    starved = _missing_gradients(model)
    assert any(".attn." in n for n in starved) and any(n.startswith("spatial_embed") for n in starved)
    _sgd_step(model)
    assert _missing_gradients(model) == []  # ...and all of them do once the modulation has moved


@pytest.mark.parametrize("name", list_denoisers())
def test_samples_do_not_see_each_other(name):
    model = _model(name)
    x, t, s, c = _inputs(model, batch=4)
    x_b = x.clone()
    x_b[1:] = torch.randn_like(x_b[1:])
    with torch.no_grad():
        assert not _first_sample_depends_on_rest(lambda v: model(v, t, s, c), x, x_b)
        # Prompts and steps of the other samples must not leak either.
        s_b, c_b, t_b = s.clone(), c.clone(), t.clone()
        s_b[1:], c_b[1:], t_b[1:] = torch.randn_like(s_b[1:]), torch.randn_like(c_b[1:]), t_b[1:] + 17
        other = model(x_b, t_b, s_b, c_b)
        assert torch.allclose(model(x, t, s, c)[0], other[0], atol=1e-5)


def test_attention_without_batch_first_would_fail_the_independence_check():
    torch.manual_seed(0)
    d_model, length = 8, 5
    a = torch.randn(4, length, d_model)
    b = a.clone()
    b[1:] = torch.randn_like(b[1:])
    for batch_first in (False, True):
        attn = nn.MultiheadAttention(d_model, 2, batch_first=batch_first).eval()
        with torch.no_grad():
            # (B, L, d) fed as GPD does: without batch_first, dim 0 (the batch) is read as the sequence.
            leaks = _first_sample_depends_on_rest(lambda v: attn(v, v, v, need_weights=False)[0], a, b)
        assert leaks is not batch_first


@pytest.mark.parametrize("name", list_denoisers())
def test_both_prompts_change_the_output(name):
    model = _model(name)
    x, t, s, c = _inputs(model)
    with torch.no_grad():
        base = model(x, t, s, c)
        assert (model(x, t, s, c + 1.0) - base).abs().max() > 1e-4  # temporal
        assert (model(x, t, s + 1.0, c) - base).abs().max() > 1e-4  # spatial
        assert (model(x, t + 100, s, c) - base).abs().max() > 1e-4  # diffusion step


def test_pre_bias_spatial_prompt_moves_only_graph_tokens():
    layout = _layout()
    model = build_denoiser("pre-bias", layout, SPATIAL, TEMPORAL, **{**SMALL, "depth": 0}).eval()
    x, t, s, c = _inputs(model)
    with torch.no_grad():
        delta = (layout.tokenize(model(x, t, s + 1.0, c)) - layout.tokenize(model(x, t, s, c))).abs()
        delta = delta.amax(dim=(0, 2))  # per token
    graph = layout.graph_tokens
    assert bool(graph.any()) and bool((~graph).any())
    assert bool((delta[graph] > 1e-4).all())
    assert bool((delta[~graph] <= 1e-6).all())
    # The temporal prompt, by contrast, reaches every token.
    with torch.no_grad():
        moved = (layout.tokenize(model(x, t, s, c + 1.0)) - layout.tokenize(model(x, t, s, c))).abs().amax(dim=(0, 2))
    assert bool((moved > 1e-4).all())


@pytest.mark.parametrize("name", list_denoisers())
def test_without_spatial_prompt(name):
    model = _model(name, spatial_dim=0)
    assert model.spatial_embed is None
    x, t, _, c = _inputs(model)
    with torch.no_grad():
        out = model(x, t, None, c)
        assert out.shape == x.shape and bool(torch.isfinite(out).all())
        assert torch.equal(out, model(x, t, torch.zeros(BATCH, 0), c))  # None and (B, 0) mean the same
        assert (model(x, t, None, c + 1.0) - out).abs().max() > 1e-4
    with pytest.raises(ValueError, match="spatial"):
        model(x, t, torch.ones(BATCH, 2), c)
    assert _missing_gradients(model) == []


def test_variants_reject_settings_where_a_condition_would_be_ignored():
    for name in ("pre", "post-adaptive"):  # their conditions enter only inside blocks
        with pytest.raises(ValueError, match="depth"):
            build_denoiser(name, _layout(), SPATIAL, TEMPORAL, **{**SMALL, "depth": 0})
    no_graph = _layout([(n, k, False) for n, k, _ in TENSORS])
    with pytest.raises(ValueError, match="graph-related"):
        build_denoiser("pre-bias", no_graph, SPATIAL, TEMPORAL, **SMALL)
    build_denoiser("pre-bias", no_graph, 0, TEMPORAL, **SMALL)  # fine without a spatial prompt
