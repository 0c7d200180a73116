"""Reference points every model must beat.

`ha`: the historical average. For each node and time-of-day slot, the mean scaled reading of the
training split; forecasts look up the slots that follow the last input step. Nothing is learned by
gradient: it is fitted from the bundle when built, so on a new city it is refitted from that city's
own training split.

`baseline`: a tiny learnable model. A temporal convolution whose kernel spans the whole input window
turns each node's history into a hidden vector, one diffusion step over the dual random-walk supports
mixes in the neighbours, and a shared linear head maps to T_out steps. All weights are shared by
the nodes, so it transfers whole.

Data-free compression finds no prunable group in `baseline`: its hidden channels feed a residual sum
(relu(graph(h)) + h), so removing one changes what the graph convolution adds to every other, and its
head is a single Linear with no hidden channels of its own.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphtune.checks import integer, number, optional
from graphtune.models.base import ForecastModel
from graphtune.models.layers import DiffusionGraphConv, random_walk_supports
from graphtune.models.seasonal import ProfileLookup, seasonal_profile
from graphtune.models.registry import register_model


class HistoricalAverage(ForecastModel):
    """Per-node, per-time-of-day mean of the training split; x (B, T_in, N, 3) -> (B, T_out, N) scaled."""

    def __init__(self, profile: ProfileLookup):
        super().__init__()
        self.profile = profile

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        return self.profile(x)


class GraphBaseline(ForecastModel):
    """Window encoder + one diffusion step + shared head; x (B, T_in, N, 3) -> (B, T_out, N) scaled."""

    def __init__(self, supports: list[torch.Tensor], t_in: int, t_out: int, hidden: int, dropout: float):
        super().__init__()
        self.register_buffer("node_supports", torch.stack(supports), persistent=False)  # (S, N, N)
        # A temporal convolution whose kernel spans the window = a Linear on the flattened window, shared by nodes.
        self.temporal = nn.Linear(2 * t_in, hidden)
        self.graph = DiffusionGraphConv(hidden, hidden, num_supports=len(supports), order=1, dropout=dropout)
        self.head = nn.Linear(hidden, t_out)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        b, _, n, _ = x.shape
        window = x[..., :2].transpose(1, 2).reshape(b, n, -1)  # (B, N, T_in * 2): scaled value, time of day
        h = F.relu(self.temporal(window))  # (B, N, H)
        h = F.relu(self.graph(h, list(self.node_supports))) + h  # (B, N, H)
        return self.head(h).transpose(1, 2)  # (B, T_out, N)


@register_model("ha", options={"slots_per_day": optional(integer(min=1))}, seasonal=False)
def ha(bundle, *, slots_per_day: int | None = None) -> HistoricalAverage:
    # None = one slot per sampling step (288 at 5 min): the finest profile the data supports.
    return HistoricalAverage(ProfileLookup(seasonal_profile(bundle, slots_per_day), bundle.t_out, bundle.steps_per_day))


@register_model("baseline", options={"hidden": integer(min=1), "dropout": number(min=0, max=1, max_open=True)})
def baseline(bundle, *, hidden: int = 32, dropout: float = 0.0) -> GraphBaseline:
    # hidden=32: enough for a one-hour window of one variable; the model stays ~3k parameters.
    # dropout=0.0: the model is too small to overfit the sample.
    return GraphBaseline(random_walk_supports(bundle.adj), bundle.t_in, bundle.t_out, hidden, dropout)


class Persistence(ForecastModel):
    """The last observed reading of each node, repeated over the horizon; x (B, T_in, N, 3) -> (B, T_out, N) scaled.

    Missing inputs arrive as 0.0 in scaled units (the train mean), so a step counts as observed when its
    scaled value is nonzero. A node with no observed step in its window is forecast at 0.0, the train mean.
    """

    def __init__(self, t_out: int):
        super().__init__()
        self.t_out = t_out

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        values = x[..., 0]  # (B, T_in, N) scaled
        steps = torch.arange(1, values.shape[1] + 1, device=x.device)[None, :, None]  # (1, T_in, 1)
        # argmax over step numbers of observed steps = the last observed one (step 0, a missing 0.0, if none)
        last = ((values != 0) * steps).argmax(dim=1, keepdim=True)  # (B, 1, N)
        return values.gather(1, last).expand(-1, self.t_out, -1)  # (B, T_out, N)


@register_model("persistence", seasonal=False)
def persistence(bundle) -> Persistence:
    # No options: the naive forecast every model must beat at short horizons.
    return Persistence(bundle.t_out)
