"""Gaussian diffusion over flattened parameter vectors, as GPD uses it (Yuan et al., ICLR 2024).

A data point x0 is one model's parameters flattened to a vector of length P; a batch is (B, P). Timesteps are
0-based, t in [0, S) with S = `Schedule.steps`, and every per-step quantity below is a length-S float64 tensor
indexed by t.

Schedule. betas b_t in (0, 1); a_t = 1 - b_t; abar_t = prod_{s<=t} a_s; abar_prev_t = abar_{t-1} with
abar_{-1} = 1. `linear_schedule` spaces b_t evenly from beta_start to beta_end (GPD: 1e-5 to 0.02 over 500
steps); `cosine_schedule` (Nichol & Dhariwal 2021) sets f(u) = cos^2(pi/2 * (u/S + s)/(1 + s)) and
b_t = min(1 - f(t+1)/f(t), max_beta), so abar_t follows f(t+1)/f(0) until the clip.

Forward process. q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I), i.e.
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I).

v-prediction (Salimans & Ho 2022). The network predicts
    v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0,
and since (x_t, v) is a rotation of (x0, eps) both come back exactly:
    x0  = sqrt(abar_t) x_t - sqrt(1 - abar_t) v,
    eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v.

Loss. With snr_t = abar_t / (1 - abar_t), each sample's mean squared v error is weighted by
    w_t = snr_t / (snr_t + 1)  (= abar_t),
GPD's weighting: L = mean_b w_{t_b} * mean_p (v_hat - v)^2, with t uniform on [0, S) and eps ~ N(0, I). Since
eps_hat - eps = sqrt(abar_t) (v_hat - v) and x0_hat - x0 = -sqrt(1 - abar_t) (v_hat - v), the weighted v error
w_t |v_hat - v|^2 equals the eps-prediction error |eps_hat - eps|^2 and snr_t times the x0 error |x0_hat - x0|^2.

DDPM posterior (Ho et al. 2020). q(x_{t-1} | x_t, x0) = N(c1_t x0 + c2_t x_t, btilde_t I) with
    c1_t = b_t sqrt(abar_{t-1}) / (1 - abar_t),
    c2_t = (1 - abar_{t-1}) sqrt(a_t) / (1 - abar_t),
    btilde_t = b_t (1 - abar_{t-1}) / (1 - abar_t).
btilde_0 = 0, so its log is clipped by using btilde_1 at index 0 (as DDPM's code does). Ancestral sampling
starts at x_{S-1} ~ N(0, I), puts the x0 predicted from v into the posterior mean, and adds
sqrt(btilde_t) z for every t > 0 (none at t = 0, where the mean is x0 itself since c1_0 = 1, c2_0 = 0).

DDIM (Song et al. 2021). On a descending subsequence tau_1 > ... > tau_K (ending at 0), with a = abar_{tau_i},
a' = abar_{tau_{i+1}} and x0_hat, eps_hat from the prediction at tau_i:
    sigma = eta * sqrt((1 - a') / (1 - a)) * sqrt(1 - a / a'),
    x_{tau_{i+1}} = sqrt(a') x0_hat + sqrt(1 - a' - sigma^2) eps_hat + sigma z.
eta = 0 is deterministic; eta = 1 matches DDPM's posterior variance. The last step returns x0_hat.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from graphtune.errors import ConfigError

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""model_fn(x_t, t) -> v prediction, shape of x_t; the caller closes over the conditioning."""

__all__ = [
    "ModelFn",
    "Schedule",
    "cosine_schedule",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_sample",
    "diffusion_loss",
    "eps_from_v",
    "linear_schedule",
    "loss_weight",
    "make_ema",
    "make_schedule",
    "q_sample",
    "snr",
    "v_target",
    "x0_from_v",
]


