"""diffusers' schedulers as samplers (``--sampler diffusers:<SchedulerClass>``, ``diffusion/schedulers.py``): the
same latents as ``StableDiffusionPipeline`` with each scheduler, REG through the DDIM scheduler equal to our own
DDIM, the scheduler's ``model_output`` at each Karras step against a hand computation of REG, the refusals, the
fractional-timestep ``alpha_sigma`` and ``Prediction.from_x0``, and flow / EDM schedulers against hand-written
Euler chains on their own sigmas."""

import importlib.util
import math

import numpy as np
import pytest
import torch
from helpers import A, BIAS, LATENT, NULL, PROMPTS, LinearEps, SmoothNet, embeddings, linear_model, our_denoiser

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.predictions import PREDICTIONS, Prediction
from lightning_reg.diffusion.samplers import ddim, get_sampler
from lightning_reg.diffusion.schedulers import Scheduled
from lightning_reg.diffusion.schedules import EDMSchedule, FlowSchedule, VPSchedule
from lightning_reg.errors import ConfigError
from lightning_reg.guidance import GuidedDenoiser, make_guidance
from lightning_reg.sampling.engine import PerSampleNoise

F64 = torch.float64
# SD's schedule (the tiny components' scheduler config): scaled-linear betas, leading spacing, steps_offset 1, the
# last step to index 0
SD_SCHEDULE = dict(num_timesteps=1000, betas="scaled_linear", beta_start=0.00085, beta_end=0.012, spacing="leading",
                   steps_offset=1, final_alpha_one=False)


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# --- 1. REG off: the diffusers pipeline with each scheduler -----------------------------------------------------

