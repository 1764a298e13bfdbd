"""The optimal guidance direction ``grad_x log E_t`` by Monte Carlo, and what each guidance method uses instead.

Theorem 4.1 of the paper (docs/theory.md §1): the scaled joint ``p(x_{0:T}|y) R_0(x_0, y)`` is sampled by
``eps*_t = eps_t - s_t grad_x log E_t(x_t, y)`` with the expected future reward
``E_t(x_t, y) = ∫ p(x_0 | x_t, y) R_0(x_0, y) dx_0``. The oracle rolls the *conditional* chain (the
library's ``ddim`` sampler, DDPM for ``eta = 1``) from ``x_t`` to ``x_0`` ``rollouts`` times with
reparameterised noise, so ``log E_t ≈ logsumexp_r log R_0(x_0^r) - log(rollouts)`` is differentiable in
``x_t``; autograd gives its gradient. ``t`` is one of the schedule's sampling times: the chain takes
the remaining respaced steps, exactly as sampling would. At the clean end (``t = -1`` for ``vp``)
no step is left and ``E = R_0``; at the last step (``t = 0``) the DDPM step is deterministic, so
``E_0(x) = R_0(D(x, 0, y))``.

Every estimate is reported in the same units, an estimate of ``grad_x log E_t``: a guided noise
prediction ``eps_bar`` implies ``-(eps_bar - eps_c) / s_t``. For CFG that is ``grad log R_t`` with
``R_t = [p_t(x|y) / p_t(x)]^w``; for REG ``(I - s_t J)^T grad log R_t`` (``vjp``) or its diagonal
form (``paper``).
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
from einops import rearrange, repeat
from torch import Tensor
from tqdm.auto import tqdm

from lightning_reg.data.toy import ToyDistribution
from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.predictions import eps_from_x0
from lightning_reg.diffusion.samplers import ddim
from lightning_reg.errors import ConfigError, check_int
from lightning_reg.guidance import GuidedDenoiser, make_guidance

LogReward = Callable[[Tensor, Tensor], Tensor]  # (x_0 (N, D), y (N,)) -> log R_0 (N,)

# The sampler without its ``torch.no_grad`` decorator: the oracle differentiates through the chain.
differentiable_ddim = inspect.unwrap(ddim)

METHODS = ("cfg", "reg_paper", "reg_vjp")  # no-foresight estimates, compared with the "oracle"


def density_ratio_log_reward(distribution: ToyDistribution, w: float) -> LogReward:
    """``log R_0(x_0, y) = w (log p(x_0|y) - log p(x_0))`` with the toy's true densities (docs/theory.md §4)."""
    def log_reward(x0: Tensor, y: Tensor) -> Tensor:
        return w * (distribution.log_prob(x0, y) - distribution.unconditional.log_prob(x0))
    return log_reward


def sample_guided_target(distribution: ToyDistribution, label: int, log_reward: LogReward, n: int, *,
                         generator: torch.Generator | None = None, pool: int = 200_000) -> Tensor:
    """``n`` draws of the guided target ``p(x_0|y) R_0(x_0, y) / Z`` (the ``x_0`` marginal of the scaled joint,
    docs/theory.md §1) by sampling-importance-resampling: ``pool`` draws of ``p(x_0|y)`` resampled with weights
    ``R_0`` (float64, shape (n, D)); what guided samples should look like."""
    check_int("n", n)
    check_int("pool", pool, minimum=n)
    labels = torch.full((pool,), label, dtype=torch.long)
    x0 = distribution.sample(labels, generator)
    weights = log_reward(x0, labels).softmax(0)
    return x0[torch.multinomial(weights, n, replacement=True, generator=generator)]


def remaining_times(denoiser: Denoiser, steps: int, t: float) -> Tensor:
    """The sampling times from ``t`` to the clean end (``t`` must be one of ``sampling_times(steps)``)."""
    times = denoiser.schedule.sampling_times(steps)
    hits = (times == float(t)).nonzero()
    if not len(hits):
        raise ConfigError(f"t={float(t):g} is not one of the {steps}-step sampling times "
                          f"{[round(float(v)) for v in times]}; pass one of those")
    return times[int(hits[0]):]


