"""The shared base of all guidance methods, and the guided denoiser that samplers call.

Convention (REG_NOTES): the guided estimate is ``eps_c + w(t) * d`` with ``d = eps_c - eps_ref``
(equivalently ``x0_c + w(t) * (x0_c - x0_ref)``, see ``diffusion/predictions.py``). A method may be
configured in the other common convention ``eps_ref + w2 * d`` by ``convention: w2``; ``w2 = w + 1``.
``w(t) = 0`` means the plain conditional prediction: one forward of batch B, no backward.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.errors import ConfigError
from lightning_reg.guidance.reg import REG_MODES, rectified_guidance

CONVENTIONS = ("w", "w2")


def check_finite(name: str, value: float, minimum: float | None = None) -> float:
    """A finite number, at least ``minimum``; else a ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return float(value)


class Guidance:
    """Base class: a guidance weight over time, a reference prediction, and the REG switch.

    Args:
        scale: guidance strength, read in ``convention`` (``w``: ``eps_c + w d``; ``w2``: ``eps_u + w2 d``).
        convention: ``w`` or ``w2``.
        reg: ``none``, ``paper`` (REG, the default form when on) or ``vjp`` (exact first order).
        guidance_channels: guide only these channels (dim 1), the others keep the conditional
            prediction; DiT's checkpoints used ``[0, 1, 2]``. ``None``: all channels.
    """

    name = "guidance"
    needs_reference_model = False

    def __init__(self, scale: float = 1.0, convention: str = "w", reg: str = "none",
                 guidance_channels: Sequence[int] | None = None):
        if convention not in CONVENTIONS:
            raise ConfigError(f"unknown weight convention {convention!r}; choose 'w' or 'w2'")
        if reg not in REG_MODES:
            raise ConfigError(f"unknown REG mode {reg!r}; choose one of {list(REG_MODES)}")
        scale = check_finite(f"{self.name} scale", scale)
        self.w = self.to_w(scale, convention, "scale")
        self.convention, self.reg = convention, reg
        if guidance_channels is not None:
            guidance_channels = list(guidance_channels)
            if not guidance_channels or not all(isinstance(c, int) and not isinstance(c, bool)
                                                for c in guidance_channels):
                raise ConfigError(f"guidance_channels must be a non-empty list of channel indices or null "
                                  f"(all channels), got {guidance_channels!r}")
        self.guidance_channels = guidance_channels

    @staticmethod
    def to_w(value: float, convention: str, field: str) -> float:
        """A weight given in ``convention`` as the ``w`` of ``eps_c + w d``; refuses ``w < 0``."""
        w = value - 1.0 if convention == "w2" else value
        if w < 0:
            low = "1 (w2 convention)" if convention == "w2" else "0 (w convention)"
            raise ConfigError(f"{field}={value} is below {low}: that extrapolates away from the condition")
        return w

    def weight(self, t: Tensor, model: Denoiser) -> float:
        """``w(t)``, the weight of ``d`` at time ``t`` (subclasses vary it)."""
        return self.w

    def bind(self, model: Denoiser) -> None:
        """Check the models this method will run with."""
        if self.guidance_channels is not None:
            channels = model.data_shape[0]
            bad = [c for c in self.guidance_channels if not 0 <= c < channels]
            if bad:
                raise ConfigError(f"guidance_channels {bad} outside the model's {channels} channels")

    def _masked(self, g: Tensor) -> Tensor:
        """``g`` on ``guidance_channels`` (dim 1), zero elsewhere; all of ``g`` when unset."""
        if self.guidance_channels is None:
            return g
        mask = torch.zeros(g.shape[1], dtype=g.dtype, device=g.device)
        mask[self.guidance_channels] = 1
        return g * mask.reshape(1, -1, *([1] * (g.ndim - 2)))

    def reference_x0(self, model: Denoiser, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """The reference prediction: the null label through the same model (CFG)."""
        return model(x, t, torch.full_like(y, model.null_label))

    def conditional_and_reference(self, model: Denoiser, x: Tensor, t: Tensor, y: Tensor):
        """Both predictions in one batched forward of 2B, as DiT does."""
        x0 = model(torch.cat([x, x]), t, torch.cat([y, torch.full_like(y, model.null_label)]))
        return x0.chunk(2)

    def guided_x0(self, model: Denoiser, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """``x0_c + w(t) * (x0_c - x0_ref)``, rectified by REG when it is on.

        Channels outside ``guidance_channels`` keep the conditional prediction in every mode (the
        ``vjp`` rectification of the masked term is masked again, since ``J^T`` mixes channels).
        """
        w = self.weight(t, model)
        if w == 0:
            return model(x, t, y)
        if self.reg == "none":
            x0_c, x0_ref = self.conditional_and_reference(model, x, t, y)
            return x0_c + self._masked(w * (x0_c - x0_ref))
        with torch.no_grad():
            x0_ref = self.reference_x0(model, x, t, y)
        a_t, _ = model.coefficients(t, x)
        x0_c, rectified = rectified_guidance(model, x, t, y, a_t,
                                             lambda x0_c: self._masked(w * (x0_c - x0_ref)), self.reg)
        return x0_c + self._masked(rectified)

    def __repr__(self):
        fields = {k: v for k, v in vars(self).items() if k != "reference"}
        return f"{type(self).__name__}(method={self.name!r}, {', '.join(f'{k}={v!r}' for k, v in fields.items())})"


class GuidedDenoiser:
    """``D(x, t)`` for fixed labels ``y``: what the samplers call in place of the bare denoiser."""

    def __init__(self, model: Denoiser, guidance: Guidance, y: Tensor):
        model.check_labels(y)
        guidance.bind(model)
        self.model, self.guidance, self.y = model, guidance, y

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self.guidance.guided_x0(self.model, x, t, self.y)

    def __repr__(self):
        return repr(self.guidance)
