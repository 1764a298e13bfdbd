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
Six cheaper forms of ``paper`` (docs/guidance.md, "Cheaper REG"; measured in benchmarks/):

* ``reuse``: the autograd factor every ``every`` guided calls of a chain (one per step for DDIM/DDPM and
  Euler, two for Heun), reused in between. What is kept is the
  eps-space row sum ``r = grad_x(1^T eps_c) = (1 - f) / s_t``, and a later step uses ``1 - s_t' r`` with its
  own ``s_t'`` (``REUSE_SPACE``; the x0-space alternative keeps ``grad_x(1^T x0_c) = f / a_t`` and uses
  ``a_t' f / a_t``, measured worse on the trained nets). ``every = 1`` is ``paper``.
* ``window``: ``paper`` while sampling progress lies in ``[start, stop]`` of ``window``, the plain method
  elsewhere (where REG's correction ``(f - 1) ⊙ g`` is small).
* ``graph_free_reuse``: the ``graph_free`` factor every ``every`` guided calls, carried in between as ``reuse``
  carries the autograd one: CFG's memory, and CFG's own forward on the calls in between.
* ``adaptive``: the ``graph_free`` factor on a schedule each sample's chain decides for itself. Every time a
  fresh factor is computed for a sample, the factor it would otherwise have carried is compared with it on REG's
  correction, ``drift = ||(f_carried - f) ⊙ g|| / ||(f - 1) ⊙ g||`` (``g``: this call's guidance term; 0: the
  carried factor was exact, 1: as wrong as no REG). ``drift <= tolerance`` doubles the sample's interval (up to
  ``every``), a larger drift halves it (down to 1, a fresh factor each call). Chains start at interval 1. Only
  the due samples' rows are probed (3 rows each); the others run CFG's forward with their carried factor, so a
  sample's chain is the one it gets alone and the probes cost what the due samples need.
* ``short``: the ``paper`` factor with a short backward: the backbone's last ``blocks`` blocks keep their graph,
  the earlier ones run without (``reg_short_backward``: our UNet, DiT and toy MLP name them). In a residual network
  ``h_L = e + sum_l F_l(h_l)``; with the early blocks' Jacobian taken as the identity on the residual stream
  (``h.detach() + e - e.detach()``, ``e`` the patch embedding), the backward runs through the last blocks and the
  embedding only. The UNet's decoder needs no such path: its skips from the encoder carry ``x``'s gradient.
  Measured against the full factor along a chain in ``benchmarks/reg_factor_error.py``.
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

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from lightning_reg.diffusion import conditions
from lightning_reg.diffusion.conditions import Condition
from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.errors import ConfigError, check_int, check_number
from lightning_reg.guidance.branches import Branches
from lightning_reg.guidance.step import GuidanceStep

REG_MODES = ("none", "paper", "vjp", "reuse", "window", "graph_free", "graph_free_reuse", "adaptive", "short")
AUTOGRAD_FORMS = ("paper", "vjp")
GRAPH_FREE = ("graph_free", "graph_free_reuse", "adaptive")  # modes whose factor is the finite difference
CARRIED = ("reuse", "graph_free_reuse", "adaptive")  # modes that carry a factor between calls
REUSE_SPACE = "eps"  # what ``reuse`` keeps between steps: "eps" (r, rescaled by s_t) or "x0" (by a_t)
FD_STEP = 1e-2  # graph_free's finite-difference step in units of s_t
DEFAULT_EVERY = {"reuse": 2, "graph_free_reuse": 4, "adaptive": 8}  # adaptive: the longest interval
DEFAULT_WINDOW = (0.0, 0.5)
DEFAULT_TOLERANCE = 0.1  # adaptive: the drift under which a sample's interval doubles
DEFAULT_BLOCKS = 2  # short: the blocks the backward runs through

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


@contextmanager
def short_backward(net: torch.nn.Module, blocks: int) -> Iterator[None]:
    """Within: ``net``'s modules before its last ``blocks`` (``net.reg_short_backward``) run without graph, and an
    identity path from its embedding, if it names one, joins their output (module docstring, ``short``)."""
    without_graph, embedding = net.reg_short_backward(blocks)
    modes, embedded, handles = [], {}, []

    def off(module, args):
        modes.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)

    def on(module, args, out):
        torch.set_grad_enabled(modes.pop())

    def identity_path(module, args, out):
        return out + embedded["e"] - embedded["e"].detach()

    try:
        for module in without_graph:
            handles += [module.register_forward_pre_hook(off), module.register_forward_hook(on, always_call=True)]
        if embedding is not None and without_graph:
            handles += [embedding.register_forward_hook(lambda module, args, out: embedded.update(e=out)),
                        without_graph[-1].register_forward_hook(identity_path)]
        yield
    finally:
        for handle in handles:
            handle.remove()


