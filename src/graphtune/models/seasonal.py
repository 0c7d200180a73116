"""The time-of-day profile of each node, and the seasonal residual built on it: one shared place.

    seasonal_profile(bundle, slots)   (S, N) mean scaled reading per node and time-of-day slot, from the
                                      training readings the bundle (a budget point's view) shows; a slot never
                                      seen falls back to the node's mean
    ProfileLookup                     the profile of the T_out steps after each window's last input step
    SeasonalResidual                  any ForecastModel as a correction on top of that profile:
                                      prediction = profile(t + h) + gate_h * model(x), the gate starting at 0

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

GATE_SCALE = 10.0  # the gate's unit: with Adam at lr 1e-3, about 0.01 of the correction opens per step


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
    """`core`'s output as a gated correction of the node's time-of-day profile: profile(t + h) + g_h * core(x).

    The gate g (one per lead time) starts at zero, as the gates of DiT's adaptive blocks do: a new model
    forecasts exactly the profile, i.e. the historical average of the data it was built from, and training
    opens the gate only as far as the correction helps. With `fit` keeping the starting weights as a
    candidate, a seasonal model never ends worse on validation than the historical average.
    """

    def __init__(self, core: ForecastModel, profile: ProfileLookup):
        super().__init__()
        self.core = core
        self.profile = profile
        # (T_out, 1): one gate per lead time, shared by the nodes, in units of 1 / GATE_SCALE, so that Adam (whose
        # steps are about lr in parameter units) opens it GATE_SCALE times faster than the model's own weights move
        self.gate_raw = nn.Parameter(torch.zeros(profile.t_out, 1))
        self.takes_targets = core.takes_targets  # a teacher-forced core is fed its own residual targets

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        base = self.profile(x)  # (B, T_out, N) scaled
        if targets is not None and self.core.takes_targets:
            return base + self.gate * self.core(x, targets=targets - base)
        return base + self.gate * self.core(x)

    @property
    def gate(self) -> torch.Tensor:
        return GATE_SCALE * self.gate_raw

    def after_transfer(self) -> None:
        """A transferred seasonal model starts from the target's own profile: the gate closes again (the source's
        correction stays in the core, and comes back as far as fine-tuning on the target opens the gate)."""
        with torch.no_grad():
            self.gate_raw.zero_()
        self.core.after_transfer()