PIPELINE_STEPS = 6
PIPELINE_SCHEDULERS = [
    ("PNDMScheduler", {}),
    ("EulerDiscreteScheduler", {}),
    ("EulerAncestralDiscreteScheduler", {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    ("UniPCMultistepScheduler", {}),
    ("DDIMScheduler", {}),
]


@pytest.fixture(scope="module")
def sd_parts(clip_tokenizer, tiny_components):
    return {kind: tiny_components(clip_tokenizer, kind) for kind in ("epsilon", "v_prediction")}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name, options", PIPELINE_SCHEDULERS, ids=[n for n, _ in PIPELINE_SCHEDULERS])
def test_the_adapter_reproduces_the_stable_diffusion_pipeline(sd_parts, prediction_type, name, options, one_thread):
    """REG off, CFG at guidance_scale 4.5 (our w2 convention): ``diffusers:<name>`` over the wrapped UNet gives the
    pipeline's latents with that scheduler, from the same embeddings and initial latents; the ancestral scheduler's
    fresh noise comes from the same per-sample generators, advanced past the initial draw on both sides."""
    import diffusers

    parts = sd_parts[prediction_type]
    cond, null = embeddings(parts, PROMPTS), embeddings(parts, [""])
    noise = PerSampleNoise(5, [0, 1])
    latents = noise.draw(LATENT)
    # ``from_config`` gives each scheduler its own default timestep_spacing where the config names none (SD's does
    # not; "linspace" for most), while the adapter takes the model's ("leading", steps_offset 1): say it here
    scheduler = getattr(diffusers, name).from_config(parts["scheduler"].config, timestep_spacing="leading", **options)
    pipe = diffusers.StableDiffusionPipeline(**{**parts, "scheduler": scheduler}, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    generators = PerSampleNoise(5, [0, 1]).generators
    for g in generators:
        torch.randn(LATENT, generator=g)  # past the initial-noise draw, as ``noise``'s generators are
    theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=null.expand_as(cond), latents=latents.clone(),
                  num_inference_steps=PIPELINE_STEPS, guidance_scale=4.5, generator=generators,
                  output_type="latent").images

    denoiser = our_denoiser(parts, null)
    guided = GuidedDenoiser(denoiser, make_guidance("cfg", scale=4.5, convention="w2"), cond)
    ours = get_sampler(f"diffusers:{name}", **options)(guided, latents, denoiser.schedule, PIPELINE_STEPS,
                                                        noise_sampler=noise, prediction=denoiser.prediction.kind)
    scale = float(theirs.abs().max())
    assert scale > 0.1 and float((theirs - latents).abs().max()) > 0.1  # a real chain, not zeros or the input
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * scale)


# --- 2. REG through the DDIM scheduler = our DDIM ------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("reg", ["paper", "vjp"])
def test_reg_through_the_ddim_scheduler_equals_the_built_in_ddim(prediction, reg, one_thread):
    """On SD's schedule (leading spacing, steps_offset 1, last step to index 0) over a nonlinear float64 backbone,
    ``diffusers:DDIMScheduler`` with REG gives the chain of ``samplers.ddim`` (eta 0) with the same guidance; and
    REG changes that chain (the rectification is not negligible here)."""
    model = Denoiser(SmoothNet(), VPSchedule(**SD_SCHEDULE), Prediction(prediction))
    y, noise, steps = torch.tensor([0, 1, 1, 0]), randn(4, 3, seed=1), 7
    guided = GuidedDenoiser(model, make_guidance("cfg", scale=2.0, reg=reg), y)
    through_diffusers = get_sampler("diffusers:DDIMScheduler")(guided, noise, model.schedule, steps,
                                                               prediction=prediction)
    built_in = ddim(guided, noise, model.schedule, steps, eta=0.0)
    torch.testing.assert_close(through_diffusers, built_in, rtol=1e-5, atol=1e-5)
    plain = ddim(GuidedDenoiser(model, make_guidance("cfg", scale=2.0), y), noise, model.schedule, steps)
    assert float((built_in - plain).abs().max()) > 1e-2


# --- 3. the model_output at each Karras step, by hand ----------------------------------------------------------

def test_reg_paper_model_output_at_each_karras_step_is_the_hand_formula(monkeypatch, one_thread):
    """EulerDiscreteScheduler with Karras sigmas (fractional timesteps) over ``eps = A x + b_y`` (linear betas):
    every ``model_output`` handed to ``step`` is REG paper's ``eps_c + w d ⊙ (1 - s A^T 1)`` (``d = b_y - b_null``)
    at the state the scheduler holds, ``x = a * state`` (Euler keeps ``x / a``), with ``(a, s)`` of the scheduler's
    own sigma, ``(1, sigma) / sqrt(1 + sigma^2)``: so the denoiser's time (our ``alpha_sigma`` between integer
    indices) is the scheduler's sigma. The timesteps are the ones diffusers builds from these betas itself.

    (``eps = A x + b`` is no real denoiser: its mean ``b`` drives the state to ~160 by the end, so ``1e-6`` relative
    is what this check resolves of ``s``; ``alpha_sigma``'s interpolation is checked to 1e-6 / 1e-10 in section 5.)"""
    from diffusers import EulerDiscreteScheduler

    model, w, steps = linear_model(), 1.5, 8  # VPSchedule(1000): linear betas 1e-4..0.02, spacing even = linspace
    reference = EulerDiscreteScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                       timestep_spacing="linspace", use_karras_sigmas=True)
    reference.set_timesteps(steps)
    recorded, step = [], Scheduled.step

    def recording_step(self, out, timestep, x, generators):
        recorded.append((out.clone(), float(timestep), x.clone()))
        return step(self, out, timestep, x, generators)

    monkeypatch.setattr(Scheduled, "step", recording_step)
    y = torch.tensor([0, 1, 1])
    guided = GuidedDenoiser(model, make_guidance("cfg", scale=w, reg="paper"), y)
    get_sampler("diffusers:EulerDiscreteScheduler", use_karras_sigmas=True)(guided, randn(3, 3, seed=2),
                                                                             model.schedule, steps)

    assert [t for _, t, _ in recorded] == reference.timesteps.tolist()
    assert sum(abs(t - round(t)) > 1e-3 for _, t, _ in recorded) > steps // 2  # mostly fractional
    d, column_sums = BIAS[y] - BIAS[NULL], A.sum(0)  # grad_x 1^T eps_c = A^T 1
    for (out, _, state), sigma in zip(recorded, reference.sigmas.double()):
        a, s = 1 / math.sqrt(1 + sigma ** 2), sigma / math.sqrt(1 + sigma ** 2)
        eps_c = (a * state) @ A.T + BIAS[y]
        expected = eps_c + w * d * (1 - s * column_sums)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)  # float32 sigmas and timesteps
    assert float((recorded[0][0] - recorded[-1][0]).abs().max()) > 0.1  # the states change along the chain


