"""Typed views of params.yaml: one dataclass per section, loading and `section.key=value` overrides.

Library functions never read params.yaml themselves: the CLI loads it here and passes explicit
arguments on. Unknown sections or keys are errors that name them, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from graphtune.checks import (
    Check, boolean, choice, hinted, integer, list_of, mapping, number, optional, per_stage, text,
)
from graphtune.data.windows import steps_or_duration  # PrepareConfig.t_in / t_out: steps or a duration
from graphtune.errors import ConfigError


def option(default, check: Check):
    """A section field with its check in `metadata["check"]`; a list or dict default is copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"check": check})
    return field(default=default, metadata={"check": check})


class _SplitShares(Check):
    """Three positive shares of the time steps that sum to 1 (chronological train / val / test)."""

    description = "three positive fractions summing to 1"

    def accepts(self, value) -> bool:
        return (isinstance(value, (list, tuple)) and len(value) == 3
                and all(number(min=0, min_open=True).accepts(v) for v in value) and abs(sum(value) - 1.0) <= 1e-6)


POSITIVE = number(min=0, min_open=True)
NON_NEGATIVE = number(min=0)
ADAPTER_KINDS = ("temporal", "graph", "head", "prompt")  # the layer kinds of graphtune.adapters.layouts


class _Ratio(Check):
    """A compression ratio in [0, 1), or "budget"."""

    description = 'a compression ratio in [0, 1) or "budget"'

    def accepts(self, value) -> bool:
        return value == "budget" or number(min=0, max=1, max_open=True).accepts(value)


@dataclass
class PrepareConfig:
    """`prepare:` how raw city files become processed arrays and windows."""

    # the embedded real samples (speeds and counts); at least one, or the DVC prepare stage would write nothing
    cities: list[str] = option(["metr-la-week", "metr-la-west", "metr-la-east", "metr-la-r1", "metr-la-r2", "metr-la-r3",
                                "metr-la-r4", "metr-la-r5", "montevideo-bus"],
                               list_of(text(nonempty=True)))
    processed_dir: str = option("data/processed", text(nonempty=True))  # the DVC prepare stage's output folder
    # local | url | hf | auto (local first, then the registered sources)
    data_source: str = option("local", choice("local", "url", "hf", "auto"))
    cache_dir: str = option("data/raw/.cache", text(nonempty=True))  # downloads land here, verified by sha256
    url_overrides: dict = option({}, mapping())  # file name -> URL that replaces the registered one
    split: list[float] = option([0.7, 0.1, 0.2], _SplitShares())  # chronological train/val/test, the DCRNN protocol
    # DCRNN's Gaussian-kernel threshold for distance/coordinate graphs: weights below it become 0 (sparse graph)
    normalized_k: float = option(0.1, number(min=0, max=1, max_open=True))
    # Window lengths: a number of steps, or a duration ("1h", "90min", "2d": pandas.Timedelta syntax) that each
    # city's bundle converts to steps with its own interval (graphtune.data.windows); not a whole number of
    # steps is an error. The defaults are steps, as in the DCRNN/GWNet protocol.
    t_in: int | str = option(12, steps_or_duration())  # 12 x 5 min = 1 h of history (DCRNN/GWNet protocol)
    t_out: int | str = option(12, steps_or_duration())  # 12 x 5 min = 1 h ahead
    stride: int = option(1, integer(min=1))  # every window for training; >1 thins training windows on long series



@dataclass
class ExperimentConfig:
    """`experiment:` what is transferred where, and how."""

    # stage 0 = source, later cities are targets
    datasets: list[str] = option(["metr-la-west", "metr-la-east"], list_of(text(nonempty=True)))
    # a registered model name (graphtune models); hypernet: 100% of its weights transfer, fast on CPU
    model: str = option("hypernet", text(nonempty=True))
    # overrides of the model's builder defaults; names and ranges are checked by check_model_kwargs
    model_kwargs: dict = option({}, mapping())
    strategy: str = option("full", text(nonempty=True))  # full | freeze-transferred | scratch (transfer.strategies)
    # seeds init, shuffling and the few-shot subsets: same seed, same metrics on CPU
    seed: int = option(0, integer(min=0))
    device: str = option("auto", text(nonempty=True))  # auto = cuda when available, else cpu
    # results.json/csv, plots: a folder per run under outputs/runs ({run} = <name>-<run id>; outputs/runs/latest links
    # the newest), or one fixed folder when there is no {run} (the DVC stage's outputs/experiment)
    output_dir: str = option("outputs/runs/{run}", text(nonempty=True))
    name: str = option("", text())  # parent run name; empty = "<model>-<strategy>-<source>-to-<targets>-s<seed>"


