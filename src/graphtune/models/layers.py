"""Graph helpers shared by the models: random-walk supports, propagation, diffusion convolution.

Convention (the DCRNN / Graph WaveNet one). `adj[v, w]` is the weight of the edge v -> w.
A support P is a row-stochastic transition matrix (N, N); propagating node features over it
sends each node's features along its out-edges:

    out[..., w, :] = sum_v P[v, w] * x[..., v, :]          i.e. out = P^T x on the node axis

which is GWNet's `einsum('ncvl,vw->ncwl', x, A)` and DCRNN's `support @ x` with support = P^T.
`propagate` takes the node axis as -2 by default (channels-last layouts such as (B, N, F) or
(B, T, N, C), which `DiffusionGraphConv` uses) or -1 (nodes last, computed as a plain `x @ P`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _as_tensor(adj) -> torch.Tensor:
    if not isinstance(adj, torch.Tensor):
        adj = torch.from_numpy(np.asarray(adj))
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1]:
        raise ValueError(f"adjacency must be a square (N, N) matrix, got shape {tuple(adj.shape)}")
    return adj.to(torch.float32)


def transition_matrix(adj) -> torch.Tensor:
    """Row-normalised random-walk matrix D^-1 A (N, N); rows of nodes without out-edges stay zero."""
    adj = _as_tensor(adj)
    degree = adj.sum(dim=1, keepdim=True)  # (N, 1) weighted out-degree
    inv = torch.where(degree > 0, 1.0 / degree.clamp_min(1e-12), torch.zeros_like(degree))
    return adj * inv


def random_walk_supports(adj) -> list[torch.Tensor]:
    """The dual random-walk supports [forward D_out^-1 A, backward D_in^-1 A^T] (GWNet's "doubletransition").

    `adj` is an (N, N) numpy array or tensor, row = from, column = to. Returns two float32 (N, N)
    tensors; for a symmetric graph they are equal. Use them with `propagate`.
    """
    adj = _as_tensor(adj)
    return [transition_matrix(adj), transition_matrix(adj.t())]


def propagate(x: torch.Tensor, support: torch.Tensor, node_dim: int = -2) -> torch.Tensor:
    """One random-walk step over `support`: out = P^T x on the node axis.

    node_dim=-2: x (..., N, F) -> (..., N, F); node_dim=-1: x (..., N) -> (..., N), computed as x @ P.
    """
    if node_dim == -1:
        return x @ support
    if node_dim == -2:
        return torch.einsum("vw,...vf->...wf", support, x)
    raise ValueError(f"node_dim must be -1 or -2, got {node_dim}")


def adaptive_adjacency(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """GWNet's learned adjacency softmax(relu(E1 E2^T)) (N, N), row-stochastic. source, target: (N, d)."""
    return F.softmax(F.relu(source @ target.t()), dim=1)


def graph_statistics(adj) -> torch.Tensor:
    """Per-node graph descriptors (N, 4): log1p of out-degree, in-degree, out-weight sum, in-weight sum.

    Self-loops are left out so that graphs stored with and without a unit diagonal agree.
    """
    adj = _as_tensor(adj).clone()
    adj.fill_diagonal_(0.0)
    edges = (adj > 0).to(torch.float32)
    stats = torch.stack([edges.sum(1), edges.sum(0), adj.sum(1), adj.sum(0)], dim=1)  # (N, 4)
    return torch.log1p(stats)


class DiffusionGraphConv(nn.Module):
    """Diffusion graph convolution (DCRNN / GWNet `gcn`): mix [x, P x, P^2 x, ...] over every support.

    x (..., N, C_in) -> (..., N, C_out), channels last: the channel mixing is one `nn.Linear` GEMM over
    all (batch, time, node) rows, which on CPU beats a 1x1 convolution on (B, C, N, T). The supports are
    passed at call time so the layer holds no node-specific state: the same weights run on any graph.
    """

    def __init__(self, in_channels: int, out_channels: int, num_supports: int, order: int = 2, dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        self.order = order
        self.dropout = dropout
        self.mlp = nn.Linear((order * num_supports + 1) * in_channels, out_channels, bias=bias)

    def forward(self, x: torch.Tensor, supports: list[torch.Tensor]) -> torch.Tensor:
        terms = [x]
        for support in supports:
            h = x
            for _ in range(self.order):
                h = propagate(h, support)  # (..., N, C)
                terms.append(h)
        h = self.mlp(torch.cat(terms, dim=-1))  # (..., N, C_out)
        return F.dropout(h, self.dropout, training=self.training)


def tod_slot(tod: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Time-of-day fraction in [0, 1) -> slot index 0..num_slots-1 (long), robust to float round-off."""
    return torch.floor(tod * num_slots + 1e-4).long().clamp_(0, num_slots - 1)


def daily_profile(bundle, num_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-split statistics per node in SCALED units, from the observed (non-NaN) readings only.

    Returns (profile (S, N): mean per time-of-day slot, NaN where a slot was never observed;
    node_mean (N,), node_std (N,): over the whole training split, 0 for a node never observed).
    """
    lo, hi = bundle.splits["train"]
    scaled = (bundle.target[lo:hi].to(torch.float64) - bundle.scaler.mean) / bundle.scaler.std  # (T, N)
    observed = ~torch.isnan(scaled)
    filled = torch.where(observed, scaled, torch.zeros_like(scaled))
    slot = tod_slot(bundle.time_features[lo:hi, 0], num_slots)  # (T,)
    n = scaled.shape[1]
    sums = torch.zeros(num_slots, n, dtype=torch.float64).index_add_(0, slot, filled)
    counts = torch.zeros(num_slots, n, dtype=torch.float64).index_add_(0, slot, observed.to(torch.float64))
    profile = sums / counts  # 0/0 -> NaN for unseen slots
    count = observed.sum(0).clamp_min(1)  # (N,)
    node_mean = filled.sum(0) / count
    node_var = (torch.where(observed, scaled - node_mean, torch.zeros_like(scaled)) ** 2).sum(0) / count
    return profile.float(), node_mean.float(), node_var.sqrt().float()
