"""`graphtune compress`: train (or load) a model, compress it data-free in k rounds, record every round.

    graphtune compress --model lenet-300-100 --dataset digits --ratio 0.7 --rounds 5
    graphtune compress --model gwnet --dataset metr-la-week --ratio 0.5 --method prune-only

The model is a network family (compression/vision.py: LeNet-300-100, a VGG-style CNN, a ResNet-style
bottleneck net) on images (`digits`: scikit-learn's real load_digits; or a CIFAR python-format folder
a user already has), or a forecasting model with prunable groups (gwnet, hypernet) on a city. Without
compress.checkpoint the base model is trained here (seeded; best epoch on validation) and saved as
base.pt, so later runs compress the same base.

Each round prunes every declared group to its scheduled width with LBYL's compensation (or none,
`prune-only`) and is evaluated on the validation and test splits (reported, never used to choose
anything). Outputs, written atomically into compress.output_dir:

    rounds_C{C}_k{k}_{method}.csv   iteration, compression_rate, cumulative_compression, the metrics
                                    (accuracy, or mae/rmse/mape), num_parameters, flops, lambda1, lambda2,
                                    seed, seconds, widths; round 0 is the uncompressed model
    model.pt                        the compressed model: (config, state_dict), rebuilt strictly
    base.pt                         the trained base model (when trained here)
    results.json                    settings, base and final metrics, sizes, FLOPs, compression time

One MLflow run (kind `compress`) logs the settings, every round's metrics with step = round, and the files.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Callable

import torch

from graphtune.compression.checkpoint import load_compressed, save_compressed
from graphtune.compression.prune import CompressSettings, compress, group_width, groups_of
from graphtune.compression.schedule import format_ratio
from graphtune.config import Params
from graphtune.errors import ConfigError
from graphtune.fileio import atomic_directory, check_owned
from graphtune.profiling import count_flops
from graphtune.tracking import Tracker, graphtune_tags

FILES = ("model.pt", "base.pt", "results.json")


def _expect(task, kind: str, name: str) -> None:
    """A checkpoint must hold the model the command was asked to compress."""
    if (kind, name) != (task.kind, task.name):
        raise ConfigError(f"compress.checkpoint: holds a {kind} {name!r}, but compress.model is {task.name!r}")


class ImageTask:
    """A network family on an image split: accuracy (higher is better)."""

    kind = "network"
    metrics = ("accuracy",)
    primary = "accuracy"

    def __init__(self, family: str, dataset: str, c, seed: int):
        from graphtune.compression.vision import NETWORKS, default_config, load_images

        NETWORKS.get(family)  # unknown family: one line listing the known ones
        self.name, self.c, self.seed = family, c, seed
        self.data = load_images(dataset, seed)
        self.base_config = default_config(family, in_channels=self.data.channels, image_size=self.data.image_size,
                                          num_classes=self.data.num_classes)
        self.source = self.data.source
        self.example = self.data.x_train[:1]

    def build(self, kind: str, name: str, config: dict):
        from graphtune.compression.vision import build_network

        _expect(self, kind, name)
        return build_network(copy.deepcopy(config))

    def train(self, model) -> dict:
        from graphtune.compression.vision import train_classifier

        return train_classifier(model, self.data, epochs=self.c.epochs, lr=self.c.lr, batch_size=self.c.batch_size,
                                seed=self.seed)

    def evaluate(self, model, split: str) -> dict:
        from graphtune.compression.vision import accuracy

        x, y = getattr(self.data, f"x_{split}"), getattr(self.data, f"y_{split}")
        return {"accuracy": accuracy(model, x, y)}


class ForecastTask:
    """A forecasting model with prunable groups on a city: masked MAE/RMSE/MAPE (lower is better)."""

    kind = "model"
    metrics = ("mae", "rmse", "mape")
    primary = "mae"

    def __init__(self, model: str, city: str, params: Params, seed: int, device: str):
        from graphtune.models import check_model_kwargs, model_defaults
        from graphtune.transfer.experiment import load_bundles
        from graphtune.transfer.stages import _example

        from graphtune.data.synthetic import synthetic_bundle
        from graphtune.models import build_model

        kwargs = dict(params.experiment.model_kwargs) if params.experiment.model == model else {}
        check_model_kwargs(model, kwargs)
        # a model without prunable groups is refused before any data is read (a probe on a tiny synthetic graph)
        groups_of(build_model(model, synthetic_bundle(num_nodes=4, num_steps=200, seed=0), **kwargs),
                  f"compress.model {model!r}")
        self.name, self.params, self.seed, self.device = model, params, seed, device
        self.bundle = load_bundles(params, [city])[0]
        self.base_config = model_defaults(model) | kwargs
        self.source = f"{city} ({self.bundle.num_nodes} sensors)"
        self.example = _example(self.bundle, params.train.batch_size)

    def build(self, kind: str, name: str, config: dict):
        from graphtune.models import build_model

        _expect(self, kind, name)
        return build_model(name, self.bundle, **config)

    def train(self, model) -> dict:
        from graphtune.engine import fit

        result = fit(model, self.bundle, self.params.train, seed=self.seed, device=self.device)
        return {"epochs": len(result.history), "best_epoch": result.best_epoch, "val_mae": result.best_val_mae,
                "train_seconds": result.train_time_s}

    def evaluate(self, model, split: str) -> dict:
        from graphtune.engine import evaluate

        m = evaluate(model, self.bundle, split, batch_size=self.params.train.batch_size, device=self.device)
        return {k: float(m[k]) for k in self.metrics}


def make_task(params: Params, device: str):
    from graphtune.compression.vision import NETWORKS
    from graphtune.models import list_models

    c = params.compress
    seed = params.experiment.seed
    if c.model in NETWORKS.names():
        return ImageTask(c.model, c.dataset, c, seed)
    if c.model in list_models():
        from graphtune.data.cities import get_city

        get_city(c.dataset, params.cities)  # a forecasting model compresses on a city: unknown -> known ones
        return ForecastTask(c.model, c.dataset, params, seed, device)
    known = ", ".join(NETWORKS.names() + [m for m in list_models()])
    raise ConfigError(f"compress.model: unknown model {c.model!r}; known: {known}")


def csv_name(settings: CompressSettings) -> str:
    return f"rounds_C{format_ratio(settings.ratio)}_k{settings.rounds}_{settings.method}.csv"


def run_compress(params: Params, *, echo: Callable[[str], None] = print, tracking: bool = True) -> Path:
    """Compress params.compress.model as the section says; returns the output folder."""
    from graphtune.transfer.stages import resolve_device

    params.validate()
    c = params.compress
    if c.ratio == "budget":
        raise ConfigError("compress.ratio: 'budget' is for the transfer strategy; the command takes a ratio in [0, 1)")
    settings = c.settings().check()
    device = resolve_device(params.experiment.device)
    seed = params.experiment.seed
    out = Path(c.output_dir)
    check_owned(out, legacy_names=FILES)  # before any work: a folder that is not ours is refused now
    if tracking:
        from graphtune.tracking.preflight import check_store

        check_store(params.tracking.tracking_uri or None)
    task = make_task(params, device)

    base_info: dict = {}
    if c.checkpoint:
        model, payload = load_compressed(c.checkpoint, task.build)
        config = copy.deepcopy(payload["config"])
        base_info = {"checkpoint": str(c.checkpoint)}
    else:
        torch.manual_seed(seed)
        config = copy.deepcopy(task.base_config)
        model = task.build(task.kind, task.name, config)
    groups = groups_of(model, f"compress.model {task.name!r}")
    model.to(device)

    tr = params.tracking
    tracker = Tracker(tr.tracking_uri or None, tr.experiment_name, system_metrics=tr.system_metrics, enabled=tracking)
    tags = graphtune_tags("compress", model=task.name, strategy=settings.method, datasets=[c.dataset], seed=seed)
    tags |= {"graphtune.compress.ratio": format_ratio(settings.ratio), "graphtune.compress.rounds": str(settings.rounds)}
    run_name = f"compress-{task.name}-C{format_ratio(settings.ratio)}-k{settings.rounds}-{settings.method}-s{seed}"
    logged = {"compress": dataclasses.asdict(c), "seed": seed, "device": device, "groups": [g.name for g in groups]}
    rows: list[dict] = []

    def measure(iteration, rate, cumulative, l1, l2, seconds, widths) -> dict:
        val, test = task.evaluate(model, "val"), task.evaluate(model, "test")
        flops = count_flops(model, task.example.to(device))["flops"]
        row = {"iteration": iteration, "compression_rate": rate, "cumulative_compression": cumulative,
               **test, **{f"val_{k}": v for k, v in val.items()},
               "num_parameters": sum(p.numel() for p in model.parameters()), "flops": flops,
               "lambda1": l1, "lambda2": l2, "seed": seed, "seconds": seconds, "widths": json.dumps(widths)}
        rows.append(row)
        tracker.log_metrics({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "iteration"},
                            step=iteration)
        shown = ", ".join(f"{k} {test[k]:.4g}" for k in task.metrics)
        echo(f"  round {iteration}: {row['num_parameters']} parameters, {flops / 1e6:.3g} MFLOPs, {shown} "
             f"({seconds:.3f} s)")
        return row

    with tracker.run(run_name, tags=tags, params=logged):
        echo(f"compress {task.name} on {task.source}: C={settings.ratio:g} in {settings.rounds} round(s), "
             f"{settings.method}" + (f" ({settings.variant})" if settings.method == "lbyl" else ""))
        if not c.checkpoint:
            base_info = task.train(model)
            echo(f"  trained the base model: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in base_info.items() if k != 'history'})}")
        base_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        base_config = copy.deepcopy(config)
        base_widths = {g.name: group_width(model, g) for g in groups}
        measure(0, 0.0, 0.0, settings.lambda1, settings.lambda2, 0.0, base_widths)
        model.eval()
        began = time.perf_counter()
        compress(model, config, settings, groups=groups,
                 on_round=lambda r: measure(r.round.t, r.round.rate, r.round.cumulative, r.round.lambda1,
                                            r.round.lambda2, r.seconds, r.widths))
        total = time.perf_counter() - began
        summary = {"model": task.name, "dataset": c.dataset, "data_source": task.source, "settings":
                   dataclasses.asdict(settings), "seed": seed, "base": rows[0], "final": rows[-1],
                   "compression_seconds": total, "base_training": {k: v for k, v in base_info.items() if k != "history"},
                   "groups": [g.name for g in groups], "config": config, "csv": csv_name(settings)}
        with atomic_directory(out, legacy_names=FILES) as tmp:
            (tmp / csv_name(settings)).write_text(_csv(rows))
            save_compressed(tmp / "model.pt", kind=task.kind, name=task.name, config=config,
                            state=model.state_dict(), extra={"settings": dataclasses.asdict(settings)})
            if not c.checkpoint:
                save_compressed(tmp / "base.pt", kind=task.kind, name=task.name, config=base_config, state=base_state)
            (tmp / "results.json").write_text(json.dumps(summary, indent=1, sort_keys=True, default=float) + "\n")
        for name in [csv_name(settings), "results.json"]:
            tracker.log_artifact(out / name)
    final = rows[-1]
    echo(f"compressed: {rows[0]['num_parameters']} -> {final['num_parameters']} parameters in {total:.2f} s; "
         + ", ".join(f"{k} {rows[0][k]:.4g} -> {final[k]:.4g}" for k in task.metrics) + f"; results in {out}")
    return out


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
