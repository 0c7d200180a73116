"""DCRNN: Diffusion Convolutional Recurrent Neural Network (Li, Yu, Shahabi, Liu; ICLR 2018).

A sequence-to-sequence GRU whose matrix products are diffusion convolutions over the road graph.
The encoder reads T_in steps of (scaled value, time of day); the decoder starts from a GO symbol of
zeros and feeds back its own prediction, or, while training, the true value with a probability that
decays with the number of batches seen (scheduled sampling, inverse sigmoid decay).

Diffusion convolution of Z (N, F) over the dual random-walk supports P_f = D_out^-1 A and
P_b = D_in^-1 A^T, K steps each (the paper's random-walk series, not the Chebyshev recursion):

    [Z, P_f^T Z, (P_f^T)^2 Z, ..., P_b^T Z, (P_b^T)^2 Z, ...] @ W + b

Every weight is shared by all nodes, so the model holds no node-specific parameter: the same
weights run on any graph. The supports are non-persistent buffers (`node_supports`), rebuilt from
the adjacency of whichever city the model is built for and never saved in the state dict.

Inside the recurrence the node axis comes first, (N, B, F), so one diffusion step over all
batch elements and features is a single (N, N) @ (N, B * F) matrix product.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphtune.checks import integer, number
from graphtune.models.layers import random_walk_supports
from graphtune.models.registry import register_model
from graphtune.models.seq2seq import Seq2SeqForecaster


def diffuse(z: torch.Tensor, supports_t: torch.Tensor, steps: int) -> torch.Tensor:
    """The diffusion series of z (N, B, F): [z, S_1 z, ..., S_1^K z, S_2 z, ...] -> (N, B, (1 + S * K) * F).

    `supports_t` (S, N, N) holds the transposed transition matrices P^T, so S z sends features along
    the out-edges (the convention of graphtune.models.layers.propagate).
    """
    n, b, f = z.shape
    flat = z.reshape(n, b * f)  # (N, B * F)
    terms = [z]
    for support in supports_t:
        h = flat
        for _ in range(steps):
            h = support @ h  # (N, B * F)
            terms.append(h.view(n, b, f))
    return torch.cat(terms, dim=-1)  # (N, B, M * F): contiguous F-blocks copy fast, unlike a stack on the last axis


def linear_of_concat(linear: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """linear(cat([a, b], -1)) without materialising the concatenation (the largest copy of a step)."""
    split = a.shape[-1]
    return F.linear(a, linear.weight[:, :split], linear.bias) + F.linear(b, linear.weight[:, split:])


class DCGRUCell(nn.Module):
    """A GRU cell whose gates and candidate are diffusion convolutions of [input, state]."""

    def __init__(self, input_size: int, hidden: int, num_supports: int, diffusion_steps: int):
        super().__init__()
        self.hidden = hidden
        self.diffusion_steps = diffusion_steps
        num_matrices = 1 + num_supports * diffusion_steps
        self.gates = nn.Linear((input_size + hidden) * num_matrices, 2 * hidden)  # reset and update
        self.candidate = nn.Linear((input_size + hidden) * num_matrices, hidden)
        for linear in (self.gates, self.candidate):
            nn.init.xavier_normal_(linear.weight)  # as the reference implementation
        nn.init.constant_(self.gates.bias, 1.0)  # as the reference: gates start near 0.73, favouring the old state
        nn.init.zeros_(self.candidate.bias)

    def forward(self, x: torch.Tensor, h: torch.Tensor, supports_t: torch.Tensor) -> torch.Tensor:
        """x (N, B, C_in), h (N, B, H) -> new state (N, B, H)."""
        dx = diffuse(x, supports_t, self.diffusion_steps)  # (N, B, M * C_in), shared by gates and candidate
        dh = diffuse(h, supports_t, self.diffusion_steps)  # (N, B, M * H)
        reset, update = torch.sigmoid(linear_of_concat(self.gates, dx, dh)).chunk(2, dim=-1)
        d_reset = diffuse(reset * h, supports_t, self.diffusion_steps)  # (N, B, M * H)
        candidate = torch.tanh(linear_of_concat(self.candidate, dx, d_reset))  # (N, B, H)
        return update * h + (1.0 - update) * candidate


class DCRNN(Seq2SeqForecaster):
    """Encoder-decoder of stacked DCGRU cells; forward(x, targets=None) -> (B, T_out, N) scaled predictions."""

    def __init__(self, supports: list[torch.Tensor], *, t_out: int, input_size: int, hidden: int, num_layers: int,
                 diffusion_steps: int, cl_decay_steps: float):
        super().__init__(cl_decay_steps)
        self.t_out = t_out
        self.input_size = input_size
        self.num_layers = num_layers
        self.hidden = hidden
        # (S, N, N) transposed transition matrices; non-persistent so no node-count-shaped tensor is saved
        self.register_buffer("node_supports", torch.stack([p.t() for p in supports]).contiguous(), persistent=False)
        num_supports = len(supports)
        self.encoder = nn.ModuleList(
            DCGRUCell(input_size if i == 0 else hidden, hidden, num_supports, diffusion_steps)
            for i in range(num_layers)
        )
        self.decoder = nn.ModuleList(
            DCGRUCell(1 if i == 0 else hidden, hidden, num_supports, diffusion_steps) for i in range(num_layers)
        )
        self.projection = nn.Linear(hidden, 1)  # last decoder state -> scaled value

    def _step(self, cells: nn.ModuleList, inputs: torch.Tensor, states: list[torch.Tensor]) -> torch.Tensor:
        """Run one time step through the stacked cells, updating `states` in place; returns the top state."""
        for i, cell in enumerate(cells):
            states[i] = self.run_block(cell, inputs, states[i], self.node_supports)  # checkpointed when enabled
            inputs = states[i]
        return inputs

    def checkpoint_blocks(self) -> list[str]:
        """Every DCGRU cell at every time step (T_in encoder and T_out decoder steps): each keeps its input and
        state instead of the diffusion series of both, which dominate the memory of backpropagation through time."""
        return [f"encoder.{i} step" for i in range(self.num_layers)] + [f"decoder.{i} step"
                                                                          for i in range(self.num_layers)]

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T_in, N, C) with C >= 2 (value, time of day, ...); targets (B, T_out, N) scaled, NaN = missing."""
        b, t_in, n, _ = x.shape
        inputs = x[..., : self.input_size].permute(1, 2, 0, 3)  # (T_in, N, B, input_size)
        states = [x.new_zeros(n, b, self.hidden) for _ in range(self.num_layers)]
        for t in range(t_in):
            self._step(self.encoder, inputs[t], states)

        teacher = self.start_decoding(targets, lambda y: y.permute(1, 2, 0).unsqueeze(-1))  # (T_out, N, B, 1)
        decoder_input = x.new_zeros(n, b, 1)  # the GO symbol
        outputs = []
        for t in range(self.t_out):
            top = self._step(self.decoder, decoder_input, states)
            prediction = self.projection(top)  # (N, B, 1)
            outputs.append(prediction)
            decoder_input = self.decoder_input(prediction, t, teacher)
        return torch.stack(outputs).squeeze(-1).permute(2, 0, 1)  # (T_out, N, B) -> (B, T_out, N)


@register_model("dcrnn", options={
    "hidden": integer(min=1), "num_layers": integer(min=1),
    "diffusion_steps": integer(min=1),  # 0 would leave a recurrent model that never reads the graph
    "cl_decay_steps": number(min=0, min_open=True),
})
def dcrnn(
    bundle,
    *,
    hidden: int = 32,  # paper: 64, which costs 2.6x the FLOPs per batch (252 vs 97 GFLOP/step, B=64, N=207)
    num_layers: int = 1,  # paper: 2; a second layer costs 2.6x per batch (256 vs 97 GFLOP/step, B=64, N=207)
    diffusion_steps: int = 2,  # K = 2 random-walk steps per direction, as in the paper
    cl_decay_steps: float = 20.0,  # paper: 2000 for ~15k batches; 20 halves teacher forcing near 60 batches (CPU runs)
) -> DCRNN:
    """DCRNN for `bundle`'s graph. Reads value and time of day (channels 0, 1) like the paper; not day of week."""
    return DCRNN(
        random_walk_supports(bundle.adj),
        t_out=bundle.t_out,
        input_size=2,
        hidden=hidden,
        num_layers=num_layers,
        diffusion_steps=diffusion_steps,
        cl_decay_steps=cl_decay_steps,
    )