@dataclass(frozen=True)
class Schedule:
    """Every per-step quantity of a noise schedule, float64, shape (S,), indexed by 0-based t."""

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    @property
    def steps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> Schedule:
        """Derive every quantity from betas (any float tensor of shape (S,), values in (0, 1))."""
        betas = betas.detach().to(device="cpu", dtype=torch.float64).clone()
        if betas.dim() != 1 or betas.numel() == 0 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("Schedule.from_betas: betas must be a non-empty 1-D tensor with values in (0, 1)")
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        one_minus_abar = 1.0 - abar
        post_var = betas * (1.0 - abar_prev) / one_minus_abar
        # btilde_0 = 0 has no log; DDPM borrows btilde_1. With one step there is no btilde_1 and the log is never
        # used (no noise at t = 0), so beta_0, the other DDPM variance choice, keeps it finite.
        first = post_var[1:2] if betas.shape[0] > 1 else betas[:1]
        post_log_var = torch.log(torch.cat([first, post_var[1:]]))
        return cls(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            sqrt_alphas_cumprod=torch.sqrt(abar),
            sqrt_one_minus_alphas_cumprod=torch.sqrt(one_minus_abar),
            posterior_variance=post_var,
            posterior_log_variance_clipped=post_log_var,
            posterior_mean_coef1=betas * torch.sqrt(abar_prev) / one_minus_abar,
            posterior_mean_coef2=(1.0 - abar_prev) * torch.sqrt(alphas) / one_minus_abar,
        )


