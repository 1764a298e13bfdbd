"""REG, the rectified gradient (Gao et al., ICML 2025; docs/theory.md §2), written once for every guidance method.

Guidance adds a term ``g`` to the conditional estimate (CFG: ``g = w(t) * (x0_c - x0_ref)``; APG,
CFG-Zero* and guidance rescale: other functions of the two predictions; ``rule.py``, ``branches.py``; with PAG,
SEG or SLG terms, ``perturbed.py``, the sum of all terms, their references constants). REG is a
strategy over both: it multiplies whatever ``g`` a method returns by the chain-rule factor through the denoised
estimate, in any parameterisation:

* ``paper``: ``x0_bar = x0_c + f ⊙ g`` with ``f = a_t * grad_x(1^T x0_c) = a_t J^T 1`` (the authors'
  form; in eps units ``eps_c + w * d ⊙ (1 - s_t * grad_x(1^T eps_c))``)
* ``vjp``:   ``x0_bar = x0_c + a_t * J^T g`` with ``J = d x0_c / d x``  (exact first order; in eps
  units ``eps_c + w * (d - s_t * J_eps^T d)``)

Both cost one forward of the conditional branch with a graph plus one backward pass to ``x`` only;
the forward runs with detached weights (``branches.DifferentiableBranch``), so the graph keeps only what
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
  are (``Branches.layout``: one forward of 3B, or three of B), with no autograd graph. ``x0_c`` is then the mean of the two probes, ``x0_c(x) + O(h^2)``; both are
  exact for a denoiser quadratic in ``x``.

Inference mode: tensors made under ``torch.inference_mode()`` (Lightning's validation and
``trainer.predict``, for instance) can never be saved for backward, and ``enable_grad`` alone does not
lift that. So the differentiable forward runs under ``inference_mode(False)`` and ``enable_grad()`` on
*clones* of ``x``, ``t`` and ``y`` (normal tensors: an embedding saves its label ids for backward);
the results are detached, so no graph outlives the step. The learned variance (DiT) comes from the same
conditional forward as ``x0_c``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from lightning_reg.diffusion.conditions import Condition
from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.errors import ConfigError, check_int
from lightning_reg.guidance.branches import Branches
from lightning_reg.guidance.step import GuidanceStep

REG_MODES = ("none", "paper", "vjp", "reuse", "window", "graph_free")
AUTOGRAD_FORMS = ("paper", "vjp")
REUSE_SPACE = "eps"  # what ``reuse`` keeps between steps: "eps" (r, rescaled by s_t) or "x0" (by a_t)
FD_STEP = 1e-2  # graph_free's finite-difference step in units of s_t
DEFAULT_EVERY = 2
DEFAULT_WINDOW = (0.0, 0.5)

Term = Callable[[Tensor, Tensor | None], Tensor]  # (x0_c, x0_ref) -> the applied guidance term g


def rectified_guidance(conditional: Callable[[Tensor], Tensor], x: Tensor, a_t: Tensor,
                       guidance_term: Callable[[Tensor], Tensor], mode: str) -> tuple[Tensor, Tensor]:
    """``(x0_c, a_t * factor(g))`` for the autograd forms ``mode`` in (``paper``, ``vjp``); the guided estimate
    is their sum.

    ``conditional(x)`` is the conditional denoiser ``x0_c`` (``Branches.differentiable``: detached weights);
    ``guidance_term(x0_c)`` returns the applied ``g`` (a constant: the reference prediction carries no graph).
    """
    if mode not in AUTOGRAD_FORMS:
        raise ValueError(f"REG mode {mode!r} has no autograd rectification; expected 'paper' or 'vjp'")
    with torch.inference_mode(False), torch.enable_grad():
        x_in = x.detach().clone().requires_grad_(True)
        x0_c = conditional(x_in)
        g = guidance_term(x0_c.detach())
        # paper: grad_x(1^T x0_c) ⊙ g;  vjp: J^T g.  An x0_c that ignores x has factor 0.
        outputs, grad_outputs = (x0_c.sum(), None) if mode == "paper" else (x0_c, g)
        factor = (torch.autograd.grad(outputs, x_in, grad_outputs=grad_outputs, materialize_grads=True)[0]
                  if x0_c.requires_grad else torch.zeros_like(x_in))
        rectified = factor * g if mode == "paper" else factor
    return x0_c.detach(), a_t * rectified


def paper_factor(conditional: Callable[[Tensor], Tensor], x: Tensor, a_t: Tensor) -> tuple[Tensor, Tensor]:
    """``(x0_c, f)`` with the paper form's factor ``f = a_t * grad_x(1^T x0_c)`` by autograd."""
    return rectified_guidance(conditional, x, a_t, torch.ones_like, "paper")


