"""Node-level Graph WaveNet: one small model per node, on the node's 1-hop ego-subgraph (GPD's base model).

GPD (Yuan et al., ICLR 2024) generates parameters per node: for each node of a city, a small
spatio-temporal model reads the node's 1-hop ego-subgraph (the node and its in- and out-neighbours)
and predicts the centre node. Its base is a Graph WaveNet variant ("v_GWN") with no adaptive adjacency
and no biases. Ours is built from the same layers as `gwnet` (graphtune.models.gwnet, layers.py):

    x_ego (B, T_in, K, 3) --start--> gated dilated temporal convs (kernel 2, dilations 1, 2 per block)
        --> diffusion graph convs over the ego-subgraph's two random-walk supports (forward, backward),
        every layer feeding the skip sum --> the centre node's skip features --> end convs --> (B, T_out)

What differs from GPD's vectors, and why:
- no bias anywhere (GPD's choice): padded ego slots then stay exactly zero through every layer;
- no batch norm: its running statistics are state, not parameters, and would have to be generated too;
- only parameters that receive gradient: the last layer feeds only the skip sum, so it has no graph conv
  (GPD's vectors carry residual convolutions that never run, at their random initialisation);
- the ego-subgraph is the centre plus its `neighbours` strongest in/out neighbours (GPD takes all of them),
  so that every node model has the same input size K = 1 + neighbours; slots of a node with fewer
  neighbours are padded (zero input, no edge).

`NodeModels` holds the models of every node of a city as one module: each parameter of the single-node
model is stacked along a leading node axis, and forward runs all node models as one grouped computation
(`grouped_forward`: each Linear of NodeGWN becomes one batched GEMM over the nodes), which is how a city's
node models train together in one `fit`. `forward_each` runs NodeGWN itself per node (vmap over
functional_call): the reference the grouped computation is tested against; it is about 10x slower on CPU.
Node models never share a parameter, so the mean loss over nodes trains each one on its own loss (Adam's
update is elementwise and invariant to the 1/N scale); only gradient clipping, when enabled, couples them.
Each node's parameter vector is `NodeModels.vectors()`: the tensors in `param_names` order, each flattened
row-major (graphtune.generative.paramset documents the order).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

from graphtune.checks import boolean, integer
from graphtune.errors import ConfigError
from graphtune.models.base import ForecastModel
from graphtune.models.gwnet import receptive_field
from graphtune.models.layers import DiffusionGraphConv, random_walk_supports
from graphtune.models.registry import register_model


class NodeGWN(nn.Module):
    """One node's model: x (B, T_in, K, 3) of its ego-subgraph (centre at slot 0), supports (2, K, K) -> (B, T_out)."""

    def __init__(self, t_out: int, residual_channels: int, dilation_channels: int, skip_channels: int,
                 end_channels: int, blocks: int, layers: int):
        super().__init__()
        self.spec = (t_out, residual_channels, dilation_channels, skip_channels, end_channels, blocks, layers)
        self.receptive_field = receptive_field(blocks, layers)
        self.dilations = [2**i for _ in range(blocks) for i in range(layers)]
        r, d, s = residual_channels, dilation_channels, skip_channels
        self.start = nn.Linear(3, r, bias=False)
        self.temporal = nn.ModuleList(nn.Linear(2 * r, 2 * d, bias=False) for _ in self.dilations)
        self.skip = nn.ModuleList(nn.Linear(d, s, bias=False) for _ in self.dilations)
        # the last layer only feeds the skip sum: a graph conv there would never receive gradient
        self.graph = nn.ModuleList(DiffusionGraphConv(d, r, num_supports=2, order=2, bias=False)
                                   for _ in self.dilations[:-1])
        self.end1 = nn.Linear(s, end_channels, bias=False)
        self.end2 = nn.Linear(end_channels, t_out, bias=False)

    def forward(self, x: torch.Tensor, supports: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[..., :2], x[..., 2:] / 7.0], dim=-1)  # day of week to [0, 1), as gwnet
        if x.shape[-3] < self.receptive_field:
            x = F.pad(x, (0, 0, 0, 0, self.receptive_field - x.shape[-3], 0))  # causal left pad of time
        pair = [supports[0], supports[1]]
        x = self.start(x)  # (B, T, K, R)
        skip = None
        for i, d in enumerate(self.dilations):
            residual = x
            taps = torch.cat([x[:, :-d], x[:, d:]], dim=-1)  # x[t-d] and x[t]
            filt, gate = self.temporal[i](taps).chunk(2, dim=-1)
            h = torch.tanh(filt) * torch.sigmoid(gate)  # (B, T', K, D)
            s = self.skip[i](h[:, -1, 0])  # only the centre's last step reaches the output
            skip = s if skip is None else s + skip
            if i == len(self.dilations) - 1:
                break
            x = self.graph[i](h, pair) + residual[:, -h.shape[1]:]
        h = F.relu(self.end1(F.relu(skip)))  # (B, E)
        return self.end2(h)  # (B, T_out)


