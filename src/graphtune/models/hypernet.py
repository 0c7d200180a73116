"""A hypernetwork forecaster whose per-node output heads are generated from node prompts.

Each node gets a prompt vector computed from the bundle when the model is built, never learned:

    [ lat, lon z-scored within the city          (2)   position relative to the city's other sensors
      log1p out/in degree, out/in weight sums     (4)   place in the graph
      train mean, train std (scaled units)        (2)   level and variability of its readings
      daily profile in `profile_bins` bins        (K)   shape of its day, minus its mean ]

A shared temporal encoder turns each node's window into a hidden vector, a diffusion graph
convolution over the dual random-walk supports mixes in the neighbours, and a head whose weights
W_n = W + G(p_n) (a shared base plus a generated offset) maps node n's hidden vector to T_out steps.
Every learnable tensor is shared by all nodes, so a model trained on one city runs on another with
heads generated from that city's prompts, without training: 100% of its parameters transfer.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphtune.checks import integer, number
from graphtune.models.layers import DiffusionGraphConv, daily_profile, graph_statistics, random_walk_supports
from graphtune.models.base import ForecastModel
from graphtune.models.registry import register_model


def node_prompts(bundle, profile_bins: int) -> torch.Tensor:
    """(N, 8 + profile_bins) prompt features of `bundle`'s nodes, from its graph, coordinates and train split."""
    n = bundle.num_nodes
    if bundle.coords is None:
        position = torch.zeros(n, 2)  # no coordinates: every node sits at the city's centre
    else:
        coords = torch.tensor(bundle.coords, dtype=torch.float64)  # (N, 2) lat, lon; a copy: the array may be read-only
        position = ((coords - coords.mean(0)) / coords.std(0, unbiased=False).clamp_min(1e-9)).float()
    profile, mean, std = daily_profile(bundle, profile_bins)  # (K, N), (N,), (N,)
    shape = torch.nan_to_num(profile - mean, nan=0.0).t()  # (N, K): an unseen bin counts as average
    return torch.cat([position, graph_statistics(bundle.adj), mean[:, None], std[:, None], shape], dim=1)


class HyperNet(ForecastModel):
    """x (B, T_in, N, 3) -> (B, T_out, N) scaled."""

    def __init__(
        self,
        prompts: torch.Tensor,
        supports: list[torch.Tensor],
        t_in: int,
        t_out: int,
        hidden: int,
        prompt_hidden: int,
        dropout: float,
    ):
        super().__init__()
        self.register_buffer("node_prompts", prompts, persistent=False)  # (N, P)
        self.register_buffer("node_supports", torch.stack(supports), persistent=False)  # (S, N, N)
        self.hidden, self.t_out, self.dropout = hidden, t_out, dropout
        # Encoder input per node: the window's scaled values, plus sin/cos time of day and day of week of its end.
        self.encoder = nn.Sequential(nn.Linear(t_in + 3, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.graph = DiffusionGraphConv(hidden, hidden, num_supports=len(supports), order=2, dropout=dropout)
        self.prompt_encoder = nn.Sequential(
            nn.Linear(prompts.shape[1], prompt_hidden), nn.ReLU(),
            nn.Linear(prompt_hidden, prompt_hidden), nn.ReLU(),
        )
        self.film = nn.Linear(prompt_hidden, 2 * hidden)  # per-node scale and shift of the hidden features
        self.base_weight = nn.Parameter(torch.empty(hidden, t_out))
        nn.init.xavier_uniform_(self.base_weight)
        self.base_bias = nn.Parameter(torch.zeros(t_out))
        self.generator = nn.Linear(prompt_hidden, (hidden + 1) * t_out)
        # Start as the shared head: generated offsets grow from zero as training finds them useful.
        nn.init.zeros_(self.generator.weight)
        nn.init.zeros_(self.generator.bias)

    def prunable_groups(self) -> list:
        """The prompt MLP's two hidden layers (each Linear, ReLU, into the next Linear or the film and generator
        heads). Both widths are `prompt_hidden`, pruned at one ratio. The encoder's channels are left alone:
        its output feeds the graph convolution's residual sum, and its hidden layer shares the width `hidden`."""
        from graphtune.compression.groups import PruneGroup

        return [PruneGroup("prompt_encoder.0", "prompt_hidden", ("prompt_encoder.0",), ("prompt_encoder.2",)),
                PruneGroup("prompt_encoder.2", "prompt_hidden", ("prompt_encoder.2",), ("film", "generator"))]

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        b, _, n, _ = x.shape
        angle = 2 * torch.pi * x[:, -1, :, 1]  # (B, N)
        dow = x[:, -1, :, 2] / 6.0 - 0.5  # (B, N) in [-0.5, 0.5]
        calendar = torch.stack([torch.sin(angle), torch.cos(angle), dow], dim=-1)  # (B, N, 3)
        features = torch.cat([x[..., 0].transpose(1, 2), calendar], dim=-1)  # (B, N, T_in + 3)
        h = F.relu(self.encoder(features))  # (B, N, H)
        h = h + F.relu(self.graph(h, list(self.node_supports)))  # (B, N, H)

        p = self.prompt_encoder(self.node_prompts)  # (N, P'): once per forward, independent of the batch
        scale, shift = self.film(p).chunk(2, dim=-1)  # (N, H) each
        h = h * (1 + scale) + shift  # (B, N, H)
        generated = self.generator(p)  # (N, (H + 1) * T_out)
        weight = self.base_weight + generated[:, : self.hidden * self.t_out].view(n, self.hidden, self.t_out)
        bias = self.base_bias + generated[:, self.hidden * self.t_out :]  # (N, T_out)
        return torch.einsum("bnh,nht->btn", h, weight) + bias.t()  # (B, T_out, N)


@register_model("hypernet", options={
    "hidden": integer(min=1), "prompt_hidden": integer(min=1), "profile_bins": integer(min=1),
    "dropout": number(min=0, max=1, max_open=True),
})
def hypernet(
    bundle,
    *,
    hidden: int = 32,  # per-node feature size; the generated head has hidden x T_out weights per node
    prompt_hidden: int = 32,  # prompt encoder width; prompts have only 8 + profile_bins features
    profile_bins: int = 6,  # 4-hour bins: enough for the morning/evening peaks, robust on a week of data
    dropout: float = 0.1,  # light: the generator already regularises by sharing weights across nodes
) -> HyperNet:
    prompts = node_prompts(bundle, profile_bins)
    return HyperNet(prompts, random_walk_supports(bundle.adj), bundle.t_in, bundle.t_out, hidden, prompt_hidden, dropout)
