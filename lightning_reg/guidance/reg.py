"""REG, the rectified gradient (docs/theory.md §2), written once for every guidance method.

Guidance adds a term ``g`` to the conditional estimate (CFG: ``g = w(t) * (x0_c - x0_ref)``; APG,
CFG-Zero* and guidance rescale: other functions of the two predictions, ``base.py``). REG multiplies
whatever ``g`` a method returns by the chain-rule factor through the denoised estimate, in any
parameterisation:

* ``paper``: ``x0_bar = x0_c + a_t * grad_x(1^T x0_c) ⊙ g``  (the authors' form; in eps units
  ``eps_c + w * d ⊙ (1 - s_t * grad_x(1^T eps_c))``)
* ``vjp``:   ``x0_bar = x0_c + a_t * J^T g`` with ``J = d x0_c / d x``  (exact first order; in eps
  units ``eps_c + w * (d - s_t * J_eps^T d)``)

Both cost one forward of the conditional branch with a graph plus one backward pass to ``x`` only;
the forward runs with detached weights (``torch.func.functional_call``), so the graph keeps only what
``d/dx`` needs (no layer inputs saved for weight gradients) and no weight ``.grad`` is ever touched.

Inference mode: tensors made under ``torch.inference_mode()`` (Lightning's validation and
``trainer.predict``, for instance) can never be saved for backward, and ``enable_grad`` alone does not
lift that. So the differentiable forward runs under ``inference_mode(False)`` and ``enable_grad()`` on
*clones* of ``x``, ``t`` and ``y`` (normal tensors: an embedding saves its label ids for backward);
the results are detached, so no graph outlives the step.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

REG_MODES = ("none", "paper", "vjp")


def rectified_guidance(conditional: nn.Module, x: Tensor, t: Tensor | float, y: Tensor, a_t: Tensor,
                       guidance_term: Callable[[Tensor], Tensor], mode: str) -> tuple[Tensor, Tensor]:
    """``(x0_c, a_t * factor(g))`` for REG ``mode`` in (``paper``, ``vjp``); the guided estimate is their sum.

    ``conditional(x, t, y)`` is the conditional denoiser ``x0_c``, run with detached weights so the graph
    holds only what ``d/dx`` needs; ``guidance_term(x0_c)`` returns the weighted, channel-masked ``g``
    (a constant: the reference prediction carries no graph).
    """
    if mode not in ("paper", "vjp"):
        raise ValueError(f"REG mode {mode!r} has no rectification; expected 'paper' or 'vjp'")
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