# --- 4. refusals ----------------------------------------------------------------------------------------------

SCHEDULES = {"vp": (VPSchedule(1000), "eps"), "edm": (EDMSchedule(), "edm"), "flow": (FlowSchedule(), "velocity")}
HAS_TORCHSDE = importlib.util.find_spec("torchsde") is not None


@pytest.mark.parametrize("name, options, kind, message", [
    pytest.param("EulerDiscreetScheduler", {}, "vp",
                 r"diffusers:EulerDiscreetScheduler: not a diffusers scheduler \(did you mean 'EulerDiscreteScheduler'",
                 id="near-name"),
    pytest.param("FlowMatchEulerDiscreteScheduler", {}, "vp",
                 "is a scheduler for flow models; the model's schedule is vp: choose e.g. ", id="flow-on-vp"),
    pytest.param("EDMEulerScheduler", {}, "vp", "is a scheduler for edm models; the model's schedule is vp",
                 id="edm-on-vp"),
    pytest.param("EulerDiscreteScheduler", {}, "edm",
                 "is a scheduler for vp models; the model's schedule is edm: choose EDMEulerScheduler", id="vp-on-edm"),
    pytest.param("EulerDiscreteScheduler", {"use_karras_sigmaz": True}, "vp",
                 r"EulerDiscreteScheduler takes no option 'use_karras_sigmaz' \(did you mean 'use_karras_sigmas'\?\)",
                 id="near-option"),
    pytest.param("EulerDiscreteScheduler", {"beta_schedule": "linear"}, "vp",
                 "beta_schedule is the model's .*remove it", id="model-key"),
    pytest.param("PNDMScheduler", {"prediction_type": "sample"}, "vp",
                 r"diffusers:PNDMScheduler with \{'prediction_type': 'sample'\}: prediction_type given as sample",
                 id="prediction-type"),
    pytest.param("DPMSolverMultistepScheduler", {"prediction_type": "flow_prediction"}, "vp",
                 r"prediction_type 'flow_prediction' cannot be handed to .* over a vp model", id="flow-output-on-vp"),
    pytest.param("DPMSolverMultistepScheduler", {"prediction_type": "v_prediction"}, "flow",
                 r"prediction_type 'v_prediction' cannot be handed to .* over a flow model", id="v-output-on-flow"),
    pytest.param("DEISMultistepScheduler", {}, "flow", r"does not walk the model's chain at 4 steps: it ends at sigma",
                 id="flow-chain-stops-short"),
    pytest.param("CogVideoXDDIMScheduler", {}, "vp", "its alphas_cumprod differ from the model's betas",
                 id="rescaled-betas"),
    pytest.param("CogVideoXDDIMScheduler", {"snr_shift_scale": 1.0}, "vp", "snr_shift_scale is the model's",
                 id="betas-option"),
    pytest.param("DDIMInverseScheduler", {}, "vp", "an inversion or inpainting scheduler", id="inverse"),
    pytest.param("DPMSolverSDEScheduler", {}, "vp", "needs a package diffusers leaves optional .*torchsde",
                 id="needs-torchsde",
                 marks=pytest.mark.skipif(HAS_TORCHSDE, reason="torchsde is installed: the class is real here")),
    pytest.param("ScoreSdeVeScheduler", {}, "vp", "cannot be built from a model's noise schedule", id="score-sde-ve"),
    pytest.param("VQDiffusionScheduler", {}, "vp", "cannot be built from a model's noise schedule", id="vq-diffusion"),
])
def test_refusals_are_one_line(name, options, kind, message, one_thread):
    """Each bad ``--sampler diffusers:<name>`` / ``--sampler_kwargs`` is one ``ConfigError`` line, raised before
    the denoiser is ever called."""
    schedule, prediction = SCHEDULES[kind]

    def never(x, t):
        raise AssertionError("the denoiser was called")

    with pytest.raises(ConfigError, match=message) as err:
        get_sampler(f"diffusers:{name}", **options)(never, torch.zeros(1, 3), schedule, 4, prediction=prediction)
    assert "\n" not in str(err.value)


