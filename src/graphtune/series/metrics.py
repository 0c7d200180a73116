"""Metrics and figures of the series task, all through scikit-learn (the sktime / aeon / tsai reporting standard).

classify_metrics(y_true, y_score, tau)   precision, recall, f1, accuracy of `y_score >= tau` (zero_division=0),
                                         roc_auc, pr_auc (average precision: threshold-free), n, positives
best_threshold(y_true, y_score)          (tau, F1): the tau maximising F1, chosen on VALIDATION scores and
                                         then applied unchanged to the test split
regress_metrics(y_true, y_pred)          mae, mse, rmse, r2, n
classify_plots / regress_plots           PNGs (Agg canvas, never pyplot; see graphtune.plots)

A split with one class only (no positive or no negative window) has no ROC / PR curve: its AUCs are NaN and a
one-line GraphTuneNotice says so; nothing raises, and its plots are written with a note instead of a curve.
Every value returned is a plain Python int / float (NaN where undefined), ready for MLflow or JSON.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from graphtune.errors import GraphTuneNotice

__all__ = ["best_threshold", "classify_metrics", "classify_plots", "regress_metrics", "regress_plots"]

_MAX_POINTS = 20_000  # scatter plots draw at most this many points (a seeded subsample); histograms use all


def _binary(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=float).reshape(-1)
    s = np.asarray(y_score, dtype=float).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("classification labels must be 0 or 1")
    if not np.isfinite(s).all():
        raise ValueError(f"{int(np.count_nonzero(~np.isfinite(s)))} scores are NaN or infinite")
    return y.astype(np.int64), s


def _one_class_note(y: np.ndarray, split: str | None) -> str | None:
    """None when both classes occur; otherwise what is missing, for notices and plots."""
    positives = int(y.sum())
    if y.size and 0 < positives < y.size:
        return None
    where = f"the {split} split" if split else "a split"
    if y.size == 0:
        return f"{where} has no windows"
    kind = "positive" if positives == y.size else "negative"
    return f"{where} has only {kind} windows ({y.size})"


def classify_metrics(y_true, y_score, tau: float, *, split: str | None = None) -> dict:
    """Threshold metrics of `y_score >= tau` and threshold-free AUCs (see the module docstring).

    `split` (e.g. "val") only names the split in the one-class notice."""
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    y, s = _binary(y_true, y_score)
    out = {"n": int(y.size), "positives": int(y.sum())}
    note = _one_class_note(y, split)
    if y.size == 0:
        warnings.warn(f"{note}: its classification metrics are NaN", GraphTuneNotice, stacklevel=2)
        return {**out, **dict.fromkeys(("precision", "recall", "f1", "accuracy", "roc_auc", "pr_auc"), math.nan)}
    pred = (s >= tau).astype(np.int64)
    out["precision"] = float(precision_score(y, pred, zero_division=0))
    out["recall"] = float(recall_score(y, pred, zero_division=0))
    out["f1"] = float(f1_score(y, pred, zero_division=0))
    out["accuracy"] = float(accuracy_score(y, pred))
    if note is None:
        out["roc_auc"] = float(roc_auc_score(y, s))
        out["pr_auc"] = float(average_precision_score(y, s))
    else:
        warnings.warn(f"{note}: ROC AUC and PR AUC are undefined there (NaN)", GraphTuneNotice, stacklevel=2)
        out["roc_auc"] = out["pr_auc"] = math.nan
    return out


def best_threshold(y_true, y_score) -> tuple[float, float]:
    """(tau, F1 of `y_score >= tau`) with tau maximising F1 over every candidate threshold (each distinct score,
    as scikit-learn's precision_recall_curve gives them).

    Ties go to the LARGEST tau: of equally good thresholds it flags the fewest windows (the most conservative
    alarm) and it is the one least moved by adding low-scoring negatives. F1 is computed from exact counts,
    2TP / (positives + predicted positives), so equal F1s compare equal. Without positives every tau has
    F1 = 0 and the largest score is returned (with a notice); without windows, (0.5, NaN)."""
    from sklearn.metrics import precision_recall_curve

    y, s = _binary(y_true, y_score)
    if y.size == 0:
        warnings.warn("best_threshold: no windows; tau 0.5 is returned with F1 NaN", GraphTuneNotice, stacklevel=2)
        return 0.5, math.nan
    positives = int(y.sum())
    if positives == 0:
        warnings.warn(f"best_threshold: no positive window among {y.size}: F1 is 0 at every threshold",
                      GraphTuneNotice, stacklevel=2)
        return float(s.max()), 0.0
    _, _, thresholds = precision_recall_curve(y, s)  # distinct scores, ascending
    order = np.sort(s)
    predicted = y.size - np.searchsorted(order, thresholds, side="left")  # windows with score >= tau
    true_pos = positives - np.searchsorted(np.sort(s[y == 1]), thresholds, side="left")
    f1 = 2.0 * true_pos / (positives + predicted)
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))  # the last maximum: the largest tau among ties
    return float(thresholds[best]), float(f1[best])


def regress_metrics(y_true, y_pred) -> dict:
    """mae, mse, rmse (sqrt of mse), r2 (scikit-learn), n. NaN (with a notice) where undefined: r2 of fewer
    than two windows, everything of none."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    y = np.asarray(y_true, dtype=float).reshape(-1)
    p = np.asarray(y_pred, dtype=float).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"{y.size} targets but {p.size} predictions")
    if y.size == 0:
        warnings.warn("regression metrics of no windows are NaN", GraphTuneNotice, stacklevel=2)
        return {"n": 0, "mae": math.nan, "mse": math.nan, "rmse": math.nan, "r2": math.nan}
    mse = float(mean_squared_error(y, p))
    out = {"n": int(y.size), "mae": float(mean_absolute_error(y, p)), "mse": mse, "rmse": math.sqrt(mse)}
    if y.size < 2:
        warnings.warn("R2 of a single window is undefined (NaN)", GraphTuneNotice, stacklevel=2)
        out["r2"] = math.nan
    else:
        out["r2"] = float(r2_score(y, p))
    return out


