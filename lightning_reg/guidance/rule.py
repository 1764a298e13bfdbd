"""The rule of a guidance method: its weight over time and its guidance term from the two predictions.

A rule is as small as a diffusers guider: ``w(t)`` (``weight``, zero outside the ``[start, stop]`` window of
sampling progress) and ``g = guidance_term(x0_c, x0_ref, w, step)``, added to the conditional estimate ``x0_c``
(CFG: ``g = w (x0_c - x0_ref)``, in eps units ``eps_c + w (eps_c - eps_ref)``). How the two predictions are
evaluated is ``branches.py``'s; REG rectifies whatever ``g`` a rule returns (``reg.py``).
"""

from __future__ import annotations

from torch import Tensor

from lightning_reg.diffusion.schedules import NoiseSchedule
from lightning_reg.errors import ConfigError, check_number
from lightning_reg.guidance.step import GuidanceStep

CONVENTIONS = ("w", "w2")


class GuidanceRule:
    """Base rule: CFG's term with a constant weight.

    Args:
        scale: guidance strength, read in ``convention`` (``w``: ``eps_c + w d``; ``w2``: ``eps_u + w2 d``,
            ``w2 = w + 1``).
        convention: ``w`` or ``w2``.
        start, stop: guide only while sampling progress ``p`` (0 at the noisy start, 1 at the clean end)
            lies in ``[start, stop]`` (diffusers' guiders' ``start``/``stop``); the conditional prediction outside.
    """

    name = "guidance"
    needs_reference_model = False
    fixed: tuple[str, ...] = ()  # base parameters a method sets itself (``Conditional``: its weight)
    renoises = False  # CFG++: the samplers renoise with the reference prediction (``GuidedDenoiser.renoising_x0``)

    def __init__(self, scale: float = 1.0, convention: str = "w", start: float = 0.0, stop: float = 1.0):
        if convention not in CONVENTIONS:
            raise ConfigError(f"unknown weight convention {convention!r}; choose 'w' or 'w2'")
        self.convention = convention
        self.w = self.to_w(check_number(f"{self.name} scale", scale), convention, "scale")
        self.start = check_number(f"{self.name} start", start, 0.0, 1.0)
        self.stop = check_number(f"{self.name} stop", stop, self.start, 1.0)

    @staticmethod
    def to_w(value: float, convention: str, field: str) -> float:
        """A weight given in ``convention`` as the ``w`` of ``eps_c + w d``; refuses ``w < 0``."""
        w = value - 1.0 if convention == "w2" else value
        if w < 0:
            low = "1 (w2 convention)" if convention == "w2" else "0 (w convention)"
            raise ConfigError(f"{field}={value} is below {low}: that extrapolates away from the condition")
        return w

    @property
    def guides(self) -> bool:
        """Whether ``w(t)`` can be non-zero, i.e. whether the reference prediction is ever asked for."""
        return self.w > 0

    def weight(self, t: Tensor, schedule: NoiseSchedule) -> float:
        """``w(t)``, the weight of ``d`` at time ``t`` (subclasses vary it)."""
        return self.w

    def in_window(self, t: Tensor, schedule: NoiseSchedule) -> bool:
        """Whether sampling progress at ``t`` lies in the ``[start, stop]`` window."""
        return self.start <= schedule.progress(t) <= self.stop

    def weight_at(self, t: Tensor, schedule: NoiseSchedule) -> float:
        """``w(t)`` inside the ``[start, stop]`` window of sampling progress, 0 outside it."""
        return self.weight(t, schedule) if self.in_window(t, schedule) else 0.0

    def guidance_term(self, x0_c: Tensor, x0_ref: Tensor, w: float, step: GuidanceStep) -> Tensor:
        """The method's ``g`` in x0 units, added to ``x0_c``: CFG's ``w(t) (x0_c - x0_ref)``."""
        return w * (x0_c - x0_ref)

    def replacement(self, step: GuidanceStep) -> Tensor | None:
        """An estimate that replaces the guided one at this guided step (CFG-Zero*'s zero init), or ``None``."""
        return None

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}(method={self.name!r}, {fields})"
