"""Isotropic Gaussian mixtures: the toy distributions, with exact densities and diffused posteriors.

A mixture diffused by ``x_t = a x_0 + s eps`` stays a mixture: component k becomes
``N(a mu_k, (a^2 sigma_k^2 + s^2) I)``. Its posterior mean ``E[x_0 | x_t]`` is therefore closed-form
(the exact denoiser, equal to Tweedie's formula ``(x + s^2 grad log p_t(x)) / a``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


class GaussianMixture:
    """``sum_k w_k N(mu_k, sigma_k^2 I)`` in D dimensions (float64 throughout)."""

    def __init__(self, means: Sequence, stds: Sequence[float], weights: Sequence[float] | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim == 1:
            self.means = self.means[:, None]
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        k = self.means.shape[0]
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if self.stds.shape != (k,) or w.shape != (k,) or (self.stds <= 0).any() or (w < 0).any():
            raise ValueError("a mixture needs one positive std and one non-negative weight per mean")
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[k] + self.stds[k, None] * eps

    def _component_log_probs(self, x: Tensor, a: float | Tensor = 1.0, s: float | Tensor = 0.0) -> Tensor:
        """``log w_k + log N(x; a mu_k, (a^2 sigma_k^2 + s^2) I)``, shape (N, K)."""
        x = x.to(torch.float64)
        var = a ** 2 * self.stds ** 2 + s ** 2
        sq = ((x[:, None, :] - a * self.means[None]) ** 2).sum(-1)
        return self.weights.log() - 0.5 * sq / var - 0.5 * self.dim * torch.log(2 * math.pi * var)

    def log_prob(self, x: Tensor, a: float | Tensor = 1.0, s: float | Tensor = 0.0) -> Tensor:
        """Log density of ``x`` under the mixture diffused to ``(a, s)`` (data at ``a=1, s=0``)."""
        return torch.logsumexp(self._component_log_probs(x, a, s), dim=-1)

    def score(self, x: Tensor, a: float | Tensor = 1.0, s: float | Tensor = 0.0) -> Tensor:
        """``grad_x log p_t(x)`` of the diffused mixture, in closed form."""
        r = self._component_log_probs(x, a, s).softmax(-1)  # responsibilities (N, K)
        var = a ** 2 * self.stds ** 2 + s ** 2
        return (r[:, :, None] * (a * self.means[None] - x.to(torch.float64)[:, None, :]) / var[None, :, None]).sum(1)

    def posterior_mean(self, x: Tensor, a: float | Tensor, s: float | Tensor) -> Tensor:
        """Exact denoiser ``E[x_0 | x_t = x]``: per component ``mu_k + a sigma_k^2 / var_k (x - a mu_k)``."""
        x64 = x.to(torch.float64)
        r = self._component_log_probs(x64, a, s).softmax(-1)
        var = a ** 2 * self.stds ** 2 + s ** 2
        gain = (a * self.stds ** 2 / var)[None, :, None]
        means_k = self.means[None] + gain * (x64[:, None, :] - a * self.means[None])
        return (r[:, :, None] * means_k).sum(1).to(x.dtype)

    @staticmethod
    def combine(mixtures: Sequence["GaussianMixture"], weights: Sequence[float] | None = None) -> "GaussianMixture":
        """The mixture ``sum_c pi_c p_c`` of mixtures (e.g. the class marginal)."""
        pis = torch.ones(len(mixtures), dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        pis = pis / pis.sum()
        return GaussianMixture(torch.cat([m.means for m in mixtures]), torch.cat([m.stds for m in mixtures]),
                               torch.cat([p * m.weights for p, m in zip(pis, mixtures)]))
