"""The branches of guidance: evaluating the conditional and the reference prediction.

The conditional branch is the model given the condition ``y``; the reference branch is either a separate
``reference`` model given the *same* condition (autoguidance, Karras et al. 2024; EDM2's unconditional network)
or the model given its conditioning's null condition (classifier-free guidance). The branches also own what
turns a rule's term into the applied one: guidance rescale and the channel mask. Conditions are passed through
untouched (``diffusion/conditions.py``); a learned variance comes back with the conditional prediction.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from torch.func import functional_call

from lightning_reg.diffusion import conditions
from lightning_reg.diffusion.conditions import Condition
from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.errors import ConfigError, check_number
from lightning_reg.guidance.step import GuidanceStep, sample_dims

LAYOUTS = ("auto", "batched", "split")


class Branches:
    """How the two predictions are evaluated and how the guidance term is applied.

    Args:
        layout: ``batched`` (one forward of 2B rows, as DiT does for CFG), ``split`` (two of B) or ``auto``
            (``split`` on the CPU, faster there at every batch measured (benchmarks/README.md), ``batched``
            elsewhere). A separate reference model always runs on its own.
        reference: a separate reference ``Denoiser`` given the same conditions; ``None``: the model's null
            condition through the model.
        channels: guide only these channels (dim 1), the others keep the conditional prediction (DiT's
            checkpoints used ``[0, 1, 2]``); ``None``: all channels.
        rescale: ``phi`` of guidance rescale (Lin et al. 2023, §3.4): the guided output's per-sample std is
            matched to the conditional one's, blended by ``phi`` (0: off).
    """

    def __init__(self, layout: str = "auto", reference: Denoiser | None = None,
                 channels: Sequence[int] | None = None, rescale: float = 0.0):
        if layout not in LAYOUTS:
            raise ConfigError(f"unknown branch_layout {layout!r}; choose one of {list(LAYOUTS)}")
        if channels is not None:
            channels = list(channels)
            if not channels or not all(isinstance(c, int) and not isinstance(c, bool) for c in channels):
                raise ConfigError(f"guidance_channels must be a non-empty list of channel indices or null "
                                  f"(all channels), got {channels!r}")
        self.layout, self.reference, self.channels = layout, reference, channels
        self.rescale = check_number("guidance_rescale", rescale, 0.0, 1.0)

    def bind(self, model: Denoiser, method: str, needs_reference: bool, guides: bool = True) -> None:
        """Check the models the branches will run with, before the first sample (``guides``: whether the rule
        ever asks for the reference prediction)."""
        if self.channels is not None:
            bad = [c for c in self.channels if not 0 <= c < model.data_shape[0]]
            if bad:
                raise ConfigError(f"guidance_channels {bad} outside the model's {model.data_shape[0]} channels")
        if self.rescale and math.prod(model.data_shape) < 2:
            raise ConfigError(f"guidance_rescale needs samples of at least 2 values (a std), the model's "
                              f"data_shape is {model.data_shape}")
        ref = self.reference
        if ref is None:
            if needs_reference:
                raise ConfigError(f"{method} needs a reference model: set reference_checkpoint (a weaker or "
                                  "earlier checkpoint of the same task)")
            if guides:
                model.conditioning.refuse_null(type(model.net).__name__)
            return
        ignores = bool(getattr(ref.net, "ignores_condition", False))
        if ref.data_shape != model.data_shape or (ref.num_classes != model.num_classes and not ignores):
            raise ConfigError(
                f"{method} reference has num_classes={ref.num_classes}, data_shape={ref.data_shape}; "
                f"the model has num_classes={model.num_classes}, data_shape={model.data_shape} (a reference that "
                "ignores the condition, as EDM2's unconditional network, fits any num_classes)")
        if ref.schedule != model.schedule:
            raise ConfigError(f"{method} reference was trained with another noise schedule")

    def batched(self, x: Tensor) -> bool:
        """Whether the model's two branches run as one forward (``layout``)."""
        return self.layout == "batched" or (self.layout == "auto" and x.device.type != "cpu")

    def conditional(self, model: Denoiser, x: Tensor, t, y: Condition) -> tuple[Tensor, Tensor | None]:
        """``(x0_c, v_c)``: the conditional prediction and its learned variance (``None`` without one)."""
        return model(x, t, y, variance=True)

    def reference_prediction(self, model: Denoiser, x: Tensor, t, y: Condition) -> Tensor:
        if self.reference is not None:
            return self.reference(x, t, y)
        return model(x, t, model.conditioning.null(y))

    def predict(self, model: Denoiser, x: Tensor, t, y: Condition, x_cond: Tensor | None = None,
                reference: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(x0_c, x0_ref, v_c)``: the conditional prediction at ``x_cond`` (default ``x``; k stacked batches:
        kB rows, each given ``y``) and the reference at ``x``, in one forward of (k + 1)B rows or one of B each
        (``batched``); ``reference`` false: the conditional forward alone, ``x0_ref`` ``None``."""
        x_cond = x if x_cond is None else x_cond
        y_cond = conditions.cat([y] * (len(x_cond) // len(x)))
        if not reference:
            x0_c, v = self.conditional(model, x_cond, t, y_cond)
            return x0_c, None, v
        if self.reference is not None:
            x0_c, v = self.conditional(model, x_cond, t, y_cond)
            return x0_c, self.reference(x, t, y), v
        rows, ys = torch.cat([x_cond, x]), conditions.cat([y_cond, model.conditioning.null(y)])
        if self.batched(x):
            x0, v = model(rows, t, ys, variance=True)
        else:
            parts = [model(r, t, c, variance=True) for r, c in zip(rows.split(len(x)), conditions.split(ys, len(x)))]
            x0 = torch.cat([p[0] for p in parts])
            v = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
        n = len(x_cond)
        return x0[:n], x0[n:], None if v is None else v[:n]

    def differentiable(self, model: Denoiser, t, y: Condition) -> "DifferentiableBranch":
        """The conditional branch as a function of ``x`` alone, differentiable in ``x`` (REG)."""
        return DifferentiableBranch(model, t, y)

    def mask(self, g: Tensor) -> Tensor:
        """``g`` on ``channels`` (dim 1), zero elsewhere; all of ``g`` when unset."""
        if self.channels is None:
            return g
        mask = torch.zeros(g.shape[1], dtype=g.dtype, device=g.device)
        mask[self.channels] = 1
        return g * mask.reshape(1, -1, *([1] * (g.ndim - 2)))

    def rescaled(self, x0_c: Tensor, g: Tensor, step: GuidanceStep) -> Tensor:
        """``g`` after guidance rescale (Lin et al. 2023, §3.4) in the output space:
        ``o = o_g (phi std(o_c) / std(o_g) + 1 - phi)`` with ``o_c``, ``o_g`` the conditional and guided outputs."""
        if not self.rescale:
            return g
        out_c, out_g = step.output(x0_c), step.output(x0_c + g)
        ratio = out_c.std(dim=sample_dims(out_c), keepdim=True) / out_g.std(dim=sample_dims(out_g), keepdim=True)
        return step.to_x0(out_g * (self.rescale * ratio + 1 - self.rescale)) - x0_c

    def applied(self, x0_c: Tensor, g: Tensor, step: GuidanceStep) -> Tensor:
        """A rule's term as applied: rescaled, on ``channels``; what REG multiplies."""
        return self.mask(self.rescaled(x0_c, g, step))

    def __repr__(self):
        reference = type(self.reference).__name__ if self.reference is not None else None
        return (f"Branches(layout={self.layout!r}, reference={reference}"
                f", channels={self.channels!r}, rescale={self.rescale!r})")


class DifferentiableBranch:
    """``x -> x0_c(x)`` for fixed ``t`` and ``y``, run with detached weights (``torch.func.functional_call``) so
    a graph holds only what ``d/dx`` needs and no weight ``.grad`` is touched; ``variance`` holds the learned
    variance of its last call. ``t`` and ``y`` are cloned at each call, so that under
    ``inference_mode(False)`` they are normal tensors (an embedding saves its label ids for backward)."""

    def __init__(self, model: Denoiser, t, y: Condition):
        self.model, self.t, self.y, self.variance = model, t, y, None

    def __call__(self, x: Tensor) -> Tensor:
        weights = {name: p.detach() for name, p in self.model.named_parameters()}
        t = self.t.clone() if isinstance(self.t, Tensor) else self.t
        x0, self.variance = functional_call(self.model, weights, (x, t, conditions.apply(torch.clone, self.y)),
                                            {"variance": True})
        return x0
