"""GPD denoisers: transformers that predict the diffusion target for a flattened parameter vector.

Token layout
    A forecasting model's parameters are flattened, tensor after tensor in a fixed order, into one vector
    of P values. `TokenLayout` cuts that vector into L tokens of `token_size` values, layer-aligned: each
    tensor gives ceil(numel / token_size) tokens of its own, the last one zero-padded, so no token mixes two
    tensors. A token's position therefore always means "this slice of this layer", which is what the
    learned position embedding and the spatial-prompt inductive bias below rely on. (GPD reshapes the whole
    vector with a stride instead, so one of its tokens can hold the end of one layer and the start of the
    next.) Each tensor is flagged graph-related or not: whether its weights depend on the city's graph
    (e.g. node embeddings, graph convolutions), which is where a spatial prompt should act.

Denoiser
    x_t (B, P) -> tokens (B, L, token_size) -> Linear to d_model + position embedding -> `depth`
    pre-LayerNorm transformer blocks -> LayerNorm -> Linear back to token_size -> detokenize (B, P).
    Three conditions enter, each embedded to d_model: the diffusion step t (sinusoidal + MLP), the spatial
    prompt (B, spatial_dim) of the city/node the parameters are for, and the temporal prompt
    (B, temporal_dim); either prompt may be absent (dim 0). Attention is always batch-first, so every
    sample only ever attends within itself (GPD's variants 2 and 3 build their attention without
    batch_first and thereby attend across the batch).

Conditioning variants (registered in DENOISERS under the option `gpd.conditioning`)
    pre-bias       step + temporal embeddings added to every token at the input; the spatial embedding only
                   to the tokens of graph-related tensors (`layout.graph_tokens`): the inductive bias that
                   the city's structure should only move the graph-dependent weights.
    pre            step + spatial + temporal summed and added to every token before every block.
    pre-adaptive   each token adds its own learned softmax mix of [step, spatial, temporal] at the input
                   (logits (L, K), K = the number of conditions present), so layers can choose what to read.
    post-adaptive  step embedding added at the input; each block cross-attends from the tokens to the
                   condition tokens [step, spatial, temporal] after its self-attention.
    adaln          adaptive LayerNorm, DiT's adaLN-Zero: c = step + spatial + temporal; a zero-initialised
                   Linear(SiLU(c)) gives each block the shift/scale of its two LayerNorms and the gate of its
                   two residual branches, and the final LayerNorm a shift/scale. Blocks start as the identity.

    DENOISERS.get(name) is the class; build_denoiser(name, layout, spatial_dim, temporal_dim, **kwargs)
    builds one; list_denoisers() lists the names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from graphtune.registry import Registry

__all__ = [
    "TokenLayout",
    "Denoiser",
    "PreBiasDenoiser",
    "PreDenoiser",
    "PreAdaptiveDenoiser",
    "PostAdaptiveDenoiser",
    "AdaLNDenoiser",
    "DENOISERS",
    "build_denoiser",
    "list_denoisers",
]


# ---------------------------------------------------------------------------------------------------------
# Token layout
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenLayout:
    """Layer-aligned tokens of a flattened parameter vector; build with `TokenLayout.from_tensors`."""

    names: tuple[str, ...]
    numels: tuple[int, ...]
    graph: tuple[bool, ...]
    token_size: int
    # Derived once in __post_init__ (CPU), plus per-device copies of the index made on first use.
    _scatter: Tensor = field(init=False, repr=False, compare=False)  # (P,) flat token slot of each value
    _token_tensor: Tensor = field(init=False, repr=False, compare=False)  # (L,)
    _by_device: dict[torch.device, Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_tensors(cls, tensors: list[tuple[str, int, bool]], token_size: int) -> TokenLayout:
        """`tensors`: (name, numel, graph_related) of each tensor, in the flatten order of the vector."""
        return cls(
            names=tuple(str(name) for name, _, _ in tensors),
            numels=tuple(int(numel) for _, numel, _ in tensors),
            graph=tuple(bool(flag) for _, _, flag in tensors),
            token_size=int(token_size),
        )

    def __post_init__(self) -> None:
        if self.token_size < 1:
            raise ValueError(f"token_size must be >= 1, got {self.token_size}")
        if not self.numels:
            raise ValueError("a token layout needs at least one tensor")
        if not len(self.names) == len(self.numels) == len(self.graph):
            raise ValueError("names, numels and graph flags must have one entry per tensor")
        for name, numel in zip(self.names, self.numels):
            if numel < 1:
                raise ValueError(f"tensor {name!r} has {numel} elements; every tensor needs >= 1")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"tensor names must be unique, got {list(self.names)}")

        size = self.token_size
        scatter, owner = [], []
        slot = 0  # first flat slot of the current tensor's first token
        for index, numel in enumerate(self.numels):
            count = -(-numel // size)  # ceil: this tensor's own tokens
            scatter.append(torch.arange(slot, slot + numel))
            owner.append(torch.full((count,), index, dtype=torch.long))
            slot += count * size
        object.__setattr__(self, "_scatter", torch.cat(scatter))
        object.__setattr__(self, "_token_tensor", torch.cat(owner))

    @property
    def num_tokens(self) -> int:
        """L = sum over tensors of ceil(numel / token_size)."""
        return int(self._token_tensor.numel())

    @property
    def numel(self) -> int:
        """P, the length of the parameter vector."""
        return sum(self.numels)

    @property
    def token_tensor(self) -> Tensor:
        """(L,) long: index (into `names`) of the tensor each token belongs to."""
        return self._token_tensor.clone()

    @property
    def graph_tokens(self) -> Tensor:
        """(L,) bool: whether each token belongs to a graph-related tensor."""
        return torch.tensor(self.graph, dtype=torch.bool)[self._token_tensor]

    def _index(self, device: torch.device) -> Tensor:
        index = self._by_device.get(device)
        if index is None:  # one copy per device, not one transfer per call
            index = self._by_device[device] = self._scatter.to(device)
        return index

    def _check_vector(self, vec: Tensor) -> None:
        if vec.dim() != 2 or vec.shape[1] != self.numel:
            raise ValueError(f"expected a parameter vector of shape (B, {self.numel}), got {tuple(vec.shape)}")

    def tokenize(self, vec: Tensor) -> Tensor:
        """(B, P) -> (B, L, token_size); padded slots are zero."""
        self._check_vector(vec)
        batch = vec.shape[0]
        slots = vec.new_zeros(batch, self.num_tokens * self.token_size)
        return slots.index_copy(1, self._index(vec.device), vec).view(batch, self.num_tokens, self.token_size)

    def detokenize(self, tokens: Tensor) -> Tensor:
        """(B, L, token_size) -> (B, P): the real values, padding dropped (exact inverse of `tokenize`)."""
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (self.num_tokens, self.token_size):
            raise ValueError(
                f"expected tokens of shape (B, {self.num_tokens}, {self.token_size}), got {tuple(tokens.shape)}"
            )
        flat = tokens.reshape(tokens.shape[0], -1)
        return flat.index_select(1, self._index(tokens.device))


# ---------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------


def _sinusoid(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(B,) integer steps -> (B, dim) sin/cos features at geometrically spaced frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    if dim % 2:  # odd width: one zero feature keeps the shape
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=1)
    return emb


def _mlp(d_in: int, d_model: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_model), nn.SiLU(), nn.Linear(d_model, d_model))


def _feed_forward(d_model: int, mlp_ratio: float, dropout: float) -> nn.Sequential:
    hidden = max(1, int(round(d_model * mlp_ratio)))
    return nn.Sequential(
        nn.Linear(d_model, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d_model), nn.Dropout(dropout)
    )


class _Block(nn.Module):
    """Pre-LayerNorm block: self-attention, optional cross-attention to a context, MLP; all batch-first."""

    def __init__(self, d_model: int, heads: int, mlp_ratio: float, dropout: float, *, cross: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.norm_cross = nn.LayerNorm(d_model) if cross else None
        self.cross = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True) if cross else None
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = _feed_forward(d_model, mlp_ratio, dropout)

    def forward(self, h: Tensor, context: Tensor | None = None) -> Tensor:
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        if self.cross is not None and self.norm_cross is not None:
            if context is None:
                raise ValueError("a cross-attention block needs a context")
            q = self.norm_cross(h)
            h = h + self.cross(q, context, context, need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class _AdaLNBlock(nn.Module):
    """DiT block with adaLN-Zero: LayerNorms without affine, modulated by c; residual branches gated by c."""

    def __init__(self, d_model: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model, elementwise_affine=False)
        self.mlp = _feed_forward(d_model, mlp_ratio, dropout)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(d_model, 6 * d_model))
        # Zero: every gate starts at 0, so the block starts as the identity (the "Zero" of adaLN-Zero).
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=1)
        a = _modulate(self.norm1(h), shift1, scale1)
        h = h + gate1[:, None, :] * self.attn(a, a, a, need_weights=False)[0]
        return h + gate2[:, None, :] * self.mlp(_modulate(self.norm2(h), shift2, scale2))


class _Conditions:
    """The embedded conditions of one batch, each (B, d_model); an absent prompt is None."""

    def __init__(self, step: Tensor, spatial: Tensor | None, temporal: Tensor | None):
        self.step, self.spatial, self.temporal = step, spatial, temporal
        self._total: Tensor | None = None

    def present(self) -> list[Tensor]:
        """[step, spatial, temporal] without the absent ones, in that order."""
        return [e for e in (self.step, self.spatial, self.temporal) if e is not None]

    def total(self) -> Tensor:
        """step + spatial + temporal (computed once: adaln reads it in every block and in the head)."""
        if self._total is None:
            self._total = torch.stack(self.present(), dim=0).sum(dim=0)
        return self._total


# ---------------------------------------------------------------------------------------------------------
# Denoisers
# ---------------------------------------------------------------------------------------------------------


class Denoiser(nn.Module):
    """Base: tokens in/out, embeddings of step and prompts; subclasses decide where conditions enter.

    forward(x_t (B, P), t (B,) long, spatial (B, spatial_dim), temporal (B, temporal_dim)) -> (B, P),
    the prediction (of v in GraphTune's diffusion). An absent prompt (dim 0) may be passed as None or as a
    (B, 0) tensor.
    """

    name: ClassVar[str] = ""

    def __init__(
        self,
        layout: TokenLayout,
        spatial_dim: int,
        temporal_dim: int,
        *,
        d_model: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        if spatial_dim < 0 or temporal_dim < 0:
            raise ValueError(f"prompt dims must be >= 0, got spatial {spatial_dim}, temporal {temporal_dim}")
        if d_model < 1 or heads < 1 or d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be a positive multiple of heads ({heads})")
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        if mlp_ratio <= 0 or not 0 <= dropout < 1:
            raise ValueError(f"need mlp_ratio > 0 and 0 <= dropout < 1, got {mlp_ratio}, {dropout}")
        self.layout = layout
        self.spatial_dim, self.temporal_dim = spatial_dim, temporal_dim
        self.d_model, self.depth = d_model, depth

        length = layout.num_tokens
        self.token_in = nn.Linear(layout.token_size, d_model)
        self.position = nn.Parameter(torch.randn(length, d_model) * 0.02)
        self.step_embed = _mlp(d_model, d_model)  # on top of the sinusoid of t
        self.spatial_embed = _mlp(spatial_dim, d_model) if spatial_dim else None
        self.temporal_embed = _mlp(temporal_dim, d_model) if temporal_dim else None
        self.blocks = self._build_blocks(d_model, depth, heads, mlp_ratio, dropout)
        self.norm_out = self._build_norm_out(d_model)
        # Default init on purpose (not zero): a zero output layer would block every gradient upstream.
        self.token_out = nn.Linear(d_model, layout.token_size)

    # -- hooks for the variants ---------------------------------------------------------------------------

    def _build_blocks(self, d_model: int, depth: int, heads: int, mlp_ratio: float, dropout: float) -> nn.ModuleList:
        return nn.ModuleList(_Block(d_model, heads, mlp_ratio, dropout) for _ in range(depth))

    def _build_norm_out(self, d_model: int) -> nn.Module:
        return nn.LayerNorm(d_model)

    def _encode(self, h: Tensor, cond: _Conditions) -> Tensor:
        """(B, L, d_model) tokens with positions -> (B, L, d_model) after conditioning and the blocks."""
        raise NotImplementedError

    def _head(self, h: Tensor, cond: _Conditions) -> Tensor:
        return self.token_out(self.norm_out(h))

    # -- shared -------------------------------------------------------------------------------------------

    def _prompt(self, embed: nn.Module | None, value: Tensor | None, dim: int, what: str, batch: int) -> Tensor | None:
        if embed is None:
            if value is not None and value.numel():
                raise ValueError(f"{what} prompt given but {what}_dim is 0")
            return None
        if value is None or tuple(value.shape) != (batch, dim):
            got = None if value is None else tuple(value.shape)
            raise ValueError(f"expected a {what} prompt of shape ({batch}, {dim}), got {got}")
        return embed(value)

    def embed_conditions(self, t: Tensor, spatial: Tensor | None, temporal: Tensor | None) -> _Conditions:
        batch = t.shape[0]
        step = self.step_embed(_sinusoid(t, self.d_model))
        return _Conditions(
            step,
            self._prompt(self.spatial_embed, spatial, self.spatial_dim, "spatial", batch),
            self._prompt(self.temporal_embed, temporal, self.temporal_dim, "temporal", batch),
        )

    def forward(self, x_t: Tensor, t: Tensor, spatial: Tensor | None, temporal: Tensor | None) -> Tensor:
        if t.dim() != 1 or t.shape[0] != x_t.shape[0]:
            raise ValueError(f"expected steps t of shape ({x_t.shape[0]},), got {tuple(t.shape)}")
        cond = self.embed_conditions(t, spatial, temporal)
        h = self.token_in(self.layout.tokenize(x_t)) + self.position
        return self.layout.detokenize(self._head(self._encode(h, cond), cond))


DENOISERS: Registry[type[Denoiser]] = Registry(
    "denoiser", option="gpd.conditioning", providers=("graphtune.generative.denoiser",)
)


def _register(name: str) -> Callable[[type[Denoiser]], type[Denoiser]]:
    def add(cls: type[Denoiser]) -> type[Denoiser]:
        cls.name = name
        DENOISERS.register(name, cls)
        return cls

    return add


@_register("pre-bias")
class PreBiasDenoiser(Denoiser):
    """Conditions added once at the input; the spatial prompt only on graph-related tokens."""

    def __init__(self, layout: TokenLayout, spatial_dim: int, temporal_dim: int, **kwargs: Any):
        if spatial_dim and not any(layout.graph):
            # The spatial prompt would reach no token and be silently ignored.
            raise ValueError("pre-bias with a spatial prompt needs at least one graph-related tensor in the layout")
        super().__init__(layout, spatial_dim, temporal_dim, **kwargs)
        self.register_buffer("graph_mask", layout.graph_tokens.float()[:, None], persistent=False)  # (L, 1)

    def _encode(self, h: Tensor, cond: _Conditions) -> Tensor:
        h = h + cond.step[:, None, :]
        if cond.temporal is not None:
            h = h + cond.temporal[:, None, :]
        if cond.spatial is not None:
            h = h + cond.spatial[:, None, :] * self.graph_mask
        for block in self.blocks:
            h = block(h)
        return h


@_register("pre")
class PreDenoiser(Denoiser):
    """The summed conditions added to every token before every block."""

    def __init__(self, layout: TokenLayout, spatial_dim: int, temporal_dim: int, **kwargs: Any):
        super().__init__(layout, spatial_dim, temporal_dim, **kwargs)
        if self.depth < 1:  # conditions enter only through the blocks
            raise ValueError("the 'pre' denoiser needs depth >= 1")

    def _encode(self, h: Tensor, cond: _Conditions) -> Tensor:
        c = cond.total()[:, None, :]
        for block in self.blocks:
            h = block(h + c)
        return h


@_register("pre-adaptive")
class PreAdaptiveDenoiser(Denoiser):
    """Each token adds its own learned softmax mix of the condition embeddings at the input."""

    def __init__(self, layout: TokenLayout, spatial_dim: int, temporal_dim: int, **kwargs: Any):
        super().__init__(layout, spatial_dim, temporal_dim, **kwargs)
        kinds = 1 + bool(spatial_dim) + bool(temporal_dim)
        self.mix_logits = nn.Parameter(torch.zeros(layout.num_tokens, kinds))  # zeros: an even mix at the start

    def _encode(self, h: Tensor, cond: _Conditions) -> Tensor:
        conditions = torch.stack(cond.present(), dim=1)  # (B, K, d)
        weights = self.mix_logits.softmax(dim=1)  # (L, K)
        h = h + torch.einsum("lk,bkd->bld", weights, conditions)
        for block in self.blocks:
            h = block(h)
        return h


@_register("post-adaptive")
class PostAdaptiveDenoiser(Denoiser):
    """Step at the input; each block cross-attends from the tokens to the condition tokens."""

    def __init__(self, layout: TokenLayout, spatial_dim: int, temporal_dim: int, **kwargs: Any):
        super().__init__(layout, spatial_dim, temporal_dim, **kwargs)
        if self.depth < 1:  # the prompts enter only through the blocks' cross-attention
            raise ValueError("the 'post-adaptive' denoiser needs depth >= 1")

    def _build_blocks(self, d_model: int, depth: int, heads: int, mlp_ratio: float, dropout: float) -> nn.ModuleList:
        return nn.ModuleList(_Block(d_model, heads, mlp_ratio, dropout, cross=True) for _ in range(depth))

    def _encode(self, h: Tensor, cond: _Conditions) -> Tensor:
        context = torch.stack(cond.present(), dim=1)  # (B, K, d): K condition tokens per sample
        h = h + cond.step[:, None, :]
        for block in self.blocks:
            h = block(h, context)
        return h


@_register("adaln")
class AdaLNDenoiser(Denoiser):
    """adaLN-Zero: c = step + spatial + temporal modulates every LayerNorm and gates every residual branch."""

    def __init__(self, layout: TokenLayout, spatial_dim: int, temporal_dim: int, **kwargs: Any):
        super().__init__(layout, spatial_dim, temporal_dim, **kwargs)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(self.d_model, 2 * self.d_model))
        nn.init.zeros_(self.final_modulation[1].weight)  # starts as a plain LayerNorm
        nn.init.zeros_(self.final_modulation[1].bias)

    def _build_blocks(self, d_model: int, depth: int, heads: int, mlp_ratio: float, dropout: float) -> nn.ModuleList:
        return nn.ModuleList(_AdaLNBlock(d_model, heads, mlp_ratio, dropout) for _ in range(depth))

    def _build_norm_out(self, d_model: int) -> nn.Module:
        return nn.LayerNorm(d_model, elementwise_affine=False)  # the affine comes from c

    def _encode(self, h: Tensor, cond: _Conditions) -> Tensor:
        c = cond.total()
        for block in self.blocks:
            h = block(h, c)
        return h

    def _head(self, h: Tensor, cond: _Conditions) -> Tensor:
        shift, scale = self.final_modulation(cond.total()).chunk(2, dim=1)
        return self.token_out(_modulate(self.norm_out(h), shift, scale))


def build_denoiser(name: str, layout: TokenLayout, spatial_dim: int, temporal_dim: int, **kwargs: Any) -> Denoiser:
    """The denoiser registered as `name` (ConfigError naming gpd.conditioning and the known names otherwise)."""
    return DENOISERS.get(name)(layout, spatial_dim, temporal_dim, **kwargs)


def list_denoisers() -> list[str]:
    return DENOISERS.names()