def merge_rows(mask: Tensor, chosen: Tensor, others: Tensor) -> Tensor:
    """The rows of a batch: ``chosen``'s where ``mask``, ``others``' elsewhere (each holding just those rows)."""
    out = chosen.new_empty((len(mask), *chosen.shape[1:]))
    out[mask], out[~mask] = chosen, others
    return out


def per_sample(v: Tensor, x: Tensor) -> Tensor:
    """``v`` (a scalar or one value per sample, broadcastable against ``x``) as one value per sample (B, 1, ...)."""
    return torch.as_tensor(v, dtype=x.dtype, device=x.device).expand(x.shape[:1] + (1,) * (x.ndim - 1)).clone()


def correction_drift(f_carried: Tensor, f: Tensor, g: Tensor) -> Tensor:
    """Per sample, ``||(f_carried - f) ⊙ g|| / ||(f - 1) ⊙ g||``: the carried factor's error on REG's correction
    (``adaptive``); 0 where REG corrects nothing and the carried factor is exact there too."""
    error = torch.linalg.vector_norm(((f_carried - f) * g).flatten(1), dim=1)
    size = torch.linalg.vector_norm(((f - 1) * g).flatten(1), dim=1)
    return torch.where(size > 0, error / size.clamp_min(torch.finfo(size.dtype).tiny), error)


