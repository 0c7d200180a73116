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
- Activation checkpointing (`train.activation_checkpointing`): a model lists its checkpointable blocks in
  `checkpoint_blocks()` and runs each of them through `self.run_block(fn, *args)` in forward. Inside
  `with model.activation_checkpointing():` (the train step enters it), a block run in training mode with
  grad enabled keeps only its inputs and recomputes its activations in backward
  (torch.utils.checkpoint.checkpoint, use_reentrant=False, which replays the RNG state so dropout draws
  the same mask); everywhere else `run_block` is a plain call. A block must be a pure function of its
  arguments and the module's parameters: no in-place state such as BatchNorm's running statistics, which
  the recomputation would update a second time (keep such layers outside the block).
- `micro_batch(index)`: the train step calls it before the forward of each micro-batch of one optimizer
  step (index 0 first; without gradient accumulation, `train.grad_accum` = 1, a step is one micro-batch),
  so a model that counts training batches (the sequence-to-sequence curriculum) counts the optimizer
  batch once; nothing to do for most models.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


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

    def micro_batch(self, index: int) -> None:
        """Called by the train step before the forward of micro-batch `index` (0 first) of each optimizer step;
        nothing to do for most models."""

    # ------------------------------------------------------------------ activation checkpointing
    _checkpointing: bool = False  # set only inside `activation_checkpointing()`

    def checkpoint_blocks(self) -> list[str]:
        """What `run_block` checkpoints in this model, one label per kind of block (for logs and errors);
        [] = nothing, and the train step refuses train.activation_checkpointing for the model."""
        return []

    @contextmanager
    def activation_checkpointing(self, enabled: bool = True) -> Iterator["ForecastModel"]:
        """Within the block, `run_block` checkpoints in training forwards with grad enabled; restored on exit."""
        previous, self._checkpointing = self._checkpointing, enabled
        try:
            yield self
        finally:
            self._checkpointing = previous

    def run_block(self, block: Callable, *args):
        """block(*args); under torch.utils.checkpoint (use_reentrant=False) when checkpointing is on, the model
        is in training mode and grad is enabled: the block's activations are then recomputed in backward."""
        if self._checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)
