"""CFG++ (Chung et al. 2024, arXiv 2406.08070) against hand computations: its steps, independent loops of its
published samplers, REG's formula on its term, and its refusals.

CFG++ guides the denoised estimate, ``x0_lam = x0_u + lam (x0_c - x0_u)`` with ``lam`` in [0, 1], and renoises with
the unconditional noise: ``x_next = a_next x0_lam + s_next eps_u``, ``eps_u = (x - a x0_u) / s``. On the linear
backbone ``o = A x + b_y`` (``helpers.LinearEps``) every prediction is affine in ``x``, so each step and REG's
factors have closed forms.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import A, BIAS, NULL, LinearEps, SmoothNet, vp_s

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.samplers import get_sampler
from lightning_reg.diffusion.schedules import EDMSchedule, FlowSchedule, VPSchedule
from lightning_reg.errors import ConfigError
from lightning_reg.guidance import GuidedDenoiser, make_guidance
from lightning_reg.sampling.cli import main as sample_main
from lightning_reg.sampling.engine import setting_name
from lightning_reg.sampling.sweep import sweep_settings

TOL = dict(rtol=0, atol=1e-9)
# schedule, what the backbone's output is, the first-order sampler: DDIM (VP), Euler in sigma (EDM), flow Euler
KINDS = {"vp": (VPSchedule(1000), "eps", "ddim"), "edm": (EDMSchedule(), "eps", "ddim"),
         "flow": (FlowSchedule(), "velocity", "flow_euler")}


@pytest.fixture
def xy():
    g = torch.Generator().manual_seed(3)
    return torch.randn(5, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])


def model_for(kind: str, net) -> Denoiser:
    schedule, prediction, _ = KINDS[kind]
    return Denoiser(net, schedule, Prediction(prediction))


def cfgpp(lam: float, **params):
    return make_guidance("cfgpp", scale=lam, convention="w2", **params)


class Recorded(GuidedDenoiser):
    """A guided denoiser that keeps the ``(x, t)`` of each call: the state each step starts from."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = []

    def __call__(self, x, t):
        self.calls.append((x, float(t)))
        return super().__call__(x, t)


def recorded_chain(kind: str, guidance, x, y, steps: int = 3):
    """The sampler's chain from ``x``; its steps as ``(x, t, t_next, x_next)``."""
    model = model_for(kind, LinearEps(A, BIAS))
    guided = Recorded(model, guidance, y)
    out = get_sampler(KINDS[kind][2])(guided, x, model.schedule, steps)
    times = model.schedule.sampling_times(steps).tolist()
    states = [x_i for x_i, _ in guided.calls] + [out]
    assert [t for _, t in guided.calls] == times[:-1]
    return [(states[i], times[i], times[i + 1], states[i + 1]) for i in range(steps)]


def outputs(x, y):
    """The linear backbone's conditional and unconditional outputs ``A x + b``."""
    return x @ A.T + BIAS[y], x @ A.T + BIAS[NULL]


# --- one step by hand, in each sampler's own form -----------------------------------------------------

def ddim_step(x, t, t_next, y, lam):
    """The paper's DDIM with CFG++ on an eps-network: ``eps_lam = eps_u + lam (eps_c - eps_u)``,
    ``x0 = (x - sqrt(1 - abar) eps_lam) / sqrt(abar)``, ``x_next = sqrt(abar') x0 + sqrt(1 - abar') eps_u``."""
    eps_c, eps_u = outputs(x, y)
    (a, s), (a_next, s_next) = vp_s(round(t)), vp_s(round(t_next))  # index -1 (clean): abar = 1
    x0 = (x - s * (eps_u + lam * (eps_c - eps_u))) / a
    return a_next * x0 + s_next * eps_u


def euler_step(x, sigma, sigma_next, y, lam):
    """k-diffusion's Euler CFG++ (``x = x0 + sigma eps``): ``denoised = D_u + lam (D_c - D_u)``,
    ``d = (x - D_u) / sigma``, ``x_next = denoised + sigma_next d``."""
    eps_c, eps_u = outputs(x, y)
    d_c, d_u = x - sigma * eps_c, x - sigma * eps_u
    return d_u + lam * (d_c - d_u) + sigma_next * (x - d_u) / sigma