class Rectifier:
    """REG ``mode`` with its options (``every`` for the carried modes, ``window`` for ``window``, ``tolerance``
    for ``adaptive``, ``blocks`` for ``short``; module docstring)."""

    def __init__(self, mode: str = "none", every: int | None = None, window: Sequence[float] = DEFAULT_WINDOW,
                 tolerance: float = DEFAULT_TOLERANCE, blocks: int = DEFAULT_BLOCKS):
        if mode not in REG_MODES:
            raise ConfigError(f"unknown REG mode {mode!r}; choose one of {list(REG_MODES)}")
        every = DEFAULT_EVERY.get(mode, 1) if every is None else every
        check_int("reg_every", every)
        window = tuple(window)
        if (len(window) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in window)
                or not 0.0 <= window[0] <= window[1] <= 1.0):
            raise ConfigError(f"reg_window must be [start, stop] with 0 <= start <= stop <= 1 (sampling progress), "
                              f"got {list(window)!r}")
        self.mode, self.every, self.window = mode, every, tuple(float(v) for v in window)
        self.tolerance = check_number("reg_tolerance", tolerance, 0.0)
        self.blocks = check_int("reg_blocks", blocks)

    def bind(self, model: Denoiser) -> None:
        """Check the model REG will differentiate (``short``: a backbone that names its blocks)."""
        net = model.net
        if self.mode == "short":
            if not callable(getattr(net, "reg_short_backward", None)):
                raise ConfigError(f"reg: short needs a backbone that names its last blocks (UNet, DiT, ToyMLP); "
                                  f"{type(net).__name__} does not: use reg: paper or graph_free")
            net.reg_short_backward(self.blocks)

    def active(self, progress: float) -> bool:
        """Whether REG rectifies at sampling progress ``progress``."""
        if self.mode == "window":
            return self.window[0] <= progress <= self.window[1]
        return self.mode != "none"

    def carried(self, x: Tensor, step: GuidanceStep) -> tuple[dict | None, Tensor]:
        """The chain's carried factor (``None`` for other modes or a new chain) and which samples are due a fresh
        one: those whose factor is ``every`` (``adaptive``: their own interval) guided calls old."""
        cache = step.state.values.get("reg_factor") if self.mode in CARRIED else None
        if cache is None or cache["f"].shape != x.shape:
            return None, torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        return cache, cache["left"] == 0

    def fresh_factor(self, branches: Branches, model: Denoiser, x: Tensor, t, y: Condition, step: GuidanceStep,
                     reference: bool):
        """``(x0_c, x0_ref, f, v_c)`` with a fresh factor: the finite difference (no graph) or by autograd."""
        with torch.no_grad():
            if self.mode in GRAPH_FREE:
                return finite_difference_factor(branches, model, x, t, y, step, reference)
            x0_ref = branches.reference_prediction(model, x, t, y) if reference else None
        branch = branches.differentiable(model, t, y)
        if self.mode == "short":
            with short_backward(model.net, self.blocks):
                x0_c, f = paper_factor(branch, x, step.a)
        else:
            x0_c, f = paper_factor(branch, x, step.a)
        return x0_c, x0_ref, f, branch.variance

    def remember(self, cache: dict | None, due: Tensor, f_fresh: Tensor, f_carried: Tensor | None, g: Tensor,
                 x: Tensor, step: GuidanceStep) -> None:
        """Store the factor the chain carries on: the fresh one for the ``due`` samples; ``adaptive`` also doubles
        or halves their intervals by the carried factor's drift (module docstring)."""
        every = torch.full_like(due, self.every, dtype=torch.long) if cache is None else cache["every"]
        if self.mode == "adaptive":
            start = torch.ones_like(every) if cache is None else every
            if f_carried is not None:
                smooth = correction_drift(f_carried, f_fresh, g) <= self.tolerance
                start = torch.where(smooth, (start * 2).clamp_max(self.every), (start // 2).clamp_min(1))
            every = torch.where(due, start, every)
        a, s = per_sample(step.a, x), per_sample(step.s, x)
        if cache is not None:
            keep = ~due.view(-1, *(1,) * (x.ndim - 1))
            f_fresh, a, s = (torch.where(keep, old, new) for old, new in
                             ((cache["f"], f_fresh), (cache["a"], a), (cache["s"], s)))
        left = torch.where(due, every - 1, cache["left"] - 1 if cache is not None else every - 1)
        step.state.values["reg_factor"] = {"f": f_fresh, "a": a, "s": s, "left": left, "every": every}

    def guided(self, term: Term, branches: Branches, model: Denoiser, x: Tensor, t, y: Condition,
               step: GuidanceStep, reference: bool = True) -> tuple[Tensor, Tensor | None]:
        """``(x0_c + g rectified, v_c)`` (channels outside the branches' mask keep ``x0_c``; ``vjp``'s
        rectification of the masked term is masked again, since ``J^T`` mixes channels). ``reference`` false:
        the branches' reference is not evaluated, ``term`` gets ``None`` for it (only other terms guide)."""
        if self.mode == "vjp":
            with torch.no_grad():
                x0_ref = branches.reference_prediction(model, x, t, y) if reference else None
            branch = branches.differentiable(model, t, y)
            x0_c, rectified = rectified_guidance(branch, x, step.a, lambda x0_c: term(x0_c, x0_ref), "vjp")
            return x0_c + branches.mask(rectified), branch.variance
        cache, due = self.carried(x, step)
        f_carried = None if cache is None else reused_factor(cache["f"], cache["a"], cache["s"], step.a, step.s)
        if due.all():
            x0_c, x0_ref, f, v = self.fresh_factor(branches, model, x, t, y, step, reference)
        elif not due.any():  # every sample carries its factor: CFG's own forward
            with torch.no_grad():
                x0_c, x0_ref, v = branches.predict(model, x, t, y, reference=reference)
            f = f_carried
        else:  # adaptive: the due rows get a fresh factor, the others CFG's forward
            with torch.no_grad():
                carried = branches.predict(model, x[~due], t, conditions.index(y, ~due), reference=reference)
            fresh = self.fresh_factor(branches, model, x[due], t, conditions.index(y, due),
                                      GuidanceStep(model, x[due], t, step.state), reference)
            x0_c, x0_ref, f, v = (None if part is None else merge_rows(due, part, rest) for part, rest in
                                  zip(fresh, (*carried[:2], f_carried[~due], carried[2])))
        g = term(x0_c, x0_ref)
        if self.mode in CARRIED:
            if due.any():
                self.remember(cache, due, f, f_carried, g, x, step)
            else:
                cache["left"] = cache["left"] - 1
        return x0_c + branches.mask(f * g), v

    def __repr__(self):
        options = {"reuse": f", every={self.every}", "graph_free_reuse": f", every={self.every}",
                   "window": f", window={list(self.window)}",
                   "adaptive": f", every={self.every}, tolerance={self.tolerance}", "short": f", blocks={self.blocks}"}
        return f"Rectifier({self.mode!r}{options.get(self.mode, '')})"
