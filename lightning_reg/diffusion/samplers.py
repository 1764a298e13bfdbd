"""Samplers: plain functions over a denoiser ``D(x, t) -> x0_hat`` (labels and guidance bound in).

Each takes standard-normal ``noise`` (scaled by the schedule's ``prior_std``), walks the schedule's
``sampling_times`` from noise to clean and returns ``x_0``. ``noise_sampler(x)`` draws the fresh
noise of stochastic steps (default ``torch.randn_like``; pass a per-sample source for results that
do not depend on batch composition).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_reg.diffusion.denoiser import learned_log_variance
from lightning_reg.diffusion.predictions import eps_from_x0
from lightning_reg.diffusion.schedulers import PREFIX, Scheduled, check_scheduler
from lightning_reg.diffusion.schedules import EDMSchedule, FlowSchedule, NoiseSchedule
from lightning_reg.errors import ConfigError

DenoiserFn = Callable[[Tensor, Tensor], Tensor]


def _steps(times: Tensor, progress: bool, name: str):
    """The steps' ``(i, (t, t_next))``, with a bar if ``progress`` and the output is a terminal (tqdm's None)."""
    pairs = list(zip(times[:-1], times[1:]))
    return tqdm(list(enumerate(pairs)), desc=name, leave=False, disable=None if progress else True)


def renoising_x0(denoiser: DenoiserFn, x0_hat: Tensor) -> Tensor:
    """The x0 whose noise ``(x - a_t x0) / s_t`` a first-order step renoises with: the denoiser's
    ``renoising_x0()`` of its last call where it has one (``GuidedDenoiser``: CFG++'s unconditional prediction),
    else ``x0_hat`` itself."""
    x0_r = getattr(denoiser, "renoising_x0", lambda: None)()
    return x0_hat if x0_r is None else x0_r


def refuse_renoising(denoiser: DenoiserFn, sampler: str, why: str) -> None:
    """A ConfigError before the first step if ``denoiser`` renoises (CFG++), which ``sampler`` does not define."""
    if getattr(denoiser, "renoises", False):
        raise ConfigError(f"cfgpp is defined for first-order steps (ddim, ddpm, flow_euler), not for sampler "
                          f"{sampler!r}: {why}; use ddim (the Euler step of every schedule, edm included)")


def _check_finite(x: Tensor, step: int, t: Tensor, denoiser) -> None:
    if not torch.isfinite(x).all():
        raise FloatingPointError(
            f"non-finite values after sampling step {step} (t={float(t):.4g}) with {denoiser!r}; "
            "lower the guidance weight or check the model")


@torch.no_grad()
def ddim(denoiser: DenoiserFn, noise: Tensor, schedule: NoiseSchedule, steps: int, *, eta: float = 0.0,
         noise_sampler: Callable[[Tensor], Tensor] = torch.randn_like, progress: bool = False,
         times: Tensor | None = None, learned_variance: Callable[[], Tensor | None] | None = None) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) for any ``x_t = a x0 + s eps``; ``eta = 1`` is DDPM ancestral.

    ``x_next = a_next x0_hat + sqrt(s_next^2 - c^2) eps_hat + c z`` with the posterior std
    ``c = eta * s_next * sqrt(1 - (a_cur s_next / (a_next s_cur))^2)``; ``eps_hat`` is the noise of
    ``renoising_x0`` (CFG++: the unconditional ``eps_u``; in sigma units, ``x / a``, the k-diffusion Euler and Euler
    ancestral steps, eta = 0 and > 0).
    ``times`` (optional) continues a chain: ``noise`` is then the state ``x`` at ``times[0]`` itself
    (not rescaled) and the walk follows ``times`` instead of ``schedule.sampling_times(steps)``.

    Learned variance (``eta = 1`` and a backbone with ``learn_sigma``, e.g. DiT): the mean stays the
    posterior mean and the noise std becomes ``exp(log Sigma / 2)`` of improved DDPM eq. 15 between the
    step's ``beta = 1 - (a_cur / a_next)^2`` and the posterior variance ``c^2``, with ``v`` of the
    conditional call, asked of ``learned_variance()`` after each call (``GuidedDenoiser.learned_variance``, handed
    in by ``generate``; ``None``: the fixed posterior std), as the public DiT/ADM ``p_sample`` on respaced betas.
    """
    if not 0.0 <= eta <= 1.0:
        raise ConfigError(f"eta must lie in [0, 1], got {eta}")
    x = noise * schedule.prior_std if times is None else noise
    times = schedule.sampling_times(steps) if times is None else times
    for i, (t_cur, t_next) in _steps(times, progress, "ddpm" if eta == 1 else "ddim"):
        (a_cur, s_cur), (a_next, s_next) = schedule.alpha_sigma(t_cur), schedule.alpha_sigma(t_next)
        x0_hat = denoiser(x, t_cur)
        eps_hat = eps_from_x0(renoising_x0(denoiser, x0_hat), x, float(a_cur), float(s_cur))
        c = eta * s_next * (1 - (a_cur * s_next / (a_next * s_cur)) ** 2).clamp(min=0).sqrt()
        x = float(a_next) * x0_hat + float((s_next ** 2 - c ** 2).clamp(min=0).sqrt()) * eps_hat
        if c > 0:
            v = learned_variance() if eta == 1 and learned_variance is not None else None
            std = float(c) if v is None else (
                0.5 * learned_log_variance(v.to(x.dtype), 1 - (a_cur / a_next) ** 2, c ** 2)).exp()
            x = x + std * noise_sampler(x)
        _check_finite(x, i, t_cur, denoiser)
    return x


@torch.no_grad()
def edm_heun(denoiser: DenoiserFn, noise: Tensor, schedule: NoiseSchedule, steps: int, *,
             noise_sampler=None, progress: bool = False) -> Tensor:
    """EDM deterministic Heun 2nd-order sampler (Karras et al. 2022, Alg. 1): ``dx/dsigma = (x - D)/sigma``."""
    if not isinstance(schedule, EDMSchedule):
        raise ConfigError("sampler 'edm_heun' needs the 'edm' schedule")
    refuse_renoising(denoiser, "edm_heun", "its second-order correction has no CFG++ form")
    times = schedule.sampling_times(steps)
    x = noise * schedule.prior_std
    for i, (t_cur, t_next) in _steps(times, progress, "edm_heun"):
        d_cur = (x - denoiser(x, t_cur)) / float(t_cur)
        x_next = x + float(t_next - t_cur) * d_cur
        if t_next > 0:  # 2nd-order correction, skipped on the last step to sigma = 0
            d_prime = (x_next - denoiser(x_next, t_next)) / float(t_next)
            x_next = x + float(t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
        _check_finite(x, i, t_cur, denoiser)
    return x


@torch.no_grad()
def flow_euler(denoiser: DenoiserFn, noise: Tensor, schedule: NoiseSchedule, steps: int, *,
               noise_sampler=None, progress: bool = False) -> Tensor:
    """Euler on the flow ODE ``dx/dt = v = (x - x0_hat) / t`` from t = 1 to 0.

    With CFG++ (``renoising_x0`` ``x0_u``), DDIM's ``x_next = (1 - t_next) x0_hat + t_next eps_u`` on the flow path:
    the Euler step with ``v = (x - x0_u) / t``, plus ``(1 - t_next) (x0_hat - x0_u)`` (zero without CFG++)."""
    if not isinstance(schedule, FlowSchedule):
        raise ConfigError("sampler 'flow_euler' needs the 'flow' schedule")
    times = schedule.sampling_times(steps)
    x = noise * schedule.prior_std
    for i, (t_cur, t_next) in _steps(times, progress, "flow_euler"):
        x0_hat = denoiser(x, t_cur)
        x0_r = renoising_x0(denoiser, x0_hat)
        v = (x - x0_r) / float(t_cur)
        x = x + float(t_next - t_cur) * v + float(1 - t_next) * (x0_hat - x0_r)
        _check_finite(x, i, t_cur, denoiser)
    return x


@torch.no_grad()
def diffusers_scheduler(denoiser: DenoiserFn, noise: Tensor, schedule: NoiseSchedule, steps: int, *, scheduler: str,
                        noise_sampler=None, progress: bool = False,
                        learned_variance: Callable[[], Tensor | None] | None = None, prediction: str = "eps",
                        **options) -> Tensor:
    """diffusers' ``scheduler`` built from ``schedule`` (``schedulers.Scheduled``), stepped as a diffusers pipeline
    steps: ``x_T = noise * init_noise_sigma``, then per timestep ``x0 = D(x_model, t)`` and
    ``x = scheduler.step(model_output(x0), timestep, x)``. Its noise comes from ``noise_sampler``'s per-sample
    generators (``PerSampleNoise``); ``prediction``: the model's own target (what a VP scheduler is handed)."""
    refuse_renoising(denoiser, f"{PREFIX}{scheduler}", "a scheduler's step takes one model output, not a second "
                     "noise to renoise with")
    chain = Scheduled(scheduler, schedule, steps, options, prediction)
    generators = getattr(noise_sampler, "generators", None)
    x = noise * float(getattr(chain.scheduler, "init_noise_sigma", 1.0))  # FlowMatch: plain noise
    steps_bar = tqdm(list(enumerate(chain.timesteps)), desc=scheduler.removesuffix("Scheduler"), leave=False,
                     disable=None if progress else True)  # None: no bar off a terminal
    for i, timestep in steps_bar:
        t = chain.time(i, timestep)
        x_model = chain.model_input(x, timestep)
        x0 = denoiser(x_model, t)
        variance = learned_variance() if learned_variance is not None else None
        x = chain.step(chain.model_output(x0, x_model, t, variance), timestep, x, generators)
        _check_finite(x, i, t, denoiser)
    return x


SAMPLERS = {
    "ddpm": partial(ddim, eta=1.0),
    "ddim": ddim,
    "edm_heun": edm_heun,
    "flow_euler": flow_euler,
}


def get_sampler(name: str, **kwargs) -> Callable[..., Tensor]:
    """A sampler by name (``ddpm``, ``ddim``, ``edm_heun``, ``flow_euler``, or ``diffusers:<SchedulerClass>``:
    ``diffusers_scheduler``); kwargs such as ``eta``, or the scheduler's options."""
    if name.startswith(PREFIX):
        check_scheduler(name[len(PREFIX):], kwargs)
        return partial(diffusers_scheduler, scheduler=name[len(PREFIX):], **kwargs)
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)} or "
                          f"{PREFIX}<SchedulerClass> (e.g. {PREFIX}DPMSolverMultistepScheduler)")
    return partial(SAMPLERS[name], **kwargs) if kwargs else SAMPLERS[name]
