"""Tracking store -> leaderboard: one row per configuration, ranked by the comparable score.

    leaderboard(...)            read the FINISHED experiment-kind runs (through tracking.search_runs)
                                and aggregate them over seeds
    aggregate_runs(runs)        the pure aggregation, on a mlflow.search_runs frame
    write_leaderboard(df, dir)  leaderboard.csv, leaderboard.md, leaderboard.png (atomically, see fileio)
    format_table(df)            the same tables as plain text for a terminal
    live_leaderboard(rows)      the per-stage table the experiment loop prints after each stage

Rules.
- Only runs tagged graphtune.kind=experiment with status FINISHED count: a FAILED or KILLED run (a
  diverged fit included) has no trustworthy metrics and never reaches a board.
- A row is one configuration: runs are grouped by `graphtune.config_hash`, the hash of the whole
  resolved configuration except the seed (graphtune.transfer.experiment). Runs that differ in anything else
  (epochs, learning rates, fractions, weights, budgets, model options, data) are separate rows; the
  `differs` column names what sets a row apart from its siblings of the same model, strategy and cities.
- When one seed of a configuration was run more than once, only its latest run counts.
- Rows are ranked by `score`, the comparable score (graphtune.transfer.score): it depends only on each run's own
  measurements and fixed city references, so adding or removing runs changes no row's score. Ties go to
  the lower final test RMSE, then to names. Mean over seeds; std is the sample std (ddof=1), NaN for one.
- Two boards: `transfer` (runs that move to a target city) and `pretrain` (source models trained on one
  city: a different question, never ranked against transfers).
- Each board carries reference rows, strategy `reference`: the time-of-day historical average (`ha`)
  and last-value persistence on the same cities, scored by the same rule from the references every run
  logs. HA scores 0 by construction, so any model with a lower error ranks above it.
- Runs from before the comparable score (no config hash, another score version) are not ranked; the
  table says how many.

mlflow is imported only when `leaderboard` reads a store: the formatting functions are cheap.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from graphtune.errors import ConfigError
from graphtune.tracking import tags
from graphtune.transfer.score import SCORE_VERSION

BOARDS = ("transfer", "pretrain")
SPREAD_METRICS = ("score", "final_test_mae", "final_test_rmse", "final_test_mape")  # mean and std over seeds
MEAN_METRICS = ("S_uep", "mean_skill", "mean_transfer_auc", "finetune_tflops", "trainable_params", "size_mb",
                "total_train_time_s", "peak_rss_mb")
COLUMNS = [
    "board",
    "rank",
    "model",
    "strategy",
    "datasets",
    "config",
    "differs",
    "n_runs",
    "seeds",
    *(f"{metric}_{stat}" for metric in SPREAD_METRICS for stat in ("mean", "std")),
    *MEAN_METRICS,
    "config_hash",
]
REFERENCES = ("ha", "persistence")

# The graphtune.* tag keys a row is read from (graphtune.tracking.tags imports no mlflow).
_TAG = {"model": tags.TAG_MODEL, "strategy": tags.TAG_STRATEGY, "datasets": tags.TAG_DATASETS, "seed": tags.TAG_SEED,
        "kind": tags.TAG_KIND, "config_hash": tags.TAG_CONFIG_HASH, "run_type": tags.TAG_RUN_TYPE,
        "score_version": tags.TAG_SCORE_VERSION, "targets": tags.TAG_TARGETS, "reference_key": tags.TAG_REFERENCE_KEY,
        "config": tags.TAG_CONFIG, "source": tags.TAG_SOURCE}


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
    experiment_names: str | list[str] | tuple[str, ...] | None = (tags.DEFAULT_EXPERIMENT,),
    filter_string: str = "",
    tags: dict | None = None,
    parent_run_id: str | None = None,
) -> pd.DataFrame:
    """Read the store and aggregate its FINISHED experiment runs (see the module docstring).

    tags: exact tag matches, e.g. {"graphtune.strategy": "full", "device": "cpu"}.
    filter_string: any extra MLflow filter, e.g. "metrics.score > 0.2" (AND-ed with the rest).
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