def reused_factor(f: Tensor, a_then: Tensor, s_then: Tensor, a_now: Tensor, s_now: Tensor,
                  space: str = REUSE_SPACE) -> Tensor:
    """The factor ``f`` computed at ``(a_then, s_then)``, carried to ``(a_now, s_now)``: ``eps`` keeps the row
    sum ``r = (1 - f) / s`` and returns ``1 - s_now r``; ``x0`` keeps ``f / a`` and returns ``a_now f / a_then``."""
    if space == "eps":
        return 1 - s_now * (1 - f) / s_then
    if space == "x0":
        return a_now * f / a_then
    raise ValueError(f"unknown reuse space {space!r}; expected 'eps' or 'x0'")


def finite_difference_factor(branches: Branches, model: Denoiser, x: Tensor, t, y: Condition, step: GuidanceStep,
                             reference: bool = True):
    """``(x0_c, x0_ref, f, v_c)`` from 3B rows without graph (2B without the ``reference``):
    ``f = a_t (x0_c(x + h 1) - x0_c(x - h 1)) / 2h``, i.e. ``a_t J 1`` in place of the paper's ``a_t J^T 1``;
    ``x0_c`` (and a learned variance ``v_c``) the mean of the two probes, ``h = FD_STEP * s_t``."""
    h = FD_STEP * step.s
    x0_probes, x0_ref, v = branches.predict(model, x, t, y, x_cond=torch.cat([x + h, x - h]), reference=reference)
    x0_plus, x0_minus = x0_probes.chunk(2)
    v = None if v is None else sum(v.chunk(2)) / 2
    return (x0_plus + x0_minus) / 2, x0_ref, step.a * (x0_plus - x0_minus) / (2 * h), v


class Rectifier:
    """REG ``mode`` with its options (``every`` for ``reuse``, ``window`` for ``window``; module docstring)."""

    def __init__(self, mode: str = "none", every: int = DEFAULT_EVERY, window: Sequence[float] = DEFAULT_WINDOW):
        if mode not in REG_MODES:
            raise ConfigError(f"unknown REG mode {mode!r}; choose one of {list(REG_MODES)}")
        check_int("reg_every", every)
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

    def cached_factor(self, x: Tensor, step: GuidanceStep) -> Tensor | None:
        """``reuse``: the chain's factor carried to this call while it is fresh (fewer than ``every`` guided calls
        since it was computed), else ``None``."""
        cache = step.state.values.get("reg_factor") if self.mode == "reuse" else None
        if cache is None or cache["left"] == 0 or cache["f"].shape != x.shape:
            return None
        cache["left"] -= 1
        return reused_factor(cache["f"], cache["a"], cache["s"], step.a, step.s)

    def guided(self, term: Term, branches: Branches, model: Denoiser, x: Tensor, t, y: Condition,
               step: GuidanceStep, reference: bool = True) -> tuple[Tensor, Tensor | None]:
        """``(x0_c + g rectified, v_c)`` (channels outside the branches' mask keep ``x0_c``; ``vjp``'s
        rectification of the masked term is masked again, since ``J^T`` mixes channels). ``reference`` false:
        the branches' reference is not evaluated, ``term`` gets ``None`` for it (only other terms guide)."""
        f = self.cached_factor(x, step)
        with torch.no_grad():
            if self.mode == "graph_free":
                x0_c, x0_ref, f, v = finite_difference_factor(branches, model, x, t, y, step, reference)
            elif f is not None:  # reuse: CFG's own forward
                x0_c, x0_ref, v = branches.predict(model, x, t, y, reference=reference)
            else:
                x0_ref = branches.reference_prediction(model, x, t, y) if reference else None
        if self.mode == "vjp":
            branch = branches.differentiable(model, t, y)
            x0_c, rectified = rectified_guidance(branch, x, step.a, lambda x0_c: term(x0_c, x0_ref), "vjp")
            return x0_c + branches.mask(rectified), branch.variance
        if f is None:
            branch = branches.differentiable(model, t, y)
            x0_c, f = paper_factor(branch, x, step.a)
            v = branch.variance
            if self.mode == "reuse":
                step.state.values["reg_factor"] = {"left": self.every - 1, "f": f, "a": step.a, "s": step.s}
        return x0_c + branches.mask(f * term(x0_c, x0_ref)), v

    def __repr__(self):
        return f"Rectifier({self.mode!r}, every={self.every}, window={list(self.window)})"