# ------------------------------------------------------------------------------------------------- plots


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)


def _subsample(n: int) -> np.ndarray:
    if n <= _MAX_POINTS:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, _MAX_POINTS, replace=False))


def classify_plots(y_true, y_score, tau: float, out_dir: Path) -> list[Path]:
    """roc_curve.png, pr_curve.png (the operating point at tau marked on both) and hist_score.png (scores
    by class, tau as a vertical line) under `out_dir`; the written paths. A one-class split gets its curves
    replaced by a note."""
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    from graphtune.plots import _new_figure, _save

    y, s = _binary(y_true, y_score)
    out_dir = Path(out_dir)
    note = _one_class_note(y, None)
    pred = s >= tau
    positives = int(y.sum())
    tp = int(np.count_nonzero(pred & (y == 1)))
    fp = int(np.count_nonzero(pred & (y == 0)))
    paths = []

    fig = _new_figure(5.0, 4.5)
    ax = fig.add_subplot()
    if note is None:
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, color="tab:blue", label=f"ROC (AUC {auc(fpr, tpr):.3f})")
        ax.plot([0, 1], [0, 1], color="tab:gray", linestyle="--", linewidth=1, label="chance")
        ax.plot(fp / (y.size - positives), tp / positives, "o", color="tab:red", label=f"tau = {tau:.3g}")
        ax.legend(loc="lower right", fontsize="small")
    else:
        _note(ax, f"{note}:\nno ROC curve")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax.grid(True, alpha=0.3)
    paths.append(_save(fig, out_dir / "roc_curve.png"))

    fig = _new_figure(5.0, 4.5)
    ax = fig.add_subplot()
    if note is None:
        precision, recall, _ = precision_recall_curve(y, s)
        ax.step(recall, precision, where="post", color="tab:blue", label=f"PR (AUC {auc(recall, precision):.3f})")
        ax.axhline(positives / y.size, color="tab:gray", linestyle="--", linewidth=1, label="positive rate")
        ax.plot(tp / positives, tp / max(tp + fp, 1), "o", color="tab:red", label=f"tau = {tau:.3g}")
        ax.legend(loc="upper right", fontsize="small")
    else:
        _note(ax, f"{note}:\nno precision-recall curve")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title="precision-recall")
    ax.grid(True, alpha=0.3)
    paths.append(_save(fig, out_dir / "pr_curve.png"))

    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    if y.size:
        lo, hi = float(min(s.min(), tau)), float(max(s.max(), tau))
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
        for label, color in ((0, "tab:blue"), (1, "tab:orange")):
            part = s[y == label]
            if part.size:  # density: both classes visible however rare the positives
                ax.hist(part, bins=bins, density=True, alpha=0.5, color=color,
                        label=f"{'positive' if label else 'negative'} ({part.size})")
        ax.axvline(tau, color="tab:red", linestyle="--", label=f"tau = {tau:.3g}")
        ax.legend(fontsize="small")
        if note is not None:
            ax.set_title(note, fontsize="small")
    else:
        _note(ax, "no windows")
    ax.set(xlabel="score", ylabel="density")
    paths.append(_save(fig, out_dir / "hist_score.png"))
    return paths


def regress_plots(y_true, y_pred, out_dir: Path) -> list[Path]:
    """residuals.png (residual against prediction) and scatter.png (prediction against truth, y = x drawn)
    under `out_dir`; at most 20,000 points are drawn (a seeded subsample, said in the title)."""
    from graphtune.plots import _new_figure, _save

    y = np.asarray(y_true, dtype=float).reshape(-1)
    p = np.asarray(y_pred, dtype=float).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"{y.size} targets but {p.size} predictions")
    out_dir = Path(out_dir)
    keep = _subsample(y.size)
    shown = "" if keep.size == y.size else f" ({keep.size} of {y.size} windows drawn)"
    paths = []

    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    if y.size:
        ax.scatter(p[keep], (y - p)[keep], s=4, alpha=0.3, color="tab:blue", rasterized=True)
        ax.axhline(0.0, color="tab:red", linewidth=1)
    else:
        _note(ax, "no windows")
    ax.set(xlabel="prediction", ylabel="residual (truth - prediction)", title="residuals" + shown)
    ax.grid(True, alpha=0.3)
    paths.append(_save(fig, out_dir / "residuals.png"))

    fig = _new_figure(5.0, 5.0)
    ax = fig.add_subplot()
    if y.size:
        ax.scatter(y[keep], p[keep], s=4, alpha=0.3, color="tab:blue", rasterized=True)
        lo, hi = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
        ax.plot([lo, hi], [lo, hi], color="tab:red", linewidth=1, label="y = x")
        ax.legend(fontsize="small")
    else:
        _note(ax, "no windows")
    ax.set(xlabel="truth", ylabel="prediction", title="prediction vs truth" + shown)
    ax.grid(True, alpha=0.3)
    paths.append(_save(fig, out_dir / "scatter.png"))
    return paths
