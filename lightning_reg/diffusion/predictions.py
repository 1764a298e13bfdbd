"""Prediction targets and the conversions between them, in one place.

A backbone's raw output ``F`` is turned into the denoised estimate ``x0_hat``; guidance and the
samplers work on ``x0_hat`` (and ``eps_hat`` derived from it). Because every conversion is affine in
``F`` with an ``x``-dependent offset that does not depend on the label, a guidance rule written on
``x0_hat`` is the same rule on ``eps`` (docs/theory.md §2: the general factor ``a_t * grad(1^T x0_hat_c)``).

With ``x_t = a x0 + s eps``:

* ``eps``:      ``x0 = (x - s F) / a``
* ``x0``:       ``x0 = F``
* ``v``:        ``v = a eps - s x0``  =>  ``x0 = (a x - s F) / (a^2 + s^2)``
* ``velocity``: flow ``v = eps - x0`` (``a = 1 - t``, ``s = t``)  =>  ``x0 = x - s F``
* ``edm``:      EDM preconditioning ``D = c_skip x + c_out F(c_in x)`` (Karras et al. 2022, Table 1)
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_reg.errors import ConfigError

PREDICTIONS = ("eps", "x0", "v", "velocity", "edm")


def eps_from_x0(x0: Tensor, x: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """``eps = (x - a x0) / s``."""
    return (x - a * x0) / s


def x0_from_eps(eps: Tensor, x: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """``x0 = (x - s eps) / a``."""
    return (x - s * eps) / a


def v_from_x0_eps(x0: Tensor, eps: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """VP v-prediction target ``v = a eps - s x0`` (Salimans & Ho 2022)."""
    return a * eps - s * x0


class Prediction:
    """What the backbone predicts: its regression target and how to read ``x0_hat`` from it."""

    def __init__(self, kind: str, sigma_data: float = 0.5):
        if kind not in PREDICTIONS:
            raise ConfigError(f"unknown prediction {kind!r}; choose one of {list(PREDICTIONS)}")
        self.kind, self.sigma_data = kind, sigma_data

    def _edm_coefficients(self, s):
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (s ** 2 + sd2)
        c_out = s * self.sigma_data / (s ** 2 + sd2) ** 0.5
        return c_skip, c_out

    def input_scale(self, a: Tensor, s: Tensor) -> Tensor:
        """``c_in``: what the backbone's input is multiplied by (EDM keeps it at unit variance)."""
        if self.kind == "edm":
            return 1 / (s ** 2 + self.sigma_data ** 2).sqrt()
        return torch.ones_like(s)

    def target(self, x0: Tensor, eps: Tensor, a: Tensor, s: Tensor) -> Tensor:
        """Regression target for the raw output ``F`` at ``x = a x0 + s eps`` (unweighted MSE)."""
        if self.kind == "eps":
            return eps
        if self.kind == "x0":
            return x0
        if self.kind == "v":
            return v_from_x0_eps(x0, eps, a, s)
        if self.kind == "velocity":
            return eps - x0
        c_skip, c_out = self._edm_coefficients(s)  # EDM: F-target, equal to EDM's weighted loss
        return (x0 - c_skip * (a * x0 + s * eps)) / c_out

    def to_x0(self, out: Tensor, x: Tensor, a: Tensor, s: Tensor) -> Tensor:
        """``x0_hat`` from the raw output ``F`` at input ``x``."""
        if self.kind == "eps":
            return x0_from_eps(out, x, a, s)
        if self.kind == "x0":
            return out
        if self.kind == "v":
            return (a * x - s * out) / (a ** 2 + s ** 2)
        if self.kind == "velocity":
            return x - s * out
        c_skip, c_out = self._edm_coefficients(s)
        return c_skip * x + c_out * out

    def from_x0(self, x0: Tensor, x: Tensor, a: Tensor, s: Tensor) -> Tensor:
        """The raw output ``F`` whose ``to_x0`` at input ``x`` is ``x0`` (its inverse: what a diffusers scheduler
        of this prediction type is handed)."""
        if self.kind == "eps":
            return eps_from_x0(x0, x, a, s)
        if self.kind == "x0":
            return x0
        if self.kind == "v":
            return (a * x - (a ** 2 + s ** 2) * x0) / s
        if self.kind == "velocity":
            return (x - x0) / s
        c_skip, c_out = self._edm_coefficients(s)
        return (x0 - c_skip * x) / c_out

    def __repr__(self):
        return f"Prediction({self.kind!r})"