@dataclass
class TrainConfig:
    """`train:` the optimisation of every fit (pretraining and each budget point)."""

    epochs: list[int] = option([6, 3], per_stage(integer(min=1)))  # per stage; one value applies to all stages
    # per stage; fine-tuning uses a smaller lr. Finite and > 0: inf or 0 would train nothing meaningful
    lrs: list[float] = option([0.003, 0.001], per_stage(POSITIVE))
    batch_size: int = option(64, integer(min=1))  # the GWNet/DCRNN protocol
    weight_decay: float = option(0.0001, NON_NEGATIVE)  # GWNet's default; negative would grow the weights
    # GWNet/DCRNN clip gradients at norm 5; a norm <= 0 would flip or zero every gradient
    clip_grad: float | None = option(5.0, hinted(optional(POSITIVE), "use null to disable"))
    # epochs without val improvement before stopping; 0 = never stop early
    early_stop_patience: int = option(0, integer(min=0))
    # auto = mixed precision on CUDA only (bfloat16, or float16 with loss scaling); on (bfloat16 on CPU) | off
    amp: str = option("auto", choice("auto", "on", "off"))
    # Gradient accumulation: batch_size stays the optimizer's batch, and each step runs it as grad_accum
    # micro-batches of batch_size / grad_accum windows (which must divide it), summing their gradients. The loss
    # is the masked MAE of the whole batch (each micro-batch's error sum over the batch's valid readings), so a
    # step equals one of the whole batch up to float rounding, for less activation memory; except in models
    # with batch statistics (GWNet's BatchNorm normalises each micro-batch) and in random draws (dropout masks)
    grad_accum: int = option(1, integer(min=1))
    # recompute each model block's activations in backward instead of storing them (ForecastModel.run_block):
    # less memory for about one more forward per step, same numbers; refused for models that mark no block
    activation_checkpointing: bool = option(False, boolean())
    # MB per training step: before training, the planner (graphtune.memory) picks the fewest micro-batches (at
    # least grad_accum) and, only when needed, checkpointing (kept on when set above) whose MEASURED peak tensor
    # memory of one step fits; null = no planning
    memory_budget_mb: float | None = option(None, optional(POSITIVE))

    def epochs_at(self, stage: int, n_stages: int) -> int:
        """Epochs of stage `stage` (0 = pretraining) in a run of `n_stages` stages (see `stage_value`)."""
        return stage_value(self.epochs, stage, n_stages, "train.epochs")

    def lr_at(self, stage: int, n_stages: int) -> float:
        return float(stage_value(self.lrs, stage, n_stages, "train.lrs"))

    def check_stages(self, stages: range | list[int], n_stages: int) -> None:
        """ConfigError (naming the option) unless the per-stage lists have an entry for each of `stages`, and
        unless grad_accum divides batch_size (`micro_batch_size`): everything a run can check before it starts."""
        for stage in stages:
            self.epochs_at(stage, n_stages), self.lr_at(stage, n_stages)
        self.micro_batch_size

    @property
    def micro_batch_size(self) -> int:
        """Windows per forward with gradient accumulation: batch_size / grad_accum; ConfigError unless it divides."""
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.grad_accum: {self.grad_accum} does not divide train.batch_size "
                              f"{self.batch_size}; choose a divisor of the batch size (a micro-batch is "
                              "batch_size / grad_accum windows)")
        return self.batch_size // self.grad_accum

    @property
    def patience(self) -> int | None:
        """Early-stopping patience for `fit`: None = never stop early."""
        return self.early_stop_patience or None

    @property
    def amp_enabled(self) -> bool | None:
        """Mixed precision for `fit`: None = on for CUDA only."""
        return {"auto": None, "on": True, "off": False}[self.amp]


