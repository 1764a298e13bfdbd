"""Guidance methods (docs/theory.md §3): one small rule each (``rule.py``); every one takes every branch option
(``branches.py``) and every REG mode (``reg.py``), composed by ``guided.make_guidance``."""

from __future__ import annotations

import math

import torch

from lightning_reg.errors import ConfigError, check_int, check_number
from lightning_reg.guidance.rule import GuidanceRule
from lightning_reg.guidance.step import sample_dims


class Conditional(GuidanceRule):
    """No guidance: the conditional prediction alone (``w = 0``)."""

    name = "conditional"
    fixed = ("scale", "convention")  # set here, not by the user

    def __init__(self, **kwargs):
        super().__init__(scale=0.0, convention="w", **kwargs)


class CFG(GuidanceRule):
    """Classifier-free guidance with a constant weight: ``eps_c + w (eps_c - eps_null)``."""

    name = "cfg"


class IntervalCFG(GuidanceRule):
    """CFG only for ``t_lo <= t <= t_hi`` (Kynkäänniemi et al. 2024), the conditional prediction outside.

    Times are in the schedule's own unit: DDPM index for ``vp`` (DiT: [205, 502] of 1000), sigma for
    ``edm`` (EDM2: [0.28, 2.90]), t for ``flow``. At least one bound must be given (an unset ``t_lo`` is 0, an
    unset ``t_hi`` infinity): without either the method would be plain CFG under another name.
    """

    name = "interval"

    def __init__(self, scale: float = 1.0, t_lo: float | None = None, t_hi: float | None = None, **kwargs):
        super().__init__(scale, **kwargs)
        if t_lo is None and t_hi is None:
            raise ConfigError("interval needs t_lo and/or t_hi, in the schedule's time unit (DDPM index, sigma or "
                              "flow t; DiT: t_lo: 205, t_hi: 502); without them it is plain cfg")
        self.t_lo = 0.0 if t_lo is None else check_number("interval t_lo", t_lo)
        self.t_hi = float("inf") if t_hi is None else check_number("interval t_hi", t_hi)
        if self.t_lo > self.t_hi:
            raise ConfigError(f"inverted guidance interval: t_lo={t_lo} > t_hi={t_hi}")

    def weight(self, t, schedule):
        return self.w if self.t_lo <= float(t) <= self.t_hi else 0.0


class LinearCFG(GuidanceRule):
    """Weight moving linearly with sampling progress ``p``: ``w(t) = w + (w_end - w) * p``.

    ``scale_end`` is read in the same convention as ``scale``; unset, it is "no guidance" (``w_end = 0``).
    """

    name = "linear"

    def __init__(self, scale: float = 1.0, scale_end: float | None = None, **kwargs):
        super().__init__(scale, **kwargs)
        self.w_end = 0.0 if scale_end is None else self.to_w(
            check_number("linear scale_end", scale_end), self.convention, "scale_end")

    @property
    def guides(self):
        return self.w > 0 or self.w_end > 0

    def weight(self, t, schedule):
        p = schedule.progress(t)
        return self.w + (self.w_end - self.w) * p


class CosineCFG(GuidanceRule):
    """MDT's cosine schedule ``w2(t) = w2 * (1 - cos(pi p^s)) / 2`` applied as ``eps_u + w2(t) d``.

    In our convention the guidance term is ``(w2(t) - 1) d``, and that is what REG multiplies. (The
    authors' cosine+REG patch multiplies ``w2(t) d`` instead, an off-by-one in the weight; we follow
    the math.)
    """

    name = "cosine"

    def __init__(self, scale: float = 1.0, power: float = 1.0, **kwargs):
        super().__init__(scale, **kwargs)
        self.power = check_number("cosine power", power, minimum=0.0)

    def weight(self, t, schedule):
        w2 = self.w + 1.0
        p = schedule.progress(t)
        return w2 * (1 - math.cos(math.pi * p ** self.power)) / 2 - 1.0


