"""GPD's three steps as pure functions: collect node models, train the denoiser, generate for a target.

    collect(source bundles)  -> ParamSet        every node model of every source city trained on its
                                                ego-subgraph (one grouped fit per city), flattened, with
                                                the node's prompts; a seeded share of each city's nodes is
                                                held out to select the denoiser's checkpoint
    diffuse(ParamSet)        -> generator dict  a conditional DDPM over the normalised vectors (v-prediction,
                                                snr/(snr+1) weighting, EMA), checkpoint chosen on the
                                                held-out SOURCE nodes' parameter-space error
    generate(generator, target view) -> (N, P)  one vector per target node from its prompts

What each step may read: collection reads the source cities only; every prompt (source or target) comes from
the last `gpd.prompt_days` of its city's training split, plus, at a target's budget point, that point's
windows (`DatasetBundle.restrict`): never a validation or test step. Prompt and parameter statistics are fitted
on the source rows the denoiser trains on. Nothing here reads a target's validation or test split; the stage
loop evaluates there, as for every strategy.

The generator is a plain dict of tensors, numbers and strings (loadable with `torch.load(weights_only=True)`):
the denoiser's EMA weights and build arguments, the schedule, the normalisation, the prompt scalers, and the
training rows' raw vectors and prompts (for the mean and nearest-prompt baselines).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from graphtune.config import GpdConfig, TrainConfig
from graphtune.data.bundle import DatasetBundle
from graphtune.data.prompts import PromptScaler, check_prompts, node_prompts
from graphtune.engine import fit
from graphtune.errors import ConfigError
from graphtune.generative.denoiser import TokenLayout, build_denoiser
from graphtune.generative.diffusion import ddim_sample, ddpm_sample, diffusion_loss, make_ema, make_schedule
from graphtune.generative.paramset import ParamSet, layout_of
from graphtune.models import build_model, check_model_kwargs

NODE_MODEL = "node-gwn"
Log = Callable[[dict, int], None]  # (metrics, step) -> None


def _quiet(metrics: dict, step: int) -> None:
    return None


def node_model_kwargs(gpd: GpdConfig) -> dict:
    """The node model's resolved options (defaults updated with gpd.model_kwargs), checked."""
    return check_model_kwargs(NODE_MODEL, dict(gpd.model_kwargs), option="gpd.model_kwargs")


def prompt_view(bundle: DatasetBundle, prompt_days: float) -> DatasetBundle:
    """A source city as a target's zero-shot point sees a city: only the last `prompt_days` of its training split."""
    lo, hi = bundle.splits["train"]
    steps = min(hi - lo, int(round(prompt_days * 1440.0 / bundle.interval_minutes)))
    return bundle.restrict(bundle.window_starts("train")[:0], prompt_steps=steps, fallback_scaler=bundle.scaler)


def prompts_of(view: DatasetBundle, gpd: GpdConfig, kwargs: dict, where: str,
               encoder: tuple[str, dict] = ("stats", {})) -> tuple[np.ndarray, np.ndarray]:
    """(spatial (N, Ds), temporal (N, Dt)) raw prompts of a view; an absent part has 0 columns. DataError on NaN.

    `encoder` = (name, state) of the temporal encoder (graphtune.generative.encoder), trained on the sources."""
    from graphtune.data.prompts import SPATIAL_FEATURES
    from graphtune.generative.encoder import TEMPORAL_ENCODERS, encoder_names

    n = view.num_nodes
    spatial = temporal = None
    if gpd.prompts in ("both", "spatial"):
        spatial = node_prompts(view, kwargs["neighbours"], gpd.profile_bins, "spatial")[0]
        check_prompts(spatial, SPATIAL_FEATURES, view.sensor_ids, where)
    if gpd.prompts in ("both", "temporal"):
        name, state = encoder
        temporal = TEMPORAL_ENCODERS.get(name).encode(state, view, bins=gpd.profile_bins)
        check_prompts(temporal, encoder_names(name, state, gpd.profile_bins), view.sensor_ids, where)
    spatial = np.zeros((n, 0), np.float32) if spatial is None else spatial
    temporal = np.zeros((n, 0), np.float32) if temporal is None else temporal
    return spatial, temporal


def resolve_prompt_days(gpd: GpdConfig, transfer_prompt_days: float) -> float:
    """The prompt window of a gpd run: gpd.prompt_days, which transfer.prompt_days must leave at 0 or repeat."""
    if transfer_prompt_days and transfer_prompt_days != gpd.prompt_days:
        raise ConfigError(f"transfer.prompt_days: a gpd run reads its prompts from gpd.prompt_days "
                          f"({gpd.prompt_days:g}), got {transfer_prompt_days:g}; set gpd.prompt_days instead")
    return gpd.prompt_days


