"""The exact (network-free) denoiser of a toy mixture: ``D(x, t, y) = E[x_0 | x_t = x, y]`` in closed form.

A diffused Gaussian mixture stays a mixture, so its posterior mean is analytic
(``GaussianMixture.posterior_mean``, equal to Tweedie's ``(x + s_t^2 grad log p_t(x)) / a_t``). It is
served as an ``x0``-predicting backbone inside the library's ``Denoiser``, so ``GuidedDenoiser``, REG
and the samplers run on it unchanged, and autograd differentiates through it (REG's backward pass).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_reg.data.toy import ToyDistribution
from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import NoiseSchedule, VPSchedule
from lightning_reg.errors import ConfigError


class MixturePosteriorMean(nn.Module):
    """Backbone ``net(x, t, y) = E[x_0 | x_t = x, y]`` of a ``ToyDistribution`` under a VP schedule.

    ``t`` is the DDPM index (the VP schedule's net time is the time itself); the null label
    ``num_classes`` selects the unconditional mixture.
    """

    def __init__(self, distribution: ToyDistribution, schedule: NoiseSchedule):
        super().__init__()
        if not isinstance(schedule, VPSchedule):
            raise ConfigError(f"the exact mixture denoiser needs the 'vp' schedule (its net time is the DDPM "
                              f"index); got {schedule.name!r}")
        self.distribution, self.schedule = distribution, schedule
        self.num_classes, self.data_shape = distribution.num_classes, (distribution.dim,)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        if t.numel() and not (t == t.flatten()[0]).all():
            raise ValueError("the exact mixture denoiser takes one time per call")
        a, s = self.schedule.alpha_sigma(t.flatten()[0])
        out = torch.zeros_like(x)
        for label in y.unique().tolist():
            idx = (y == label).nonzero().squeeze(1)
            mean = self.distribution.mixture(label).posterior_mean(x[idx], a, s)
            out = out.index_put((idx,), mean)  # out of place: autograd reaches x through every label
        return out


class ExactMixtureDenoiser(Denoiser):
    """``Denoiser`` whose backbone is the closed-form posterior mean of ``distribution``."""

    def __init__(self, distribution: ToyDistribution, schedule: NoiseSchedule):
        super().__init__(MixturePosteriorMean(distribution, schedule), schedule, Prediction("x0"))

    @property
    def distribution(self) -> ToyDistribution:
        return self.net.distribution
