"""The series board: `graphtune compare --board series` ranks CSV series runs on their own leaderboard.

Only FINISHED runs tagged graphtune.kind=series count, of mode train or finetune (an infer run evaluates a
model it did not train). A row is one configuration (graphtune.config_hash: every option and the files'
contents, the seed aside), with the mean and sample std over seeds of the evaluated split's metrics and
the scikit-learn reference's on the same windows. Classify rows rank by F1 at best_tau (chosen on
validation), regress rows by RMSE; the two tasks, and runs evaluated on different splits, are separate
boards, since their numbers do not compare.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

RANK_BY = {"classify": ("f1_at_best_tau", False), "regress": ("rmse", True)}  # metric, ascending
SHOWN = {"classify": ("f1_at_best_tau", "f1", "roc_auc", "pr_auc", "reference_f1_at_best_tau", "reference_roc_auc"),
         "regress": ("rmse", "mae", "r2", "reference_rmse", "reference_mae", "reference_r2")}


def series_leaderboard(tracking_uri: str | None = None, experiment_names=("series",)) -> pd.DataFrame:
    from graphtune.tracking import search_runs

    runs = search_runs(tracking_uri=tracking_uri, experiment_names=experiment_names,
                       filter_string="tags.`graphtune.kind` = 'series' AND attributes.status = 'FINISHED'")
    return aggregate_series(runs)


def _col(runs: pd.DataFrame, name: str) -> pd.Series:
    return runs[name] if name in runs.columns else pd.Series([math.nan] * len(runs), index=runs.index)


def aggregate_series(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, eval split, config hash), ranked within each board."""
    if runs.empty:
        return pd.DataFrame(columns=["board", "rank", "backbone", "task", "split", "config", "n_runs", "seeds"])
    runs = runs[_col(runs, "tags.graphtune.strategy").isin(["train", "finetune"])]
    rows = []
    keys = ["tags.graphtune.series.task", "tags.graphtune.series.eval_split", "tags.graphtune.config_hash"]
    for (task, split, config), group in runs.groupby([_col(runs, k) for k in keys], dropna=False):
        group = group.sort_values("start_time").drop_duplicates("tags.graphtune.seed", keep="last")
        row = {"board": f"{task} ({split})", "backbone": group["tags.graphtune.model"].iloc[0], "task": task,
               "split": split, "config": config, "n_runs": len(group),
               "seeds": ",".join(sorted(group["tags.graphtune.seed"].astype(str))),
               "mode": ",".join(sorted(set(group["tags.graphtune.strategy"]))),
               "files": group["params.files"].iloc[0] if "params.files" in group else ""}
        for metric in SHOWN.get(task, ()):
            values = pd.to_numeric(_col(group, f"metrics.{metric}"), errors="coerce")
            row[f"{metric}_mean"] = values.mean()
            row[f"{metric}_std"] = values.std(ddof=1) if values.notna().sum() > 1 else math.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    ranked = []
    for board, part in table.groupby("board", sort=True):
        metric, ascending = RANK_BY.get(part["task"].iloc[0], ("f1_at_best_tau", False))
        part = part.sort_values([f"{metric}_mean", "backbone"], ascending=[ascending, True], na_position="last")
        part.insert(1, "rank", range(1, len(part) + 1))
        ranked.append(part)
    return pd.concat(ranked, ignore_index=True)


def format_series_table(df: pd.DataFrame) -> str:
    from graphtune.compare import format_number, text_table

    if df.empty:
        return "No finished series runs."
    out = []
    for board, part in df.groupby("board", sort=True):
        task = part["task"].iloc[0]
        metrics = [m for m in SHOWN.get(task, ()) if f"{m}_mean" in part]
        headers = ["rank", "backbone", "mode", "seeds", *metrics]
        body = [[str(r["rank"]), r["backbone"], r["mode"], r["seeds"],
                 *[format_number(r[f"{m}_mean"]) + ("" if pd.isna(r[f"{m}_std"]) else f" ± {format_number(r[f'{m}_std'])}")
                   for m in metrics]] for _, r in part.iterrows()]
        metric, ascending = RANK_BY[task]
        out.append(f"series board: {board}, ranked by {metric} ({'lower' if ascending else 'higher'} is better); "
                   "reference_* = the scikit-learn reference on the same windows\n"
                   + text_table(headers, body, [True, False, False, False, *[True] * len(metrics)]))
    return "\n\n".join(out)


def write_series_board(df: pd.DataFrame, out_dir: str | os.PathLike) -> dict[str, Path]:
    from graphtune.fileio import atomic_directory

    out = Path(out_dir)
    with atomic_directory(out, legacy_names=("series_board.csv", "series_board.txt")) as tmp:
        df.to_csv(tmp / "series_board.csv", index=False)
        (tmp / "series_board.txt").write_text(format_series_table(df) + "\n")
    return {"csv": out / "series_board.csv", "txt": out / "series_board.txt"}