@dataclass
class TransferConfig:
    """`transfer:` the budget curve of every transfer stage and its loss-gradient scheduler."""

    # shares of the target's training data, in (0, 1]: 0 is the zero-shot point, which every curve measures
    fractions: list[float] = option([0.1, 0.3, 1.0], list_of(number(min=0, max=1, min_open=True)))
    # subset (seeded random windows) | steps (capped optimizer steps) | both
    fewshot_mode: str = option("subset", choice("subset", "steps", "both"))
    # A step is flat when the val error falls by less than this share of the reference (zero-shot) error per
    # full budget ... (0.15: on METR-LA's ~3.3 mph zero-shot MAE, 0.5 mph per 100% of the data)
    min_gain_rate: float = option(0.15, number())
    min_rel_improve: float = option(0.01, number())  # ... and by less than 1% of the best val error so far
    patience: int = option(0, integer(min=0))  # flat steps tolerated before the curve stops (0 = the first stops it)
    # days of unlabelled target readings at the end of the target's training split that a strategy may read
    # at zero-shot, for node prompts and the scaler; 0 = zero-shot sees only the graph and coordinates
    prompt_days: float = option(0.0, NON_NEGATIVE)
    # GPD's target_days: budget points as days of target data instead of fractions. When set, it replaces
    # `fractions`: each point trains on the windows of the LAST d days of the training split (the most recent
    # data a new city has), and is recorded with the fraction of the windows that is. [] = use fractions.
    target_days: list[float] = option([], list_of(POSITIVE, min_len=0))
    # one fine-tuning budget shared by several targets (graphtune.transfer.allocation): none = each target runs its
    # whole curve; uniform = every target at total_budget; diagnostics = shares from zero-shot gap, probe gain and
    # difficulty. Each target then runs two points: the probe (fractions[0]) and its share.
    allocation: str = option("none", choice("none", "uniform", "diagnostics"))
    total_budget: float = option(0.3, number(min=0, max=1, min_open=True))  # share of all targets' windows in total


@dataclass
class GpdConfig:
    """`gpd:` generated parameters (graphtune.generative): node models on source cities, a diffusion model
    over their parameters, and generation for the target (experiment.datasets) from node prompts."""

    # source cities of the node models; never the target. Default: the METR-LA regions other than metr-la-r1
    sources: list[str] = option(["metr-la-r2", "metr-la-r3", "metr-la-r4", "metr-la-r5"],
                                list_of(text(nonempty=True)))
    model_kwargs: dict = option({}, mapping())  # options of the node model (graphtune models: node-gwn)
    # how the target's parameters start: diffusion (GPD) | mean (the mean source vector) | nearest (the source
    # node with the nearest prompt) | shuffled (diffusion from another target node's prompts) | random (the seeded
    # initialisation). The last four are GPD's baselines, run by the same loop.
    init: str = option("diffusion", choice("diffusion", "mean", "nearest", "shuffled", "random"))
    prompts: str = option("both", choice("both", "spatial", "temporal"))  # which node prompts condition generation
    # the temporal prompt: stats (descriptors) | masked-ae (an encoder learned on the sources, GPD's kind)
    temporal_encoder: str = option("stats", text(nonempty=True))
    # days of readings at the end of a city's training split that the temporal prompts read: each source's in
    # collection, the target's at zero-shot (a gpd run's transfer.prompt_days is set to it). 2 days: the
    # one-day autocorrelation needs pairs a day apart
    prompt_days: float = option(2.0, POSITIVE)
    samples: int = option(1, integer(min=1))  # vectors sampled per target node and averaged (1 = GPD: one sample)
    profile_bins: int = option(8, integer(min=1))  # time-of-day bins of the temporal prompt's daily profile
    # collection: every source node model trains on its ego-subgraph (all of a city's nodes as one grouped fit)
    collect_epochs: int = option(6, integer(min=1))
    collect_lr: float = option(0.005, POSITIVE)
    # collection trains on every k-th training window: a city's node models cost about 1.3 s per batch of 64
    # windows on 2 CPU cores (100 nodes), so k = 3 keeps a region's collection near a minute
    collect_stride: int = option(3, integer(min=1))
    holdout: float = option(0.15, number(min=0, max=1, min_open=True, max_open=True))  # source nodes kept for selection
    # the denoiser: a Transformer over layer-aligned tokens of the parameter vector
    conditioning: str = option("pre-bias", text(nonempty=True))  # pre-bias | pre | pre-adaptive | post-adaptive | adaln
    token_size: int = option(128, integer(min=1))
    d_model: int = option(64, integer(min=8))
    depth: int = option(2, integer(min=1))
    heads: int = option(4, integer(min=1))
    # diffusion: GPD's DDPM defaults
    diffusion_steps: int = option(500, integer(min=1))
    schedule: str = option("linear", choice("linear", "cosine"))
    beta_start: float = option(1e-5, POSITIVE)
    beta_end: float = option(0.02, POSITIVE)
    iterations: int = option(2000, integer(min=1))  # denoiser optimizer steps
    lr: float = option(0.002, POSITIVE)
    batch_size: int = option(64, integer(min=1))
    ema_decay: float = option(0.995, number(min=0, max=1, max_open=True))
    eval_every: int = option(500, integer(min=1))  # steps between checkpoint evaluations on held-out source nodes
    sampler: str = option("ddim", choice("ddim", "ddpm"))
    ddim_steps: int = option(50, integer(min=1))
    # a generator file written by `graphtune gpd diffuse` (the DVC pipeline's); empty = an experiment with
    # strategy gpd collects and trains its own, as nested runs of its parent run
    generator: str = option("", text())
    output_dir: str = option("outputs/gpd", text(nonempty=True))  # `gpd collect` -> params/, `gpd diffuse` -> generator/


