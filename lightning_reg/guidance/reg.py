"""REG, the rectified gradient (Gao et al., ICML 2025; docs/theory.md §2), written once for every guidance method.

Guidance adds a term ``g`` to the conditional estimate (CFG: ``g = w(t) * (x0_c - x0_ref)``; APG,
CFG-Zero* and guidance rescale: other functions of the two predictions, ``base.py``). REG multiplies
whatever ``g`` a method returns by the chain-rule factor through the denoised estimate, in any
parameterisation:

* ``paper``: ``x0_bar = x0_c + f ⊙ g`` with ``f = a_t * grad_x(1^T x0_c) = a_t J^T 1`` (the authors'
  form; in eps units ``eps_c + w * d ⊙ (1 - s_t * grad_x(1^T eps_c))``)
* ``vjp``:   ``x0_bar = x0_c + a_t * J^T g`` with ``J = d x0_c / d x``  (exact first order; in eps
  units ``eps_c + w * (d - s_t * J_eps^T d)``)

Both cost one forward of the conditional branch with a graph plus one backward pass to ``x`` only;
the forward runs with detached weights (``torch.func.functional_call``), so the graph keeps only what
``d/dx`` needs (no layer inputs saved for weight gradients) and no weight ``.grad`` is ever touched.
Three cheaper forms of ``paper`` (docs/guidance.md, "Cheaper REG"; measured in benchmarks/):

* ``reuse``: the autograd factor every ``every`` guided calls of a chain (one per step for DDIM/DDPM and
  Euler, two for Heun), reused in between. What is kept is the
  eps-space row sum ``r = grad_x(1^T eps_c) = (1 - f) / s_t``, and a later step uses ``1 - s_t' r`` with its
  own ``s_t'`` (``REUSE_SPACE``; the x0-space alternative keeps ``grad_x(1^T x0_c) = f / a_t`` and uses
  ``a_t' f / a_t``, measured worse on the trained nets). ``every = 1`` is ``paper``.
* ``window``: ``paper`` while sampling progress lies in ``[start, stop]`` of ``window``, the plain method
  elsewhere (where REG's correction ``(f - 1) ⊙ g`` is small).
* ``graph_free``: for an ideal eps-model ``J`` is symmetric (a scaled Hessian of ``log p_t``), so
  ``J^T 1 ≈ J 1``, the derivative along the all-ones direction: the central difference
  ``(x0_c(x + h 1) - x0_c(x - h 1)) / 2h`` with ``h = FD_STEP * s_t``, run with the reference as CFG's branches
  are (``Guidance.branch_layout``: one forward of 3B, or three of B), with no autograd graph. ``x0_c`` is then the mean of the two probes, ``x0_c(x) + O(h^2)``; both are
  exact for a denoiser quadratic in ``x``.

Inference mode: tensors made under ``torch.inference_mode()`` (Lightning's validation and
``trainer.predict``, for instance) can never be saved for backward, and ``enable_grad`` alone does not
lift that. So the differentiable forward runs under ``inference_mode(False)`` and ``enable_grad()`` on
*clones* of ``x``, ``t`` and ``y`` (normal tensors: an embedding saves its label ids for backward);
the results are detached, so no graph outlives the step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_reg.errors import ConfigError

if TYPE_CHECKING:
    from lightning_reg.guidance.base import Guidance, GuidanceStep

REG_MODES = ("none", "paper", "vjp", "reuse", "window", "graph_free")
AUTOGRAD_FORMS = ("paper", "vjp")
REUSE_SPACE = "eps"  # what ``reuse`` keeps between steps: "eps" (r, rescaled by s_t) or "x0" (by a_t)
FD_STEP = 1e-2  # graph_free's finite-difference step in units of s_t
DEFAULT_EVERY = 2
DEFAULT_WINDOW = (0.0, 0.5)


def rectified_guidance(conditional: nn.Module, x: Tensor, t: Tensor | float, y: Tensor, a_t: Tensor,
                       guidance_term: Callable[[Tensor], Tensor], mode: str) -> tuple[Tensor, Tensor]:
    """``(x0_c, a_t * factor(g))`` for the autograd forms ``mode`` in (``paper``, ``vjp``); the guided estimate
    is their sum.

    ``conditional(x, t, y)`` is the conditional denoiser ``x0_c``, run with detached weights so the graph
    holds only what ``d/dx`` needs; ``guidance_term(x0_c)`` returns the weighted, channel-masked ``g``
    (a constant: the reference prediction carries no graph).
    """
    if mode not in AUTOGRAD_FORMS:
        raise ValueError(f"REG mode {mode!r} has no autograd rectification; expected 'paper' or 'vjp'")
    with torch.inference_mode(False), torch.enable_grad():
        x_in = x.detach().clone().requires_grad_(True)
        weights = {name: p.detach() for name, p in conditional.named_parameters()}
        x0_c = functional_call(conditional, weights, (x_in, t.clone() if isinstance(t, Tensor) else t, y.clone()))
        g = guidance_term(x0_c.detach())
        # paper: grad_x(1^T x0_c) ⊙ g;  vjp: J^T g.  An x0_c that ignores x has factor 0.
        outputs, grad_outputs = (x0_c.sum(), None) if mode == "paper" else (x0_c, g)
        factor = (torch.autograd.grad(outputs, x_in, grad_outputs=grad_outputs, materialize_grads=True)[0]
                  if x0_c.requires_grad else torch.zeros_like(x_in))
        rectified = factor * g if mode == "paper" else factor
    return x0_c.detach(), a_t * rectified


def paper_factor(conditional: nn.Module, x: Tensor, t: Tensor | float, y: Tensor, a_t: Tensor) -> tuple[Tensor, Tensor]:
    """``(x0_c, f)`` with the paper form's factor ``f = a_t * grad_x(1^T x0_c)`` by autograd."""
    return rectified_guidance(conditional, x, t, y, a_t, torch.ones_like, "paper")