def _is_real(value: object) -> bool:
    """A plain real number (Python or numpy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_steps(steps: object, option: str = "gpd.diffusion_steps") -> int:
    try:
        n = operator.index(steps)  # ints and numpy ints; not floats, and bool is refused below
    except TypeError:
        raise ConfigError(f"{option} must be a whole number >= 1, got {steps!r}") from None
    if isinstance(steps, bool) or n < 1:
        raise ConfigError(f"{option} must be a whole number >= 1, got {steps!r}")
    return n


def linear_schedule(steps: int = 500, beta_start: float = 1e-5, beta_end: float = 0.02) -> Schedule:
    """Betas evenly spaced from beta_start to beta_end inclusive (GPD's defaults: 500 steps, 1e-5 to 0.02)."""
    n = _check_steps(steps)
    for name, value in (("gpd.beta_start", beta_start), ("gpd.beta_end", beta_end)):
        if not (_is_real(value) and 0.0 < value < 1.0):  # `not` form also refuses NaN
            raise ConfigError(f"{name} must be a number in (0, 1), got {value!r}")
    if beta_start > beta_end:
        raise ConfigError(f"gpd.beta_start ({beta_start}) must not exceed gpd.beta_end ({beta_end})")
    return Schedule.from_betas(torch.linspace(float(beta_start), float(beta_end), n, dtype=torch.float64))


def cosine_schedule(steps: int = 500, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """Nichol & Dhariwal's cosine schedule: abar follows cos^2 from 1 towards 0, betas clipped at max_beta."""
    n = _check_steps(steps)
    if not (_is_real(s) and 0.0 <= s < math.inf):
        raise ConfigError(f"cosine schedule offset s must be a finite number >= 0, got {s!r}")
    if not (_is_real(max_beta) and 0.0 < max_beta < 1.0):
        raise ConfigError(f"cosine schedule max_beta must be a number in (0, 1), got {max_beta!r}")
    u = torch.arange(n + 1, dtype=torch.float64) / n
    f = torch.cos((u + s) / (1.0 + s) * (math.pi / 2)) ** 2
    # The ratio of consecutive f, not f itself, so the clip on the last steps (f -> 0) keeps abar_t > 0.
    betas = torch.clamp(1.0 - f[1:] / f[:-1], max=max_beta)
    return Schedule.from_betas(betas)


def make_schedule(kind: str, steps: int = 500, beta_start: float = 1e-5, beta_end: float = 0.02) -> Schedule:
    """The schedule named by option `gpd.schedule`: "linear" (uses the betas) or "cosine" (ignores them)."""
    if kind == "linear":
        return linear_schedule(steps, beta_start, beta_end)
    if kind == "cosine":
        return cosine_schedule(steps)
    raise ConfigError(f"gpd.schedule must be 'linear' or 'cosine', got {kind!r}")


def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] in like's dtype and device, shaped (B, 1, ..., 1) to broadcast against like (B, ...)."""
    # Cast the S values on the CPU, then move them and index there: no float64 on devices that lack it, and no
    # device-to-host copy of t (which would stall the GPU every training step). index_select, not values[t]:
    # advanced indexing with a constant t (every sampler step) made a CPU DDPM run about 10x slower.
    picked = values.to(dtype=like.dtype).to(device=like.device).index_select(0, t.to(like.device))
    return picked.reshape(picked.shape + (1,) * (like.dim() - 1))


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, per row of x0 (B, ...) with t (B,)."""
    return _at(schedule.sqrt_alphas_cumprod, t, x0) * x0 + _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def v_target(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0."""
    return _at(schedule.sqrt_alphas_cumprod, t, x0) * noise - _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0


def x0_from_v(schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
    return _at(schedule.sqrt_alphas_cumprod, t, x_t) * x_t - _at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * v


def eps_from_v(schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v."""
    return _at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t + _at(schedule.sqrt_alphas_cumprod, t, x_t) * v


def snr(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio abar_t / (1 - abar_t), float64, on t's device."""
    abar = schedule.alphas_cumprod.to(t.device).index_select(0, t)
    return abar / (1.0 - abar)


def loss_weight(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """GPD's v-loss weight snr / (snr + 1), float64 on t's device; algebraically abar_t."""
    ratio = snr(schedule, t)
    return ratio / (ratio + 1.0)


def _randn(
    shape: Sequence[int],
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    # Draw on the generator's own device (a CPU generator cannot fill a CUDA tensor), then move: a seed then
    # gives the same numbers whichever device the sampler runs on.
    where = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=where, dtype=dtype).to(device)


def diffusion_loss(
    model_fn: ModelFn,
    schedule: Schedule,
    x0: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """mean_b w_{t_b} * mean_p (model_fn(x_t, t) - v)^2 for a batch x0 (B, P); t and noise drawn unless given."""
    batch = x0.shape[0]
    if t is None:
        where = generator.device if generator is not None else x0.device
        t = torch.randint(0, schedule.steps, (batch,), generator=generator, device=where).to(x0.device)
    elif tuple(t.shape) != (batch,):
        raise ValueError(f"diffusion_loss: t must have shape ({batch},), got {tuple(t.shape)}")
    if noise is None:
        noise = _randn(x0.shape, generator, x0.device, x0.dtype)
    elif noise.shape != x0.shape:
        raise ValueError(f"diffusion_loss: noise must have x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
    x_t = q_sample(schedule, x0, t, noise)
    target = v_target(schedule, x0, t, noise)
    pred = model_fn(x_t, t)
    if pred.shape != target.shape:  # a broadcastable shape would silently average the wrong differences
        raise ValueError(f"diffusion_loss: model_fn returned shape {tuple(pred.shape)}, expected {tuple(x0.shape)}")
    per_sample = (pred - target).pow(2).reshape(batch, -1).mean(dim=1)
    # The weight of every step, then gathered on t's device: no copy of t back to the host.
    weight = _at(loss_weight(schedule, torch.arange(schedule.steps)), t, per_sample)
    return (weight * per_sample).mean()


def _check_clip(clip_x0: float | None) -> None:
    if clip_x0 is not None and not clip_x0 > 0:
        raise ValueError(f"clip_x0 must be positive or None, got {clip_x0!r}")


def _predict_x0(
    model_fn: ModelFn, schedule: Schedule, x: torch.Tensor, t: torch.Tensor, clip_x0: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, v_hat) at x_t = x; x0_hat clamped to [-clip_x0, clip_x0] when asked."""
    v = model_fn(x, t)
    x0 = x0_from_v(schedule, x, t, v)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
    return x0, v


@torch.no_grad()
def ddpm_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    shape: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    clip_x0: float | None = None,
) -> torch.Tensor:
    """Ancestral sampling through all S steps from x_{S-1} ~ N(0, I); returns float32 samples of `shape`."""
    _check_clip(clip_x0)
    x = _randn(shape, generator, device)
    batch = x.shape[0]
    for step in range(schedule.steps - 1, -1, -1):
        t = torch.full((batch,), step, dtype=torch.long, device=x.device)
        x0, _ = _predict_x0(model_fn, schedule, x, t, clip_x0)
        mean = float(schedule.posterior_mean_coef1[step]) * x0 + float(schedule.posterior_mean_coef2[step]) * x
        if step > 0:
            std = math.exp(0.5 * float(schedule.posterior_log_variance_clipped[step]))
            x = mean + std * _randn(x.shape, generator, x.device, x.dtype)
        else:
            x = mean
    return x


def ddim_timesteps(schedule: Schedule, steps: int) -> torch.Tensor:
    """`steps` distinct timesteps, evenly spaced from S-1 down to 0 (just S-1 when steps = 1), descending."""
    n = _check_steps(steps, "gpd.ddim_steps")
    if n > schedule.steps:
        raise ConfigError(f"gpd.ddim_steps must be at most gpd.diffusion_steps ({schedule.steps}), got {n}")
    grid = torch.linspace(schedule.steps - 1, 0, n, dtype=torch.float64).round().long()
    # Spacing (S-1)/(n-1) >= 1 keeps rounded values distinct; unique() is a guard, flip restores descending order.
    return torch.unique(grid).flip(0)


@torch.no_grad()
def ddim_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    shape: Sequence[int],
    *,
    steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    clip_x0: float | None = None,
) -> torch.Tensor:
    """DDIM sampling on `steps` evenly spaced timesteps; eta = 0 is deterministic given x_{S-1}."""
    taus = ddim_timesteps(schedule, steps)
    if not (_is_real(eta) and 0.0 <= eta < math.inf):
        raise ConfigError(f"gpd.ddim_eta must be a finite number >= 0, got {eta!r}")
    _check_clip(clip_x0)
    x = _randn(shape, generator, device)
    batch = x.shape[0]
    abar = schedule.alphas_cumprod
    for i, step in enumerate(taus.tolist()):
        t = torch.full((batch,), step, dtype=torch.long, device=x.device)
        x0, v = _predict_x0(model_fn, schedule, x, t, clip_x0)
        if i == len(taus) - 1:
            return x0
        if clip_x0 is None:
            eps = eps_from_v(schedule, x, t, v)  # exact, and stable even where 1 - abar_t is tiny
        else:
            # Clipping moved x0, so take the eps consistent with it and x_t (as improved-diffusion does).
            eps = (x - _at(schedule.sqrt_alphas_cumprod, t, x) * x0) / _at(schedule.sqrt_one_minus_alphas_cumprod, t, x)
        a, a_prev = float(abar[step]), float(abar[taus[i + 1]])
        sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a)) * math.sqrt(1.0 - a / a_prev)
        # For eta <= 1 this is >= 0; the clamp only matters for eta > 1, where the noise takes all the variance.
        direction = math.sqrt(max(1.0 - a_prev - sigma**2, 0.0))
        x = math.sqrt(a_prev) * x0 + direction * eps
        if sigma > 0:
            x = x + sigma * _randn(x.shape, generator, x.device, x.dtype)
    return x  # unreachable: the loop returns at its last timestep


def make_ema(model: nn.Module, decay: float = 0.995) -> AveragedModel:
    """An exponential moving average of `model`'s parameters and float buffers (use_buffers=True).

    Call `ema.update_parameters(model)` after each optimizer step: the first call copies the weights, every
    later one sets w_ema <- decay * w_ema + (1 - decay) * w. `ema.module` is the averaged model (sample and save
    with it). Non-float buffers (e.g. BatchNorm's step counter) are averaged then truncated by torch; GPD's
    denoisers have none.
    """
    if not (_is_real(decay) and 0.0 <= decay <= 1.0):
        raise ConfigError(f"gpd.ema_decay must be a number in [0, 1], got {decay!r}")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
