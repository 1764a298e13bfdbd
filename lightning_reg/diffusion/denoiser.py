"""The denoiser ``D(x, t, y) = x0_hat``: a backbone read through its schedule and prediction target."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import NoiseSchedule
from lightning_reg.errors import ConfigError


def broadcast_coef(c: Tensor, x: Tensor) -> Tensor:
    """A scalar or per-sample coefficient shaped to broadcast against ``x`` (B, ...)."""
    c = c.to(device=x.device, dtype=x.dtype)
    return c.reshape(-1, *([1] * (x.ndim - 1))) if c.ndim else c


class Denoiser(nn.Module):
    """Wraps a backbone ``net(x, t, y)`` (attributes ``num_classes``, ``data_shape``).

    The label ``num_classes`` is the null label that classifier-free guidance uses.
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction: Prediction):
        super().__init__()
        for attr in ("num_classes", "data_shape"):
            if not hasattr(net, attr):
                raise ConfigError(f"backbone {type(net).__name__} needs an attribute {attr!r}")
        if prediction.kind not in schedule.predictions:
            raise ConfigError(
                f"prediction {prediction.kind!r} does not fit schedule {schedule.name!r}; "
                f"choose one of {list(schedule.predictions)}")
        self.net, self.schedule, self.prediction = net, schedule, prediction

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    @property
    def null_label(self) -> int:
        return self.net.num_classes

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.net.data_shape)

    def coefficients(self, t: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(a_t, s_t)`` broadcastable against ``x``."""
        a, s = self.schedule.alpha_sigma(t)
        return broadcast_coef(a, x), broadcast_coef(s, x)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor) -> Tensor:
        a, s = self.coefficients(t, x)
        t = torch.as_tensor(t, dtype=torch.float64)
        net_t = self.schedule.net_time(t).to(device=x.device, dtype=x.dtype).expand(x.shape[0])
        out = self.net(self.prediction.input_scale(a, s) * x, net_t, y)
        return self.prediction.to_x0(out, x, a, s)

    def check_labels(self, y: Tensor, allow_null: bool = False) -> None:
        """Refuse labels outside ``[0, num_classes)`` (``num_classes`` itself if ``allow_null``)."""
        top = self.num_classes + int(allow_null)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= top):
            raise ConfigError(
                f"label ids must lie in [0, {top - 1}] for a model with num_classes={self.num_classes}; "
                f"got min {int(y.min())}, max {int(y.max())}")
