"""GPD diffusion: schedules against closed forms, the v-parametrisation, the loss, DDPM/DDIM samplers, EMA.

Reference values are computed here in numpy float64 from the papers' formulas, not from `Schedule`'s fields, so
a wrong field or a wrong sign in the module shows up as a mismatch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from graphtune.errors import ConfigError, GraphTuneError
from graphtune.generative.diffusion import (
    Schedule,
    cosine_schedule,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    diffusion_loss,
    eps_from_v,
    linear_schedule,
    loss_weight,
    make_ema,
    make_schedule,
    q_sample,
    snr,
    v_target,
    x0_from_v,
)

S = 500
BETAS = np.linspace(1e-5, 0.02, S)  # GPD's linear schedule, built independently of the module
ABAR = np.cumprod(1.0 - BETAS)
ABAR_PREV = np.concatenate([[1.0], ABAR[:-1]])


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy().astype(np.float64)


def _abar_at(t: torch.Tensor, like: torch.Tensor, abar: np.ndarray = ABAR) -> torch.Tensor:
    """The test's own abar[t], float64, shaped (B, 1) against a (B, P) tensor."""
    return torch.from_numpy(abar).index_select(0, t.cpu()).reshape(-1, *([1] * (like.dim() - 1)))


# ---------------------------------------------------------------------------------------------- schedules


def test_linear_schedule_matches_closed_forms():
    sch = linear_schedule()
    assert sch.steps == S and sch.betas.shape == (S,)
    for name in Schedule.__dataclass_fields__:
        field = getattr(sch, name)
        assert field.dtype == torch.float64 and field.shape == (S,), name
    assert sch.betas[0].item() == 1e-5 and sch.betas[-1].item() == 0.02  # GPD's endpoints, exactly
    np.testing.assert_allclose(_np(sch.betas), BETAS, rtol=1e-12)
    np.testing.assert_allclose(_np(sch.alphas), 1.0 - BETAS, rtol=1e-12)
    np.testing.assert_allclose(_np(sch.alphas_cumprod), ABAR, rtol=1e-10)
    assert sch.alphas_cumprod_prev[0].item() == 1.0
    np.testing.assert_allclose(_np(sch.alphas_cumprod_prev), ABAR_PREV, rtol=1e-10)
    np.testing.assert_allclose(_np(sch.sqrt_alphas_cumprod), np.sqrt(ABAR), rtol=1e-10)
    np.testing.assert_allclose(_np(sch.sqrt_one_minus_alphas_cumprod), np.sqrt(1.0 - ABAR), rtol=1e-8)
    assert sch.posterior_variance[0].item() == 0.0  # abar_{-1} = 1: nothing left to sample at t = 0
    for t in (1, 2, 137, 250, 499):
        by_hand = BETAS[t] * (1.0 - ABAR[t - 1]) / (1.0 - ABAR[t])
        assert sch.posterior_variance[t].item() == pytest.approx(by_hand, rel=1e-8)
        assert sch.posterior_log_variance_clipped[t].item() == pytest.approx(math.log(by_hand), rel=1e-8)
    # index 0 borrows btilde_1 (DDPM's clipping)
    assert sch.posterior_log_variance_clipped[0].item() == pytest.approx(
        math.log(BETAS[1] * (1.0 - ABAR[0]) / (1.0 - ABAR[1])), rel=1e-8
    )


