"""Typed views of params.yaml: one dataclass per section, loading and `section.key=value` overrides.

Library functions never read params.yaml themselves: the CLI loads it here and passes explicit
arguments on. Unknown sections or keys are errors that name them, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from graphtune.errors import ConfigError


@dataclass
class PrepareConfig:
    """`prepare:` how raw city files become processed arrays and windows."""

    cities: list[str] = field(default_factory=lambda: ["metr-la-week", "metr-la-west", "metr-la-east"])
    processed_dir: str = "data/processed"  # the DVC prepare stage's output folder
    data_source: str = "local"  # local | url | hf | auto (local first, then the registered sources)
    cache_dir: str = "data/raw/.cache"  # downloads land here, verified by sha256
    url_overrides: dict = field(default_factory=dict)  # file name -> URL that replaces the registered one
    split: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])  # chronological, the DCRNN protocol
    normalized_k: float = 0.1  # DCRNN's Gaussian-kernel threshold for distance/coordinate graphs
    t_in: int = 12  # 12 x 5 min = 1 h of history (DCRNN/GWNet protocol)
    t_out: int = 12  # 12 x 5 min = 1 h ahead
    stride: int = 1  # every window for training; >1 thins training windows on long series

    def dataset_kwargs(self) -> dict:
        """Keyword arguments for prepare_dataset / write_processed."""
        return {
            "processed_dir": self.processed_dir, "data_source": self.data_source, "cache_dir": self.cache_dir,
            "url_overrides": self.url_overrides, "split": tuple(self.split), "normalized_k": self.normalized_k,
            "t_in": self.t_in, "t_out": self.t_out, "stride": self.stride,
        }


@dataclass
class ExperimentConfig:
    """`experiment:` what is transferred where, and how."""

    datasets: list[str] = field(default_factory=lambda: ["metr-la-west", "metr-la-east"])  # stage 0 = source
    model: str = "gwnet"  # a registered model name (graphtune models)
    model_kwargs: dict = field(default_factory=dict)  # overrides of the model's builder defaults
    strategy: str = "full"  # full | freeze-transferred | scratch (see graphtune.strategies)
    seed: int = 0  # seeds init, shuffling and the few-shot subsets: same seed, same metrics on CPU
    device: str = "auto"  # auto = cuda when available, else cpu
    output_dir: str = "outputs/experiment"  # results.json, results.csv, plots (DVC outputs)
    name: str = ""  # parent run name; empty = "<model>-<strategy>-<source>-to-<targets>"


@dataclass
class TrainConfig:
    """`train:` the optimisation of every fit (pretraining and each budget point)."""

    epochs: list[int] = field(default_factory=lambda: [6, 3])  # per stage; one value applies to all stages
    lrs: list[float] = field(default_factory=lambda: [0.003, 0.001])  # per stage; fine-tuning uses a smaller lr
    batch_size: int = 64  # the GWNet/DCRNN protocol
    weight_decay: float = 0.0001  # GWNet's default
    clip_grad: float = 5.0  # GWNet/DCRNN clip gradients at norm 5
    early_stop_patience: int = 0  # epochs without val improvement before stopping; 0 = never stop early
    amp: str = "auto"  # auto = mixed precision on CUDA only; on | off


@dataclass
class TransferConfig:
    """`transfer:` the budget curve of every transfer stage and its loss-gradient scheduler."""

    fractions: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0])  # shares of the target's training data
    fewshot_mode: str = "subset"  # subset (seeded random windows) | steps (capped optimizer steps) | both
    min_gain_rate: float = 0.5  # val-MAE gain per unit of budget below which a step counts as flat
    min_rel_improve: float = 0.01  # relative val-MAE gain below which a step counts as flat
    patience: int = 0  # flat steps tolerated before the curve stops (0 = stop at the first flat step)


@dataclass
class BudgetConfig:
    """`budgets:` resource budgets per stage; usage above a budget is penalised in S_uep (null = no budget)."""

    mem_mb: float | None = None  # peak memory (GPU when on CUDA, else process RSS above the stage start)
    time_sec: float | None = None  # training wall time of the stage
    flops_g: float | None = None  # forward GFLOPs per batch
    trainable_m: float | None = None  # trainable parameters, millions
    enforce: bool = False  # also stop a stage's training once it exceeds its time budget


@dataclass
class ScoreConfig:
    """`score:` S_uep weights (see graphtune.score for the formula)."""

    w_perf: float = 0.45
    w_transfer_auc: float = 0.35
    w_eff: float = 0.20
    w_budget: float = 0.25
    alpha: float = 1.0  # stage weight ~ difficulty ** alpha


@dataclass
class TrackingConfig:
    """`tracking:` where and how runs are recorded in MLflow."""

    experiment_name: str = "graphtune"
    tracking_uri: str = ""  # empty = MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    system_metrics: bool = False  # MLflow's own CPU/memory/GPU sampling on the parent run
    log_checkpoints: bool = True  # the best checkpoint of every stage as an artifact


@dataclass
class CompareConfig:
    """`compare:` which runs the leaderboard covers and where it is written."""

    experiment_names: list[str] = field(default_factory=list)  # empty = every experiment in the store
    filter: str = ""  # an MLflow search filter, e.g. "tags.`graphtune.datasets` = 'metr-la-west,metr-la-east'"
    output_dir: str = "outputs/compare"


SECTIONS: dict[str, type] = {
    "prepare": PrepareConfig, "experiment": ExperimentConfig, "train": TrainConfig, "transfer": TransferConfig,
    "budgets": BudgetConfig, "score": ScoreConfig, "tracking": TrackingConfig, "compare": CompareConfig,
}
FREE_SECTIONS = ("cities",)  # mappings passed through as they are (validated by their consumer)


@dataclass
class Params:
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    budgets: BudgetConfig = field(default_factory=BudgetConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    cities: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)  # the merged YAML, for logging

    def as_dict(self) -> dict:
        """Every section with defaults filled in (what a run logs as its parameters)."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["cities"] = self.cities
        return out


def _coerce(section: str, key: str, value, default):
    """Parse a CLI override string into the type of the default value."""
    if not isinstance(value, str) or isinstance(default, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"{section}.{key}: cannot parse {value!r} ({err.problem})") from None


def _build(section: str, cls: type, values: dict):
    if not isinstance(values, dict):
        raise ConfigError(f"params section {section!r}: expected a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"params section {section!r}: unknown key(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    return cls(**values)


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Load params.yaml (missing file -> all defaults when path is None) and apply `section.key=value` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: params file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    unknown = sorted(set(data) - set(SECTIONS) - set(FREE_SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(set(SECTIONS) | set(FREE_SECTIONS)))}")
    data = {k: dict(v or {}) if isinstance(v, dict) or v is None else v for k, v in data.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in SECTIONS:
            raise ConfigError(f"override {item!r}: expected section.key=value with section one of "
                              f"{', '.join(SECTIONS)}")
        defaults = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
        if name not in defaults:
            raise ConfigError(f"override {item!r}: {section} has no key {name!r}; known: {', '.join(sorted(defaults))}")
        default = getattr(SECTIONS[section](), name)
        data.setdefault(section, {})[name] = _coerce(section, name, value, default)
    built = {name: _build(name, cls, data.get(name, {})) for name, cls in SECTIONS.items()}
    cities = data.get("cities") or {}
    if not isinstance(cities, dict):
        raise ConfigError(f"{path}: section 'cities' must map city names to their entries")
    return Params(**built, cities=cities, raw=data)
