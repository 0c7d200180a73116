"""BigST-style linear-complexity forecaster (Han et al., VLDB 2024), after usail-hkust/BigST.

Each node's input window is embedded and concatenated with a node embedding and time-of-day /
day-of-week embeddings of the last input step. Spatial mixing is global attention between all nodes
whose queries and keys come from [node, time-of-day, day-of-week] embeddings; the softmax kernel
exp(q.k / tau) is replaced by positive random features phi(q).phi(k) (Performer FAVOR+), so

    out_n = sum_m phi(q_n).phi(k_m) v_m / sum_m phi(q_n).phi(k_m)
          = phi(q_n) . (sum_m phi(k_m) v_m^T) / phi(q_n) . (sum_m phi(k_m))

costs O(N r d) instead of O(N^2 d): no N x N matrix is ever formed. The node embedding `node_emb`
is the only node-specific tensor. Left out from the paper: the long-history preprocessing stage and
the auxiliary spatial loss (the model contract returns predictions only).

Data-free compression finds no prunable group here: every mixer's channels add into a residual stream
that a LayerNorm then normalises across channels (removing one shifts the statistics of all), and the
regression head is a single Linear over [h0, h], both of which carry that stream.

Activation checkpointing (train.activation_checkpointing) recomputes each attention layer in backward
(`_layer`, ForecastModel.run_block), keeping only its input (B, N, W); the dropout mask is replayed.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphtune.checks import integer, number
from graphtune.models.layers import tod_slot
from graphtune.models.base import ForecastModel
from graphtune.models.registry import register_model


def orthogonal_random_features(num_features: int, dim: int, seed: int) -> torch.Tensor:
    """(r, d) Gaussian projection with orthogonal rows inside each d-block (Performer's lower-variance draw)."""
    generator = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(-(-num_features // dim)):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        blocks.append(q.t())
    rows = torch.cat(blocks)[:num_features]  # (r, d) unit rows
    norms = torch.randn(num_features, dim, generator=generator).norm(dim=1, keepdim=True)  # chi(d) lengths
    return rows * norms


def positive_random_features(x: torch.Tensor, projection: torch.Tensor, is_query: bool) -> torch.Tensor:
    """phi(x) with E[phi(q).phi(k)] = exp(q.k); x (B, N, d) -> (B, N, r), all entries > 0.

    The stabilising max is per row for queries and over all nodes for keys: a constant factor per query
    row or per batch cancels between numerator and denominator of the attention.
    """
    proj = x @ projection.t()  # (B, N, r)
    half_norm = 0.5 * x.square().sum(-1, keepdim=True)  # (B, N, 1)
    dims = (-1,) if is_query else (-2, -1)
    stab = proj.detach().amax(dim=dims, keepdim=True)
    return torch.exp(proj - half_norm - stab) / math.sqrt(projection.shape[0]) + 1e-6


def linear_attention(v: torch.Tensor, q_features: torch.Tensor, k_features: torch.Tensor) -> torch.Tensor:
    """Kernelised attention over the node axis in O(N). v (B, N, F), features (B, N, r) -> (B, N, F)."""
    kv = torch.einsum("bnr,bnf->brf", k_features, v)  # (B, r, F): summed over nodes first
    normaliser = torch.einsum("bnr,br->bn", q_features, k_features.sum(1))  # (B, N)
    return torch.einsum("bnr,brf->bnf", q_features, kv) / normaliser[..., None]


class BigST(ForecastModel):
    """x (B, T_in, N, 3) -> (B, T_out, N) scaled."""

    def __init__(
        self,
        num_nodes: int,
        t_in: int,
        t_out: int,
        steps_per_day: int,
        hidden: int,
        node_emb_dim: int,
        time_emb_dim: int,
        num_layers: int,
        random_feature_dim: int,
        tau: float,
        dropout: float,
        seed: int,
    ):
        super().__init__()
        self.steps_per_day, self.tau, self.dropout = steps_per_day, tau, dropout
        self.node_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(num_nodes, node_emb_dim)))
        self.tod_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(steps_per_day, time_emb_dim)))
        self.dow_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(7, time_emb_dim)))
        self.input_emb = nn.Linear(2 * t_in, hidden)  # scaled values and times of day of the window
        context = node_emb_dim + 2 * time_emb_dim
        self.query = nn.Linear(context, hidden)
        self.key = nn.Linear(context, hidden)
        width = hidden + context
        self.mixers = nn.ModuleList(nn.Linear(width, width) for _ in range(num_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(num_layers))
        self.regression = nn.Linear(2 * width, t_out)
        # Persistent and N-independent: a transferred model keeps the projection its query/key maps learned with.
        self.register_buffer("random_features", orthogonal_random_features(random_feature_dim, hidden, seed))

    def checkpoint_blocks(self) -> list[str]:
        """Every linearized-attention layer: mixer, dropout, attention over the nodes, residual and LayerNorm."""
        return [f"layer {i}" for i in range(len(self.mixers))]

    def _layer(self, i: int, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Layer i: h (B, N, W) -> (B, N, W), mixing nodes by the random-feature attention of q, k (B, N, r)."""
        v = F.dropout(F.relu(self.mixers[i](h)), self.dropout, training=self.training)  # (B, N, W)
        return self.norms[i](h + linear_attention(v, q, k))

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        b, _, n, _ = x.shape
        window = x[..., :2].permute(0, 2, 3, 1).reshape(b, n, -1)  # (B, N, 2*T_in)
        tod = self.tod_emb[tod_slot(x[:, -1, 0, 1], self.steps_per_day)]  # (B, d_t): last input step
        dow = self.dow_emb[x[:, -1, 0, 2].long().clamp(0, 6)]  # (B, d_t)
        time = torch.cat([tod, dow], dim=-1)[:, None, :].expand(b, n, -1)  # (B, N, 2 d_t)
        context = torch.cat([self.node_emb.expand(b, -1, -1), time], dim=-1)  # (B, N, C)

        # Queries and keys scaled by tau^-1/2 each (temperature) and d^-1/4 each (softmax's 1/sqrt(d)).
        scale = (self.tau * math.sqrt(self.random_features.shape[1])) ** -0.5
        q = positive_random_features(self.query(context) * scale, self.random_features, is_query=True)  # (B, N, r)
        k = positive_random_features(self.key(context) * scale, self.random_features, is_query=False)  # (B, N, r)

        h0 = torch.cat([self.input_emb(window), context], dim=-1)  # (B, N, W)
        h = h0
        for i in range(len(self.mixers)):
            h = self.run_block(self._layer, i, h, q, k)  # (B, N, W)
        out = self.regression(F.relu(torch.cat([h0, h], dim=-1)))  # (B, N, T_out)
        return out.transpose(1, 2)  # (B, T_out, N)


@register_model("bigst", options={
    "hidden": integer(min=1), "node_emb_dim": integer(min=1), "time_emb_dim": integer(min=1),
    "num_layers": integer(min=1), "random_feature_dim": integer(min=1), "tau": number(min=0, min_open=True),
    "dropout": number(min=0, max=1, max_open=True), "seed": integer(min=0),
})
def bigst(
    bundle,
    *,
    hidden: int = 64,  # BigST uses 32; 64 keeps the shared layers >= 90% of all parameters at ~300 nodes
    node_emb_dim: int = 16,  # BigST uses 32; node_emb is N x node_emb_dim, the one part that does not transfer
    time_emb_dim: int = 16,  # time-of-day / day-of-week embedding size, matched to node_emb_dim
    num_layers: int = 3,  # BigST's number of linearized attention layers
    random_feature_dim: int = 64,  # BigST's r: the kernel approximation's rank, independent of N
    tau: float = 0.25,  # BigST's softmax temperature
    dropout: float = 0.3,  # BigST's dropout
    seed: int = 0,  # draws the fixed random-feature projection
) -> BigST:
    return BigST(
        bundle.num_nodes, bundle.t_in, bundle.t_out, bundle.steps_per_day, hidden, node_emb_dim, time_emb_dim,
        num_layers, random_feature_dim, tau, dropout, seed,
    )