def test_posterior_is_the_gaussian_conditional_of_the_forward_process():
    """q(x_{t-1} | x_t, x0) from conditioning the joint Gaussian, against coef1 x0 + coef2 x_t and btilde_t.

    x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1}) e1 and x_t = sqrt(a_t) x_{t-1} + sqrt(b_t) e2, so given
    x0: Cov(x_{t-1}, x_t) = sqrt(a_t) (1 - abar_{t-1}), Var(x_t) = 1 - abar_t, and the conditional mean and
    variance follow from the usual Gaussian formulas.
    """
    sch = linear_schedule()
    x0, xt = 0.7, -1.3
    for t in (1, 5, 250, 499):
        a_t, ap = 1.0 - BETAS[t], ABAR[t - 1]
        cov, var_t = math.sqrt(a_t) * (1.0 - ap), 1.0 - ABAR[t]
        mean = math.sqrt(ap) * x0 + cov / var_t * (xt - math.sqrt(ABAR[t]) * x0)
        var = (1.0 - ap) - cov**2 / var_t
        # DDPM's (7), written out by hand
        ddpm_mean = math.sqrt(ap) * BETAS[t] / (1 - ABAR[t]) * x0 + math.sqrt(a_t) * (1 - ap) / (1 - ABAR[t]) * xt
        got = sch.posterior_mean_coef1[t].item() * x0 + sch.posterior_mean_coef2[t].item() * xt
        assert got == pytest.approx(mean, rel=1e-9, abs=1e-12)
        assert got == pytest.approx(ddpm_mean, rel=1e-9, abs=1e-12)
        assert sch.posterior_variance[t].item() == pytest.approx(var, rel=1e-6)
    # t = 0: the posterior mean is x0 itself
    assert sch.posterior_mean_coef1[0].item() == pytest.approx(1.0, rel=1e-9)
    assert sch.posterior_mean_coef2[0].item() == 0.0


def test_cosine_schedule_follows_cos_squared_and_clips():
    steps, s = 200, 0.008
    sch = cosine_schedule(steps)
    f = np.cos((np.arange(steps + 1) / steps + s) / (1 + s) * np.pi / 2) ** 2
    abar = _np(sch.alphas_cumprod)
    assert np.all(np.diff(abar) < 0) and abar[0] < 1.0 and abar[-1] > 0.0
    assert np.all(_np(sch.betas) > 0) and np.all(_np(sch.betas) <= 0.999)
    assert sch.betas[-1].item() == 0.999  # f(S) ~ 0, so the last beta is the clipped one
    # before any clip, abar_t = f(t + 1) / f(0)
    np.testing.assert_allclose(abar[:150], f[1:151] / f[0], rtol=1e-9)
    np.testing.assert_allclose(_np(sch.alphas_cumprod), np.cumprod(1.0 - _np(sch.betas)), rtol=1e-12)
    assert cosine_schedule(steps, max_beta=0.5).betas.max().item() == 0.5


def test_make_schedule_dispatches_and_single_step_is_usable():
    assert torch.equal(make_schedule("linear", 100, 1e-4, 0.01).betas, linear_schedule(100, 1e-4, 0.01).betas)
    assert torch.equal(make_schedule("cosine", 100).betas, cosine_schedule(100).betas)
    one = linear_schedule(1, 1e-3, 1e-3)
    assert one.steps == 1 and torch.isfinite(one.posterior_log_variance_clipped).all()


@pytest.mark.parametrize(
    ("call", "option"),
    [
        (lambda: make_schedule("sigmoid", 10), "gpd.schedule"),
        (lambda: linear_schedule(0), "gpd.diffusion_steps"),
        (lambda: linear_schedule(2.5), "gpd.diffusion_steps"),
        (lambda: cosine_schedule(-3), "gpd.diffusion_steps"),
        (lambda: linear_schedule(10, 0.0, 0.02), "gpd.beta_start"),
        (lambda: linear_schedule(10, float("nan"), 0.02), "gpd.beta_start"),
        (lambda: linear_schedule(10, 1e-4, 1.0), "gpd.beta_end"),
        (lambda: linear_schedule(10, 0.03, 0.02), "gpd.beta_end"),
        (lambda: ddim_sample(lambda x, t: x, linear_schedule(10), (1, 2), steps=0), "gpd.ddim_steps"),
        (lambda: ddim_sample(lambda x, t: x, linear_schedule(10), (1, 2), steps=11), "gpd.ddim_steps"),
        (lambda: ddim_sample(lambda x, t: x, linear_schedule(10), (1, 2), steps=5, eta=-0.5), "gpd.ddim_eta"),
        (lambda: make_ema(nn.Linear(2, 2), decay=1.5), "gpd.ema_decay"),
    ],
)
def test_bad_options_raise_config_error_naming_the_option(call, option):
    with pytest.raises(ConfigError) as err:
        call()
    assert isinstance(err.value, GraphTuneError)
    assert option in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------- forward process and v


