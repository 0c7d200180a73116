"""The contract every registered model implements, and the hooks the training loop and strategies call.

    class MyModel(ForecastModel):
        def forward(self, x, targets=None):   # x (B, T_in, N, C) -> (B, T_out, N) scaled predictions
            ...

A model says what it needs through this interface instead of being special-cased by the loops:

- `takes_targets`: the training step passes the scaled targets (B, T_out, N) to forward (teacher
  forcing). False for models that never read them.
- `after_transfer()`: a strategy calls it once the model holds weights transferred from a source, before
  fine-tuning (e.g. a sequence-to-sequence model ends its teacher-forcing curriculum there).
- `prunable_groups()`: the channel groups data-free compression may remove (compression/groups.py), each
  with the builder option that holds its width; none by default.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class ForecastModel(nn.Module):
    """Base of every GraphTune forecaster: forward(x (B, T_in, N, C), targets=None) -> (B, T_out, N) scaled."""

    takes_targets: bool = False  # True: the train step passes scaled targets to forward

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def prunable_groups(self) -> list:
        """The PruneGroups compression may prune, in forward order (graphtune.compression.groups); none here."""
        return []

    def after_transfer(self) -> None:
        """Called by a strategy after loading a source's weights; nothing to do for most models."""