def flow_step(x, t, t_next, y, lam):
    """Flow CFG++ on a velocity network ``v = eps - x0`` (``x = (1 - t) x0 + t eps``): ``x0_y = x - t v_y``,
    ``eps_u = x + (1 - t) v_u``, ``x_next = (1 - t') (x0_u + lam (x0_c - x0_u)) + t' eps_u``."""
    v_c, v_u = outputs(x, y)
    x0_c, x0_u = x - t * v_c, x - t * v_u
    return (1 - t_next) * (x0_u + lam * (x0_c - x0_u)) + t_next * (x + (1 - t) * v_u)


HAND_STEPS = {"vp": ddim_step, "edm": euler_step, "flow": flow_step}


@pytest.mark.parametrize("lam", [0.6, 1.0])
@pytest.mark.parametrize("kind", list(KINDS))
def test_each_step_equals_the_hand_step(xy, kind, lam):
    """Every step of a 3-step chain (its middle one renoises at 0 < s' < s), ``lam = 1`` included: the
    conditional x0, still renoised with ``eps_u``."""
    x, y = xy
    for x_i, t, t_next, x_next in recorded_chain(kind, cfgpp(lam), x, y):
        torch.testing.assert_close(x_next, HAND_STEPS[kind](x_i, t, t_next, y, lam), **TOL)


# --- REG on CFG++'s term: only the term is rectified, the renoising eps_u is not ------------------------

def reg_step(kind, x, t, t_next, y, lam, reg):
    """One CFG++ step with REG by its formula: ``x0_bar = x0_c + a (J^T 1) ⊙ g`` (paper) or ``x0_c + a J^T g``
    (vjp), ``g = (lam - 1)(x0_c - x0_u)``, ``J = d x0_c / d x``; then ``a' x0_bar + s' eps_u``."""
    schedule, prediction, _ = KINDS[kind]
    (a, s), (a_next, s_next) = (tuple(map(float, schedule.alpha_sigma(v))) for v in (t, t_next))
    o_c, o_u = outputs(x, y)
    if prediction == "eps":  # x0 = (x - s o) / a
        x0_c, x0_u, jac = (x - s * o_c) / a, (x - s * o_u) / a, (torch.eye(3, dtype=x.dtype) - s * A) / a
    else:  # flow velocity: x0 = x - t o
        x0_c, x0_u, jac = x - t * o_c, x - t * o_u, torch.eye(3, dtype=x.dtype) - t * A
    g = (lam - 1) * (x0_c - x0_u)
    x0_bar = x0_c + (a * jac.sum(0) * g if reg == "paper" else a * g @ jac)
    return a_next * x0_bar + s_next * (x - a * x0_u) / s


