"""Samplers against a case with a known answer: Gaussian data, whose exact denoiser is closed-form.

For data ``N(mu, sd^2 I)`` diffused to ``x = a x0 + s eps`` the posterior mean is
``E[x0 | x] = mu + a sd^2 / (a^2 sd^2 + s^2) (x - a mu)`` (``GaussianMixture.posterior_mean`` with one
component), so a correct sampler driven by it must return samples with mean ``mu`` and std ``sd`` up
to Monte Carlo and discretization error.
"""

import pytest
import torch

from lightning_reg.data.mixtures import GaussianMixture
from lightning_reg.diffusion import Denoiser, EDMSchedule, FlowSchedule, Prediction, VPSchedule, get_sampler
from lightning_reg.errors import ConfigError
from lightning_reg.guidance import GuidedDenoiser, make_guidance
from lightning_reg.models.mlp import ToyMLP

pytestmark = pytest.mark.usefixtures("one_thread")

MU, SD = torch.tensor([0.7, -0.4], dtype=torch.float64), 0.3
GAUSSIAN = GaussianMixture(MU[None], [SD])


def exact_denoiser(schedule):
    """``D(x, t) = E[x0 | x_t = x]`` for the Gaussian data, read through ``schedule.alpha_sigma(t)``."""
    def denoise(x, t):
        a, s = schedule.alpha_sigma(t)
        return GAUSSIAN.posterior_mean(x, a, s)
    return denoise


def test_exact_denoiser_is_the_gaussian_posterior_mean():
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    a, s = 0.6, 0.8
    want = MU + a * SD ** 2 / (a ** 2 * SD ** 2 + s ** 2) * (x - a * MU)
    torch.testing.assert_close(GAUSSIAN.posterior_mean(x, torch.tensor(a), torch.tensor(s)), want)


# Tolerances. Monte Carlo: with n = 20,000 the sample mean has standard error SD/sqrt(n) = 0.0021 and
# the sample std a relative standard error 1/sqrt(2n) = 0.005; we allow 5 standard errors. On top of
# that each sampler has a deterministic discretization error (computed exactly from the sampler's
# affine map in `test_deterministic_samplers_converge_at_their_order`): first-order DDIM (250 steps)
# and Euler (100 steps) and second-order Heun (32 steps) shrink the std by at most 2%; DDPM's
# ancestral step uses the posterior variance of x_{t-1} given x0 and ignores Var[x0 | x_t], which
# under-disperses by ~4.6% at 250 of 1000 steps. The prior x_T ~ N(0, prior_std^2) ignores mu, which
# moves the mean by at most 0.003 (EDM: mu * SD / sigma_max).
CASES = [  # sampler, schedule, steps, allowed relative std bias
    ("ddpm", VPSchedule(num_timesteps=1000), 250, 0.05),
    ("ddim", VPSchedule(num_timesteps=1000), 250, 0.02),
    ("edm_heun", EDMSchedule(), 32, 0.02),
    ("flow_euler", FlowSchedule(), 100, 0.02),
]


@pytest.mark.parametrize("name, schedule, steps, std_bias", CASES, ids=[c[0] for c in CASES])
def test_sampler_reproduces_gaussian_data(name, schedule, steps, std_bias):
    n = 20_000
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    samples = get_sampler(name)(exact_denoiser(schedule), noise, schedule, steps,
                                noise_sampler=lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype))
    assert samples.shape == (n, 2) and samples.dtype == torch.float64
    mean_tol = 5 * SD / n ** 0.5 + 0.003
    std_tol = 5 / (2 * n) ** 0.5 + std_bias
    assert (samples.mean(0) - MU).abs().max() < mean_tol, samples.mean(0)
    assert (samples.std(0) / SD - 1).abs().max() < std_tol, samples.std(0)


@pytest.mark.parametrize("name, schedule, order", [
    ("ddim", VPSchedule(num_timesteps=1000), 1),
    ("edm_heun", EDMSchedule(), 2),
    ("flow_euler", FlowSchedule(), 1),
])
def test_deterministic_samplers_converge_at_their_order(name, schedule, order):
    """On Gaussian data a deterministic sampler is an affine map ``x_T -> m + g x_T``; its output std is
    ``g * prior_std``, and its error must fall by ~2^order when the steps double."""
    sampler, denoise = get_sampler(name), exact_denoiser(schedule)

    def std_error(steps):
        out = sampler(denoise, torch.stack([torch.zeros(2), torch.ones(2)]).double(), schedule, steps)
        return float((out[1] - out[0])[0]) / SD - 1

    coarse, fine = std_error(32), std_error(64)
    assert abs(fine) < 0.07
    assert 0.8 * 2 ** order < coarse / fine < 1.2 * 2 ** order, (coarse, fine)


def test_sampler_names_and_schedules_are_checked():
    with pytest.raises(ConfigError, match=r"unknown sampler 'euler'; choose one of \['ddim', 'ddpm', 'edm_heun'"):
        get_sampler("euler")
    noise, vp = torch.zeros(4, 2), VPSchedule()
    with pytest.raises(ConfigError, match=r"'edm_heun' needs the 'edm' schedule"):
        get_sampler("edm_heun")(exact_denoiser(vp), noise, vp, 4)
    with pytest.raises(ConfigError, match=r"'flow_euler' needs the 'flow' schedule"):
        get_sampler("flow_euler")(exact_denoiser(vp), noise, vp, 4)
    with pytest.raises(ConfigError, match=r"eta must lie in \[0, 1\], got 1.5"):
        get_sampler("ddim", eta=1.5)(exact_denoiser(vp), noise, vp, 4)
    with pytest.raises(ConfigError, match=r"steps must be a positive integer, got 0"):
        get_sampler("ddim")(exact_denoiser(vp), noise, vp, 0)


def test_non_finite_sample_names_the_step():
    with pytest.raises(FloatingPointError, match=r"non-finite values after sampling step 0"):
        get_sampler("ddim")(lambda x, t: torch.full_like(x, float("nan")), torch.zeros(3, 2), VPSchedule(), 5)


def test_label_ids_outside_the_model_are_refused():
    model = Denoiser(ToyMLP(num_classes=3), VPSchedule(), Prediction("eps"))
    model.conditioning.check(torch.tensor([0, 2]))
    model.conditioning.check(torch.tensor([3]), allow_null=True)  # the null label, allowed in training
    with pytest.raises(ConfigError, match=r"label ids must lie in \[0, 2\] .*num_classes=3.*max 3"):
        model.conditioning.check(torch.tensor([0, 3]))
    with pytest.raises(ConfigError, match=r"label ids must lie in \[0, 2\].*min -1"):
        model.conditioning.check(torch.tensor([-1, 1]))
    with pytest.raises(ConfigError, match=r"label ids must lie in \[0, 2\] .*num_classes=3"):
        GuidedDenoiser(model, make_guidance("cfg", scale=1.0), torch.tensor([1, 5]))
