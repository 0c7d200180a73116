"""Graph WaveNet (Wu et al., IJCAI 2019), after the reference code nnzhan/Graph-WaveNet.

Stacked blocks of gated dilated causal temporal convolutions (kernel 2, dilations 1, 2 within each
block) interleaved with diffusion graph convolutions (order 2) over the dual random-walk supports
plus a learned adaptive adjacency softmax(relu(E1 E2^T)); every layer feeds a skip connection, and
two 1x1 end convolutions map the skip sum to T_out steps. The only node-specific tensors are the
adaptive-adjacency embeddings E1, E2 (`node_emb_source`, `node_emb_target`); a transferred model gets
fresh ones for the new graph and keeps every convolution.

Data-free compression (graphtune.compression) may prune two groups, whose channels reach their
consumers through ReLU alone: the skip channels (every skip convolution's outputs, summed, ReLU, into
end_conv_1) and the end channels (end_conv_1, ReLU, end_conv_2). The residual channels are left alone
(every layer adds into them and the BatchNorm mixes their statistics), and so are the gated dilation
channels (tanh * sigmoid of two halves is not per-channel ReLU, and they feed the graph convolution's
concatenated powers).

Layout: channels last, (B, T, N, C) (the reference uses (B, C, N, T)). Every 1x1 convolution is then an
`nn.Linear` over all (batch, time, node) rows and each kernel-2 dilated convolution a Linear on the
concatenation of the two taps; on CPU these GEMMs beat mkldnn 1x1 convolutions on (B, C, N, T).

Activation checkpointing (train.activation_checkpointing) recomputes each layer in backward (`_layer`,
ForecastModel.run_block): per layer only its input (B, T, N, R) is kept instead of the taps, gates,
diffusion powers and skip output, which are most of a training step's memory.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphtune.checks import boolean, integer, number
from graphtune.errors import ConfigError
from graphtune.models.layers import DiffusionGraphConv, adaptive_adjacency, random_walk_supports
from graphtune.models.base import ForecastModel
from graphtune.models.registry import register_model


def receptive_field(blocks: int, layers: int, kernel_size: int = 2) -> int:
    """Input steps seen by one output step: 1 + blocks * (kernel-1) * (1 + 2 + ... + 2^(layers-1))."""
    return 1 + blocks * (kernel_size - 1) * (2**layers - 1)


class GraphWaveNet(ForecastModel):
    """x (B, T_in, N, 3) -> (B, T_out, N) scaled."""

    def __init__(
        self,
        supports: list[torch.Tensor],
        num_nodes: int,
        t_out: int,
        residual_channels: int,
        dilation_channels: int,
        skip_channels: int,
        end_channels: int,
        blocks: int,
        layers: int,
        adaptive: bool,
        node_emb_dim: int,
        dropout: float,
    ):
        super().__init__()
        self.register_buffer("node_supports", torch.stack(supports), persistent=False)  # (S, N, N)
        self.receptive_field = receptive_field(blocks, layers)
        self.dilations = [2**i for _ in range(blocks) for i in range(layers)]  # 1, 2, 1, 2, ... (restart per block)
        self.adaptive = adaptive
        num_supports = len(supports) + int(adaptive)
        if adaptive:
            # Random init, as GWNet's best configuration (--randomadj): no assumption about the graph.
            self.node_emb_source = nn.Parameter(torch.randn(num_nodes, node_emb_dim))  # E1 (N, d)
            self.node_emb_target = nn.Parameter(torch.randn(num_nodes, node_emb_dim))  # E2 (N, d)

        self.start_conv = nn.Linear(3, residual_channels)
        # Filter and gate convolutions of one layer share one Linear: (2 taps x R) -> (filter D + gate D).
        self.temporal_convs = nn.ModuleList(
            nn.Linear(2 * residual_channels, 2 * dilation_channels) for _ in self.dilations
        )
        self.skip_convs = nn.ModuleList(nn.Linear(dilation_channels, skip_channels) for _ in self.dilations)
        # The last layer only feeds the skip sum: the reference's graph conv and norm there are dead weights, left out.
        self.graph_convs = nn.ModuleList(
            DiffusionGraphConv(dilation_channels, residual_channels, num_supports, order=2, dropout=dropout)
            for _ in self.dilations[:-1]
        )
        self.norms = nn.ModuleList(nn.BatchNorm1d(residual_channels) for _ in self.dilations[:-1])
        self.end_conv_1 = nn.Linear(skip_channels, end_channels)
        self.end_conv_2 = nn.Linear(end_channels, t_out)

    def prunable_groups(self) -> list:
        from graphtune.compression.groups import PruneGroup

        skips = tuple(f"skip_convs.{i}" for i in range(len(self.skip_convs)))
        return [PruneGroup("skip", "skip_channels", skips, ("end_conv_1",)),
                PruneGroup("end", "end_channels", ("end_conv_1",), ("end_conv_2",))]

    def checkpoint_blocks(self) -> list[str]:
        """Every layer up to its norm: gated temporal convolution, skip convolution, graph convolution, residual.
        The BatchNorm after it and the running skip sum stay outside (a recomputed BatchNorm would update its
        running statistics twice; the sum saves nothing for backward)."""
        return [f"layer {i}" for i in range(len(self.dilations))]

    def _layer(self, i: int, x: torch.Tensor, *supports: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Layer i up to its norm: (skip output (B, T', N, S), graph convolution plus residual (B, T', N, R)),
        T' = T - dilation; called without supports (the last layer) it returns the skip output alone, a 1-tuple."""
        d = self.dilations[i]
        taps = torch.cat([x[:, :-d], x[:, d:]], dim=-1)  # (B, T-d, N, 2R): x[t-d] and x[t]
        filt, gate = self.temporal_convs[i](taps).chunk(2, dim=-1)  # (B, T', N, D) each
        h = torch.tanh(filt) * torch.sigmoid(gate)
        s = self.skip_convs[i](h)  # (B, T', N, S)
        if not supports:
            return (s,)
        return s, self.graph_convs[i](h, list(supports)) + x[:, -h.shape[1] :]  # residual: the layer's input

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        # Channels: scaled value, time of day in [0, 1), day of week brought to [0, 1).
        x = torch.cat([x[..., :2], x[..., 2:] / 7.0], dim=-1)  # (B, T_in, N, 3)
        if x.shape[1] < self.receptive_field:
            x = F.pad(x, (0, 0, 0, 0, self.receptive_field - x.shape[1], 0))  # left-pad time: causal
        supports = list(self.node_supports)
        if self.adaptive:
            supports.append(adaptive_adjacency(self.node_emb_source, self.node_emb_target))  # once per forward

        x = self.start_conv(x)  # (B, T, N, R)
        skip = 0
        for i in range(len(self.dilations)):
            if i < len(self.dilations) - 1:
                s, x = self.run_block(self._layer, i, x, *supports)  # x before this layer's norm
                x = self.norms[i](x.reshape(-1, x.shape[-1])).view_as(x)  # batch norm over channels
            else:  # the last layer only feeds the skip sum
                (s,) = self.run_block(self._layer, i, x)
            skip = s if isinstance(skip, int) else s + skip[:, -s.shape[1] :]  # outside the block: never saved
        h = F.relu(skip[:, -1])  # (B, N, S): the receptive field covers the window exactly once
        h = F.relu(self.end_conv_1(h))
        return self.end_conv_2(h).transpose(1, 2)  # (B, T_out, N)