def _linear(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-node linear map: h (n, ..., in) with weight (n, out, in) -> (n, ..., out), as one batched GEMM."""
    n, out = weight.shape[0], weight.shape[1]
    flat = h.reshape(n, -1, h.shape[-1])
    return torch.bmm(flat, weight.transpose(1, 2)).reshape(*h.shape[:-1], out)


def grouped_forward(template: NodeGWN, params: dict[str, torch.Tensor], x: torch.Tensor,
                    supports: torch.Tensor) -> torch.Tensor:
    """NodeGWN.forward for n node models at once: x (n, B, T, K, 3), params name -> (n, *shape), supports
    (n, 2, K, K) -> (n, B, T_out). The same operations as the single-node model, each Linear a batched GEMM."""
    x = torch.cat([x[..., :2], x[..., 2:] / 7.0], dim=-1)
    if x.shape[2] < template.receptive_field:
        x = F.pad(x, (0, 0, 0, 0, template.receptive_field - x.shape[2], 0))
    last = len(template.dilations) - 1
    x = _linear(x, params["start.weight"])  # (n, B, T, K, R)
    skip = None
    for i, d in enumerate(template.dilations):
        residual = x
        taps = torch.cat([x[:, :, :-d], x[:, :, d:]], dim=-1)
        filt, gate = _linear(taps, params[f"temporal.{i}.weight"]).chunk(2, dim=-1)
        h = torch.tanh(filt) * torch.sigmoid(gate)  # (n, B, T', K, D)
        s = _linear(h[:, :, -1, 0], params[f"skip.{i}.weight"])  # (n, B, S): the centre's last step
        skip = s if skip is None else s + skip
        if i == last:
            break
        terms = [h]
        for k in range(supports.shape[1]):  # diffusion over each support, order 2, as DiffusionGraphConv
            z = h
            for _ in range(template.graph[i].order):
                z = torch.einsum("nvw,nbtvc->nbtwc", supports[:, k], z)
                terms.append(z)
        x = _linear(torch.cat(terms, dim=-1), params[f"graph.{i}.mlp.weight"]) + residual[:, :, -h.shape[2]:]
    h = F.relu(_linear(F.relu(skip), params["end1.weight"]))
    return _linear(h, params["end2.weight"])  # (n, B, T_out)


def ego_supports(adj: np.ndarray, members: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The ego-subgraphs' inputs: gather index (N, K) (padded slots point at the centre) and valid mask (N, K),
    and the two random-walk supports of each induced ego adjacency (N, 2, K, K), zero rows/columns at padding."""
    n, k = members.shape
    valid = members >= 0
    index = np.where(valid, members, np.arange(n)[:, None])
    sub = adj[index[:, :, None], index[:, None, :]] * (valid[:, :, None] & valid[:, None, :])  # (N, K, K)
    supports = torch.stack([torch.stack(random_walk_supports(a)) for a in sub.astype(np.float32)])
    return torch.from_numpy(index).long(), torch.from_numpy(valid), supports


class NodeModels(ForecastModel):
    """The node models of one city as one module: x (B, T_in, N, 3) -> (B, T_out, N), every node by its own model."""

    def __init__(self, template: NodeGWN, adj: np.ndarray, neighbours: int, shared_init: bool = True,
                 chunk: int = 256):
        super().__init__()
        from graphtune.data.prompts import ego_members  # the one definition of an ego-subgraph (prompts use it too)

        n = adj.shape[0]
        index, valid, supports = ego_supports(adj, ego_members(adj, neighbours))
        self.register_buffer("ego_index", index, persistent=False)
        self.register_buffer("ego_valid", valid, persistent=False)
        self.register_buffer("ego_supports", supports, persistent=False)
        self.param_names = [name for name, _ in template.named_parameters()]  # the flatten order
        self.param_shapes = {name: tuple(p.shape) for name, p in template.named_parameters()}
        self.chunk = chunk
        if shared_init:  # every node from the same seeded draw: weights stay comparable across nodes
            stacked = {name: p.detach().expand(n, *p.shape).clone() for name, p in template.named_parameters()}
        else:  # independent draws, node by node (GPD's default; measured against shared init in bench_gpd)
            draws = [dict(template.named_parameters())] + [
                dict(NodeGWN(*template.spec).named_parameters()) for _ in range(n - 1)]
            stacked = {name: torch.stack([d[name].detach() for d in draws]) for name in self.param_names}
        self.node_weights = nn.ParameterDict({_key(name): nn.Parameter(t) for name, t in stacked.items()})
        # the template's own tensors are never used (functional_call replaces them): keep it out of the state
        object.__setattr__(self, "_template", template.requires_grad_(False))

    @property
    def num_nodes(self) -> int:
        return int(self.ego_index.shape[0])

    def stacked(self) -> dict[str, torch.Tensor]:
        """name -> the stacked parameter (N, *shape), in flatten order."""
        return {name: self.node_weights[_key(name)] for name in self.param_names}

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        outs = []
        for lo in range(0, self.num_nodes, self.chunk):  # node chunks bound the activations' memory
            hi = min(lo + self.chunk, self.num_nodes)
            idx, ok = self.ego_index[lo:hi], self.ego_valid[lo:hi]
            xe = x[:, :, idx] * ok[None, None, :, :, None].to(x.dtype)  # (B, T, n, K, C); padding -> 0
            params = {name: p[lo:hi] for name, p in self.stacked().items()}
            outs.append(grouped_forward(self._template, params, xe.permute(2, 0, 1, 3, 4),
                                        self.ego_supports[lo:hi]))  # (n, B, T_out)
        return torch.cat(outs).permute(1, 2, 0)  # (B, T_out, N)

    def forward_each(self, x: torch.Tensor) -> torch.Tensor:
        """The reference computation: every node's NodeGWN run on its own (`torch.func.vmap` over
        `functional_call`), equal to `forward` up to float rounding (tested); several times slower on CPU."""
        template = self._template
        idx, ok = self.ego_index, self.ego_valid
        xe = (x[:, :, idx] * ok[None, None, :, :, None].to(x.dtype)).permute(2, 0, 1, 3, 4)
        run = vmap(lambda params, xi, si: functional_call(template, params, (xi, si)))
        return run(self.stacked(), xe, self.ego_supports).permute(1, 2, 0)

    @torch.no_grad()
    def vectors(self) -> torch.Tensor:
        """(N, P) float32: each node's parameters flattened, tensors in `param_names` order (row-major)."""
        return torch.cat([p.detach().reshape(self.num_nodes, -1) for p in self.stacked().values()], dim=1).cpu()

    @torch.no_grad()
    def load_vectors(self, vectors: torch.Tensor) -> None:
        """Set every node's parameters from (N, P) vectors (the inverse of `vectors`, bit-exact)."""
        sizes = [int(np.prod(self.param_shapes[name])) for name in self.param_names]
        if tuple(vectors.shape) != (self.num_nodes, sum(sizes)):
            raise ValueError(f"expected vectors of shape ({self.num_nodes}, {sum(sizes)}), got {tuple(vectors.shape)}")
        for (name, p), part in zip(self.stacked().items(), vectors.split(sizes, dim=1)):
            p.copy_(part.reshape(p.shape).to(p.device, p.dtype))


def _key(name: str) -> str:
    return name.replace(".", "-")  # ParameterDict keys cannot hold dots


NODE_OPTIONS = {
    "residual_channels": integer(min=1), "dilation_channels": integer(min=1), "skip_channels": integer(min=1),
    "end_channels": integer(min=1), "blocks": integer(min=1), "layers": integer(min=1),
    "neighbours": integer(min=1), "shared_init": boolean(),
}


@register_model("node-gwn", options=NODE_OPTIONS, seasonal=False)
def node_gwn(
    bundle,
    *,
    # GPD's v_GWN is 32 channels wide (about 92k parameters per node); a commented-out 16/8/16/16 variant has
    # about 12k. We take 8/8/16/16 (5.8k per node): a city's node models then train in minutes on 2 CPU cores,
    # and the denoiser models vectors of 5.8k values from a few hundred source nodes, not 92k.
    residual_channels: int = 8,
    dilation_channels: int = 8,
    skip_channels: int = 16,
    end_channels: int = 16,
    blocks: int = 4,  # 4 blocks x 2 layers: receptive field 13 >= 12 input steps, as gwnet
    layers: int = 2,
    neighbours: int = 8,  # ego-subgraph = centre + its 8 strongest in/out neighbours (K = 9)
    shared_init: bool = True,  # every node model starts from one seeded draw (comparable weights across nodes)
) -> NodeModels:
    if receptive_field(blocks, layers) < bundle.t_in:
        raise ConfigError(f"node-gwn: blocks={blocks}, layers={layers} see {receptive_field(blocks, layers)} input "
                          f"steps but t_in={bundle.t_in}; raise blocks or layers")
    # A city smaller than an ego-subgraph still runs (slots are padded); gpd refuses it as a source or target
    # (graphtune.generative.strategy.check_sources), since no node there can have the neighbourhood it models.
    template = NodeGWN(bundle.t_out, residual_channels, dilation_channels, skip_channels, end_channels, blocks, layers)
    return NodeModels(template, np.asarray(bundle.adj, dtype=np.float64), neighbours, shared_init)
