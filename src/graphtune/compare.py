"""Tracking store -> leaderboard: one row per (model, strategy, datasets), ranked by S_uep.

    leaderboard(...)            read the FINISHED experiment-kind runs (through tracking.search_runs)
                                and aggregate them over seeds
    aggregate_runs(runs)        the pure aggregation, on a mlflow.search_runs frame
    write_leaderboard(df, dir)  leaderboard.csv, leaderboard.md, leaderboard.png
    format_table(df)            the same table as plain text for a terminal
    live_leaderboard(rows)      the per-stage table the experiment loop prints after each stage

Aggregation rules. Only runs tagged graphtune.kind=experiment with status FINISHED count (a
FAILED or KILLED run has no trustworthy final metrics). When one seed of a group was run more than
once, only its latest run (by start time) counts, so a rerun replaces rather than double-weights a
seed. Means skip missing values; std is the sample std over seeds (ddof=1), NaN for one seed.
Rank 1 = highest S_uep_mean; ties go to the lower final_test_rmse_mean, then to names.

mlflow is imported only when `leaderboard` reads a store: the formatting functions are cheap.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from graphtune.errors import ConfigError

GROUP_KEYS = ("model", "strategy", "datasets")
SPREAD_METRICS = ("S_uep", "final_test_mae", "final_test_rmse", "final_test_mape")  # mean and std
MEAN_METRICS = ("mean_transfer_auc", "total_train_time_s", "peak_rss_mb", "trainable_params", "flops_g")
COLUMNS = [
    "rank",
    *GROUP_KEYS,
    "n_runs",
    "seeds",
    *(f"{metric}_{stat}" for metric in SPREAD_METRICS for stat in ("mean", "std")),
    *MEAN_METRICS,
]

# The graphtune.* tag keys; repeated from tracking.py so that this module does not import mlflow.
_TAG = {key: f"graphtune.{key}" for key in (*GROUP_KEYS, "seed", "kind")}


# ---------------------------------------------------------------------------------------------
# Store -> leaderboard
# ---------------------------------------------------------------------------------------------


def _quote(value: Any, what: str) -> str:
    """A value quoted for an MLflow filter string (which has no escape for quotes)."""
    text = str(value)
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise ConfigError(f"{what}: a filter value cannot contain both quote characters, got {text!r}")


def leaderboard(
    tracking_uri: str | None = None,
    experiment_names: str | list[str] | tuple[str, ...] | None = ("graphtune",),
    filter_string: str = "",
    tags: dict | None = None,
    parent_run_id: str | None = None,
) -> pd.DataFrame:
    """Read the store and aggregate its FINISHED experiment runs (see the module docstring).

    tags: exact tag matches, e.g. {"graphtune.strategy": "finetune", "device": "cpu"}.
    filter_string: any extra MLflow filter, e.g. "metrics.S_uep > 0.5" (AND-ed with the rest).
    parent_run_id: only that run, if it is an experiment run, and the experiment runs nested
        directly under it (e.g. all the experiments of one sweep).
    experiment_names: None reads every active experiment of the store.
    """
    from graphtune.tracking import search_runs  # imports mlflow (seconds); only when reading a store

    filters = [f"tags.`{_TAG['kind']}` = 'experiment'", "attributes.status = 'FINISHED'"]
    for key, value in (tags or {}).items():
        if "`" in key:
            raise ConfigError(f"leaderboard tag filter: a tag key cannot contain a backtick, got {key!r}")
        filters.append(f"tags.`{key}` = {_quote(value, f'leaderboard tag filter {key!r}')}")
    if filter_string and filter_string.strip():
        filters.append(filter_string.strip())
    runs = search_runs(
        tracking_uri=tracking_uri,
        experiment_names=experiment_names,
        filter_string=" AND ".join(filters),
        parent_run_id=parent_run_id,
    )
    if parent_run_id:  # the run itself counts too, when it is an experiment run
        itself = search_runs(
            tracking_uri=tracking_uri,
            experiment_names=experiment_names,
            filter_string=" AND ".join([*filters, f"attributes.run_id = {_quote(parent_run_id, 'parent run id')}"]),
        )
        runs = itself if runs.empty else runs if itself.empty else pd.concat([itself, runs], ignore_index=True)
    return aggregate_runs(runs)


def _column(runs: pd.DataFrame, name: str) -> pd.Series:
    """A column of a search_runs frame, all-missing when no run has it (MLflow omits such columns)."""
    if name in runs.columns:
        return runs[name]
    return pd.Series([None] * len(runs), index=runs.index, dtype=object)


def _seed_order(seed: str) -> tuple:
    """Sort seeds numerically when they are integers ("2" before "10"), as text otherwise."""
    return (0, int(seed), "") if seed.lstrip("-").isdigit() else (1, 0, seed)


def aggregate_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """A mlflow.search_runs frame of experiment runs -> the ranked leaderboard (columns: COLUMNS)."""
    if runs.empty:
        return pd.DataFrame(columns=COLUMNS)
    table = pd.DataFrame({key: _column(runs, f"tags.{_TAG[key]}") for key in GROUP_KEYS})
    table["seed"] = _column(runs, f"tags.{_TAG['seed']}")
    table["start_time"] = _column(runs, "start_time")
    for metric in (*SPREAD_METRICS, *MEAN_METRICS):
        table[metric] = pd.to_numeric(_column(runs, f"metrics.{metric}"), errors="coerce")

    # The latest run of each seed replaces its earlier ones; runs without a seed tag all count.
    table = table.sort_values("start_time", ascending=False, kind="stable")
    seeded = table["seed"].notna()
    table = pd.concat(
        [table[seeded].drop_duplicates(subset=[*GROUP_KEYS, "seed"], keep="first"), table[~seeded]]
    )

    rows = []
    for keys, group in table.groupby(list(GROUP_KEYS), dropna=False, sort=False):
        row: dict[str, Any] = dict(zip(GROUP_KEYS, keys))
        row["n_runs"] = len(group)
        row["seeds"] = ",".join(sorted(group["seed"].dropna().astype(str), key=_seed_order))
        for metric in SPREAD_METRICS:
            row[f"{metric}_mean"] = group[metric].mean()
            row[f"{metric}_std"] = group[metric].std(ddof=1)  # sample std over seeds; NaN for one
        for metric in MEAN_METRICS:
            row[metric] = group[metric].mean()
        rows.append(row)

    board = pd.DataFrame(rows, columns=COLUMNS[1:])
    board = board.sort_values(
        ["S_uep_mean", "final_test_rmse_mean", *GROUP_KEYS],
        ascending=[False, True, True, True, True],
        na_position="last",
        kind="stable",
    ).reset_index(drop=True)
    board.insert(0, "rank", range(1, len(board) + 1))
    return board


# ---------------------------------------------------------------------------------------------
# Text: numbers, plain tables, Markdown
# ---------------------------------------------------------------------------------------------


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def format_number(value: Any) -> str:
    """A number for a table cell: 4 significant digits, whole numbers from 1000 up, "-" if missing.

    0.70710 -> "0.7071", 3.01234 -> "3.012", 123.456 -> "123.5", 1234.5 -> "1234", 123456.0 -> "123456".
    """
    if _is_missing(value):
        return "-"
    number = float(value)
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    if abs(number) >= 1000:
        return f"{number:.0f}"
    return f"{number:.4g}"


def _mean_std(mean: Any, std: Any) -> str:
    if _is_missing(mean):
        return "-"
    if _is_missing(std):
        return format_number(mean)
    return f"{format_number(mean)} ± {format_number(std)}"


def _text(value: Any) -> str:
    return "-" if _is_missing(value) else str(value)


# (header, cell function of a leaderboard row, right-aligned?)
_DISPLAY = [
    ("#", lambda r: str(int(r["rank"])), True),
    ("model", lambda r: _text(r["model"]), False),
    ("strategy", lambda r: _text(r["strategy"]), False),
    ("datasets", lambda r: _text(r["datasets"]), False),
    ("seeds", lambda r: str(int(r["n_runs"])), True),
    ("S_uep", lambda r: _mean_std(r["S_uep_mean"], r["S_uep_std"]), True),
    ("test MAE", lambda r: _mean_std(r["final_test_mae_mean"], r["final_test_mae_std"]), True),
    ("test RMSE", lambda r: _mean_std(r["final_test_rmse_mean"], r["final_test_rmse_std"]), True),
    ("test MAPE", lambda r: _mean_std(r["final_test_mape_mean"], r["final_test_mape_std"]), True),
    ("transfer AUC", lambda r: format_number(r["mean_transfer_auc"]), True),
    ("train s", lambda r: format_number(r["total_train_time_s"]), True),
    ("peak RSS MB", lambda r: format_number(r["peak_rss_mb"]), True),
    ("trainable params", lambda r: format_number(r["trainable_params"]), True),
    ("GFLOPs", lambda r: format_number(r["flops_g"]), True),
]


def _display(df: pd.DataFrame) -> tuple[list[str], list[list[str]], list[bool]]:
    headers = [header for header, _, _ in _DISPLAY]
    rows = [[cell(row) for _, cell, _ in _DISPLAY] for _, row in df.iterrows()]
    return headers, rows, [right for _, _, right in _DISPLAY]


def text_table(headers: list[str], rows: list[list[str]], right: list[bool]) -> str:
    """Aligned plain-text table: a header, a rule of dashes, one line per row; two spaces between columns."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(row) for row in rows)])


