"""Temporal prompt encoders, registered by name (`gpd.temporal_encoder`).

    stats       the descriptors of graphtune.data.prompts (daily profile, moments, autocorrelations, missing
                share): nothing to train
    masked-ae   GPD's kind of temporal prompt: a small encoder learned by masked reconstruction of short
                windows of the SOURCE series, then applied to any city. A window is one hour of readings
                (scaled with the city's scaler); a quarter of its steps are masked and the decoder
                reconstructs them from the encoder's code. A node's prompt is the mean code over the
                windows of its visible steps (the same steps the descriptors read), concatenated with the
                descriptors' mean and std, so that the level survives the per-window centring.

An encoder is `fit(views, seed) -> state` (a dict of tensors and numbers; {} for stats) and
`encode(state, view) -> (N, D)`; the state travels in the parameter dataset and the generator, so a target
is encoded by the weights trained on the sources only.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from graphtune.data.prompts import TEMPORAL_FEATURES, node_prompts, visible_steps
from graphtune.registry import Registry

WINDOW_MINUTES = 60.0  # "short windows": one hour, 12 steps at 5 minutes
MASK_SHARE = 0.25


class TemporalEncoder:
    """Base: subclass, implement fit/encode/names, register."""

    name = ""

    def fit(self, views: list, *, bins: int, seed: int) -> dict:  # pragma: no cover - the interface
        raise NotImplementedError

    def encode(self, state: dict, view, *, bins: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


TEMPORAL_ENCODERS: Registry[TemporalEncoder] = Registry("temporal encoder", option="gpd.temporal_encoder",
                                                        providers=("graphtune.generative.encoder",))


def register_encoder(name: str):
    def decorator(cls):
        cls.name = name
        TEMPORAL_ENCODERS.register(name, cls(), owner=cls.__module__)
        return cls
    return decorator


@register_encoder("stats")
class Stats(TemporalEncoder):
    """The descriptors of graphtune.data.prompts; nothing is learned."""

    def fit(self, views, *, bins, seed):
        return {}

    def encode(self, state, view, *, bins):
        return node_prompts(view, 1, bins, "temporal")[1]


class _AutoEncoder(nn.Module):
    def __init__(self, window: int, dim: int, hidden: int = 64):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(2 * window, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.decoder = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, window))

    def code(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (n, L) centred windows, keep (n, L) bool (False = masked): the code (n, dim)."""
        return self.encoder(torch.cat([x * keep, keep.to(x.dtype)], dim=-1))


def _windows(view, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of `window` consecutive visible steps with every reading observed, per node:
    (windows (M, L) scaled and centred per window, node index (M,))."""
    steps = visible_steps(view)
    runs = np.split(steps, np.flatnonzero(np.diff(steps) != 1) + 1) if steps.size else []
    starts = [r[i] for r in runs for i in range(0, len(r) - window + 1, window)]
    if not starts:
        return torch.zeros(0, window), torch.zeros(0, dtype=torch.long)
    idx = torch.as_tensor(np.asarray(starts))[:, None] + torch.arange(window)  # (W, L)
    x = (view.target[idx].to(torch.float64) - view.scaler.mean) / view.scaler.std  # (W, L, N)
    x = x.permute(2, 0, 1)  # (N, W, L)
    ok = ~torch.isnan(x).any(-1)  # (N, W)
    node = torch.arange(x.shape[0])[:, None].expand_as(ok)[ok]
    w = x[ok]
    return (w - w.mean(-1, keepdim=True)).float(), node


@register_encoder("masked-ae")
class MaskedAutoEncoder(TemporalEncoder):
    """Masked reconstruction of one-hour windows of the source series (see the module doc)."""

    dim = 8
    iterations = 400

    def fit(self, views, *, bins, seed):
        window = max(2, int(round(WINDOW_MINUTES / views[0].interval_minutes)))
        data = torch.cat([_windows(v, window)[0] for v in views])
        if data.shape[0] == 0:
            raise ValueError("no complete one-hour window in the sources' prompt windows to train the encoder on")
        torch.manual_seed(seed)
        net = _AutoEncoder(window, self.dim)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        losses = []
        for _ in range(self.iterations):
            batch = data[torch.randint(data.shape[0], (min(256, data.shape[0]),), generator=gen)]
            keep = torch.rand(batch.shape, generator=gen) >= MASK_SHARE
            recon = net.decoder(net.code(batch, keep))
            loss = ((recon - batch) ** 2)[~keep].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return {"window": window, "dim": self.dim, "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
                "first_loss": float(np.mean(losses[:20])), "last_loss": float(np.mean(losses[-20:]))}

    def encode(self, state, view, *, bins):
        net = _AutoEncoder(state["window"], state["dim"])
        net.load_state_dict(state["state"])
        windows, node = _windows(view, state["window"])
        n = view.num_nodes
        with torch.no_grad():
            codes = net.code(windows, torch.ones_like(windows, dtype=torch.bool)).double()
        sums = torch.zeros(n, state["dim"], dtype=torch.float64).index_add_(0, node, codes)
        counts = torch.zeros(n, dtype=torch.float64).index_add_(0, node, torch.ones(len(node), dtype=torch.float64))
        mean_code = (sums / counts[:, None]).numpy()  # 0/0 -> NaN: a node without a complete window (refused later)
        stats = node_prompts(view, 1, bins, "temporal")[1]
        names = TEMPORAL_FEATURES(bins)
        level = stats[:, [names.index("mean"), names.index("std")]]
        return np.concatenate([mean_code, level], axis=1).astype(np.float32)


def list_encoders() -> list[str]:
    return TEMPORAL_ENCODERS.names()


def encoder_names(kind: str, state: dict, bins: int) -> list[str]:
    """Column names of the temporal prompt an encoder gives."""
    if kind == "stats":
        return list(TEMPORAL_FEATURES(bins))
    return [f"code_{i}" for i in range(state["dim"])] + ["mean", "std"]