# ----------------------------------------------------------------------------- collect
def collect(bundles: list[DatasetBundle], gpd: GpdConfig, *, batch_size: int, seed: int, device: str = "cpu",
            log: Log = _quiet, echo: Callable[[str], None] = lambda _: None) -> ParamSet:
    """Train every node model of every source city and stack their vectors and prompts (see the module doc)."""
    prompt_days = gpd.prompt_days
    kwargs = node_model_kwargs(gpd)
    train = TrainConfig(epochs=[gpd.collect_epochs], lrs=[gpd.collect_lr], batch_size=batch_size,
                        weight_decay=0.0, clip_grad=None, early_stop_patience=0)  # unclipped: nodes stay independent
    vectors, spatial, temporal, ids, held, fits = [], [], [], [], [], {}
    layout = None
    epoch0 = 0
    encoder = ("stats", {})
    if gpd.prompts != "spatial":  # the temporal encoder learns from the sources' prompt windows only
        from graphtune.generative.encoder import TEMPORAL_ENCODERS

        views = [prompt_view(b, prompt_days) for b in bundles]
        encoder = (gpd.temporal_encoder,
                   TEMPORAL_ENCODERS.get(gpd.temporal_encoder).fit(views, bins=gpd.profile_bins, seed=seed))
    for bundle in bundles:
        torch.manual_seed(seed)  # every city's node models from the same seeded draw (shared_init)
        net = build_model(NODE_MODEL, bundle, **kwargs)
        layout = layout or layout_of(net.param_shapes)
        start = time.perf_counter()
        starts = bundle.window_starts("train")[::gpd.collect_stride]
        result = fit(net, bundle, train, seed=seed, device=device, train_starts=starts,
                     on_epoch_end=lambda _, e, o=epoch0: log({f"collect/{k}": v for k, v in e.items()
                                                               if k != "epoch"}, o + e["epoch"]))
        epoch0 += gpd.collect_epochs
        fits[bundle.name] = {"val_mae": result.best_val_mae, "best_epoch": result.best_epoch,
                             "epochs": len(result.history), "fit_time_s": time.perf_counter() - start,
                             "nodes": bundle.num_nodes}
        echo(f"  collected {bundle.num_nodes} node models of {bundle.name}: val MAE {result.best_val_mae:.3f}, "
             f"{fits[bundle.name]['fit_time_s']:.1f} s")
        s, t = prompts_of(prompt_view(bundle, prompt_days), gpd, kwargs, f"gpd.sources: {bundle.name}", encoder)
        vectors.append(net.vectors().numpy())
        spatial.append(s)
        temporal.append(t)
        ids += [f"{bundle.name}:{sid}" for sid in bundle.sensor_ids]
        held.append(_holdout(bundle.num_nodes, gpd.holdout, seed))
    from graphtune.data.prompts import SPATIAL_FEATURES
    from graphtune.generative.encoder import encoder_names

    ps = ParamSet(vectors=np.concatenate(vectors).astype(np.float32), spatial=np.concatenate(spatial),
                  temporal=np.concatenate(temporal), node_ids=ids, cities=[b.name for b in bundles], layout=layout,
                  model=NODE_MODEL, model_kwargs=kwargs,
                  spatial_names=list(SPATIAL_FEATURES) if gpd.prompts != "temporal" else [],
                  temporal_names=encoder_names(*encoder, gpd.profile_bins) if gpd.prompts != "spatial" else [],
                  encoder=encoder,
                  train=~np.concatenate(held),
                  extra={"seed": seed, "collect_epochs": gpd.collect_epochs, "collect_lr": gpd.collect_lr,
                         "prompt_days": prompt_days, "prompts": gpd.prompts, "profile_bins": gpd.profile_bins,
                         "fits": fits})
    return ps.fit_normalisation()


def _holdout(n: int, share: float, seed: int) -> np.ndarray:
    """(n,) bool: a seeded share of a city's nodes (at least one when the city has two) held out for selection."""
    k = min(n - 1, max(1, int(round(share * n)))) if n > 1 else 0
    mask = np.zeros(n, bool)
    mask[np.random.default_rng(seed).permutation(n)[:k]] = True
    return mask


# ----------------------------------------------------------------------------- diffuse
@dataclass
class DiffuseResult:
    generator: dict
    history: list[dict]  # per evaluation: step, loss (mean since the last), heldout_mse, mean_baseline_mse
    best_step: int
    train_time_s: float
    sample_time_s: float  # sampling the held-out nodes once with the chosen sampler


