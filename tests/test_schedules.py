"""Schedules, prediction targets and their conversions, and the errors for bad choices."""

import math

import pytest
import torch

from lightning_reg.diffusion import Denoiser, EDMSchedule, FlowSchedule, Prediction, VPSchedule, make_schedule
from lightning_reg.diffusion.predictions import eps_from_x0, v_from_x0_eps, x0_from_eps
from lightning_reg.errors import ConfigError
from lightning_reg.guidance import make_guidance
from lightning_reg.models.mlp import ToyMLP


@pytest.mark.parametrize("betas", ["linear", "cosine"])
@pytest.mark.parametrize("num_timesteps", [1, 2, 7, 1000])
def test_vp_alpha_bar_decreases_and_preserves_variance(betas, num_timesteps):
    schedule = VPSchedule(num_timesteps=num_timesteps, betas=betas)
    t = torch.arange(-1, num_timesteps, dtype=torch.float64)  # -1 is the clean end
    a, s = schedule.alpha_sigma(t)
    abar = a ** 2
    assert abar[0] == 1 and s[0] == 0
    assert (abar[1:] < abar[:-1]).all()  # strictly decreasing: every beta is positive
    assert (abar > 0).all()
    torch.testing.assert_close(a ** 2 + s ** 2, torch.ones_like(a), rtol=0, atol=1e-12)


def test_vp_linear_betas_match_hand_computed_alpha_bar():
    schedule = VPSchedule(num_timesteps=3, betas="linear", beta_start=0.1, beta_end=0.3)
    a, _ = schedule.alpha_sigma(torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(a ** 2, torch.tensor([0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7], dtype=torch.float64))


def test_edm_and_flow_alpha_sigma_as_documented():
    sigma = torch.tensor([0.0, 0.002, 1.0, 80.0], dtype=torch.float64)
    a, s = EDMSchedule().alpha_sigma(sigma)
    assert torch.equal(a, torch.ones_like(sigma)) and torch.equal(s, sigma)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    a, s = FlowSchedule().alpha_sigma(t)
    torch.testing.assert_close(a, 1 - t, rtol=0, atol=0)
    torch.testing.assert_close(s, t, rtol=0, atol=0)


@pytest.mark.parametrize("schedule, first", [
    (VPSchedule(num_timesteps=1000), 999.0),
    (VPSchedule(num_timesteps=50, betas="cosine"), 49.0),
    (EDMSchedule(sigma_min=0.002, sigma_max=80.0), 80.0),
    (FlowSchedule(), 1.0),
])
@pytest.mark.parametrize("steps", [1, 2, 25])
def test_sampling_times_shape_order_and_clean_end(schedule, first, steps):
    times = schedule.sampling_times(steps)
    assert times.shape == (steps + 1,) and times.dtype == torch.float64
    assert (times[1:] < times[:-1]).all()
    assert math.isclose(float(times[0]), first, rel_tol=1e-12)
    _, s_end = schedule.alpha_sigma(times[-1])
    assert float(s_end) == 0.0
    _, s = schedule.alpha_sigma(times[:-1])
    assert (s > 0).all()  # only the last time is clean


def test_edm_sampling_times_are_karras_sigmas():
    """Karras et al. (2022) eq. 5: ``(smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho``, then 0."""
    smin, smax, rho, n = 0.002, 80.0, 7.0, 5
    want = [(smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho for i in range(n)]
    torch.testing.assert_close(EDMSchedule(smin, smax, rho).sampling_times(n),
                               torch.tensor(want + [0.0], dtype=torch.float64))


def dit_space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """DiT/ADM ``space_timesteps(T, [steps])`` for one section (``steps >= 2``), written out independently."""
    stride = (num_timesteps - 1) / (steps - 1)
    return sorted({round(i * stride) for i in range(steps)}, reverse=True)


@pytest.mark.parametrize("num_timesteps, steps", [(1000, 250), (1000, 25), (1000, 20), (1000, 1000), (100, 7)])
def test_vp_respacing_matches_dit(num_timesteps, steps):
    times = VPSchedule(num_timesteps=num_timesteps).sampling_times(steps)
    assert times[0] == num_timesteps - 1 and times[-1] == -1
    assert times[:-1].long().tolist() == dit_space_timesteps(num_timesteps, steps)


def test_vp_more_steps_than_timesteps_is_refused():
    with pytest.raises(ConfigError, match=r"steps=11 exceeds .*num_timesteps=10"):
        VPSchedule(num_timesteps=10).sampling_times(11)


@pytest.mark.parametrize("schedule", [VPSchedule(), EDMSchedule(), FlowSchedule()])
@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "10"])
def test_non_positive_or_non_integer_steps_are_refused(schedule, steps):
    with pytest.raises(ConfigError, match=r"steps must be a positive integer"):
        schedule.sampling_times(steps)