def test_q_sample_moments_over_many_noise_draws():
    sch = linear_schedule()
    gen = torch.Generator().manual_seed(1)
    n = 20_000
    x0 = torch.tensor([1.5, -0.5, 0.0, 3.0])
    for step in (0, 100, 499):
        t = torch.full((n,), step, dtype=torch.long)
        noise = torch.randn((n, 4), generator=gen)
        xt = q_sample(sch, x0.expand(n, 4), t, noise)
        assert xt.dtype == torch.float32
        xt64 = _np(xt)
        sd = math.sqrt(1.0 - ABAR[step])
        # 5 standard errors: the mean's is sd / sqrt(n), the variance's sd^2 sqrt(2 / (n - 1))
        np.testing.assert_allclose(xt64.mean(0), math.sqrt(ABAR[step]) * _np(x0), atol=5 * sd / math.sqrt(n))
        np.testing.assert_allclose(xt64.var(0, ddof=1), sd**2, atol=5 * sd**2 * math.sqrt(2 / (n - 1)))


def test_v_parametrisation_matches_formulas_and_round_trips():
    sch = linear_schedule()
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn((3, 16), generator=gen)
    eps = torch.randn((3, 16), generator=gen)
    t = torch.tensor([0, 250, 499])
    a = _abar_at(t, x0).numpy()
    xt = q_sample(sch, x0, t, eps)
    v = v_target(sch, x0, t, eps)
    np.testing.assert_allclose(_np(xt), np.sqrt(a) * _np(x0) + np.sqrt(1 - a) * _np(eps), atol=1e-6)
    np.testing.assert_allclose(_np(v), np.sqrt(a) * _np(eps) - np.sqrt(1 - a) * _np(x0), atol=1e-6)
    torch.testing.assert_close(x0_from_v(sch, xt, t, v), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(eps_from_v(sch, xt, t, v), eps, atol=1e-5, rtol=0)


def test_loss_weight_is_snr_over_snr_plus_one_which_is_abar():
    sch = linear_schedule()
    t = torch.tensor([0, 1, 77, 250, 498, 499])
    ratio = ABAR[t.numpy()] / (1.0 - ABAR[t.numpy()])
    np.testing.assert_allclose(_np(snr(sch, t)), ratio, rtol=1e-8)
    np.testing.assert_allclose(_np(loss_weight(sch, t)), ratio / (ratio + 1.0), rtol=1e-10)
    np.testing.assert_allclose(_np(loss_weight(sch, t)), ABAR[t.numpy()], rtol=1e-10)


def test_diffusion_loss_is_zero_for_the_oracle_and_the_weighted_mse_for_a_zero_model():
    sch = linear_schedule()
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn((8, 32), generator=gen)
    noise = torch.randn((8, 32), generator=gen)
    t = torch.tensor([0, 3, 50, 120, 250, 333, 480, 499])
    true_v = v_target(sch, x0, t, noise)
    seen = {}

    def oracle(x_t, t_in):
        seen["x_t"], seen["t"] = x_t, t_in
        return true_v

    assert diffusion_loss(oracle, sch, x0, t=t, noise=noise).item() == 0.0
    torch.testing.assert_close(seen["x_t"], q_sample(sch, x0, t, noise))  # the model saw x_t, not x0
    assert torch.equal(seen["t"], t)

    zero = diffusion_loss(lambda x_t, t_in: torch.zeros_like(x_t), sch, x0, t=t, noise=noise)
    a = _abar_at(t, x0).numpy()
    v = np.sqrt(a) * _np(noise) - np.sqrt(1 - a) * _np(x0)
    expected = np.mean(a[:, 0] * np.mean(v**2, axis=1))
    assert zero.item() > 0 and zero.item() == pytest.approx(expected, rel=1e-5)

    with pytest.raises(ValueError, match="shape"):
        diffusion_loss(lambda x_t, t_in: x_t[:, :1], sch, x0, t=t, noise=noise)


def test_diffusion_loss_draws_reproducibly_and_trains_a_model():
    sch = linear_schedule()
    x0 = torch.randn((16, 8), generator=torch.Generator().manual_seed(4))
    net = nn.Linear(8, 8)

    def loss(seed: int) -> torch.Tensor:
        return diffusion_loss(lambda x_t, t: net(x_t), sch, x0, generator=torch.Generator().manual_seed(seed))

    assert loss(5).item() == loss(5).item() and loss(5).item() != loss(6).item()
    loss(5).backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- sampling


def _point_oracle(x_star: torch.Tensor, abar: np.ndarray = ABAR):
    """The exact v when the data are the single point x*: v = (sqrt(abar) x_t - x*) / sqrt(1 - abar).

    (eps = (x_t - sqrt(abar) x*) / sqrt(1 - abar) in v = sqrt(abar) eps - sqrt(1 - abar) x*.)
    """

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = _abar_at(t, x_t, abar)
        return ((a.sqrt() * x_t.double() - x_star.double()) / (1 - a).sqrt()).to(x_t.dtype)

    return model_fn


def test_ddim_timesteps_are_evenly_spaced_descending_and_end_at_zero():
    sch = linear_schedule()
    for k in (2, 7, 50, 500):
        taus = ddim_timesteps(sch, k).tolist()
        assert len(taus) == k and taus[0] == S - 1 and taus[-1] == 0
        assert all(a > b for a, b in zip(taus, taus[1:]))
        assert max(np.diff(taus)) - min(np.diff(taus)) <= 1  # even spacing up to rounding
    assert ddim_timesteps(sch, 1).tolist() == [S - 1]


@pytest.mark.parametrize(
    "sample",
    [
        lambda fn, sch, g: ddim_sample(fn, sch, (3, 16), steps=50, eta=0.0, generator=g),
        lambda fn, sch, g: ddim_sample(fn, sch, (3, 16), steps=1, generator=g),
        lambda fn, sch, g: ddim_sample(fn, sch, (3, 16), steps=20, eta=1.0, generator=g),
        lambda fn, sch, g: ddpm_sample(fn, sch, (3, 16), generator=g),
    ],
    ids=["ddim-eta0", "ddim-1step", "ddim-eta1", "ddpm"],
)
def test_samplers_return_the_point_under_its_oracle(sample):
    sch = linear_schedule()
    x_star = torch.randn((1, 16), generator=torch.Generator().manual_seed(7))
    out = sample(_point_oracle(x_star), sch, torch.Generator().manual_seed(8))
    assert out.shape == (3, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out, x_star.expand(3, 16), atol=1e-5, rtol=0)


def test_clip_x0_bounds_the_samples():
    sch = linear_schedule(50)
    abar = np.cumprod(1.0 - np.linspace(1e-5, 0.02, 50))
    oracle = _point_oracle(torch.full((1, 4), 3.0), abar)
    assert ddim_sample(oracle, sch, (2, 4), steps=10, clip_x0=1.0).abs().max().item() <= 1.0
    assert ddpm_sample(oracle, sch, (2, 4), clip_x0=1.0).abs().max().item() <= 1.0 + 1e-6


def _gaussian_oracle(mu: float, s: float, abar: np.ndarray):
    """The exact v when the data are N(mu, s^2 I): E[x0 | x_t] = mu + sqrt(abar) s^2 / V (x_t - sqrt(abar) mu)
    with V = abar s^2 + 1 - abar, and v = (sqrt(abar) x_t - E[x0 | x_t]) / sqrt(1 - abar)."""

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, x = _abar_at(t, x_t, abar), x_t.double()
        x0 = mu + a.sqrt() * s**2 / (a * s**2 + 1 - a) * (x - a.sqrt() * mu)
        return ((a.sqrt() * x - x0) / (1 - a).sqrt()).to(x_t.dtype)

    return model_fn


def _x0_hat(x: float, a: float, mu: float, s: float) -> float:
    return mu + math.sqrt(a) * s**2 / (a * s**2 + 1 - a) * (x - math.sqrt(a) * mu)


def _expected_moments(step_fn, taus, mu: float, s: float) -> tuple[float, float]:
    """Mean and sd of the sampler's output when x_start ~ N(0, 1) and each step is x -> A x + B + sd z.

    Every step is affine in x under the Gaussian oracle, so A and B come from evaluating it at x = 0 and 1;
    step_fn(None, i, t) gives the step's noise sd.
    """
    m, var = 0.0, 1.0
    for i, t in enumerate(taus):
        f0, f1, noise_sd = step_fn(0.0, i, t), step_fn(1.0, i, t), step_fn(None, i, t)
        m, var = (f1 - f0) * m + f0, (f1 - f0) ** 2 * var + noise_sd**2
    return m, math.sqrt(var)


def _ddpm_step(betas: np.ndarray, mu: float, s: float):
    """One DDPM step (Ho et al. eq. 6-7) under the Gaussian oracle: posterior mean, sd sqrt(btilde_t)."""
    abar = np.cumprod(1.0 - betas)
    ap = np.concatenate([[1.0], abar[:-1]])

    def step(x, i, t):
        if x is None:
            return 0.0 if t == 0 else math.sqrt(betas[t] * (1 - ap[t]) / (1 - abar[t]))
        c1 = betas[t] * math.sqrt(ap[t]) / (1 - abar[t])
        c2 = (1 - ap[t]) * math.sqrt(1 - betas[t]) / (1 - abar[t])
        return c1 * _x0_hat(x, abar[t], mu, s) + c2 * x

    return step


def _ddim_step(betas: np.ndarray, taus: list[int], eta: float, mu: float, s: float):
    """One DDIM step (Song et al. eq. 12) under the Gaussian oracle; the last returns the x0 prediction."""
    abar = np.cumprod(1.0 - betas)

    def step(x, i, t):
        if i == len(taus) - 1:
            return 0.0 if x is None else _x0_hat(x, abar[t], mu, s)
        a, ap = abar[t], abar[taus[i + 1]]
        sigma = eta * math.sqrt((1 - ap) / (1 - a)) * math.sqrt(1 - a / ap)
        if x is None:
            return sigma
        x0 = _x0_hat(x, a, mu, s)
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        return math.sqrt(ap) * x0 + math.sqrt(1 - ap - sigma**2) * eps

    return step


def _cosine_betas(steps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    f = np.cos((np.arange(steps + 1) / steps + s) / (1 + s) * np.pi / 2) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


@pytest.mark.parametrize(
    ("sch", "betas", "ddim_steps"),
    [
        (linear_schedule(), BETAS, 50),  # GPD's: abar_T = 0.0066, a prior mismatch DDIM carries to the end
        (linear_schedule(10, 1e-3, 0.3), np.linspace(1e-3, 0.3, 10), 5),  # few steps: DDPM under-disperses
        (cosine_schedule(20), _cosine_betas(20), 10),
    ],
    ids=["gpd-linear-500", "linear-10", "cosine-20"],
)
def test_samplers_reproduce_the_exact_moments_for_gaussian_data(sch, betas, ddim_steps):
    """With the exact denoiser for N(mu, s^2), DDPM and DDIM are linear-Gaussian maps, so the mean and sd of
    their output are known in closed form, discretisation error included."""
    mu, s, n_rows, p = 0.5, 0.5, 2000, 8
    steps = len(betas)
    oracle = _gaussian_oracle(mu, s, np.cumprod(1.0 - betas))
    taus = [int(v) for v in np.round(np.linspace(steps - 1, 0, ddim_steps))]
    cases = [
        ("ddpm", lambda g: ddpm_sample(oracle, sch, (n_rows, p), generator=g), _ddpm_step(betas, mu, s)),
        (
            "ddim0",
            lambda g: ddim_sample(oracle, sch, (n_rows, p), steps=ddim_steps, generator=g),
            _ddim_step(betas, taus, 0.0, mu, s),
        ),
        (
            "ddim1",
            lambda g: ddim_sample(oracle, sch, (n_rows, p), steps=ddim_steps, eta=1.0, generator=g),
            _ddim_step(betas, taus, 1.0, mu, s),
        ),
    ]
    n = n_rows * p
    for name, run, step_fn in cases:
        m, sd = _expected_moments(step_fn, taus if name != "ddpm" else list(range(steps - 1, -1, -1)), mu, s)
        out = _np(run(torch.Generator().manual_seed(9)))
        # 5 standard errors of the sample mean and of the sample sd (sd / sqrt(2 (n - 1)))
        assert out.mean() == pytest.approx(m, abs=5 * sd / math.sqrt(n)), name
        assert out.std(ddof=1) == pytest.approx(sd, abs=5 * sd / math.sqrt(2 * (n - 1))), name


def test_expected_gaussian_moments_differ_from_the_data_moments():
    """The closed forms above are not just N(mu, s^2) (so that test is not vacuous): GPD's short noise range
    leaves DDIM's mean off, and a 10-step DDPM under-disperses."""
    taus = [int(v) for v in np.round(np.linspace(S - 1, 0, 50))]
    assert _expected_moments(_ddim_step(BETAS, taus, 0.0, 0.5, 0.5), taus, 0.5, 0.5)[0] < 0.49
    ddpm_10 = _expected_moments(_ddpm_step(np.linspace(1e-3, 0.3, 10), 0.5, 0.5), list(range(9, -1, -1)), 0.5, 0.5)
    assert ddpm_10[1] < 0.45


@pytest.mark.parametrize("kind", ["ddpm", "ddim0", "ddim1"])
def test_same_seed_same_samples(kind):
    sch = linear_schedule(100)
    net = nn.Sequential(nn.Linear(6, 6), nn.Tanh())

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        fn = lambda x, t: net(x)  # noqa: E731
        if kind == "ddpm":
            return ddpm_sample(fn, sch, (4, 6), generator=g)
        return ddim_sample(fn, sch, (4, 6), steps=20, eta=0.0 if kind == "ddim0" else 1.0, generator=g)

    first = run(11)
    assert not first.requires_grad  # sampled under no_grad
    assert torch.equal(first, run(11)) and not torch.equal(first, run(12))


# ---------------------------------------------------------------------------------------------------- EMA


class _WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("scale", torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


def test_make_ema_is_the_exponential_average_of_parameters_and_buffers():
    torch.manual_seed(0)
    model = _WithBuffer()
    ema = make_ema(model)  # decay 0.995
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(5, 3)
    names = ["lin.weight", "lin.bias", "scale"]
    expected: dict[str, np.ndarray] = {}
    for step in range(4):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
        model.scale.mul_(1.5)  # a buffer that changes too (use_buffers=True averages it)
        ema.update_parameters(model)
        now = {k: _np(v) for k, v in model.state_dict().items()}
        for k in names:  # first update copies, then w_ema <- 0.995 w_ema + 0.005 w
            expected[k] = now[k] if step == 0 else 0.995 * expected[k] + 0.005 * now[k]
    averaged = ema.module.state_dict()
    for k in names:
        np.testing.assert_allclose(_np(averaged[k]), expected[k], rtol=1e-6, atol=1e-7)
        assert not np.allclose(_np(averaged[k]), _np(model.state_dict()[k]))  # it lags the model
    assert ema.module is not model and int(ema.n_averaged) == 4