def grad_log_expected_reward(denoiser: Denoiser, x_t: Tensor, t: float, y: Tensor, log_reward: LogReward,
                             steps: int, *, rollouts: int = 100, eta: float = 1.0,
                             generator: torch.Generator | None = None, batch_size: int = 8192) -> Tensor:
    """Monte Carlo ``grad_x log E_t(x_t, y)``, shape of ``x_t`` (N, D).

    ``rollouts`` chains per point with noise drawn from ``generator`` (independent of ``x_t``:
    reparameterised); ``eta = 0`` is the deterministic DDIM chain (one rollout then suffices).
    ``batch_size`` bounds the chains run at once (points x rollouts), which bounds memory.
    """
    check_int("rollouts", rollouts)
    times = remaining_times(denoiser, steps, t)
    chunk = max(1, batch_size // rollouts)
    return torch.cat([_grad_log_expected_reward(denoiser, x_t[i:i + chunk], times, y[i:i + chunk], log_reward,
                                                rollouts, eta, generator)
                      for i in range(0, len(x_t), chunk)])


def _grad_log_expected_reward(denoiser, x_t, times, y, log_reward, rollouts, eta, generator) -> Tensor:
    def noise_sampler(x: Tensor) -> Tensor:
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)

    with torch.inference_mode(False), torch.enable_grad():
        x = x_t.detach().clone().requires_grad_(True)
        labels = repeat(y, "n -> (r n)", r=rollouts)
        chain = GuidedDenoiser(denoiser, make_guidance("conditional"), labels)
        x0 = differentiable_ddim(chain, repeat(x, "n d -> (r n) d", r=rollouts), denoiser.schedule, len(times) - 1,
                                 eta=eta, noise_sampler=noise_sampler, times=times)
        log_r0 = rearrange(log_reward(x0, labels), "(r n) -> r n", r=rollouts)
        log_e = torch.logsumexp(log_r0, dim=0) - math.log(rollouts)
        (grad,) = torch.autograd.grad(log_e.sum(), x)
    return grad


def no_foresight_estimates(denoiser: Denoiser, x: Tensor, t: float, y: Tensor, w: float) -> dict[str, Tensor]:
    """CFG's ``grad log R_t`` and REG's rectified versions, each read off the library's guided denoiser.

    ``eps_bar = eps_c - s_t g``, so ``g = -(eps_bar - eps_c) / s_t`` (docs/theory.md §1-2).
    """
    a, s = denoiser.coefficients(t, x)
    with torch.no_grad():
        eps_c = eps_from_x0(denoiser(x, t, y), x, a, s)
    out = {}
    for method, reg in zip(METHODS, ("none", "paper", "vjp")):
        guided = GuidedDenoiser(denoiser, make_guidance("cfg", scale=w, reg=reg), y)
        eps_bar = eps_from_x0(guided(x, t), x, a, s)
        out[method] = -(eps_bar - eps_c) / s
    return out


def guidance_gradients(denoiser: Denoiser, x: Tensor, y: Tensor, w: float, log_reward: LogReward, steps: int, *,
                       rollouts: int = 100, eta: float = 1.0, generator: torch.Generator | None = None,
                       batch_size: int = 8192, progress: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """At every sampling step, every method's estimate of ``grad_x log E_t`` on the points ``x`` (N, D).

    Returns the step times (steps,) and ``{method: (steps, N, D)}`` for ``cfg``, ``reg_paper``,
    ``reg_vjp`` and ``oracle``.
    """
    times = denoiser.schedule.sampling_times(steps)[:-1]
    per_step = []
    for t in tqdm(times, desc="oracle per step", disable=not progress):
        est = no_foresight_estimates(denoiser, x, t, y, w)
        est["oracle"] = grad_log_expected_reward(denoiser, x, t, y, log_reward, steps, rollouts=rollouts, eta=eta,
                                                 generator=generator, batch_size=batch_size)
        per_step.append(est)
    return times, {k: torch.stack([est[k] for est in per_step]) for k in per_step[0]}