class Autoguidance(GuidanceRule):
    """Autoguidance (Karras et al. 2024): CFG's rule with a weaker model given the *same* conditions as the
    reference (the branches' ``reference``, a smaller or earlier ``Denoiser``; ``sample.py`` loads it from
    ``reference_checkpoint``). Every other method takes a ``reference`` the same way."""

    name = "autoguidance"
    needs_reference_model = True


class APG(GuidanceRule):
    """Adaptive projected guidance (Sadat et al. 2024, Algorithm 1) on the denoised prediction ``x0``.

    ``d = x0_c - x0_ref``; with ``momentum`` beta, ``d`` is replaced by the chain's running ``m = d + beta m``;
    with ``norm_threshold`` r > 0 it is scaled by ``min(1, r / ||d||)``; then split into ``d_par``, its
    projection on ``x0_c``, and ``d_orth = d - d_par`` (per sample, over all non-batch dims):
    ``g = w (d_orth + eta d_par)``. ``eta = 1`` without threshold or momentum is CFG.
    """

    name = "apg"

    def __init__(self, scale: float = 1.0, eta: float = 0.0, norm_threshold: float = 0.0, momentum: float = 0.0,
                 **kwargs):
        super().__init__(scale, **kwargs)
        self.eta = check_number("apg eta", eta)
        self.norm_threshold = check_number("apg norm_threshold", norm_threshold, minimum=0.0)
        self.momentum = check_number("apg momentum", momentum)

    def guidance_term(self, x0_c, x0_ref, w, step):
        d = x0_c - x0_ref
        if self.momentum:
            d = d + self.momentum * step.state.values.get("apg_average", 0.0)
            step.state.values["apg_average"] = d
        dims = sample_dims(d)
        if self.norm_threshold > 0:
            norm = torch.linalg.vector_norm(d, dim=dims, keepdim=True)
            d = d * (self.norm_threshold / norm).clamp(max=1.0)
        unit = x0_c / torch.linalg.vector_norm(x0_c, dim=dims, keepdim=True).clamp(min=1e-12)
        parallel = (d * unit).sum(dim=dims, keepdim=True) * unit
        return w * (d - parallel + self.eta * parallel)


class CFGZeroStar(GuidanceRule):
    """CFG-Zero* (Fan et al. 2025) on the flow velocity ``v = eps - x0`` (every schedule, ``GuidanceStep``).

    ``v = v_c + w (v_c - s* v_ref)`` with the per-sample optimised scale ``s* = <v_c, v_ref> / ||v_ref||^2``;
    for the chain's first ``zero_init_steps`` steps (distinct times) ``v = 0``: ``x0_hat = eps_hat =
    x / (a_t + s_t)`` (flow: ``x0_hat = x``, Euler keeps ``x``). Both apply only when ``w > 0``; a zeroed
    step has no guidance term, so REG leaves it alone. A learned-sigma network (DiT) still runs its conditional
    branch on a zeroed step, for the variance the DDPM sampler asks.
    """

    name = "cfg_zero_star"

    def __init__(self, scale: float = 1.0, zero_init_steps: int = 1, **kwargs):
        super().__init__(scale, **kwargs)
        self.zero_init_steps = check_int("cfg_zero_star zero_init_steps", zero_init_steps, minimum=0)

    def guidance_term(self, x0_c, x0_ref, w, step):
        v_c, v_ref = step.velocity(x0_c), step.velocity(x0_ref)
        dims = sample_dims(v_c)
        norm2 = (v_ref * v_ref).sum(dim=dims, keepdim=True).clamp(min=torch.finfo(v_ref.dtype).tiny)
        s_star = (v_c * v_ref).sum(dim=dims, keepdim=True) / norm2
        return step.x0_from_velocity(v_c + w * (v_c - s_star * v_ref)) - step.x0_from_velocity(v_c)

    def replacement(self, step):
        if step.state.step >= self.zero_init_steps:
            return None
        return step.x0_from_velocity(torch.zeros_like(step.x))


GUIDANCE = {cls.name: cls for cls in (Conditional, CFG, IntervalCFG, LinearCFG, CosineCFG, Autoguidance, APG,
                                      CFGZeroStar)}
