"""DGCRN: Dynamic Graph Convolutional Recurrent Network (Li, Jin et al.; ACM TKDD 2023).

A sequence-to-sequence GRU like DCRNN, but at every time step the cell first generates a dynamic
graph from the current input and hidden state:

    F_1, F_2 = hyper-network(x_t, h_{t-1})            mix-hop graph convs over the road graph + MLP
    M_i      = tanh(alpha * node_emb_i * F_i)          (B, N, d) filtered node embeddings
    A_t      = relu(tanh(alpha * (M_1 M_2^T - M_2 M_1^T)))   (B, N, N), one direction per node pair

A_t + I and A_t^T + I, row-normalised, are then used together with the pre-defined dual
random-walk supports in mix-hop graph convolutions

    H^(k+1) = a * Z + b * A_dyn^T H^(k) + g * P^T H^(k),   H^(0) = Z,   k < depth

that compute the GRU gates and candidate (one pass for the "forward" pair (A_t, P_f), one for the
"backward" pair (A_t^T, P_b)). The encoder and the decoder each have their own cell; the decoder
starts from a GO symbol of zeros and, while training, is fed the true value with the DCRNN
inverse-sigmoid scheduled-sampling probability.

Compared with the reference implementation (tsinghua-fib-lab/Traffic-Benchmark), work that shares
an input and a graph is done once: the reference's separate `gz`/`gr` graph convolutions (and their
per-direction pairs) become one linear layer over the concatenated propagations (the same function
class with one bias instead of four), the antisymmetric score is P - P^T of one product, and the row
normalisation of A + I is applied to the features (A^T (H / deg) + H / deg) instead of forming the
normalised (B, N, N) matrix, so each hop touches a (B, N, N) tensor once. The horizon
curriculum ("task level") of the reference lives in its training loop, not in the model, and is not
reproduced here; neither is day of week, which the reference does not read either.

Node-specific parameters are the two embeddings `node_emb_source` and `node_emb_target` (N, d); the
pre-defined supports are the non-persistent buffer `node_supports`. Everything else is shared by
all nodes.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from graphtune.checks import integer, number
from graphtune.models.layers import random_walk_supports
from graphtune.models.registry import register_model
from graphtune.models.seq2seq import Seq2SeqForecaster


MIX_WEIGHTS = (0.05, 0.95, 0.95)  # mix-hop (input kept a, dynamic graph b, pre-defined graph g), the paper's


def future_time_of_day(last: torch.Tensor, t_out: int, steps_per_day: int) -> torch.Tensor:
    """Time of day (fraction in [0, 1)) of the T_out steps after `last` (...,) -> (T_out, ...), wrapping at midnight.

    The reference feeds the decoder the time of day of each predicted step; the bundle's targets carry
    no time features, so they are continued from the last input step.
    """
    ahead = torch.arange(1, t_out + 1, dtype=last.dtype, device=last.device) / steps_per_day  # (T_out,)
    ahead = ahead.reshape((t_out,) + (1,) * last.dim())
    return torch.remainder(last.unsqueeze(0) + ahead, 1.0)


class DGCRNCell(nn.Module):
    """One GRU step on a graph generated from (x_t, h_{t-1}) and the node embeddings."""

    def __init__(self, input_size: int, hidden: int, node_dim: int, depth: int, hyper_dim: int, middle_dim: int,
                 tanh_alpha: float, mix_weights: tuple[float, float, float]):
        super().__init__()
        self.depth = depth
        self.tanh_alpha = tanh_alpha
        self.keep, self.dynamic_weight, self.static_weight = mix_weights
        width = (input_size + hidden) * (depth + 1)  # features after one mix-hop propagation

        def hyper_mlp() -> nn.Sequential:  # the reference's 3-layer filter generator
            return nn.Sequential(
                nn.Linear(width, hyper_dim), nn.Sigmoid(),
                nn.Linear(hyper_dim, middle_dim), nn.Sigmoid(),
                nn.Linear(middle_dim, node_dim),
            )

        # filter i for the source/target embedding, from the forward and the backward propagation
        self.hyper = nn.ModuleList(hyper_mlp() for _ in range(4))  # [src-fwd, src-bwd, tgt-fwd, tgt-bwd]
        self.gates = nn.Linear(2 * width, 2 * hidden)  # update and reset, over both directions
        self.candidate = nn.Linear(2 * width, hidden)

    def _static_mix(self, z: torch.Tensor, support_t: torch.Tensor) -> torch.Tensor:
        """Mix-hop over the pre-defined graph only (the hyper-network): z (B, N, F) -> (B, N, (depth + 1) * F)."""
        terms, h, kept = [z], z, self.keep * z
        for _ in range(self.depth):
            h = kept + self.static_weight * (support_t @ h)  # (N, N) @ (B, N, F)
            terms.append(h)
        return torch.cat(terms, dim=-1)

    def _mix_terms(self, z: torch.Tensor, adj_t: torch.Tensor, inv_degree: torch.Tensor,
                   support_t: torch.Tensor) -> list[torch.Tensor]:
        """Mix-hop terms [H^(0), ..., H^(depth)] of z (B, N, F) over a dynamic and a pre-defined graph.

        One hop is H -> a * z + b * D^T H + g * P^T H with D = rownorm(A + I). D is never formed:
        D^T H = A^T (H / deg) + H / deg, with deg = rowsum(A) + 1 given as `inv_degree` (B, N, 1) = 1 / deg,
        which keeps every (B, N, N)-sized operation down to the one product per hop.
        """
        terms, h, kept = [z], z, self.keep * z
        for _ in range(self.depth):
            scaled = h * inv_degree  # (B, N, F)
            dynamic = torch.baddbmm(scaled, adj_t, scaled)  # D^T H = A^T (H / deg) + H / deg
            h = kept + self.dynamic_weight * dynamic + self.static_weight * (support_t @ h)
            terms.append(h)
        return terms

    def dynamic_graph(self, x: torch.Tensor, h: torch.Tensor, node_emb_source: torch.Tensor,
                      node_emb_target: torch.Tensor, supports_t: torch.Tensor) -> torch.Tensor:
        """The generated adjacency A_t (B, N, N): non-negative, A_t[v, w] > 0 excludes A_t[w, v] > 0."""
        z = torch.cat([x, h], dim=-1)  # (B, N, C + H)
        forward, backward = self._static_mix(z, supports_t[0]), self._static_mix(z, supports_t[1])
        filter_source = self.hyper[0](forward) + self.hyper[1](backward)  # (B, N, d)
        filter_target = self.hyper[2](forward) + self.hyper[3](backward)
        source = torch.tanh(self.tanh_alpha * node_emb_source * filter_source)  # (B, N, d)
        target = torch.tanh(self.tanh_alpha * node_emb_target * filter_target)
        product = (self.tanh_alpha * source) @ target.transpose(1, 2)  # (B, N, N): alpha M1 M2^T
        # alpha (M1 M2^T - M2 M1^T) = P - P^T: one product, and exactly antisymmetric in floating point
        return torch.relu(torch.tanh(product - product.transpose(1, 2)))

    def forward(self, x: torch.Tensor, h: torch.Tensor, node_emb_source: torch.Tensor,
                node_emb_target: torch.Tensor, supports_t: torch.Tensor) -> torch.Tensor:
        """x (B, N, C), h (B, N, H) -> new state (B, N, H)."""
        adj = self.dynamic_graph(x, h, node_emb_source, node_emb_target, supports_t)  # (B, N, N)
        # forward direction: D = rownorm(A + I) with P_f; backward: rownorm(A^T + I) with P_b.
        # The hop applies D^T, so the forward pass multiplies by A^T and the backward one by A.
        directions = [
            (adj.transpose(1, 2), 1.0 / (adj.sum(dim=2, keepdim=True) + 1.0), supports_t[0]),  # (B, N, 1) out-degree
            (adj, 1.0 / (adj.sum(dim=1).unsqueeze(-1) + 1.0), supports_t[1]),  # in-degree
        ]

        def conv(z: torch.Tensor) -> torch.Tensor:  # both directions: (B, N, 2 * (depth + 1) * F)
            return torch.cat([t for direction in directions for t in self._mix_terms(z, *direction)], dim=-1)

        update, reset = torch.sigmoid(self.gates(conv(torch.cat([x, h], dim=-1)))).chunk(2, dim=-1)
        candidate = torch.tanh(self.candidate(conv(torch.cat([x, reset * h], dim=-1))))
        return update * h + (1.0 - update) * candidate


class DGCRN(Seq2SeqForecaster):
    """Encoder-decoder of DGCRN cells; forward(x, targets=None) -> (B, T_out, N) scaled predictions."""

    def __init__(self, supports: list[torch.Tensor], *, t_out: int, steps_per_day: int, hidden: int, node_dim: int,
                 depth: int, hyper_dim: int, middle_dim: int, tanh_alpha: float,
                 mix_weights: tuple[float, float, float], cl_decay_steps: float):
        super().__init__(cl_decay_steps)
        num_nodes = supports[0].shape[0]
        self.t_out = t_out
        self.steps_per_day = steps_per_day
        self.hidden = hidden
        # (2, N, N) transposed forward/backward transition matrices; non-persistent: never saved
        self.register_buffer("node_supports", torch.stack([p.t() for p in supports]).contiguous(), persistent=False)
        self.node_emb_source = nn.Parameter(torch.randn(num_nodes, node_dim))  # N(0, 1) like nn.Embedding
        self.node_emb_target = nn.Parameter(torch.randn(num_nodes, node_dim))
        cell_args = (hidden, node_dim, depth, hyper_dim, middle_dim, tanh_alpha, mix_weights)
        self.encoder = DGCRNCell(2, *cell_args)  # input: scaled value, time of day
        self.decoder = DGCRNCell(2, *cell_args)  # input: previous value, time of day of the predicted step
        self.projection = nn.Linear(hidden, 1)

    def _cell(self, cell: DGCRNCell, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One recurrent step; checkpointed when activation checkpointing is on (ForecastModel.run_block)."""
        return self.run_block(cell, x, h, self.node_emb_source, self.node_emb_target, self.node_supports)

    def checkpoint_blocks(self) -> list[str]:
        """The encoder and decoder cell at every time step: each keeps its input and state instead of its generated
        (B, N, N) graph and mix-hop terms, the bulk of backpropagation-through-time memory."""
        return ["encoder step", "decoder step"]

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T_in, N, C) with C >= 2 (value, time of day, ...); targets (B, T_out, N) scaled, NaN = missing."""
        b, t_in, n, _ = x.shape
        h = x.new_zeros(b, n, self.hidden)
        for t in range(t_in):
            h = self._cell(self.encoder, x[:, t, :, :2], h)

        tod = future_time_of_day(x[:, -1, :, 1], self.t_out, self.steps_per_day).unsqueeze(-1)  # (T_out, B, N, 1)

        teacher = self.start_decoding(targets, lambda y: y.transpose(0, 1).unsqueeze(-1))  # (T_out, B, N, 1)
        value = x.new_zeros(b, n, 1)  # the GO symbol
        outputs = []
        for t in range(self.t_out):
            h = self._cell(self.decoder, torch.cat([value, tod[t]], dim=-1), h)
            prediction = self.projection(h)  # (B, N, 1)
            outputs.append(prediction)
            value = self.decoder_input(prediction, t, teacher)
        return torch.cat(outputs, dim=-1).transpose(1, 2)  # (B, N, T_out) -> (B, T_out, N)


@register_model("dgcrn", options={
    "hidden": integer(min=1), "node_dim": integer(min=1),
    "depth": integer(min=1),  # 0 would leave a recurrent model that never reads the graph
    "hyper_dim": integer(min=1), "middle_dim": integer(min=1), "tanh_alpha": number(min=0, min_open=True),
    "cl_decay_steps": number(min=0, min_open=True),
})
def dgcrn(
    bundle,
    *,
    hidden: int = 32,  # paper: 64, which costs 2.2x the FLOPs per batch (600 vs 267 GFLOP/step, B=64, N=207)
    node_dim: int = 8,  # paper: 40; 8 keeps >= 90% of the weights node-independent up to 325 nodes at hidden 32
    depth: int = 2,  # mix-hop depth (gcn_depth), as in the paper
    hyper_dim: int = 16,  # hidden width of the filter generator, as in the paper
    middle_dim: int = 2,  # bottleneck of the filter generator, as in the paper
    tanh_alpha: float = 3.0,  # saturation of the graph generator, as in the paper
    cl_decay_steps: float = 20.0,  # paper: 2000-4000 for long GPU runs; 20 halves teacher forcing near 60 batches
) -> DGCRN:
    """DGCRN for `bundle`'s graph. Reads value and time of day (channels 0, 1) like the paper; not day of week."""
    return DGCRN(
        random_walk_supports(bundle.adj),
        t_out=bundle.t_out,
        steps_per_day=bundle.steps_per_day,
        hidden=hidden,
        node_dim=node_dim,
        depth=depth,
        hyper_dim=hyper_dim,
        middle_dim=middle_dim,
        tanh_alpha=tanh_alpha,
        mix_weights=MIX_WEIGHTS,
        cl_decay_steps=cl_decay_steps,
    )
