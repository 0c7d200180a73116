"""Figures: transfer curves (test RMSE vs fine-tuning budget) and the leaderboard bar chart.

Figures are built on matplotlib's Agg canvas directly (`Figure` + `FigureCanvasAgg`), never through
pyplot: no global backend switch, no window, nothing kept alive in pyplot's figure registry, safe in
threads and on machines without a display. Importing this module does not import matplotlib.

    transfer_curve_figure / transfer_curve_png   one line per target city, fraction 0 = zero-shot
    leaderboard_figure / leaderboard_png         score mean per leaderboard row with std error bars
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

DPI = 120  # sharp enough for a README or the MLflow UI; 15-40 kB per PNG


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)  # attaches the Agg canvas: savefig renders PNG without any pyplot backend
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def transfer_curve_figure(curves: dict[str, list[tuple[float, float]]], title: str = "") -> Figure:
    """Test RMSE against the fine-tuning budget, one line per stage/city.

    curves: {"stage1 pems-bay": [(0.0, 5.1), (0.05, 4.3), (1.0, 3.9)], ...}: (fraction of the
    target's training windows, test RMSE); fraction 0 is the zero-shot model, drawn hollow.
    Points whose RMSE is None or NaN are left out. The x axis is linear up to the smallest
    positive fraction and logarithmic above it (symlog), so that 0, 1 % and 100 % are all readable.
    """
    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    kept = {
        label: sorted((float(f), float(r)) for f, r in points if r is not None and not math.isnan(float(r)))
        for label, points in curves.items()
    }
    kept = {label: points for label, points in kept.items() if points}
    for label, points in kept.items():
        xs, ys = zip(*points)
        (line,) = ax.plot(xs, ys, marker="o", label=label)
        zero_shot = [(x, y) for x, y in points if x == 0.0]
        if zero_shot:
            ax.plot(*zip(*zero_shot), marker="o", markersize=9, markerfacecolor="white",
                    color=line.get_color(), linestyle="none")  # an explicit color: the cycle stays put
    if not kept:
        ax.text(0.5, 0.5, "no transfer results", ha="center", va="center", transform=ax.transAxes)
    fractions = sorted({f for points in kept.values() for f, _ in points})
    positive = [f for f in fractions if f > 0]
    if len(positive) > 1:
        ax.set_xscale("symlog", linthresh=positive[0])
    if fractions:  # a tick at every budget, written as the fraction itself ("0.1", not "10^-1")
        ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
        ax.minorticks_off()
    ax.set_xlabel("fine-tuning budget (fraction of target training windows; 0 = zero-shot)")
    ax.set_ylabel("test RMSE")
    ax.grid(True, alpha=0.3)
    if kept:
        ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return fig


def transfer_curve_png(
    curves: dict[str, list[tuple[float, float]]], path: str | os.PathLike, title: str = ""
) -> Path:
    """Write transfer_curve_figure(curves, title) as a PNG at `path`; returns the path."""
    return _save(transfer_curve_figure(curves, title), path)


def leaderboard_figure(df: pd.DataFrame) -> Figure:
    """Horizontal bars of score_mean (error bar: score_std over seeds), best at the top.

    `df` is a leaderboard from graphtune.compare.leaderboard (rows in rank order); only `model`,
    `strategy` and `score_mean` are required, so any ad-hoc score table can be drawn too (`score_std`,
    `rank`, `datasets`, `config` and `board` are used when present: a pretrain board's rows are marked,
    reference rows drawn grey). A row with a single seed has no std (NaN) and no error bar.
    """
    n = len(df)
    fig = _new_figure(7.0, 1.5 + 0.45 * max(n, 1))  # 0.45 in per bar keeps labels from overlapping
    ax = fig.add_subplot()
    if n == 0:
        ax.text(0.5, 0.5, "no finished experiment runs", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    runs = df[df["strategy"] != "reference"] if "strategy" in df.columns else df
    several_datasets = "datasets" in df.columns and runs["datasets"].nunique(dropna=False) > 1
    labels, colors = [], []
    for _, row in df.iterrows():
        label = f"{row['model']} / {row['strategy']}"
        if row.get("config"):
            label += f" [{row['config']}]"
        if row.get("board") == "pretrain":
            label = "pretrain: " + label
        if several_datasets:
            label += f"\n{row['datasets']}"
        labels.append(label)
        colors.append("tab:gray" if row["strategy"] == "reference" else
                      "tab:orange" if row.get("board") == "pretrain" else "tab:blue")
    means = df["score_mean"].astype(float).to_numpy()
    stds = df["score_std"].astype(float).fillna(0.0).to_numpy() if "score_std" in df.columns else 0.0 * means
    ranks = df["rank"].tolist() if "rank" in df.columns else list(range(1, n + 1))
    positions = list(range(n))
    ax.barh(positions, means, xerr=stds if stds.any() else None, capsize=4, color=colors, alpha=0.8)
    ax.set_yticks(positions, labels)
    ax.invert_yaxis()  # rank 1 at the top
    for y, (mean, std, rank) in enumerate(zip(means, stds, ranks)):
        if not math.isnan(mean):  # the label sits just past the error bar
            ax.annotate(f"#{rank}  {mean:.3f}", (mean + std, y), xytext=(4, 0), textcoords="offset points",
                        va="center", fontsize="small")
    ax.set_xlabel("score (comparable across runs; mean over seeds, error bar = std)")
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def leaderboard_png(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write leaderboard_figure(df) as a PNG at `path`; returns the path."""
    return _save(leaderboard_figure(df), path)


def stage_scores_png(scores: dict[str, float], path: str | os.PathLike, title: str = "") -> Path:
    """One experiment's stage scores (the comparable score's parts combined per stage) as bars, stage 0 on top."""
    fig = _new_figure(6.0, 1.2 + 0.45 * max(len(scores), 1))
    ax = fig.add_subplot()
    labels, values = list(scores), [float(v) for v in scores.values()]
    ax.barh(range(len(values)), values, color="tab:green", alpha=0.8)
    ax.set_yticks(range(len(values)), labels)
    ax.invert_yaxis()
    for y, v in enumerate(values):
        ax.annotate(f"{v:.3f}", (v, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize="small")
    ax.set_xlabel("stage score (see graphtune.transfer.score)")
    if title:
        ax.set_title(title, fontsize="medium")
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path)
