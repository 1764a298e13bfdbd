"""Guidance methods (docs/theory.md §3): one small rule each (``rule.py``); every one takes every branch option
(``branches.py``) and every REG mode (``reg.py``), composed by ``guided.make_guidance``."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_reg.errors import ConfigError, check_int, check_number
from lightning_reg.guidance.rule import GuidanceRule
from lightning_reg.guidance.step import GuidanceStep, sample_dims


def damp_parallel(d: Tensor, direction: Tensor, eta: float) -> Tensor:
    """``d_orth + eta d_par``: ``d`` with its part parallel to ``direction`` (per sample) weighted by ``eta``."""
    dims = sample_dims(d)
    unit = direction / torch.linalg.vector_norm(direction, dim=dims, keepdim=True).clamp(min=1e-12)
    parallel = (d * unit).sum(dim=dims, keepdim=True) * unit
    return d - parallel + eta * parallel


def term_in_space(to_space: Callable[[Tensor], Tensor], to_x0: Callable[[Tensor], Tensor], x0_c: Tensor,
                  x0_ref: Tensor, term: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """A term ``h = term(o_c, o_ref)`` written on the predictions in another space (``to_space``: x0 to it,
    ``to_x0``: back), in x0 units: ``x0(o_c + h) - x0(o_c)``."""
    o_c, o_ref = to_space(x0_c), to_space(x0_ref)
    return to_x0(o_c + term(o_c, o_ref)) - to_x0(o_c)


class Conditional(GuidanceRule):
    """No guidance: the conditional prediction alone (``w = 0``)."""

    name = "conditional"
    fixed = ("scale", "convention")  # set here, not by the user

    def __init__(self, **kwargs):
        super().__init__(scale=0.0, convention="w", **kwargs)


class CFG(GuidanceRule):
    """Classifier-free guidance with a constant weight: ``eps_c + w (eps_c - eps_null)``."""

    name = "cfg"


class CFGPlusPlus(GuidanceRule):
    """CFG++ (Chung et al. 2024, arXiv 2406.08070): CFG's ``x0_g = x0_u + lam d`` with ``lam`` in [0, 1], renoised
    with the *unconditional* noise, the DDIM step ``x_next = a_next x0_g + s_next eps_u``, ``eps_u = (x - a_t x0_u) /
    s_t`` (the samplers take ``x0_u`` from ``GuidedDenoiser.renoising_x0``).

    ``lam`` is the weight in the ``w2`` convention (``scale: lam, convention: w2``); in ``w``, ``w = lam - 1`` in
    [-1, 0]. The term is CFG's ``w (x0_c - x0_ref)``, so REG rectifies it as any other; the renoising is not.
    ``scale`` has no default: the paper's ``lam`` and our ``w`` differ by one.
    """

    name = "cfgpp"
    renoises = True

    def __init__(self, scale: float | None = None, **kwargs):
        if scale is None:
            raise ConfigError("cfgpp needs scale: the paper's lambda in [0, 1] with convention: w2 (e.g. {method: "
                              "cfgpp, scale: 0.6, convention: w2}), or w = lambda - 1 in [-1, 0]")
        super().__init__(scale, **kwargs)

    @staticmethod
    def to_w(value: float, convention: str, field: str) -> float:
        """``w = lam - 1``; refuses ``lam`` outside [0, 1]."""
        w = value - 1.0 if convention == "w2" else value
        if not -1.0 <= w <= 0.0:
            raise ConfigError(f"cfgpp {field}={value} ({convention} convention) is lambda = {w + 1:g}, outside "
                              "CFG++'s [0, 1]: give lambda with convention: w2 (e.g. {method: cfgpp, scale: 0.6, "
                              "convention: w2}) or w = lambda - 1 in [-1, 0]")
        return w

    @property
    def guides(self):
        return True  # the unconditional prediction renoises at every lam, 1 included


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
        self.eta = check_number(f"{self.name} eta", eta)
        self.norm_threshold = check_number(f"{self.name} norm_threshold", norm_threshold, minimum=0.0)
        self.momentum = check_number(f"{self.name} momentum", momentum)

    def running_difference(self, d: Tensor, step: GuidanceStep) -> Tensor:
        """``d``, or with ``momentum`` beta the chain's running ``m = d + beta m`` (kept in its state)."""
        if self.momentum:
            d = d + self.momentum * step.state.values.get("apg_average", 0.0)
            step.state.values["apg_average"] = d
        return d

    def guidance_term(self, x0_c, x0_ref, w, step):
        d = self.running_difference(x0_c - x0_ref, step)
        if self.norm_threshold > 0:
            norm = torch.linalg.vector_norm(d, dim=sample_dims(d), keepdim=True)
            d = d * (self.norm_threshold / norm).clamp(max=1.0)
        return w * damp_parallel(d, x0_c, self.eta)


