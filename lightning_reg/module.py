"""``ConditionalDiffusion``: trains any backbone ``net(x, t, y)`` as a class-conditional diffusion model.

Label dropout (Ho & Salimans 2022) replaces a label by the null id ``num_classes`` with probability
``label_dropout`` so the same network also learns the unconditional prediction CFG needs. An EMA
copy of the weights (``torch.optim.swa_utils.AveragedModel``) is used for validation and sampling.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lightning_reg.diffusion.denoiser import Denoiser, broadcast_coef, learned_variance_vlb
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import NoiseSchedule, VPSchedule
from lightning_reg.errors import ConfigError, one_line


class ConditionalDiffusion(L.LightningModule):
    """Args:
        net: backbone ``net(x, t, y)`` with attributes ``num_classes`` and ``data_shape``.
        schedule: forward process (``VPSchedule``, ``EDMSchedule``, ``FlowSchedule``).
        prediction: what ``net`` predicts: ``eps``, ``x0``, ``v`` (VP), ``edm`` (EDM), ``velocity`` (flow).
        label_dropout: probability of training a sample with the null label (DiT: 0.1).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up.
        ema_decay: decay of the EMA weights used for validation and sampling.
        init_from: fine-tuning: a checkpoint of the same backbone whose EMA weights start both the
            trained and the EMA weights (not saved as a hyperparameter: the run's own checkpoints
            stand alone).
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule | None = None, prediction: str = "eps",
                 label_dropout: float = 0.1, lr: float = 1e-3, weight_decay: float = 0.0,
                 warmup_steps: int = 100, ema_decay: float = 0.999, init_from: str | None = None):
        super().__init__()
        if not 0.0 <= label_dropout < 1.0:
            raise ConfigError(f"label_dropout must lie in [0, 1), got {label_dropout}")
        if not 0.0 <= ema_decay < 1.0:
            raise ConfigError(f"ema_decay must lie in [0, 1), got {ema_decay}")
        if lr <= 0 or warmup_steps < 0:
            raise ConfigError("lr must be positive and warmup_steps non-negative")
        with warnings.catch_warnings():
            # Under LightningCLI the backbone is saved as its class_path config (so ``load_from_checkpoint``
            # rebuilds it); Lightning's advice to ignore it would drop that config.
            warnings.filterwarnings("ignore", message="Attribute 'net' is an instance of `nn.Module`")
            self.save_hyperparameters(ignore=["init_from"])
        for key in ("net", "schedule"):  # live objects (built in Python, not from a config) are not pickled
            if not isinstance(self.hparams.get(key), (dict, type(None))):
                self._hparams.pop(key)
                self._hparams_initial.pop(key, None)
        self.net = net
        self.schedule = schedule or VPSchedule()
        sigma_data = getattr(self.schedule, "sigma_data", 0.5)
        self.denoiser = Denoiser(net, self.schedule, Prediction(prediction, sigma_data))
        self.ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        if init_from is not None:
            self.init_weights_from(init_from)

    def init_weights_from(self, path: str) -> None:
        """Start ``net`` and its EMA from the EMA weights of the checkpoint at ``path`` (fine-tuning)."""
        source = load_denoiser(path, ema=True, field="model.init_from")
        try:
            self.net.load_state_dict(source.net.state_dict())
        except RuntimeError as err:
            reason = one_line(err, 300)
            raise ConfigError(f"model.init_from {path} holds another backbone than model.net: {reason}") from None
        self.ema.module.load_state_dict(self.net.state_dict())

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    def ema_denoiser(self) -> Denoiser:
        """The denoiser on the EMA weights (what validation and sampling use)."""
        return Denoiser(self.ema.module, self.schedule, self.denoiser.prediction)

    def drop_labels(self, y: Tensor) -> Tensor:
        """Replace each label by the null id with probability ``label_dropout``."""
        drop = torch.rand(y.shape, device=y.device) < self.hparams.label_dropout
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def diffusion_loss(self, net: nn.Module, x0: Tensor, y: Tensor) -> Tensor:
        """Unweighted MSE between ``net``'s output and the prediction target at a random time.

        A backbone with ``learn_sigma`` (DiT) adds the VLB term that trains its variance channels, on a
        detached mean (improved DDPM's hybrid loss ``mse + vb``, as DiT trains).
        """
        t = self.schedule.sample_training_times(x0.shape[0], device=x0.device)
        a, s = (broadcast_coef(c, x0) for c in self.schedule.alpha_sigma(t))
        eps = torch.randn_like(x0)
        x_t = a * x0 + s * eps
        prediction = self.denoiser.prediction
        out = net(prediction.input_scale(a, s) * x_t, self.schedule.net_time(t).to(x0.dtype), y)
        if not getattr(net, "learn_sigma", False):
            return (out - prediction.target(x0, eps, a, s)).pow(2).mean()
        out, v = out.chunk(2, dim=1)
        x0_hat = prediction.to_x0(out.detach(), x_t, a, s)
        vb = learned_variance_vlb(self.schedule, x0, x_t, t, x0_hat, v)
        return (out - prediction.target(x0, eps, a, s)).pow(2).mean() + vb.mean()

    def training_step(self, batch, batch_idx):
        x0, y = batch
        self.denoiser.check_labels(y, allow_null=True)
        loss = self.diffusion_loss(self.net, x0, self.drop_labels(y))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.ema.update_parameters(self.net)

    def validation_step(self, batch, batch_idx):
        x0, y = batch
        loss = self.diffusion_loss(self.ema.module, x0, y)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup = max(self.hparams.warmup_steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def load_denoiser(path, ema: bool, field: str = "--checkpoint") -> Denoiser:
    """The checkpoint's EMA (or raw) denoiser, in eval mode on the CPU; a ConfigError saying what is wrong."""
    if path is None:
        raise ConfigError(f"{field} is required: the .ckpt file of a trained ConditionalDiffusion")
    if not Path(path).is_file():
        raise ConfigError(f"{field} {path} does not exist")
    try:
        model = ConditionalDiffusion.load_from_checkpoint(path, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any failure means "not a checkpoint of this model"
        reason = one_line(err)
        raise ConfigError(f"{field} {path} is not a loadable ConditionalDiffusion checkpoint "
                          f"({type(err).__name__}: {reason})") from None
    return (model.ema_denoiser() if ema else model.denoiser).eval()