@dataclass
class CompressConfig:
    """`compress:` data-free compression with compensation (graphtune.compression): `graphtune compress` and the
    transfer strategy `compress` (prune the transferred model before any target data is used)."""

    # the command's model: a network family (lenet-300-100 | vgg | resnet-bottleneck) or a forecasting model with
    # prunable groups (gwnet, hypernet); the strategy compresses experiment.model instead
    model: str = option("lenet-300-100", text(nonempty=True))
    # the command's data: digits (scikit-learn's load_digits, real, shipped) | a CIFAR python-format folder | a city
    dataset: str = option("digits", text(nonempty=True))
    # C: share of every prunable group's channels removed (a per-layer channel ratio in [0, 1)); "budget" (the
    # strategy only) = the smallest ratio whose model meets budgets.trainable_m and budgets.flops_g
    ratio: float | str = option(0.5, _Ratio())
    rounds: int = option(1, integer(min=1))  # k: 1 = one-shot LBYL; more = PA-DFCR's iterations
    method: str = option("lbyl", choice("lbyl", "prune-only"))  # prune-only: drop channels, restore nothing
    lbyl_variant: str = option("derivation", choice("derivation", "reference"))  # reference: upstream's code
    # LBYL's lambdas (see compression/lbyl.py): l1 weighs the BN-offset term, l2 the ridge; chosen on the digits
    # validation split (bench/bench_compression.py --select), never on test
    lambda1: float = option(1e-3, NON_NEGATIVE)
    lambda2: float = option(1e-2, NON_NEGATIVE)
    k1: float = option(0.2, NON_NEGATIVE)  # PA-DFCR: l1_t = l1 exp(k1 cum_t) from round 2
    k2: float = option(0.1, NON_NEGATIVE)  # PA-DFCR: l2_t = l2 exp(-k2 cum_t) from round 2
    # the trained model to compress (a file `graphtune compress` wrote: base.pt or model.pt); empty = train one
    checkpoint: str = option("", text())
    epochs: int = option(30, integer(min=1))  # training of the base network when no checkpoint is given
    lr: float = option(1e-3, POSITIVE)
    batch_size: int = option(64, integer(min=1))
    output_dir: str = option("outputs/compress", text(nonempty=True))  # per-round CSV, model.pt, results.json

    def settings(self, ratio: float | None = None):
        """The CompressSettings of this section (ratio overridden, e.g. the one a budget asks for)."""
        from graphtune.compression.prune import CompressSettings

        return CompressSettings(ratio=self.ratio if ratio is None else ratio, rounds=self.rounds, method=self.method,
                                variant=self.lbyl_variant, lambda1=self.lambda1, lambda2=self.lambda2, k1=self.k1,
                                k2=self.k2)