def _cities(row: pd.Series) -> str:
    """How a row names its cities: "source -> target" for transfers, the city for pretraining."""
    datasets = [d for d in str(row["datasets"] or "").split(",") if d]
    if row["source"] and isinstance(row["source"], str):
        return f"{row['source'][:12]} -> {' -> '.join(datasets)}"
    return " -> ".join(datasets)


def _flat_config(text: Any) -> dict:
    """The resolved configuration of a run (tag graphtune.config), flattened to "a.b[1].c" keys; {} if absent."""
    try:
        config = json.loads(text) if isinstance(text, str) else {}
    except json.JSONDecodeError:  # truncated by MLflow's tag limit: show no differences rather than wrong ones
        return {}
    flat: dict = {}

    def walk(value, key):
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        else:
            flat[key] = value

    walk(config, "")
    return flat


def _differs(configs: dict[str, dict]) -> dict[str, str]:
    """config hash -> "key=value, ..." of the settings that differ between the given configurations."""
    if len(configs) < 2:
        return {h: "" for h in configs}
    keys = sorted({k for c in configs.values() for k in c})
    varying = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs.values()}) > 1]
    out = {}
    for digest, config in configs.items():
        parts = ["data changed" if k.startswith("data.") else f"{k}={config.get(k)}" for k in varying]
        text = ", ".join(dict.fromkeys(parts))
        out[digest] = text if len(text) <= 80 else text[:77] + "..."
    return out


def aggregate_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """A mlflow.search_runs frame of experiment runs -> the ranked boards (columns: COLUMNS).

    `df.attrs["unranked"]` counts the runs left out because they carry no comparable score.
    """
    if runs.empty:
        board = pd.DataFrame(columns=COLUMNS)
        board.attrs["unranked"] = 0
        return board
    table = pd.DataFrame({key: _column(runs, f"tags.{tag}") for key, tag in _TAG.items()})
    table["start_time"] = _column(runs, "start_time")
    for metric in (*SPREAD_METRICS, *MEAN_METRICS):
        table[metric] = pd.to_numeric(_column(runs, f"metrics.{metric}"), errors="coerce")
    for name in REFERENCES:
        for key in ("score", "final_test_rmse", "final_test_mae", "mean_skill", "mean_transfer_auc"):
            table[f"ref_{name}_{key}"] = pd.to_numeric(_column(runs, f"metrics.reference/{name}/{key}"),
                                                       errors="coerce")

    comparable = (table["config_hash"].notna() & (table["score_version"].astype(str) == str(SCORE_VERSION))
                  & table["score"].notna())
    unranked = int((~comparable).sum())
    table = table[comparable]
    table["run_type"] = table["run_type"].where(table["run_type"].isin(BOARDS), "transfer")

    # The latest run of each seed replaces its earlier ones; runs without a seed tag all count.
    table = table.sort_values("start_time", ascending=False, kind="stable")
    seeded = table["seed"].notna()
    table = pd.concat([table[seeded].drop_duplicates(subset=["config_hash", "seed"], keep="first"), table[~seeded]])

    rows = []
    for digest, group in table.groupby("config_hash", sort=False):
        first = group.iloc[0]  # the latest run: its tags name the row
        row: dict[str, Any] = {"board": first["run_type"], "model": first["model"], "strategy": first["strategy"],
                               "datasets": _cities(first), "config": str(digest)[:8], "config_hash": digest,
                               "n_runs": len(group),
                               "seeds": ",".join(sorted(group["seed"].dropna().astype(str), key=_seed_order))}
        for metric in SPREAD_METRICS:
            row[f"{metric}_mean"] = group[metric].mean()
            row[f"{metric}_std"] = group[metric].std(ddof=1)  # sample std over seeds; NaN for one
        for metric in MEAN_METRICS:
            row[metric] = group[metric].mean()
        row["_config"] = _flat_config(first["config"])
        rows.append(row)
    rows += _reference_rows(table)

    families: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        if row["strategy"] != "reference":
            families.setdefault((row["board"], row["model"], row["strategy"], row["datasets"]), {})[
                row["config_hash"]] = row["_config"]
    differs = {digest: text for configs in families.values() for digest, text in _differs(configs).items()}
    for row in rows:
        row["differs"] = differs.get(row["config_hash"], "")
        row.pop("_config", None)

    board = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "rank"])
    board["board"] = pd.Categorical(board["board"], categories=list(BOARDS), ordered=True)
    board = board.sort_values(
        ["board", "score_mean", "final_test_rmse_mean", "model", "strategy", "datasets"],
        ascending=[True, False, True, True, True, True], na_position="last", kind="stable",
    ).reset_index(drop=True)
    board["board"] = board["board"].astype(str)
    board.insert(1, "rank", board.groupby("board").cumcount() + 1)
    board.attrs["unranked"] = unranked
    return board