class APGMix(APG):
    """APG after a CFG phase (HunyuanImage 2.1; diffusers' ``AdaptiveProjectedMixGuidance``), on ``x0`` as APG.

    CFG's ``w d`` for the chain's steps ``<= apg_start_step``, then APG's term with its own weight ``w_apg``
    (``apg_scale``, in ``convention``; unset: ``w``). The momentum runs over both phases, so APG starts from the
    CFG phase's running average.
    """

    name = "apg_mix"

    def __init__(self, scale: float = 1.0, apg_scale: float | None = None, apg_start_step: int = 5, **kwargs):
        super().__init__(scale, **kwargs)
        self.w_apg = self.w if apg_scale is None else self.to_w(
            check_number("apg_mix apg_scale", apg_scale), self.convention, "apg_scale")
        self.apg_start_step = check_int("apg_mix apg_start_step", apg_start_step, minimum=0)

    def guidance_term(self, x0_c, x0_ref, w, step):
        if step.state.step > self.apg_start_step:
            return super().guidance_term(x0_c, x0_ref, self.w_apg, step)
        self.running_difference(x0_c - x0_ref, step)
        return w * (x0_c - x0_ref)


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
        def term(v_c, v_ref):
            dims = sample_dims(v_c)
            norm2 = (v_ref * v_ref).sum(dim=dims, keepdim=True).clamp(min=torch.finfo(v_ref.dtype).tiny)
            s_star = (v_c * v_ref).sum(dim=dims, keepdim=True) / norm2
            return w * (v_c - s_star * v_ref)

        return term_in_space(step.velocity, step.x0_from_velocity, x0_c, x0_ref, term)

    def replacement(self, step):
        if step.state.step >= self.zero_init_steps:
            return None
        return step.x0_from_velocity(torch.zeros_like(step.x))


class MamboG(GuidanceRule):
    """MAMBO-G (Zhu et al. 2025): CFG with its weight damped where the guidance is large against the prediction,
    ``w exp(-alpha r)``, ``r = ||v_c - v_ref|| / ||v_ref||`` per sample on the flow velocity ``v = eps - x0`` (every
    schedule, as CFG-Zero*: the space of the paper's flow models). Only ``r`` depends on the space:
    ``g = w exp(-alpha r) (x0_c - x0_ref)``."""

    name = "mambo_g"

    def __init__(self, scale: float = 1.0, alpha: float = 8.0, **kwargs):
        super().__init__(scale, **kwargs)
        self.alpha = check_number("mambo_g alpha", alpha, minimum=0.0)

    def guidance_term(self, x0_c, x0_ref, w, step):
        v_c, v_ref = step.velocity(x0_c), step.velocity(x0_ref)
        dims = sample_dims(v_c)
        norm_ref = torch.linalg.vector_norm(v_ref, dim=dims, keepdim=True).clamp(min=torch.finfo(v_ref.dtype).tiny)
        ratio = torch.linalg.vector_norm(v_c - v_ref, dim=dims, keepdim=True) / norm_ref
        return w * torch.exp(-self.alpha * ratio) * (x0_c - x0_ref)


class TCFG(GuidanceRule):
    """Tangential damping CFG (Kwon et al. 2025) in the output space (``GuidanceStep.output``: eps for VP and EDM,
    as the paper's scores; the velocity for flow, what diffusers hands its guider there).

    Per sample, ``v1`` is the top right-singular vector of the 2-row matrix ``[o_c; o_ref]``; the reference keeps
    its part along ``v1`` only (the tangential part, along ``v2``, is dropped): ``o_ref' = <o_ref, v1> v1``,
    ``o = o_c + w (o_c - o_ref')``, the term taken back to x0 units.
    """

    name = "tcfg"

    def guidance_term(self, x0_c, x0_ref, w, step):
        def term(o_c, o_ref):
            rows = torch.stack([o_c.flatten(1), o_ref.flatten(1)], dim=1)
            v1 = torch.linalg.svd(rows, full_matrices=False).Vh[:, :1]  # (B, 1, D)
            o_ref_normal = (rows[:, 1:] @ v1.mT @ v1).view_as(o_ref)
            return w * (o_c - o_ref_normal)

        return term_in_space(step.output, step.to_x0, x0_c, x0_ref, term)


PYRAMID_TAPS = (1.0, 4.0, 6.0, 4.0, 1.0)  # the 5-tap binomial filter (/16) of Burt & Adelson's pyramid