@pytest.mark.parametrize("reg", ["paper", "vjp"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_reg_rectifies_the_term_and_renoises_with_eps_u(xy, kind, reg):
    x, y = xy
    steps = recorded_chain(kind, cfgpp(0.4, reg=reg), x, y)
    for x_i, t, t_next, x_next in steps:
        torch.testing.assert_close(x_next, reg_step(kind, x_i, t, t_next, y, 0.4, reg), **TOL)
    x_i, t, t_next, x_next = steps[1]
    plain = HAND_STEPS[kind](x_i, t, t_next, y, 0.4)
    assert (x_next - plain).abs().max() > 1e-3  # REG changed the step: the check above is not CFG++'s alone


# --- whole chains against independent loops of the published samplers ---------------------------------

def smooth_model(kind: str) -> Denoiser:
    return model_for(kind, SmoothNet())


def net_outputs(model, x, t, y):
    """The network's raw conditional and unconditional outputs at ``t`` (no guidance code)."""
    net_t = model.schedule.net_time(torch.tensor(t, dtype=torch.float64)).expand(len(x))
    with torch.no_grad():
        return model.net(x, net_t, y), model.net(x, net_t, torch.full_like(y, NULL))


def ancestral_sigmas(sigma, sigma_next, eta):
    """``(sigma_down, sigma_up)`` of an ancestral Euler step between VE sigmas: ``sigma_up = min(sigma',
    eta sigma' sqrt(sigma^2 - sigma'^2) / sigma)``, ``sigma_down = sqrt(sigma'^2 - sigma_up^2)``."""
    up = min(sigma_next, eta * sigma_next * math.sqrt(sigma ** 2 - sigma_next ** 2) / sigma)
    return math.sqrt(sigma_next ** 2 - up ** 2), up


def paper_ddim_loop(model, x, y, lam, steps, eta=0.0, noises=()):
    """CFG++'s DDIM in ``abar`` (the paper), written as k-diffusion's Euler-ancestral CFG++ in VE sigmas
    ``sigma = s / a`` for ``eta > 0``: ``x' = a' (x0_lam + sigma_down eps_u + sigma_up z)``."""
    noises = iter(noises)
    times = model.schedule.sampling_times(steps).tolist()
    for t, t_next in zip(times[:-1], times[1:]):
        eps_c, eps_u = net_outputs(model, x, t, y)
        (a, s), (a_next, s_next) = vp_s(round(t)), vp_s(round(t_next))
        x0_lam = (x - s * (eps_u + lam * (eps_c - eps_u))) / a
        if s_next == 0:
            x = x0_lam
            continue
        down, up = ancestral_sigmas(s / a, s_next / a_next, eta)
        x = a_next * (x0_lam + down * eps_u) + (a_next * up * next(noises) if up else 0)
    return x


def euler_loop(model, x, y, lam, steps):
    """k-diffusion's ``sample_euler_cfg_pp`` on EDM sigmas with an eps-network: ``x' = denoised + sigma' d``,
    ``d = (x - D_u) / sigma``."""
    sigmas = model.schedule.sampling_times(steps).tolist()
    x = x * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        eps_c, eps_u = net_outputs(model, x, sigma, y)
        d_c, d_u = x - sigma * eps_c, x - sigma * eps_u
        x = d_u + lam * (d_c - d_u) + sigma_next * (x - d_u) / sigma
    return x


def flow_loop(model, x, y, lam, steps):
    """Euler CFG++ on the flow path in ComfyUI's alpha-scaled form (``alpha = 1 - sigma``, velocity network):
    ``d = (x - alpha x0_u) / sigma``, ``x' = alpha' x0_lam + sigma' d``."""
    times = model.schedule.sampling_times(steps).tolist()
    for t, t_next in zip(times[:-1], times[1:]):
        v_c, v_u = net_outputs(model, x, t, y)
        x0_c, x0_u = x - t * v_c, x - t * v_u
        x = (1 - t_next) * (x0_u + lam * (x0_c - x0_u)) + t_next * (x - (1 - t) * x0_u) / t
    return x


@pytest.mark.parametrize("kind, sampler, loop", [
    ("vp", "ddim", paper_ddim_loop), ("vp", "ddpm", paper_ddim_loop), ("edm", "ddim", euler_loop),
    ("flow", "flow_euler", flow_loop)])
def test_chain_equals_the_published_loop(xy, kind, sampler, loop):
    """10 steps of a nonlinear backbone (``helpers.SmoothNet``); ``ddpm`` (eta = 1) is the Euler-ancestral CFG++
    with the same fresh noises."""
    x, y = xy
    model, lam, steps = smooth_model(kind), 0.7, 10
    g = torch.Generator().manual_seed(4)
    noises = [torch.randn(x.shape, generator=g, dtype=x.dtype) for _ in range(steps)]
    source = iter(noises)
    got = get_sampler(sampler)(GuidedDenoiser(model, cfgpp(lam), y), x, model.schedule, steps,
                               noise_sampler=lambda _: next(source))
    want = (loop(model, x, y, lam, steps, eta=1.0, noises=noises) if sampler == "ddpm"
            else loop(model, x, y, lam, steps))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", list(KINDS))
def test_lambda_zero_is_the_unconditional_chain(xy, kind):
    x, y = xy
    model = smooth_model(kind)
    sampler = get_sampler(KINDS[kind][2])
    null = torch.full_like(y, NULL)
    want = sampler(lambda x_t, t: model(x_t, t, null), x, model.schedule, 6)
    got = sampler(GuidedDenoiser(model, cfgpp(0.0), y), x, model.schedule, 6)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("reg", ["none", "paper"])
def test_outside_its_window_a_step_is_the_conditional_one(xy, reg):
    """Past ``stop`` the estimate is ``x0_c`` and no renoising prediction is handed on (the step renoises with
    ``x0_c``'s own noise); inside, ``renoising_x0`` is the unconditional prediction."""
    x, y = xy
    model = smooth_model("vp")
    guided = GuidedDenoiser(model, cfgpp(0.5, stop=0.5, reg=reg), y)
    with torch.no_grad():
        guided(x, torch.tensor(900.0, dtype=torch.float64))
        torch.testing.assert_close(guided.renoising_x0(), model(x, 900.0, torch.full_like(y, NULL)), rtol=0, atol=0)
        out = guided(x, torch.tensor(200.0, dtype=torch.float64))
    assert guided.renoising_x0() is None
    torch.testing.assert_close(out, model(x, 200.0, y), rtol=0, atol=0)


def test_channels_outside_guidance_channels_renoise_with_the_conditional_noise(xy):
    """``guidance_channels``: the unguided channels keep ``x0_c`` and their step is the conditional one."""
    x, y = xy
    model = smooth_model("vp")
    guided = GuidedDenoiser(model, cfgpp(0.5, guidance_channels=[0, 2]), y)
    with torch.no_grad():
        out = guided(x, torch.tensor(600.0, dtype=torch.float64))
    x0_c, x0_u = model(x, 600.0, y), model(x, 600.0, torch.full_like(y, NULL))
    torch.testing.assert_close(guided.renoising_x0()[:, [0, 2]], x0_u[:, [0, 2]], **TOL)
    torch.testing.assert_close(guided.renoising_x0()[:, 1], x0_c[:, 1], **TOL)
    torch.testing.assert_close(out[:, 1], x0_c[:, 1], **TOL)
    torch.testing.assert_close(out[:, [0, 2]], (x0_u + 0.5 * (x0_c - x0_u))[:, [0, 2]], **TOL)


# --- refusals and configs ------------------------------------------------------------------------------

@pytest.mark.parametrize("params, message", [
    ({"scale": 1.2, "convention": "w2"},
     r"cfgpp scale=1.2 \(w2 convention\) is lambda = 1.2, outside CFG\+\+'s \[0, 1\]"),
    ({"scale": 0.6}, r"cfgpp scale=0.6 \(w convention\) is lambda = 1.6, outside .*convention: w2"),
    ({"scale": -1.5}, r"is lambda = -0.5, outside"),
    ({}, r"cfgpp needs scale: the paper's lambda in \[0, 1\] with convention: w2"),
])
def test_lambda_outside_zero_one_is_refused(params, message):
    with pytest.raises(ConfigError, match=message) as err:
        make_guidance("cfgpp", **params)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind, sampler", [("edm", "edm_heun"), ("vp", "diffusers:DDIMScheduler")])
def test_samplers_without_a_cfgpp_step_refuse_it(xy, kind, sampler):
    x, y = xy
    model = smooth_model(kind)
    with pytest.raises(ConfigError, match=f"cfgpp is defined for first-order steps .*not for sampler '{sampler}'"):
        get_sampler(sampler)(GuidedDenoiser(model, cfgpp(0.6), y), x, model.schedule, 2)


def test_w_convention_is_lambda_minus_one(xy):
    x, y = xy
    model = smooth_model("vp")
    chains = [get_sampler("ddim")(GuidedDenoiser(model, guidance, y), x, model.schedule, 4)
              for guidance in (cfgpp(0.3), make_guidance("cfgpp", scale=-0.7, convention="w"))]
    torch.testing.assert_close(chains[0], chains[1], rtol=0, atol=1e-12)


def test_sweep_settings_take_cfgpp_weights():
    settings = sweep_settings([{"method": "cfgpp", "weights": [0.2, 1.0]}], ["none", "paper"], "w2")
    assert [setting_name(s) for s in settings] == ["cfgpp_w2x0.2_none", "cfgpp_w2x1_none", "cfgpp_w2x0.2_paper",
                                                   "cfgpp_w2x1_paper"]
    with pytest.raises(ConfigError, match=r"--methods\[0\] \(cfgpp\) weight 0.6: cfgpp scale=0.6 \(w convention\)"):
        sweep_settings([{"method": "cfgpp", "weights": [0.6]}], ["none"], "w")


def test_sample_cli_runs_cfgpp_and_refuses_a_scheduler(checkpoint, tmp_path, refused):
    base = ["--checkpoint", str(checkpoint), "--num_samples", "4", "--steps", "3", "--seed", "2",
            "--guidance", "{method: cfgpp, scale: 0.6, convention: w2, reg: paper}"]
    sample_main([*base, "--output", str(tmp_path / "ok"), "--sampler", "ddim"])
    record = json.loads((tmp_path / "ok" / "meta.json").read_text())
    assert record["setting"] == "cfgpp_w2x0.6_paper"
    refused(lambda: sample_main([*base, "--output", str(tmp_path / "no"), "--sampler", "diffusers:DDIMScheduler"]),
            "cfgpp is defined for first-order steps .*not for sampler 'diffusers:DDIMScheduler'", tmp_path / "no")