def _reference_rows(table: pd.DataFrame) -> list[dict]:
    """One `ha` and one `persistence` row per board and set of scored cities, from the latest run logging them."""
    rows = []
    for (run_type, key), group in table.groupby(["run_type", "reference_key"], sort=False):
        first = group.iloc[0]
        targets = str(first["targets"] or first["datasets"] or "")
        for name in REFERENCES:
            if pd.isna(first[f"ref_{name}_score"]):
                continue
            rows.append({"board": run_type, "model": name, "strategy": "reference",
                         "datasets": ("-> " if run_type == "transfer" else "") + " -> ".join(targets.split(",")),
                         "config": "", "config_hash": f"reference:{name}:{key}", "n_runs": 0, "seeds": "",
                         "score_mean": first[f"ref_{name}_score"], "score_std": math.nan,
                         "final_test_rmse_mean": first[f"ref_{name}_final_test_rmse"], "final_test_rmse_std": math.nan,
                         "final_test_mae_mean": first[f"ref_{name}_final_test_mae"], "final_test_mae_std": math.nan,
                         "final_test_mape_mean": math.nan, "final_test_mape_std": math.nan,
                         "mean_skill": first[f"ref_{name}_mean_skill"],
                         "mean_transfer_auc": first[f"ref_{name}_mean_transfer_auc"],
                         **{m: 0.0 for m in ("finetune_tflops", "trainable_params", "size_mb")},
                         "_config": {}})
    return rows


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
    None, NaN, +/-inf and +/-1.797e308 (how MLflow's SQL stores write an infinite metric, so runs
    logged before NaN replaced inf read back as it) are "-": no measurement, not a 309-digit number.
    """
    if _is_missing(value):
        return "-"
    number = float(value)
    if not math.isfinite(number) or abs(number) >= 1.7976931348623157e308:  # sys.float_info.max
        return "-"
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
    ("cities", lambda r: _text(r["datasets"]), False),
    ("config", lambda r: _text(r["config"]) if r["config"] else "-", False),
    ("differs", lambda r: r["differs"] or "-", False),
    ("seeds", lambda r: str(int(r["n_runs"])) if r["n_runs"] else "-", True),
    ("score", lambda r: _mean_std(r["score_mean"], r["score_std"]), True),
    ("test MAE", lambda r: _mean_std(r["final_test_mae_mean"], r["final_test_mae_std"]), True),
    ("test RMSE", lambda r: _mean_std(r["final_test_rmse_mean"], r["final_test_rmse_std"]), True),
    ("skill", lambda r: format_number(r["mean_skill"]), True),
    ("transfer AUC", lambda r: format_number(r["mean_transfer_auc"]), True),
    ("fine-tune TFLOPs", lambda r: format_number(r["finetune_tflops"]), True),
    ("trainable", lambda r: format_number(r["trainable_params"]), True),
    ("S_uep (within run)", lambda r: format_number(r["S_uep"]), True),
    ("train s", lambda r: format_number(r["total_train_time_s"]), True),
    ("peak RSS MB", lambda r: format_number(r["peak_rss_mb"]), True),
]

BOARD_TITLES = {
    "transfer": "Transfer: ranked by score, comparable across runs (skill vs the historical average, transfer AUC "
                "and deterministic cost; graphtune.transfer.score). `reference` rows: HA and persistence on the same cities.",
    "pretrain": "Pretraining (source models on one city): ranked by the same score; not comparable with transfers.",
}
NOTE = ("Mean ± sample std over seeds. One row per configuration (config = its hash; differs = what sets it apart "
        "from rows of the same model, strategy and cities). S_uep is GraphTune-lite's within-run score, shown "
        "for reference only: it is not comparable across runs and does not rank.")


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


def _boards(df: pd.DataFrame):
    for board in BOARDS:
        part = df[df["board"] == board] if "board" in df.columns else df.iloc[0:0]
        if not part.empty:
            yield board, part


def _unranked_note(df: pd.DataFrame) -> str:
    n = df.attrs.get("unranked", 0)
    return (f"{n} finished run(s) recorded before the comparable score (score version {SCORE_VERSION}) "
            "are not ranked." if n else "")


def format_table(df: pd.DataFrame) -> str:
    """The leaderboard as aligned plain-text tables for the terminal, one per board, each with its header."""
    parts = []
    for board, part in _boards(df):
        parts += [BOARD_TITLES[board], text_table(*_display(part)), ""]
    if not parts:
        parts = ["no finished experiment runs with a comparable score"]
    else:
        parts.append(NOTE)
    if note := _unranked_note(df):
        parts.append(note)
    return "\n".join(parts).rstrip()


def write_leaderboard(df: pd.DataFrame, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write leaderboard.csv (all columns, full precision), .md (the display tables) and .png, replacing
    the folder atomically and only where it holds nothing but GraphTune's own files (graphtune.fileio).

    Returns {"csv": path, "md": path, "png": path}.
    """
    from graphtune.fileio import atomic_directory
    from graphtune.plots import leaderboard_png

    out = Path(out_dir)
    names = {"csv": "leaderboard.csv", "md": "leaderboard.md", "png": "leaderboard.png"}
    with atomic_directory(out, legacy_names=tuple(names.values())) as tmp:
        df.to_csv(tmp / names["csv"], index=False)
        sections = [f"_{BOARD_TITLES[board]}_\n\n" + markdown_table(*_display(part)) for board, part in _boards(df)]
        body = "\n\n".join(sections) + f"\n\n_{NOTE}_" if sections else "_No finished experiment runs._"
        if note := _unranked_note(df):
            body += f"\n\n_{note}_"
        (tmp / names["md"]).write_text(body + "\n", encoding="utf-8")
        leaderboard_png(df, tmp / names["png"])
    return {key: out / name for key, name in names.items()}


# ---------------------------------------------------------------------------------------------
# Live per-stage table
# ---------------------------------------------------------------------------------------------

# (header, key in a stage row); a missing key or None shows "-" (stage 0 has no zero-shot or AUC).
_STAGE_COLUMNS = [
    ("stage", "stage"),
    ("city", "city"),
    ("zero-shot RMSE", "zero_shot_rmse"),
    ("test RMSE", "test_rmse"),
    ("HA RMSE", "ha_rmse"),
    ("skill", "skill"),
    ("transfer AUC", "transfer_auc"),
    ("stage score", "stage_score"),
]


def live_leaderboard(stage_rows: list[dict]) -> str:
    """The stages so far as a small text table (keys: stage, city, zero_shot_rmse, test_rmse, ha_rmse,
    skill, transfer_auc, stage_score), printed by the experiment loop after each stage."""
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
