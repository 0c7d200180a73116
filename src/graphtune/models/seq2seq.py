"""Encoder-decoder scaffolding shared by DCRNN and DGCRN: scheduled sampling over the decoder's inputs.

While training, the decoder is fed the true previous value instead of its own prediction with a
probability that decays with the number of training batches seen (inverse sigmoid decay, Bengio et al.
2015, as in DCRNN): one coin per decoder step for the whole batch, as in the reference implementations.
A model built for transfer has finished its curriculum: `after_transfer` moves it past the decay, so it is
fine-tuned free-running, the way it is evaluated.

Data-free compression declares no prunable group in these models: a GRU's hidden channels recirculate
through its own gates at every step, so a pruned channel's contribution cannot be moved into its
consumers once (graphtune.compression handles channels that flow forward through ReLU only).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from graphtune.models.base import ForecastModel

CURRICULUM_DONE = 10**9  # batches seen after which the teacher-forcing probability is 0 for any decay


def teacher_forcing_probability(batches_seen: int, decay_steps: float) -> float:
    """Scheduled-sampling probability of feeding the true value: k / (k + exp(batches_seen / k)).

    The inverse sigmoid decay of Bengio et al. (2015) as used by DCRNN: close to 1 at the start,
    one half near batches_seen = k * ln(k), then towards 0.
    """
    exponent = batches_seen / decay_steps
    if exponent > 700.0:  # exp would overflow a float; the probability is 0 to double precision anyway
        return 0.0
    return decay_steps / (decay_steps + math.exp(exponent))


class Seq2SeqForecaster(ForecastModel):
    """A ForecastModel whose decoder is trained with scheduled sampling.

    Subclasses call `start_decoding(targets, layout)` once before the decoder loop and
    `decoder_input(prediction, step, teacher)` after each step's prediction.
    """

    takes_targets = True

    def __init__(self, cl_decay_steps: float):
        super().__init__()
        self.cl_decay_steps = cl_decay_steps
        self.batches_seen = 0  # plain attribute: training batches so far, drives scheduled sampling
        self._p_teacher = 0.0
        self._repeat_batch = False  # the next training forward is a later micro-batch of the same optimizer batch

    def teacher_forcing_probability(self) -> float:
        return teacher_forcing_probability(self.batches_seen, self.cl_decay_steps)

    def after_transfer(self) -> None:
        self.batches_seen = CURRICULUM_DONE

    def micro_batch(self, index: int) -> None:
        """The curriculum counts optimizer batches, whatever train.grad_accum: the next training forward, when it is
        a later micro-batch (index > 0), reuses the first one's teacher-forcing probability and is not counted.
        Each micro-batch still draws its own coins, so only a finished curriculum (probability 0, as after
        `after_transfer`) makes the micro-batches' forwards exactly those of the whole batch."""
        self._repeat_batch = index > 0

    def start_decoding(self, targets: torch.Tensor | None,
                       layout: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
        """In training: count the batch and return the teacher values per decoder step (laid out by `layout`
        from the scaled targets (B, T_out, N), missing -> 0), or None when no targets were given.
        In evaluation: None (the decoder always runs on its own predictions)."""
        if not self.training:
            return None
        repeat, self._repeat_batch = self._repeat_batch, False  # applies to this one forward
        if not repeat:
            self._p_teacher = self.teacher_forcing_probability()
            self.batches_seen += 1
        return None if targets is None else layout(torch.nan_to_num(targets, nan=0.0))

    def decoder_input(self, prediction: torch.Tensor, step: int, teacher: torch.Tensor | None) -> torch.Tensor:
        """The next decoder input: the true value of `step` with the teacher-forcing probability, else `prediction`."""
        if teacher is not None and torch.rand(()).item() < self._p_teacher:
            return teacher[step]
        return prediction