def test_eps_x0_v_round_trips_in_float64():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 64, 3, generator=g, dtype=torch.float64)
    a, _ = VPSchedule().alpha_sigma(torch.randint(0, 1000, (64, 1), generator=g))
    s = (1 - a ** 2).sqrt()
    x = a * x0 + s * eps
    torch.testing.assert_close(x0_from_eps(eps_from_x0(x0, x, a, s), x, a, s), x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(eps_from_x0(x0_from_eps(eps, x, a, s), x, a, s), eps, rtol=0, atol=1e-6)
    v = v_from_x0_eps(x0, eps, a, s)
    torch.testing.assert_close(Prediction("v").to_x0(v, x, a, s), x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(a * v + s * x, eps, rtol=0, atol=1e-6)  # eps = a v + s x when a^2 + s^2 = 1


@pytest.mark.parametrize("schedule", [VPSchedule(), EDMSchedule(), FlowSchedule()], ids=lambda s: s.name)
def test_every_prediction_recovers_x0_from_its_target(schedule):
    """``Prediction(kind).to_x0(target(x0, eps, a, s), a x0 + s eps) == x0`` for each kind the schedule takes."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 256, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(1)
    a, s = schedule.alpha_sigma(schedule.sample_training_times(256).clamp(max=0.999)[:, None])
    assert (s > 0).all()
    x = a * x0 + s * eps
    for kind in schedule.predictions:
        prediction = Prediction(kind, sigma_data=0.5)
        out = prediction.to_x0(prediction.target(x0, eps, a, s), x, a, s)
        torch.testing.assert_close(out, x0, rtol=0, atol=1e-6, msg=f"prediction {kind!r}")


def test_edm_preconditioning_is_karras_table_1():
    """``c_skip = sd^2/(s^2+sd^2)``, ``c_out = s sd/sqrt(s^2+sd^2)``, ``c_in = 1/sqrt(s^2+sd^2)``."""
    prediction, s = Prediction("edm", sigma_data=0.5), torch.tensor(2.0, dtype=torch.float64)
    x, out = torch.tensor([1.0], dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64)
    torch.testing.assert_close(prediction.to_x0(out, x, torch.ones_like(s), s),
                               torch.tensor([0.25 / 4.25 * 1.0 + 1.0 / math.sqrt(4.25) * 3.0], dtype=torch.float64))
    torch.testing.assert_close(prediction.input_scale(torch.ones_like(s), s), 1 / torch.tensor(4.25).sqrt().double())


def test_unknown_schedule_betas_and_prediction_are_refused():
    with pytest.raises(ConfigError, match=r"unknown schedule 'ddpm'.*\['edm', 'flow', 'vp'\]"):
        make_schedule("ddpm")
    with pytest.raises(ConfigError, match=r"unknown betas schedule 'quadratic'.*'linear', 'scaled_linear' or 'cosine'"):
        make_schedule("vp", betas="quadratic")
    with pytest.raises(ConfigError, match=r"unknown prediction 'noise'"):
        Prediction("noise")
    assert isinstance(make_schedule("flow"), FlowSchedule)


@pytest.mark.parametrize("schedule, kind", [(FlowSchedule(), "eps"), (VPSchedule(), "velocity"),
                                            (EDMSchedule(), "v")])
def test_prediction_that_does_not_fit_the_schedule_is_refused(schedule, kind):
    with pytest.raises(ConfigError, match=rf"prediction '{kind}' does not fit schedule '{schedule.name}'"):
        Denoiser(ToyMLP(num_classes=2), schedule, Prediction(kind))


def test_scaled_linear_betas_match_hand_computed_alpha_bar():
    schedule = VPSchedule(num_timesteps=3, betas="scaled_linear", beta_start=0.01, beta_end=0.09)
    a, _ = schedule.alpha_sigma(torch.tensor([0.0, 1.0, 2.0]))
    beta = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64) ** 2  # linspace(sqrt 0.01, sqrt 0.09, 3)^2
    torch.testing.assert_close(a ** 2, torch.cumprod(1 - beta, 0))


@pytest.mark.parametrize("spacing, offset, steps, one", [
    ("leading", 1, 50, False), ("leading", 1, 7, True), ("leading", 0, 10, False), ("trailing", 0, 10, False),
    ("trailing", 0, 50, True), ("linspace", 0, 1, True)])
def test_diffusers_spacings_step_as_its_ddim_scheduler(spacing, offset, steps, one):
    """``timesteps`` of diffusers' DDIM scheduler, then its last step's target ``t - T // steps`` (clean when
    negative with set_alpha_to_one, else abar_0 = our index 0); alpha_bar to float32 rounding."""
    from diffusers import DDIMScheduler

    theirs = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                           timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=one)
    theirs.set_timesteps(steps)
    ours = VPSchedule(1000, "scaled_linear", 0.00085, 0.012, spacing=spacing, steps_offset=offset, final_alpha_one=one)
    times = ours.sampling_times(steps)
    assert torch.equal(times[:-1].long(), theirs.timesteps)
    last = int(theirs.timesteps[-1]) - 1000 // steps
    assert times[-1] == (last if last >= 0 else -1 if one else 0)
    a, _ = ours.alpha_sigma(times[:-1])
    torch.testing.assert_close(a ** 2, theirs.alphas_cumprod[theirs.timesteps].double(), rtol=1e-4, atol=1e-6)


def test_diffusers_spacing_refuses_times_its_ddim_steps_do_not_follow():
    with pytest.raises(ConfigError, match="spacing 'linspace' with steps=10 .* not 100 apart"):
        VPSchedule(1000, spacing="linspace").sampling_times(10)
    with pytest.raises(ConfigError, match="unknown spacing 'even-ish'"):
        VPSchedule(spacing="even-ish")
    with pytest.raises(ConfigError, match="steps_offset must be a non-negative integer"):
        VPSchedule(spacing="leading", steps_offset=-1)


def test_edm_progress_is_the_karras_ramp_by_hand():
    """EDM's progress is the position on the ramp in ``sigma^(1/rho)`` (not in sigma): with sigma_max = 80,
    sigma_min = 0.002, rho = 7, sigma = 1 sits at ``(80^(1/7) - 1) / (80^(1/7) - 0.002^(1/7))``."""
    schedule = EDMSchedule()
    hi, lo = 80 ** (1 / 7), 0.002 ** (1 / 7)
    assert schedule.progress(80.0) == 0.0 and schedule.progress(0.002) == pytest.approx(1.0, abs=1e-12)
    assert schedule.progress(1.0) == pytest.approx((hi - 1.0) / (hi - lo), abs=1e-12)
    assert schedule.progress(1.0) == pytest.approx(0.5966, abs=1e-4)  # 0.8699 / 1.4584; linear in sigma: 0.9875
    assert schedule.progress(0.0) == 1.0 and schedule.progress(200.0) == 0.0  # clamped outside the ramp
    # the sampling grid is uniform on the ramp: step i of n sits at progress i / (n - 1)
    times = schedule.sampling_times(5)[:-1]
    assert [schedule.progress(t) for t in times] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0], abs=1e-9)


def test_flow_and_vp_progress_by_hand_and_the_window_edges():
    assert FlowSchedule().progress(0.7) == pytest.approx(0.3) and VPSchedule(1000).progress(250) == 0.75
    # a window [0.25, 0.5] of progress guides the EDM ramp positions inside it: just inside each edge, not just out
    schedule, rule = EDMSchedule(), make_guidance("cfg", scale=2.0, start=0.25, stop=0.5).rule
    hi, lo = 80 ** (1 / 7), 0.002 ** (1 / 7)
    weights = [rule.weight_at(torch.tensor((hi + p * (lo - hi)) ** 7, dtype=torch.float64), schedule)
               for p in (0.2499, 0.2501, 0.4, 0.4999, 0.5001)]
    assert weights == [0.0, 2.0, 2.0, 2.0, 0.0]


def test_flow_progress_on_a_shifted_grid_and_the_window_edges():
    """Flow progress is ``1 - t``: SD3's shifted grid ``t = 3u / (1 + 2u)`` at u = 1, 3/4, 1/2, 1/4 sits at
    t = 1, 0.9, 0.75, 0.5 (progress 0, 0.1, 0.25, 0.5, all exact in binary but 0.1); a window [0.25, 0.5] of
    progress guides its edges (the last two steps) and nothing just past them."""
    schedule = FlowSchedule(shift=3.0)
    times = schedule.sampling_times(4)
    assert times.tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0], abs=1e-15)
    assert [schedule.progress(t) for t in times] == pytest.approx([0.0, 0.1, 0.25, 0.5, 1.0], abs=1e-15)
    rule = make_guidance("cfg", scale=2.0, start=0.25, stop=0.5).rule
    assert [rule.weight_at(t, schedule) for t in times[:-1]] == [0.0, 0.0, 2.0, 2.0]
    assert [rule.weight_at(torch.tensor(t, dtype=torch.float64), schedule)
            for t in (0.7501, 0.7499, 0.5001, 0.4999)] == [0.0, 2.0, 2.0, 0.0]