def diffuse(ps: ParamSet, gpd: GpdConfig, *, seed: int, device: str = "cpu", log: Log = _quiet,
            echo: Callable[[str], None] = lambda _: None) -> DiffuseResult:
    """Train the conditional denoiser on the training rows; keep the EMA weights with the lowest parameter-space
    error on the held-out source nodes (never a target's data)."""
    torch.manual_seed(seed)
    device = torch.device(device)
    train_rows = ps.train_mask
    if ps.mean is None:
        ps.fit_normalisation()
    z_all = torch.from_numpy(ps.normalise(ps.vectors))
    s_scaler = PromptScaler.fit(ps.spatial[train_rows]) if ps.spatial.shape[1] else None
    t_scaler = PromptScaler.fit(ps.temporal[train_rows]) if ps.temporal.shape[1] else None
    s_all = _scaled(s_scaler, ps.spatial)
    t_all = _scaled(t_scaler, ps.temporal)
    layout = TokenLayout.from_tensors([(t["name"], t["numel"], t["graph"]) for t in ps.layout], gpd.token_size)
    build = {"name": gpd.conditioning, "spatial_dim": s_all.shape[1], "temporal_dim": t_all.shape[1],
             "d_model": gpd.d_model, "depth": gpd.depth, "heads": gpd.heads}
    net = build_denoiser(gpd.conditioning, layout, s_all.shape[1], t_all.shape[1], d_model=gpd.d_model,
                         depth=gpd.depth, heads=gpd.heads).to(device)
    schedule = make_schedule(gpd.schedule, gpd.diffusion_steps, gpd.beta_start, gpd.beta_end)
    ema = make_ema(net, gpd.ema_decay)
    opt = torch.optim.AdamW(net.parameters(), lr=gpd.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    tr = torch.from_numpy(np.flatnonzero(train_rows))
    ho = torch.from_numpy(np.flatnonzero(~train_rows))
    z, s, t = z_all.to(device), s_all.to(device), t_all.to(device)
    history, best, best_step, best_state, losses = [], math.inf, 0, None, []
    start = time.perf_counter()
    for step in range(1, gpd.iterations + 1):
        idx = tr[torch.randint(len(tr), (min(gpd.batch_size, len(tr)),), generator=gen)].to(device)
        sb, tb = s[idx], t[idx]
        loss = diffusion_loss(lambda x, k: net(x, k, sb, tb), schedule, z[idx], generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update_parameters(net)
        losses.append(float(loss.detach()))
        if step % gpd.eval_every == 0 or step == gpd.iterations:
            entry = {"loss": float(np.mean(losses)), "step": step}
            losses = []
            if len(ho):
                pred = _sample(ema.module, schedule, gpd.sampler, gpd.ddim_steps, s[ho.to(device)], t[ho.to(device)],
                               seed, device)
                entry["heldout_mse"] = float(((pred.cpu() - z_all[ho]) ** 2).mean())
                entry["mean_baseline_mse"] = float((z_all[ho] ** 2).mean())  # the mean vector is 0 in z units
            key = entry.get("heldout_mse", entry["loss"])
            if key < best:
                best, best_step = key, step
                best_state = {k: v.detach().cpu().clone() for k, v in ema.module.state_dict().items()}
            history.append(entry)
            log({f"diffuse/{k}": v for k, v in entry.items() if k != "step"}, step)
            echo(f"  denoiser step {step}: loss {entry['loss']:.4f}"
                 + (f", held-out param MSE {entry['heldout_mse']:.4f} (mean vector {entry['mean_baseline_mse']:.4f})"
                    if "heldout_mse" in entry else ""))
    train_time = time.perf_counter() - start
    ema.module.load_state_dict(best_state)
    t0 = time.perf_counter()
    if len(ho):
        _sample(ema.module, schedule, gpd.sampler, gpd.ddim_steps, s[ho.to(device)], t[ho.to(device)], seed, device)
    sample_time = time.perf_counter() - t0
    generator = {
        "version": 1, "param_hash": ps.hash, "model": ps.model, "model_kwargs": dict(ps.model_kwargs),
        "denoiser": build, "token_size": gpd.token_size, "layout": copy.deepcopy(ps.layout),
        "state": best_state,
        "schedule": {"kind": gpd.schedule, "steps": gpd.diffusion_steps, "beta_start": gpd.beta_start,
                     "beta_end": gpd.beta_end},
        "sampler": gpd.sampler, "ddim_steps": gpd.ddim_steps,
        "mean": torch.from_numpy(ps.mean), "std": torch.from_numpy(ps.std),
        "spatial_scaler": s_scaler.to_dict() if s_scaler else None,
        "temporal_scaler": t_scaler.to_dict() if t_scaler else None,
        "prompts": ps.extra.get("prompts", gpd.prompts), "profile_bins": ps.extra.get("profile_bins", gpd.profile_bins),
        "prompt_days": ps.extra.get("prompt_days"),
        "temporal_encoder": {"name": ps.encoder[0], "state": ps.encoder[1]},
        "train_vectors": torch.from_numpy(ps.vectors[train_rows]),
        "train_prompts": torch.cat([s_all[tr], t_all[tr]], dim=1),
        "cities": list(ps.cities), "best_step": best_step,
    }
    return DiffuseResult(generator, history, best_step, train_time, sample_time)


def _scaled(scaler: PromptScaler | None, prompts: np.ndarray) -> torch.Tensor:
    if scaler is None:
        return torch.zeros(prompts.shape[0], 0)
    return torch.from_numpy(np.asarray(scaler.transform(prompts), np.float32))


def _sample(net, schedule, sampler: str, ddim_steps: int, s: torch.Tensor, t: torch.Tensor, seed: int,
            device) -> torch.Tensor:
    """Normalised vectors (n, P) sampled for prompts (s, t): DDIM on `ddim_steps` steps, or DDPM on all of them."""
    net.eval()
    gen = torch.Generator(device=torch.device(device)).manual_seed(seed)
    shape = (s.shape[0], net.layout.numel)

    def fn(x, k):
        return net(x, k, s, t)

    with torch.no_grad():
        if sampler == "ddim":
            return ddim_sample(fn, schedule, shape, steps=ddim_steps, generator=gen, device=device)
        return ddpm_sample(fn, schedule, shape, generator=gen, device=device)


# ----------------------------------------------------------------------------- generate
def load_generator(generator: dict, device="cpu"):
    """The denoiser (EMA weights) and schedule of a generator dict."""
    layout = TokenLayout.from_tensors([(t["name"], t["numel"], t["graph"]) for t in generator["layout"]],
                                      generator["token_size"])
    b = generator["denoiser"]
    net = build_denoiser(b["name"], layout, b["spatial_dim"], b["temporal_dim"], d_model=b["d_model"],
                         depth=b["depth"], heads=b["heads"])
    net.load_state_dict(generator["state"])
    sch = generator["schedule"]
    return net.to(device).eval(), make_schedule(sch["kind"], sch["steps"], sch["beta_start"], sch["beta_end"])


def generate(generator: dict, view: DatasetBundle, *, init: str = "diffusion", seed: int = 0, device="cpu"
             ) -> torch.Tensor | None:
    """(N, P) raw parameter vectors for the nodes of `view` (a target as a budget point sees it), or None for
    init="random" (the node models keep their seeded initialisation). See GpdConfig.init for the options."""
    if init == "random":
        return None
    mean, std = generator["mean"].numpy(), generator["std"].numpy()
    per_element = np.repeat(std, [t["numel"] for t in generator["layout"]])
    if init == "mean":
        return torch.from_numpy(np.tile(mean, (view.num_nodes, 1)))
    gpd = GpdConfig(prompts=generator["prompts"], profile_bins=generator["profile_bins"])
    enc = generator.get("temporal_encoder") or {"name": "stats", "state": {}}
    spatial, temporal = prompts_of(view, gpd, generator["model_kwargs"], f"{view.name} (target prompts)",
                                   (enc["name"], enc["state"]))
    s = _scaled(PromptScaler.from_dict(generator["spatial_scaler"]) if generator["spatial_scaler"] else None, spatial)
    t = _scaled(PromptScaler.from_dict(generator["temporal_scaler"]) if generator["temporal_scaler"] else None,
                temporal)
    if init == "nearest":
        source = generator["train_prompts"]
        nearest = torch.cdist(torch.cat([s, t], dim=1), source).argmin(dim=1)
        return generator["train_vectors"][nearest].clone()
    if init == "shuffled":  # GPD's ablation: each node gets another node's prompts
        perm = torch.randperm(view.num_nodes, generator=torch.Generator().manual_seed(seed + 1))
        s, t = s[perm], t[perm]
    elif init != "diffusion":
        raise ConfigError(f"gpd.init: unknown {init!r}")
    net, schedule = load_generator(generator, device)
    k = int(generator.get("samples", 1))  # k > 1: the mean of k samples per node (an estimate of E[theta | prompt])
    z = _sample(net, schedule, generator["sampler"], generator["ddim_steps"], s.repeat(k, 1).to(device),
                t.repeat(k, 1).to(device), seed, device)
    z = z.reshape(k, view.num_nodes, -1).mean(0).cpu().numpy()
    return torch.from_numpy((z * per_element + mean).astype(np.float32))