def reused_factor(f: Tensor, a_then: Tensor, s_then: Tensor, a_now: Tensor, s_now: Tensor,
                  space: str = REUSE_SPACE) -> Tensor:
    """The factor ``f`` computed at ``(a_then, s_then)``, carried to ``(a_now, s_now)``: ``eps`` keeps the row
    sum ``r = (1 - f) / s`` and returns ``1 - s_now r``; ``x0`` keeps ``f / a`` and returns ``a_now f / a_then``."""
    if space == "eps":
        return 1 - s_now * (1 - f) / s_then
    if space == "x0":
        return a_now * f / a_then
    raise ValueError(f"unknown reuse space {space!r}; expected 'eps' or 'x0'")


def finite_difference_factor(guidance: "Guidance", model, x: Tensor, t: Tensor | float, y: Tensor,
                             step: "GuidanceStep") -> tuple[Tensor, Tensor, Tensor]:
    """``(x0_c, x0_ref, f)`` from 3B rows without graph: ``f = a_t (x0_c(x + h 1) - x0_c(x - h 1)) / 2h``, i.e.
    ``a_t J 1`` in place of the paper's ``a_t J^T 1``; ``x0_c`` the mean of the two probes, ``h = FD_STEP * s_t``."""
    h = FD_STEP * step.s
    x0_probes, x0_ref = guidance.conditional_and_reference(model, x, t, y, x_cond=torch.cat([x + h, x - h]))
    x0_plus, x0_minus = x0_probes.chunk(2)
    v = getattr(model, "variance_interpolation", None)
    if v is not None and len(v) == 2 * len(x):  # batched: the probes' mean, as x0_c; split: the x - h probe's
        model.variance_interpolation = sum(v.chunk(2)) / 2
    return (x0_plus + x0_minus) / 2, x0_ref, step.a * (x0_plus - x0_minus) / (2 * h)


class Rectifier:
    """REG ``mode`` with its options (``every`` for ``reuse``, ``window`` for ``window``; module docstring)."""

    def __init__(self, mode: str = "none", every: int = DEFAULT_EVERY, window: Sequence[float] = DEFAULT_WINDOW):
        if mode not in REG_MODES:
            raise ConfigError(f"unknown REG mode {mode!r}; choose one of {list(REG_MODES)}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"reg_every must be an integer >= 1 (reuse's factor every k guided calls), got {every!r}")
        window = tuple(window)
        if (len(window) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in window)
                or not 0.0 <= window[0] <= window[1] <= 1.0):
            raise ConfigError(f"reg_window must be [start, stop] with 0 <= start <= stop <= 1 (sampling progress), "
                              f"got {list(window)!r}")
        self.mode, self.every, self.window = mode, every, tuple(float(v) for v in window)

    def active(self, progress: float) -> bool:
        """Whether REG rectifies at sampling progress ``progress``."""
        if self.mode == "window":
            return self.window[0] <= progress <= self.window[1]
        return self.mode != "none"

    def cached_factor(self, x: Tensor, step: "GuidanceStep") -> Tensor | None:
        """``reuse``: the chain's factor carried to this call while it is fresh (fewer than ``every`` guided calls
        since it was computed), else ``None``."""
        cache = step.state.values.get("reg_factor") if self.mode == "reuse" else None
        if cache is None or cache["left"] == 0 or cache["f"].shape != x.shape:
            return None
        cache["left"] -= 1
        return reused_factor(cache["f"], cache["a"], cache["s"], step.a, step.s)

    def guided_x0(self, guidance: "Guidance", model, x: Tensor, t: Tensor | float, y: Tensor, w: float,
                  step: "GuidanceStep") -> Tensor:
        """``x0_c + g`` with ``g`` rectified (channels outside ``guidance_channels`` keep ``x0_c``)."""
        f = self.cached_factor(x, step)
        with torch.no_grad():
            if self.mode == "graph_free":
                x0_c, x0_ref, f = finite_difference_factor(guidance, model, x, t, y, step)
            elif f is not None:  # reuse: CFG's own forward
                x0_c, x0_ref = guidance.conditional_and_reference(model, x, t, y)
            else:
                x0_ref = guidance.reference_x0(model, x, t, y)
        if self.mode == "vjp":
            x0_c, rectified = rectified_guidance(model, x, t, y, step.a,
                                                 lambda x0_c: guidance._term(x0_c, x0_ref, w, step), "vjp")
            return x0_c + guidance._masked(rectified)
        if f is None:
            x0_c, f = paper_factor(model, x, t, y, step.a)
            if self.mode == "reuse":
                step.state.values["reg_factor"] = {"left": self.every - 1, "f": f, "a": step.a, "s": step.s}
        return x0_c + guidance._masked(f * guidance._term(x0_c, x0_ref, w, step))

    def __repr__(self):
        return f"Rectifier({self.mode!r}, every={self.every}, window={list(self.window)})"
