"""The denoiser ``D(x, t, y) = x0_hat``: a backbone read through its schedule and prediction target.

``y`` is a condition of the denoiser's ``conditioning`` (``diffusion/conditions.py``): class ids by default, or
what the backbone's own ``conditioning`` attribute defines.

Learned variance (improved DDPM, Nichol & Dhariwal 2021; DiT): a backbone with ``learn_sigma = True``
returns ``2C`` channels, the prediction and a variance interpolation ``v`` in [-1, 1]. ``D(x, t, y,
variance=True)`` returns ``(x0_hat, v)``; guidance hands ``v`` of the conditional branch on to the sampler
with its guided ``x0_hat`` (``GuidedDenoiser.learned_variance``), as the public DiT sampler does: ``v`` is
never guided, and nothing is kept in the denoiser between calls.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_reg.diffusion.conditions import ClassLabels, Condition, Conditioning
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import NoiseSchedule
from lightning_reg.errors import ConfigError


def broadcast_coef(c: Tensor, x: Tensor) -> Tensor:
    """A scalar or per-sample coefficient shaped to broadcast against ``x`` (B, ...)."""
    c = c.to(device=x.device, dtype=x.dtype)
    return c.reshape(-1, *([1] * (x.ndim - 1))) if c.ndim else c


class Denoiser(nn.Module):
    """Wraps a backbone ``net(x, t, y)`` (attributes ``num_classes``, ``data_shape``).

    ``conditioning``: what ``y`` is; default the backbone's own ``conditioning`` attribute if it has one, else
    class labels with the null label ``num_classes`` (``ClassLabels``; none if ``net.trains_null_label`` is false).
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction: Prediction,
                 conditioning: Conditioning | None = None):
        super().__init__()
        for attr in ("num_classes", "data_shape"):
            if not hasattr(net, attr):
                raise ConfigError(f"backbone {type(net).__name__} needs an attribute {attr!r}")
        if prediction.kind not in schedule.predictions:
            raise ConfigError(
                f"prediction {prediction.kind!r} does not fit schedule {schedule.name!r}; "
                f"choose one of {list(schedule.predictions)}")
        if getattr(net, "learn_sigma", False) and schedule.name != "vp":
            raise ConfigError(f"a backbone with learn_sigma (a learned DDPM variance) needs the 'vp' schedule, "
                              f"not {schedule.name!r}")
        if conditioning is None:
            conditioning = getattr(net, "conditioning", None)
        if conditioning is None:
            conditioning = ClassLabels(net.num_classes, getattr(net, "trains_null_label", True))
        self.net, self.schedule, self.prediction, self.conditioning = net, schedule, prediction, conditioning

    def with_net(self, net: nn.Module) -> "Denoiser":
        """This denoiser over another copy of its backbone (the EMA weights), sharing everything else."""
        return Denoiser(net, self.schedule, self.prediction, self.conditioning).train(self.training)

    @property
    def learn_sigma(self) -> bool:
        return bool(getattr(self.net, "learn_sigma", False))

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.net.data_shape)

    @property
    def state_dtype(self) -> torch.dtype:
        """The dtype of the sampling chain's state: the parameters' (float32 for a parameter-free net)."""
        return next(self.parameters(), torch.empty(0)).dtype

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one finished sample (``decode``'s output): ``data_shape`` here, images for latents."""
        return self.data_shape

    def decode(self, x0: Tensor) -> Tensor:
        """A finished chain's ``x0`` as a sample: itself here (``LatentDenoiser`` decodes latents to images)."""
        return x0

    def training_batch(self, batch) -> tuple[Tensor, Condition]:
        """``(x0, y)`` of a datamodule batch ``(data, keys)``: the keys (class ids, captions) made conditions."""
        x0, keys = batch
        return x0, self.conditioning.make(keys)

    def coefficients(self, t: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(a_t, s_t)`` broadcastable against ``x``."""
        a, s = self.schedule.alpha_sigma(t)
        return broadcast_coef(a, x), broadcast_coef(s, x)

    def forward(self, x: Tensor, t: Tensor | float, y: Condition, variance: bool = False):
        """``x0_hat``; with ``variance``, ``(x0_hat, v)`` (``v``: the learned variance interpolation, or ``None``)."""
        a, s = self.coefficients(t, x)
        t = torch.as_tensor(t, dtype=torch.float64)
        net_t = self.schedule.net_time(t).to(device=x.device, dtype=x.dtype).expand(x.shape[0])
        out = self.net(self.prediction.input_scale(a, s) * x, net_t, y)
        v = None
        if self.learn_sigma:
            out, v = out.chunk(2, dim=1)
            v = v.detach()
        x0 = self.prediction.to_x0(out, x, a, s)
        return (x0, v) if variance else x0


def learned_log_variance(v: Tensor, beta: Tensor, posterior_variance: Tensor) -> Tensor:
    """Improved DDPM eq. 15: ``log Sigma = frac log(beta_t) + (1 - frac) log(beta~_t)``, ``frac = (v + 1) / 2``."""
    frac = (v + 1) / 2
    return frac * beta.log() + (1 - frac) * posterior_variance.log()


def learned_variance_vlb(schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor, x0_hat: Tensor,
                         v: Tensor) -> Tensor:
    """Per-sample VLB term ``L_t`` in bits per dimension that trains the learned variance (improved
    DDPM's hybrid loss; DiT trains with ``mse + vb``): ``KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))``,
    and at ``t = 0`` the discretised Gaussian decoder NLL of ``x0`` (256 bins on [-1, 1]; exact normal
    CDF). The model mean uses ``x0_hat`` as given (pass it detached: only ``v`` learns from this term).
    """
    (a, s), (a_prev, s_prev) = schedule.alpha_sigma(t), schedule.alpha_sigma(t - 1)
    beta = 1 - (a / a_prev) ** 2
    (a1, s1), (a0, s0) = schedule.alpha_sigma(torch.ones_like(t)), schedule.alpha_sigma(torch.zeros_like(t))
    posterior_var = torch.where(t == 0, (1 - (a1 / a0) ** 2) * s0 ** 2 / s1 ** 2, beta * s_prev ** 2 / s ** 2)
    coef_x0, coef_xt = (broadcast_coef(c, x0) for c in (beta * a_prev / s ** 2, s_prev ** 2 * (a / a_prev) / s ** 2))
    beta, posterior_var = broadcast_coef(beta, x0), broadcast_coef(posterior_var, x0)
    log_var = learned_log_variance(v, beta, posterior_var)
    model_mean = coef_x0 * x0_hat + coef_xt * x_t
    true_mean = coef_x0 * x0 + coef_xt * x_t
    kl = 0.5 * (-1 + log_var - posterior_var.log() + (posterior_var + (true_mean - model_mean) ** 2) * (-log_var).exp())
    inv_std = (-0.5 * log_var).exp()
    cdf_plus = torch.special.ndtr(inv_std * (x0 - model_mean + 1 / 255))
    cdf_minus = torch.special.ndtr(inv_std * (x0 - model_mean - 1 / 255))
    bin_prob = torch.where(x0 < -0.999, cdf_plus, torch.where(x0 > 0.999, 1 - cdf_minus, cdf_plus - cdf_minus))
    nll = -bin_prob.clamp(min=1e-12).log()
    per_sample = torch.where(broadcast_coef(t == 0, x0).bool(), nll, kl).flatten(1).mean(1)
    return per_sample / math.log(2)
