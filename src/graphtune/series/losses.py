"""Losses of the series task.

classify_loss = alpha * BCEWithLogits(pos_weight) + (1 - alpha) * (1 - soft_f1(sigmoid(logits))):

- BCE with ``pos_weight = negatives / positives`` of the TRAINING labels (``global_pos_weight``) weighs both
  classes equally in total, so a rare positive class (threshold crossings are rare) is not ignored; it is
  computed once on the training split, never per batch (a batch without positives would have none).
- soft-F1 is F1 = 2TP / (2TP + FP + FN) with TP, FP, FN the expected counts under the predicted
  probabilities (sums over the batch), so it is differentiable; on 0/1 inputs it IS F1. It optimises the
  metric reported, but its gradient is batch-level and weak at the start, hence the mix.
- alpha = 1 is EXACTLY BCE (the soft-F1 term is not even computed), alpha = 0 exactly 1 - soft-F1.

All are computed in float32 whatever the autocast dtype of the logits.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from graphtune.errors import ConfigError, DataError

__all__ = ["REGRESS_LOSSES", "classify_loss", "global_pos_weight", "regress_loss", "soft_f1"]

REGRESS_LOSSES = ("mse", "mae")


def soft_f1(probs: Tensor, targets: Tensor, eps: float = 1e-7) -> Tensor:
    """2TP / (2TP + FP + FN + eps) on probabilities (a scalar); equals F1 on 0/1 inputs (0 when there are
    neither positive targets nor positive predictions, as scikit-learn's f1_score)."""
    p = probs.float().reshape(-1)
    t = targets.to(p.dtype).reshape(-1)
    tp = (p * t).sum()
    fp = (p * (1.0 - t)).sum()
    fn = ((1.0 - p) * t).sum()
    return 2.0 * tp / (2.0 * tp + fp + fn + eps)


def classify_loss(logits: Tensor, targets: Tensor, *, alpha: float, pos_weight: float | None) -> Tensor:
    """alpha * BCEWithLogits(pos_weight) + (1 - alpha) * (1 - soft_f1(sigmoid(logits))), a scalar.

    logits and targets (0/1) are (B,); pos_weight None is plain BCE."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"series.alpha: expected a number in [0, 1], got {alpha!r}")
    if pos_weight is not None and (isinstance(pos_weight, bool) or not isinstance(pos_weight, (int, float))
                                   or not math.isfinite(pos_weight) or pos_weight <= 0):
        raise ConfigError(f"series.pos_weight: expected a positive number, got {pos_weight!r}")
    logits = logits.float()
    targets = targets.to(logits.dtype)
    if alpha == 0:
        return 1.0 - soft_f1(torch.sigmoid(logits), targets)
    weight = None if pos_weight is None else torch.tensor(float(pos_weight), dtype=logits.dtype,
                                                          device=logits.device)
    bce = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight)
    if alpha == 1:
        return bce
    return alpha * bce + (1.0 - alpha) * (1.0 - soft_f1(torch.sigmoid(logits), targets))


def regress_loss(pred: Tensor, target: Tensor, kind: str = "mse") -> Tensor:
    """Mean squared ("mse") or absolute ("mae") error, a scalar in float32."""
    pred = pred.float()
    target = target.to(pred.dtype)
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "mae":
        return F.l1_loss(pred, target)
    raise ConfigError(f"series.loss: expected one of {', '.join(REGRESS_LOSSES)}, got {kind!r}")


def global_pos_weight(labels: np.ndarray) -> float:
    """negatives / positives of the TRAINING labels (0/1). DataError when there is no positive (the weight
    is undefined) or no negative (a weight of 0 would switch the positives off: nothing to learn)."""
    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0:
        raise DataError("the training split has no labelled windows: the classify loss's pos_weight is undefined")
    if not np.isfinite(labels).all():
        raise DataError(f"{int(np.count_nonzero(~np.isfinite(labels)))} training labels are NaN or infinite")
    positives = int(np.count_nonzero(labels > 0.5))
    negatives = int(labels.size - positives)
    if positives == 0:
        raise DataError(f"none of the {labels.size} training windows is positive: the classify loss's pos_weight "
                        f"(negatives / positives) is undefined; choose a label rule that some windows meet")
    if negatives == 0:
        raise DataError(f"all {labels.size} training windows are positive: there is nothing to classify; choose "
                        f"a label rule that some windows do not meet")
    return negatives / positives
