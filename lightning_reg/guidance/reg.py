"""REG, the rectified gradient (REG_NOTES §2), written once for every guidance method.

Guidance adds a term ``g = w(t) * (x0_c - x0_ref)`` to the conditional estimate. REG multiplies it by
the chain-rule factor through the denoised estimate, in any parameterisation:

* ``paper``: ``x0_bar = x0_c + a_t * grad_x(1^T x0_c) ⊙ g``  (the authors' form; in eps units
  ``eps_c + w * d ⊙ (1 - s_t * grad_x(1^T eps_c))``)
* ``vjp``:   ``x0_bar = x0_c + a_t * J^T g`` with ``J = d x0_c / d x``  (exact first order; in eps
  units ``eps_c + w * (d - s_t * J_eps^T d)``)

Both cost one backward pass through the conditional branch only.

Inference mode: tensors made under ``torch.inference_mode()`` (Lightning's validation, for one) can
never enter an autograd graph, and ``enable_grad`` alone does not lift that. So the backward pass
runs under ``inference_mode(False)`` and ``enable_grad()`` on a *clone* of ``x`` (a normal tensor);
the result is detached, so no graph outlives the step.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

REG_MODES = ("none", "paper", "vjp")


def rectified_guidance(conditional: Callable[[Tensor], Tensor], x: Tensor, a_t: Tensor,
                       guidance_term: Callable[[Tensor], Tensor], mode: str) -> Tensor:
    """``x0_bar`` for REG ``mode`` in (``paper``, ``vjp``).

    ``conditional(x)`` is the conditional denoiser ``x0_c``; ``guidance_term(x0_c)`` returns the
    weighted, channel-masked ``g`` (treated as a constant: ``x0_ref`` carries no graph).
    """
    with torch.inference_mode(False), torch.enable_grad():
        x_in = x.detach().clone().requires_grad_(True)
        x0_c = conditional(x_in)
        g = guidance_term(x0_c.detach())
        if mode == "paper":
            (grad_sum,) = torch.autograd.grad(x0_c.sum(), x_in)
            rectified = grad_sum * g
        elif mode == "vjp":
            (rectified,) = torch.autograd.grad(x0_c, x_in, grad_outputs=g)
        else:
            raise ValueError(f"REG mode {mode!r} has no rectification; expected 'paper' or 'vjp'")
    return x0_c.detach() + a_t * rectified