@dataclass
class AdapterConfig:
    """`adapter:` low-rank adapters (graphtune.adapters) for the transfer strategies `adapter` (a fixed rank on
    the layer kinds of `targets`) and `topology-adapter` (rank and kinds chosen per target city by
    graphtune.adapters.capacity.choose_capacity). The source weights stay frozen; the adapters and the
    re-created node-specific tensors train, and the adapters merge into the weights for evaluation and export."""

    # r of every adapted layer (strategy adapter), at most each adapted layer's width min(in, out). 4 rather than
    # LoRA's usual 8: these layers are 32-64 channels wide, where rank 8 adds 25-29% of each adapted weight
    # (about 15% of gwnet's and hypernet's parameters), above max_share
    rank: int = option(4, integer(min=1))
    # the update B A is scaled by alpha / rank; null = 2 x rank, a scale of 2 at any rank (so the rank that
    # topology-adapter picks changes the capacity, not the size of the steps)
    alpha: float | None = option(None, optional(POSITIVE))
    # layer kinds that get adapters (graphtune.adapters.layouts): temporal | graph | head | prompt
    targets: list[str] = option(["temporal", "graph"], list_of(choice(*ADAPTER_KINDS)))
    # biases that train too: none | adapted (those of the adapted layers) | all (every node-independent bias)
    bias: str = option("none", choice("none", "adapted", "all"))
    # the adapter parameters (A, B and the biases `bias` unfreezes) may be at most this share of the model's
    # node-independent parameters (so a smaller share of all of them): adapter checks it before any run,
    # topology-adapter lowers its choice to meet it
    max_share: float = option(0.1, number(min=0, max=1, min_open=True))
    # topology-adapter: the range of its ranks ...
    rank_min: int = option(1, integer(min=1))
    rank_max: int = option(8, integer(min=1))
    # ... and the order in which layer kinds get adapters as a city's need grows
    topology_kinds: list[str] = option(["graph", "temporal"], list_of(choice(*ADAPTER_KINDS)))
    # weights of its four signals (0 = not measured): the node count, the graph's difficulty proxy, the zero-shot
    # val error relative to persistence's, the distance of the node prompts from the source's
    w_nodes: float = option(1.0, NON_NEGATIVE)
    w_difficulty: float = option(1.0, NON_NEGATIVE)
    w_error: float = option(2.0, NON_NEGATIVE)  # the most direct evidence that the source does not fit the city
    w_shift: float = option(1.0, NON_NEGATIVE)
    # a signal counts half at its reference (x / (x + ref)): the METR-LA halves have about 100 nodes and a
    # difficulty proxy of about 210; 0.5 = target prompts half a source standard deviation away per feature
    ref_nodes: float = option(100.0, POSITIVE)
    ref_difficulty: float = option(200.0, POSITIVE)
    ref_shift: float = option(0.5, POSITIVE)


@dataclass
class BudgetConfig:
    """`budgets:` resource budgets per stage; usage above a budget is penalised in S_uep (null = no budget)."""

    # peak memory (GPU when on CUDA, else process RSS above the stage start)
    mem_mb: float | None = option(None, optional(POSITIVE))
    # wall time of the stage's fits (training steps and their validations): penalised and enforced on this clock
    time_sec: float | None = option(None, optional(POSITIVE))
    flops_g: float | None = option(None, optional(POSITIVE))  # forward GFLOPs per batch
    trainable_m: float | None = option(None, optional(POSITIVE))  # trainable parameters, millions
    enforce: bool = option(False, boolean())  # also stop a stage's training once it exceeds its time budget


@dataclass
class ScoreConfig:
    """`score:` S_uep weights and the reference budgets of the comparable score (see graphtune.transfer.score)."""

    # GraphTune-lite's weights; each >= 0, since a negative weight would reward a worse forecast or an overrun
    w_perf: float = option(0.45, NON_NEGATIVE)  # accuracy is the main goal
    w_transfer_auc: float = option(0.35, NON_NEGATIVE)  # how quickly fine-tuning improves over zero-shot
    w_eff: float = option(0.20, NON_NEGATIVE)  # cheaper is better, but never at the price of accuracy
    w_budget: float = option(0.25, NON_NEGATIVE)  # subtracted per unit of relative budget overrun
    alpha: float = option(1.0, NON_NEGATIVE)  # stage weight ~ difficulty ** alpha; 0 = every stage counts equally
    # Reference budgets: at the reference a cost counts half (cost share u / (u + ref)).
    # fine-tuning compute of one target stage over its whole budget curve, TFLOPs
    ref_finetune_tflops: float = option(10.0, POSITIVE)
    ref_trainable_m: float = option(0.1, POSITIVE)  # trainable parameters, millions
    ref_size_mb: float = option(1.0, POSITIVE)  # model size, MB
    ref_infer_gflops: float = option(1.0, POSITIVE)  # forward GFLOPs per window


@dataclass
class TrackingConfig:
    """`tracking:` where and how runs are recorded in MLflow."""

    experiment_name: str = option("graphtune", text(nonempty=True))  # MLflow rejects an empty experiment name
    tracking_uri: str = option("", text())  # empty = MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    system_metrics: bool = option(False, boolean())  # MLflow's own CPU/memory/GPU sampling on the parent run
    log_checkpoints: bool = option(True, boolean())  # the best checkpoint of every stage as an artifact


