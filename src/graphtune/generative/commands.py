"""`graphtune gpd collect` and `graphtune gpd diffuse`: GPD's first two steps as tracked commands (DVC stages).

    collect   gpd.sources -> {gpd.output_dir}/params/ (params.npz, meta.json): the parameter dataset
    diffuse   {gpd.output_dir}/params/ -> {gpd.output_dir}/generator/ (generator.pt, history.csv, summary.json)

Each is one MLflow run (`gpd-collect`, `gpd-diffuse`, kind `phase`) logging its settings, per-step metrics
and the parameter dataset's hash. `graphtune experiment --strategy gpd --set gpd.generator=.../generator.pt`
then generates and fine-tunes as a transfer stage. Every input is checked before a run opens; outputs are
written atomically, and only into folders GraphTune wrote.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Callable

import torch

from graphtune.config import Params
from graphtune.errors import ConfigError
from graphtune.fileio import atomic_directory, check_owned
from graphtune.generative.paramset import FILES, ParamSet
from graphtune.generative.pipeline import NODE_MODEL, collect, diffuse, node_model_kwargs
from graphtune.generative.strategy import GENERATOR_FILE, check_sources
from graphtune.transfer.stages import resolve_device
from graphtune.tracking import Tracker, graphtune_tags

GENERATOR_FILES = (GENERATOR_FILE, "history.csv", "summary.json")


def _tracker(params: Params, tracking: bool) -> Tracker:
    tr = params.tracking
    return Tracker(tr.tracking_uri or None, tr.experiment_name, system_metrics=tr.system_metrics, enabled=tracking)


def _tags(params: Params, phase: str) -> dict:
    tags = graphtune_tags("phase", model=NODE_MODEL, strategy="gpd", datasets=params.gpd.sources,
                          seed=params.experiment.seed)
    return tags | {"graphtune.phase": phase}


def run_collect(params: Params, *, echo: Callable[[str], None] = print, tracking: bool = True) -> Path:
    """Collect the node models of gpd.sources into {gpd.output_dir}/params; returns that folder."""
    from graphtune.data.cities import get_city
    from graphtune.transfer.experiment import load_bundles

    params.validate()
    gpd = params.gpd
    if not gpd.sources:
        raise ConfigError("gpd.sources: expected at least one source city")
    for city in gpd.sources:
        get_city(city, params.cities)
    from graphtune.generative.encoder import TEMPORAL_ENCODERS

    TEMPORAL_ENCODERS.get(gpd.temporal_encoder)
    kwargs = node_model_kwargs(gpd)
    device = resolve_device(params.experiment.device)
    out = Path(gpd.output_dir) / "params"
    check_owned(out, legacy_names=FILES)
    if tracking:
        from graphtune.tracking.preflight import check_store

        check_store(params.tracking.tracking_uri or None)
    bundles = load_bundles(params, list(gpd.sources))
    check_sources(bundles, [], gpd, kwargs)
    tracker = _tracker(params, tracking)
    logged = {"gpd": dataclasses.asdict(gpd), "train.batch_size": params.train.batch_size,
              "seed": params.experiment.seed}
    with tracker.run("gpd-collect", tags=_tags(params, "collect"), params=logged):
        echo(f"gpd collect: node models of {', '.join(gpd.sources)}")
        ps = collect(bundles, gpd, batch_size=params.train.batch_size, seed=params.experiment.seed, device=device,
                     log=lambda m, step: tracker.log_metrics(m, step=step), echo=echo)
        ps.save(out)
        tracker.log_params({"param_hash": ps.hash, "nodes": len(ps.node_ids), "numel": ps.numel})
        tracker.log_artifact(out / "meta.json")
    echo(f"parameter dataset: {len(ps.node_ids)} node vectors of {ps.numel} values in {out} (hash {ps.hash[:16]})")
    return out


def run_diffuse(params: Params, *, echo: Callable[[str], None] = print, tracking: bool = True) -> Path:
    """Train the denoiser on {gpd.output_dir}/params into {gpd.output_dir}/generator; returns that folder."""
    from graphtune.generative.denoiser import DENOISERS

    params.validate()
    gpd = params.gpd
    DENOISERS.get(gpd.conditioning)
    kwargs = node_model_kwargs(gpd)
    device = resolve_device(params.experiment.device)
    source = Path(gpd.output_dir) / "params"
    if tracking:
        from graphtune.tracking.preflight import check_store

        check_store(params.tracking.tracking_uri or None)
    ps = ParamSet.load(source, model=NODE_MODEL, model_kwargs=kwargs)  # another node model: one line, no run
    out = Path(gpd.output_dir) / "generator"
    check_owned(out, legacy_names=GENERATOR_FILES)
    tracker = _tracker(params, tracking)
    logged = {"gpd": dataclasses.asdict(gpd), "seed": params.experiment.seed, "param_hash": ps.hash}
    with tracker.run("gpd-diffuse", tags=_tags(params, "diffuse"), params=logged):
        echo(f"gpd diffuse: {gpd.conditioning} denoiser on {len(ps.node_ids)} vectors ({int(ps.train_mask.sum())} "
             f"train, the rest select the checkpoint), {gpd.iterations} steps")
        result = diffuse(ps, gpd, seed=params.experiment.seed, device=device,
                         log=lambda m, step: tracker.log_metrics(m, step=step), echo=echo)
        summary = {"param_hash": ps.hash, "best_step": result.best_step, "train_time_s": result.train_time_s,
                   "sample_time_s": result.sample_time_s, "conditioning": gpd.conditioning,
                   "heldout_nodes": int((~ps.train_mask).sum())}
        with atomic_directory(out, legacy_names=GENERATOR_FILES) as tmp:
            torch.save(result.generator, tmp / GENERATOR_FILE)
            (tmp / "history.csv").write_text(_csv(result.history))
            (tmp / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        for name in GENERATOR_FILES:
            tracker.log_artifact(out / name)
    echo(f"generator: {out / GENERATOR_FILE} (best step {result.best_step}); use it with "
         f"graphtune experiment --strategy gpd --set gpd.generator={out / GENERATOR_FILE}")
    return out


def _csv(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
