"""The time-of-day profile of each node, and the seasonal residual built on it: one shared place.

    seasonal_profile(bundle, slots)   (S, N) mean scaled reading per node and time-of-day slot, from the
                                      training readings the bundle (a budget point's view) shows; a slot never
                                      seen falls back to the node's mean
    ProfileLookup                     the profile of the T_out steps after each window's last input step
    SeasonalResidual                  any ForecastModel as a correction on top of that profile:
                                      prediction = profile(t + h) + model(x)

The historical average (`ha`) is ProfileLookup on its own. Any registered model becomes a seasonal residual
with the model option `seasonal: true` (graphtune.models.registry): on series dominated by a daily cycle with
many zeros (hourly counts), a model that must learn each node's day from 12 steps of history does worse than
the profile itself, while a correction on top of the profile starts where the historical average is and only
has to learn what departs from it. The profile is a non-persistent buffer rebuilt from the view of the city a
model is built for, so a budget point's model sees the profile of its own data only, and it never transfers.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from graphtune.models.base import ForecastModel
from graphtune.models.layers import daily_profile, tod_slot


def seasonal_profile(bundle, slots: int | None = None) -> torch.Tensor:
    """(S, N) scaled mean per node and time-of-day slot over the bundle's visible training readings.

    `slots` None = one per sampling step (288 at 5 min, 24 hourly): the finest profile the data supports.
    A slot never observed falls back to the node's overall training mean (0, the scaled train mean, for a
    node never observed).
    """
    profile, node_mean, _ = daily_profile(bundle, slots or bundle.steps_per_day)  # (S, N), (N,)
    return torch.where(torch.isnan(profile), node_mean.expand_as(profile), profile)


class ProfileLookup(nn.Module):
    """x (B, T_in, N, C) -> (B, T_out, N): the profile at the time of day of each of the T_out next steps."""

    def __init__(self, profile: torch.Tensor, t_out: int, steps_per_day: int):
        super().__init__()
        self.register_buffer("node_profile", profile, persistent=False)  # (S, N) scaled
        self.t_out = t_out
        self.steps_per_day = steps_per_day

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slots = self.node_profile.shape[0]
        ahead = torch.arange(1, self.t_out + 1, device=x.device) / self.steps_per_day  # (T_out,) in days
        tod_ahead = (x[:, -1, 0, 1, None] + ahead) % 1.0  # (B, T_out): time of day of each target step
        return self.node_profile[tod_slot(tod_ahead, slots)]  # (B, T_out, N)


class SeasonalResidual(ForecastModel):
    """`core`'s output as a correction of the node's time-of-day profile: profile(t + h) + core(x)."""

    def __init__(self, core: ForecastModel, profile: ProfileLookup):
        super().__init__()
        self.core = core
        self.profile = profile
        self.takes_targets = core.takes_targets  # a teacher-forced core is fed its own residual targets

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        base = self.profile(x)  # (B, T_out, N) scaled
        if targets is not None and self.core.takes_targets:
            return base + self.core(x, targets=targets - base)
        return base + self.core(x)

    def after_transfer(self) -> None:
        self.core.after_transfer()