def pyramid_blur(x: Tensor) -> Tensor:
    """The pyramid's 5x5 binomial blur per channel, reflect-padded (kornia's ``filter2d`` in ``pyrdown``/``pyrup``)."""
    taps = x.new_tensor(PYRAMID_TAPS) / 16
    kernel = (taps[:, None] * taps[None, :]).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=x.shape[1])


def pyramid_up(x: Tensor) -> Tensor:
    """Double the size (bilinear), then blur: kornia's ``pyrup``."""
    return pyramid_blur(F.interpolate(x, size=(2 * x.shape[-2], 2 * x.shape[-1]), mode="bilinear",
                                      align_corners=False))


def laplacian_pyramid(x: Tensor, levels: int) -> list[Tensor]:
    """``levels`` bands of ``x`` (B, C, H, W; sides divisible by ``2^(levels-1)``), finest first, as kornia's
    ``build_laplacian_pyramid``: ``G_k - up(G_{k+1})`` and the last Gaussian level, ``G_{k+1}`` the blurred
    ``G_k`` halved (bilinear)."""
    gaussian = [x]
    for _ in range(levels - 1):
        finer = gaussian[-1]
        gaussian.append(F.interpolate(pyramid_blur(finer), size=(finer.shape[-2] // 2, finer.shape[-1] // 2),
                                      mode="bilinear", align_corners=False))
    return [g - pyramid_up(coarser) for g, coarser in zip(gaussian, gaussian[1:])] + [gaussian[-1]]


def from_pyramid(bands: list[Tensor]) -> Tensor:
    """The image of Laplacian ``bands`` (inverse of ``laplacian_pyramid``): ``up(...up(b_last) + ...) + b_0``."""
    image = bands[-1]
    for band in reversed(bands[:-1]):
        image = pyramid_up(image) + band
    return image


class FDG(GuidanceRule):
    """Frequency-decoupled guidance (Sadat et al. 2025) on ``x0``: CFG per band of a Laplacian pyramid.

    ``d = x0_c - x0_ref`` and ``x0_c`` split into ``levels`` bands (finest first); band ``k`` of ``d`` with its part
    parallel to band ``k`` of ``x0_c`` weighted ``eta`` is ``h_k``; the last band (the low-pass residue) is
    weighted ``w_low`` (``scale_low``, in ``convention``; unset: no low-frequency guidance), the others ``w``:
    ``g = sum_k up^k(w_k h_k)``. ``w_low = w``, ``eta = 1`` is CFG (the pyramid inverts exactly). Images whose
    sides are not divisible by ``2^(levels-1)`` are reflect-padded to the next multiple, ``g`` cropped back.
    ``w(t)``, the larger of the two weights, only switches guidance on.
    """

    name = "fdg"

    def __init__(self, scale: float = 1.0, scale_low: float | None = None, levels: int = 2, eta: float = 1.0,
                 **kwargs):
        super().__init__(scale, **kwargs)
        self.w_low = 0.0 if scale_low is None else self.to_w(
            check_number("fdg scale_low", scale_low), self.convention, "scale_low")
        self.levels = check_int("fdg levels", levels, minimum=2)
        self.eta = check_number("fdg eta", eta)

    @property
    def guides(self):
        return self.w > 0 or self.w_low > 0

    def weight(self, t, schedule):
        return max(self.w, self.w_low)

    def guidance_term(self, x0_c, x0_ref, w, step):
        smallest = 3 * 2 ** (self.levels - 2)  # the coarsest blurred level keeps 3 pixels for the reflect padding
        if x0_c.ndim != 4 or min(x0_c.shape[-2:]) < smallest:
            raise ConfigError(f"fdg with levels={self.levels} needs images (C, H, W) at least {smallest} pixels a "
                              f"side; the samples are {tuple(x0_c.shape[1:])}")
        height, width = x0_c.shape[-2:]
        stride = 2 ** (self.levels - 1)
        padding = (0, -width % stride, 0, -height % stride)
        d_bands, c_bands = (laplacian_pyramid(F.pad(p, padding, mode="reflect"), self.levels) for p in
                            (x0_c - x0_ref, x0_c))
        weights = [self.w] * (self.levels - 1) + [self.w_low]
        g = from_pyramid([w_k * damp_parallel(d_k, c_k, self.eta) for w_k, d_k, c_k in zip(weights, d_bands, c_bands)])
        return g[..., :height, :width]


GUIDANCE = {cls.name: cls for cls in (Conditional, CFG, CFGPlusPlus, IntervalCFG, LinearCFG, CosineCFG, Autoguidance,
                                      APG, CFGZeroStar, APGMix, FDG, MamboG, TCFG)}