def markdown_table(headers: list[str], rows: list[list[str]], right: list[bool]) -> str:
    """A GitHub-flavoured Markdown table ("|" inside cells escaped)."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    rule = "|" + "|".join("---:" if r else ":---" for r in right) + "|"
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def format_table(df: pd.DataFrame) -> str:
    """The leaderboard as an aligned plain-text table for the terminal."""
    if df.empty:
        return "no finished experiment runs"
    return text_table(*_display(df))


def write_leaderboard(df: pd.DataFrame, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write leaderboard.csv (all columns, full precision), .md (the display table) and .png.

    Returns {"csv": path, "md": path, "png": path}.
    """
    from graphtune.plots import leaderboard_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "leaderboard.csv", "md": out / "leaderboard.md", "png": out / "leaderboard.png"}
    df.to_csv(paths["csv"], index=False)
    if df.empty:
        body = "_No finished experiment runs._"
    else:
        note = "_Mean ± sample std over seeds; ranked by S_uep (higher is better)._"
        body = markdown_table(*_display(df)) + "\n\n" + note
    paths["md"].write_text(body + "\n", encoding="utf-8")
    leaderboard_png(df, paths["png"])
    return paths


# ---------------------------------------------------------------------------------------------
# Live per-stage table
# ---------------------------------------------------------------------------------------------

# (header, key in a stage row); a missing key or None shows "-" (stage 0 has no zero-shot or AUC).
_STAGE_COLUMNS = [
    ("stage", "stage"),
    ("city", "city"),
    ("zero-shot RMSE", "zero_shot_rmse"),
    ("test RMSE", "test_rmse"),
    ("transfer AUC", "transfer_auc"),
    ("stage score", "stage_score"),
]


def live_leaderboard(stage_rows: list[dict]) -> str:
    """The stages so far as a small text table (keys: stage, city, zero_shot_rmse, test_rmse,
    transfer_auc, stage_score), printed by the experiment loop after each stage."""
    rows = []
    for stage_row in stage_rows:
        cells = []
        for _, key in _STAGE_COLUMNS:
            value = stage_row.get(key)
            if key in ("stage", "city"):
                cells.append(_text(value))
            else:
                cells.append(format_number(value))
        rows.append(cells)
    headers = [header for header, _ in _STAGE_COLUMNS]
    return text_table(headers, rows, [key != "city" for _, key in _STAGE_COLUMNS])