@register_model("gwnet", options={
    "residual_channels": integer(min=1), "dilation_channels": integer(min=1), "skip_channels": integer(min=1),
    "end_channels": integer(min=1), "blocks": integer(min=1), "layers": integer(min=1), "adaptive": boolean(),
    "node_emb_dim": integer(min=1), "dropout": number(min=0, max=1, max_open=True),
})
def gwnet(
    bundle,
    *,
    residual_channels: int = 32,  # the paper's width
    dilation_channels: int = 32,  # the paper's width
    skip_channels: int = 128,  # paper 256; halved with end_channels to train in minutes on 2 CPU cores
    end_channels: int = 256,  # paper 512; see skip_channels
    blocks: int = 4,  # 4 blocks x 2 layers, kernel 2: receptive field 13 >= 12 input steps (the paper's)
    layers: int = 2,  # dilations 1, 2 per block
    adaptive: bool = True,  # learn the adaptive adjacency (the paper's best variant)
    node_emb_dim: int = 10,  # the paper's embedding size for E1, E2
    dropout: float = 0.3,  # the paper's dropout on graph-convolution outputs
) -> GraphWaveNet:
    if receptive_field(blocks, layers) < bundle.t_in:
        raise ConfigError(
            f"gwnet: blocks={blocks}, layers={layers} see {receptive_field(blocks, layers)} input steps "
            f"but t_in={bundle.t_in}; raise blocks or layers"
        )
    return GraphWaveNet(
        random_walk_supports(bundle.adj), bundle.num_nodes, bundle.t_out, residual_channels, dilation_channels,
        skip_channels, end_channels, blocks, layers, adaptive, node_emb_dim, dropout,
    )