@dataclass
class CompareConfig:
    """`compare:` which runs the leaderboard covers and where it is written."""

    # empty = every experiment in the store
    experiment_names: list[str] = option([], list_of(text(nonempty=True), min_len=0))
    # an MLflow search filter, e.g. "tags.`graphtune.datasets` = 'metr-la-west,metr-la-east'"; empty = none
    filter: str = option("", text())
    output_dir: str = option("outputs/compare", text(nonempty=True))  # leaderboard CSV, Markdown, PNG


def stage_value(values, stage: int, n_stages: int, option: str):
    """The entry of a per-stage list (train.epochs, train.lrs) for `stage` of a run with `n_stages` stages.

    Stage 0 is the pretraining; stages 1.. are the transfer targets, also in a fine-tuning run whose
    pretraining happened in another run. A list with one value per stage is read per stage. Any other
    length means [pretraining, ..., transfer]: its first value is the pretraining's and its last value is
    every transfer stage's. So one value applies everywhere, [6, 3] reads as "6 to pretrain, 3 per transfer
    stage" for any number of cities, and params.yaml's list keeps working when the command line names
    more or fewer cities.
    """
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if not values:
        raise ConfigError(f"{option}: expected at least one value")
    if len(values) == n_stages:
        return values[stage]
    return values[0] if stage == 0 else values[-1]


SECTIONS: dict[str, type] = {
    "prepare": PrepareConfig, "experiment": ExperimentConfig, "train": TrainConfig, "transfer": TransferConfig,
    "budgets": BudgetConfig, "score": ScoreConfig, "tracking": TrackingConfig, "compare": CompareConfig,
    "gpd": GpdConfig, "compress": CompressConfig, "adapter": AdapterConfig,
}
FREE_SECTIONS = ("cities",)  # mappings passed through as they are (validated by their consumer)


def validate_section(name: str, section) -> None:
    """Check every field of one section against its declared check; errors name `<name>.<field>`."""
    cls = SECTIONS[name]
    if not isinstance(section, cls):
        raise ConfigError(f"params section {name!r}: expected a {cls.__name__}, got {type(section).__name__}")
    for f in dataclasses.fields(cls):
        f.metadata["check"](getattr(section, f.name), f"{name}.{f.name}")


@dataclass
class Params:
    """Every section of params.yaml, typed. `validate()` re-checks all of them after attributes were set."""

    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    budgets: BudgetConfig = field(default_factory=BudgetConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    gpd: GpdConfig = field(default_factory=GpdConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    cities: dict = field(default_factory=dict)

    def validate(self) -> "Params":
        """Check every option of every section (and that `cities` is a mapping); returns self.

        load_params already validates; call this again after setting attributes (the CLI's options).
        """
        for name in SECTIONS:
            validate_section(name, getattr(self, name))
        mapping()(self.cities, "cities")
        return self

    def as_dict(self) -> dict:
        """Every section with defaults filled in (what a run logs as its parameters)."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["cities"] = self.cities
        return out


def _coerce(section: str, key: str, value, default):
    """Parse a CLI override string as YAML, unless the option is a string (then `name=123` stays "123").

    A numeric option also reads what YAML 1.1 leaves as strings but Python reads as floats (`1e-4`, `inf`),
    in a list too, so `train.lrs=[1e-3,5e-4]` gives floats and `train.lrs=inf` is rejected as inf.
    """
    if not isinstance(value, str) or isinstance(default, str):
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"{section}.{key}: cannot parse {value!r} ({err.problem})") from None
    items = default if isinstance(default, list) else [default]
    numeric = all(item is None or (isinstance(item, (int, float)) and not isinstance(item, bool)) for item in items)
    if not numeric or not items:
        return parsed
    return [_float_text(v) for v in parsed] if isinstance(parsed, list) else _float_text(parsed)


def _float_text(value):
    """`value` as a float when it is a string Python reads as one ("1e-4", "inf"), else unchanged."""
    if not isinstance(value, str):
        return value
    try:
        return float(value)
    except ValueError:
        return value


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
    """Load params.yaml (path None -> all defaults), apply `section.key=value` overrides, validate every option.

    Raises ConfigError with one line naming the file, section or option (e.g. `train.weight_decay`).
    """
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
    return Params(**built, cities=cities).validate()
