"""The scikit-learn reference every learned series backbone is reported against.

A linear model on the flattened window (C channels x L steps = C*L features) after a StandardScaler, in one
Pipeline fitted on TRAINING windows only:

- classify: LogisticRegression(C, class_weight="balanced", lbfgs). "balanced" weighs each class by
  n / (2 * its count), i.e. positives by negatives / positives relative to negatives: the same weighting the
  learned backbones get from ``global_pos_weight`` in their BCE, so backbone and reference optimise the same
  objective. Its probabilities are therefore not calibrated to the base rate; the decision threshold is
  chosen on validation (metrics.best_threshold) for both alike.
- regress: Ridge(alpha) (alpha 1.0: scikit-learn's default; standardised features make it scale-free).

``max_train`` (200,000) caps the training windows: beyond it a seeded uniform subsample (without
replacement, in the original order) is fitted, and ``info["subsampled"]`` says so. 200,000 windows of a
few dozen features fit in seconds on a CPU, and a linear model gains nothing measurable beyond that.

MiniRocket (aeon) would be the stronger time-series reference; it is left out because aeon is not a
dependency of GraphTune.
"""

from __future__ import annotations

import numpy as np

from graphtune.errors import ConfigError, DataError

__all__ = ["Reference"]


class Reference:
    """LogisticRegression (classify, class_weight='balanced') or Ridge (regress) on the flattened windows, in a
    Pipeline with StandardScaler; fitted on training windows only (a seeded subsample of at most `max_train`
    of them when there are more). `info` (after fit) describes what was fitted, for logging."""

    def __init__(self, task: str, *, seed: int = 0, max_train: int = 200_000, alpha: float = 1.0, C: float = 1.0):
        if task not in ("classify", "regress"):
            raise ConfigError(f"series.task: expected one of classify, regress, got {task!r}")
        if isinstance(max_train, bool) or not isinstance(max_train, int) or max_train < 2:
            raise ConfigError(f"reference max_train: expected an integer >= 2, got {max_train!r}")
        for key, value in (("alpha", alpha), ("C", C)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"reference {key}: expected a positive number, got {value!r}")
        self.task = task
        self.seed = seed
        self.max_train = max_train
        self.alpha = float(alpha)
        self.C = float(C)
        self.pipeline = None
        self.info: dict = {}

    def _features(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 3:  # (M, C, L) windows are flattened here too
            x = x.reshape(len(x), -1)
        if x.ndim != 2:
            raise ValueError(f"expected windows of shape (M, C*L) or (M, C, L), got {x.shape}")
        return x

    def fit(self, x: np.ndarray, y: np.ndarray) -> "Reference":
        from sklearn.linear_model import LogisticRegression, Ridge
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x = self._features(x)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        if len(x) != len(y):
            raise ValueError(f"{len(x)} windows but {len(y)} labels")
        if len(x) == 0:
            raise DataError("the reference model has no training windows to fit")
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise DataError("the reference model's training windows or labels contain NaN or infinite values")
        n_total = len(x)
        if n_total > self.max_train:
            keep = np.sort(np.random.default_rng(self.seed).choice(n_total, self.max_train, replace=False))
            x, y = x[keep], y[keep]
        if self.task == "classify":
            y = (y > 0.5).astype(np.int64)
            if np.unique(y).size < 2:
                raise DataError(f"the reference classifier's {len(y)} training windows are all of one class")
            model = LogisticRegression(C=self.C, class_weight="balanced", max_iter=1000, random_state=self.seed)
            kind = "logistic_regression"
        else:
            model = Ridge(alpha=self.alpha)
            kind = "ridge"
        self.pipeline = make_pipeline(StandardScaler(), model).fit(x, y)
        self.info = {"model": kind, "features": int(x.shape[1]), "n_train": int(len(x)), "n_available": n_total,
                     "subsampled": bool(n_total > self.max_train), "seed": self.seed,
                     **({"C": self.C, "class_weight": "balanced"} if self.task == "classify" else
                        {"alpha": self.alpha})}
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        """classify: the probability of the positive class; regress: the prediction. (M,) float64."""
        if self.pipeline is None:
            raise RuntimeError("Reference.score before fit")
        x = self._features(x)
        if self.task == "classify":
            classes = list(self.pipeline.classes_)
            return self.pipeline.predict_proba(x)[:, classes.index(1)]
        return self.pipeline.predict(x).astype(np.float64)