PERFECT_CHAINS = [("vp", "DDIMScheduler", {}), ("vp", "EulerDiscreteScheduler", {}), ("vp", "EulerDiscreteScheduler", {"use_karras_sigmas": True}),
                  ("vp", "EulerAncestralDiscreteScheduler", {}), ("vp", "HeunDiscreteScheduler", {}),
                  ("vp", "LMSDiscreteScheduler", {}), ("vp", "DEISMultistepScheduler", {}),
                  ("vp", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
                  ("vp", "DPMSolverMultistepScheduler", {"prediction_type": "sample"}),
                  ("vp", "UniPCMultistepScheduler", {}), ("vp", "DDPMScheduler", {}),
                  ("edm", "EDMEulerScheduler", {}), ("edm", "EDMDPMSolverMultistepScheduler", {}),
                  ("flow", "FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
                  ("flow", "DPMSolverMultistepScheduler", {}),
                  ("flow", "DPMSolverMultistepScheduler", {"prediction_type": "epsilon"}),
                  ("flow", "UniPCMultistepScheduler", {})]


@pytest.mark.parametrize("kind, name, options", PERFECT_CHAINS, ids=[f"{k}-{n}-{len(o)}" for k, n, o in PERFECT_CHAINS])
def test_a_perfect_denoiser_ends_at_its_data(kind, name, options, one_thread):
    """A denoiser that always returns the data ``x0`` itself: every scheduler, built from the model's schedule and
    handed ``x0`` in its own prediction type (deterministic or not, a step option such as ``s_churn`` included),
    must end exactly there; a wrong conversion, time or schedule would not (nor a flow chain that stops short)."""
    schedule, prediction = SCHEDULES[kind]
    x0 = randn(4, 3, seed=2).float().clamp(-1, 1)
    noise = PerSampleNoise(0, range(4))
    chain = Scheduled(name, schedule, 8, options, prediction)
    out = get_sampler(f"diffusers:{name}", **options)(lambda x, t: x0.to(x.dtype), noise.draw((3,)), schedule, 8,
                                                      noise_sampler=noise, prediction=prediction)
    # a VP solver whose last sigma is index 0's (DEIS) ends there, a_0 x0 + s_0 eps: within a few s_0 of x0
    last = getattr(chain.scheduler, "sigmas", torch.zeros(1))[-1]
    torch.testing.assert_close(out, x0, rtol=0, atol=2e-4 + 4 * float(last))


def test_a_step_option_reaches_every_step(one_thread):
    """``s_churn`` is an option of Euler's ``step``, not of its constructor: accepted, and it changes the chain."""
    schedule, steps, noise = VPSchedule(1000), 6, randn(3, 3, seed=4)
    guided = guided_linear(schedule, "eps")
    plain, churned = (get_sampler("diffusers:EulerDiscreteScheduler", **options)(
        guided, noise, schedule, steps, noise_sampler=PerSampleNoise(0, range(3)), prediction="eps")
        for options in ({}, {"s_churn": 1.0}))
    assert float((plain - churned).abs().max()) > 1e-3


def test_an_unknown_sampler_names_the_diffusers_form():
    """``get_sampler``'s refusal of an unknown name lists the built-in samplers and ``diffusers:<SchedulerClass>``."""
    with pytest.raises(ConfigError, match=r"unknown sampler 'nonsense'; choose one of .* or "
                                          r"diffusers:<SchedulerClass>"):
        get_sampler("nonsense")


# --- 5. alpha_sigma between indices, from_x0 -----------------------------------------------------------------

BETAS = {"linear": ("linear", 1e-4, 0.02), "scaled_linear": ("scaled_linear", 0.00085, 0.012),
         "cosine": ("squaredcos_cap_v2", 1e-4, 0.02)}  # ours: diffusers' beta_schedule, beta_start, beta_end


def hand_alpha_bar(betas: str, start: float, end: float, T: int = 1000) -> torch.Tensor:
    """``abar_t``, t = 0..T-1, in float64 from the definitions (DDPM, latent diffusion, improved DDPM eq. 17)."""
    i = torch.arange(T, dtype=F64)
    if betas == "linear":
        beta = start + (end - start) * i / (T - 1)
    elif betas == "scaled_linear":
        beta = (start ** 0.5 + (end ** 0.5 - start ** 0.5) * i / (T - 1)) ** 2
    else:
        f = lambda u: torch.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        beta = (1 - f(i + 1) / f(i)).clamp(max=0.999)
    return torch.cumprod(1 - beta, 0)


@pytest.mark.parametrize("betas", ["linear", "scaled_linear"])
@pytest.mark.parametrize("steps", [7, 50])
def test_alpha_sigma_at_diffusers_karras_timesteps_gives_its_sigmas(betas, steps):
    """At EulerDiscreteScheduler's (Karras) fractional timesteps ``s/a`` is its sigma. diffusers keeps the table in
    float32, whose sigma near t = 0 is up to 1e-4 (relative) off the exact one, so the scheduler is handed the exact
    float64 table; what is left is its float32 timesteps and sigmas. (Cosine betas are left to the hand test below:
    there diffusers' timesteps crowd near t = T-1, where log sigma jumps by up to 3.5 an index, and their float32
    rounding moves sigma by ~1e-4.)"""
    from diffusers import EulerDiscreteScheduler

    name, start, end = BETAS[betas]
    scheduler = EulerDiscreteScheduler(beta_schedule=name, beta_start=start, beta_end=end, use_karras_sigmas=True)
    scheduler.alphas_cumprod = hand_alpha_bar(betas, start, end)
    scheduler.set_timesteps(steps)
    a, s = VPSchedule(1000, betas=betas, beta_start=start, beta_end=end).alpha_sigma(scheduler.timesteps.double())
    assert int(((scheduler.timesteps - scheduler.timesteps.round()).abs() > 1e-3).sum()) > steps // 2  # mostly
    torch.testing.assert_close(s / a, scheduler.sigmas[:-1].double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("betas", list(BETAS))
def test_alpha_sigma_is_log_sigma_linear_between_indices_and_the_table_at_them(betas):
    """In float64 by hand: Karras sigmas (rho 7) between the table's smallest and largest sigma, each mapped to a
    fractional index as diffusers' ``_sigma_to_t`` does (linear in log sigma between neighbours): ``s/a`` there is
    that sigma (1e-10); at the integers ``a^2`` is the table and ``a^2 + s^2 = 1``; at -1 the clean end (1, 0)."""
    _, start, end = BETAS[betas]
    schedule = VPSchedule(1000, betas=betas, beta_start=start, beta_end=end)
    abar = hand_alpha_bar(betas, start, end)
    log_sigma = (0.5 * ((1 - abar) / abar).log()).numpy()
    ramp = np.linspace(0, 1, 20)
    lo, hi = math.exp(log_sigma[0]) ** (1 / 7), math.exp(log_sigma[-1]) ** (1 / 7)
    sigmas = (hi + ramp * (lo - hi)) ** 7
    t = np.interp(np.log(sigmas), log_sigma, np.arange(1000))
    assert (np.abs(t - t.round()) > 1e-3).sum() > 10  # mostly fractional
    a, s = schedule.alpha_sigma(torch.from_numpy(t))
    torch.testing.assert_close(s / a, torch.from_numpy(sigmas), rtol=1e-10, atol=0)
    torch.testing.assert_close(a ** 2 + s ** 2, torch.ones_like(a), rtol=0, atol=1e-12)

    a, s = schedule.alpha_sigma(torch.arange(1000, dtype=F64))
    torch.testing.assert_close(a ** 2, abar, rtol=1e-12, atol=0)
    torch.testing.assert_close(s ** 2, 1 - abar, rtol=1e-10, atol=1e-15)
    assert [float(c) for c in schedule.alpha_sigma(-1.0)] == [1.0, 0.0]


@pytest.mark.parametrize("kind", PREDICTIONS)
def test_from_x0_inverts_to_x0(kind):
    """For every prediction at random per-sample ``(a, s)`` (float64): ``to_x0(from_x0(x0)) = x0`` and
    ``from_x0(to_x0(F)) = F``."""
    prediction = Prediction(kind, sigma_data=0.7)
    a, s = 0.05 + randn(6, 1, seed=3).abs(), 0.05 + randn(6, 1, seed=4).abs() * 3
    x, x0, out = randn(6, 5, seed=5), randn(6, 5, seed=6), randn(6, 5, seed=7)
    torch.testing.assert_close(prediction.to_x0(prediction.from_x0(x0, x, a, s), x, a, s), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(prediction.from_x0(prediction.to_x0(out, x, a, s), x, a, s), out, rtol=1e-10,
                               atol=1e-10)


# --- 6. flow and EDM: hand-written Euler on the scheduler's own sigmas ----------------------------------------

def hand_euler(guided, x, sigmas) -> torch.Tensor:
    """``x += (sigma_next - sigma) (x - D(x, sigma)) / sigma`` down ``sigmas`` (the denoiser's time is sigma)."""
    sigmas = sigmas.double()
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            x = x + (sigma_next - sigma) * (x - guided(x, sigma)) / sigma
    return x


def guided_linear(schedule, prediction: str) -> GuidedDenoiser:
    model = Denoiser(LinearEps(A, BIAS), schedule, Prediction(prediction))
    return GuidedDenoiser(model, make_guidance("cfg", scale=1.5, reg="paper"), torch.tensor([0, 1, 1]))


def test_flow_match_euler_is_euler_on_its_sigmas(one_thread):
    """FlowMatchEulerDiscreteScheduler (shift 1) over a ``flow`` model with REG: the hand-written Euler on the
    scheduler's own sigmas from the noise itself, with the same guided denoiser."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    guided, noise, steps = guided_linear(FlowSchedule(), "velocity"), randn(3, 3, seed=8), 6
    reference = FlowMatchEulerDiscreteScheduler(shift=1.0)
    reference.set_timesteps(steps)
    ours = get_sampler("diffusers:FlowMatchEulerDiscreteScheduler", shift=1.0)(guided, noise, FlowSchedule(), steps,
                                                                              prediction="velocity")
    expected = hand_euler(guided, noise, reference.sigmas)
    assert float((expected - noise).abs().max()) > 0.1
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)  # the scheduler steps in float32


def test_edm_euler_is_euler_on_its_sigmas(one_thread):
    """EDMEulerScheduler over an ``edm`` model (EDM preconditioning) with REG: the hand-written Euler on the
    scheduler's own sigmas (Karras, rho 7, from the schedule's sigma_min / sigma_max), from
    ``noise * init_noise_sigma``."""
    from diffusers import EDMEulerScheduler

    schedule = EDMSchedule()
    guided, noise, steps = guided_linear(schedule, "edm"), randn(3, 3, seed=9), 6
    reference = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0)
    reference.set_timesteps(steps)
    ours = get_sampler("diffusers:EDMEulerScheduler")(guided, noise, schedule, steps, prediction="edm")
    expected = hand_euler(guided, noise * reference.init_noise_sigma, reference.sigmas)
    assert float(expected.abs().max()) > 0.1
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)  # the scheduler steps in float32


def test_dpm_solver_on_a_flow_model_runs_on_flow_sigmas(one_thread):
    """DPMSolverMultistepScheduler over a ``flow`` model is switched to flow sigmas (t = sigma in (0, 1]): its chain
    is finite, of the same size as Euler's, and not Euler's (a second-order solver on the same ODE)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedule, steps = FlowSchedule(), 6
    guided, noise = guided_linear(schedule, "velocity"), randn(3, 3, seed=8)
    chain = Scheduled("DPMSolverMultistepScheduler", schedule, steps, prediction="velocity")
    assert chain.scheduler.config.use_flow_sigmas and float(chain.scheduler.sigmas.max()) <= 1.0
    ours = get_sampler("diffusers:DPMSolverMultistepScheduler")(guided, noise, schedule, steps, prediction="velocity")
    reference = FlowMatchEulerDiscreteScheduler(shift=1.0)
    reference.set_timesteps(steps)
    euler = hand_euler(guided, noise, reference.sigmas)  # = FlowMatchEuler through the adapter (test above)
    assert torch.isfinite(ours).all()
    assert 1e-3 < float((ours - euler).abs().max()) < 0.5 * float(euler.abs().max())
    # and diffusers' own loop of the same scheduler on the same velocities
    reference = type(chain.scheduler).from_config(chain.scheduler.config)
    reference.set_timesteps(steps)
    x = noise.clone()
    for i, timestep in enumerate(reference.timesteps):
        t = float(reference.sigmas[i])
        x = reference.step((x - guided(x, torch.tensor(t, dtype=torch.float64))) / t, timestep, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-6)
