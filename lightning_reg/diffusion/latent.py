"""Latent diffusion (Rombach et al. 2022) with the Stable Diffusion VAE that DiT uses.

The chain runs on scaled latents ``z = scale * E(x)`` (``scale = 0.18215`` for ``stabilityai/sd-vae-ft-ema``
and ``-mse``, read from the VAE's own config); images are ``x = D(z / scale)`` in [-1, 1]. The VAE is
``diffusers.AutoencoderKL``, frozen and always run under ``no_grad``:

* training / fine-tuning: ``data.latent.LatentImages`` wraps an image datamodule and encodes each batch on
  its device;
* sampling: ``LatentDenoiser`` is a ``Denoiser`` over the latent space that decodes only after the last
  step, so guidance and REG (``grad_x`` of the backbone) never run through the VAE.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_reg.diffusion.conditions import Condition, Conditioning
from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import NoiseSchedule
from lightning_reg.errors import ConfigError


class LatentCodec(nn.Module):
    """The frozen VAE with its latent scale and shift (read from its config; SD3's VAE has a ``shift_factor``, SD's
    none, 0): ``encode(x) = scale * (E(x) - shift)``, ``decode(z) = D(z / scale + shift)``, as diffusers' pipelines."""

    def __init__(self, vae: nn.Module, scale_factor: float | None = None):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scale_factor = float(scale_factor if scale_factor is not None else vae.config.scaling_factor)
        self.shift_factor = float(vae.config.get("shift_factor") or 0.0)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def latent_shape(self, image_shape) -> tuple[int, int, int]:
        _, h, w = image_shape
        return self.latent_channels, h // self.downsample, w // self.downsample

    def image_shape(self, latent_shape) -> tuple[int, int, int]:
        _, h, w = latent_shape
        return self.vae.config.out_channels, h * self.downsample, w * self.downsample

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] -> a draw of the posterior, scaled (DiT's training: ``latent_dist.sample()``)."""
        images = images.to(next(self.vae.parameters()).dtype)
        return (self.vae.encode(images).latent_dist.sample(generator) - self.shift_factor) * self.scale_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in about [-1, 1] (not clamped)."""
        latents = latents.to(next(self.vae.parameters()).dtype)
        return self.vae.decode(latents / self.scale_factor + self.shift_factor).sample


class ChannelLatentCodec(LatentCodec):
    """The VAE with a per-channel affine map, EDM2's ``StabilityVAEEncoder`` (docs/edm2.md): the chain's latents
    are ``z = raw * scale + bias`` (``scale``, ``bias``: one value per latent channel), and that VAE reads and
    writes images in [0, 1] (here, as everywhere in the project, images are in [-1, 1] outside the codec)."""

    def __init__(self, vae: nn.Module, scale, bias):
        super().__init__(vae, scale_factor=1.0)
        shape = (1, -1, 1, 1)
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).reshape(shape))
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float32).reshape(shape))
        if self.scale.numel() != self.latent_channels or self.bias.numel() != self.latent_channels:
            raise ConfigError(f"the latent scale/bias have {self.scale.numel()}/{self.bias.numel()} channels but "
                              f"the VAE's latents have {self.latent_channels}")

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        images = ((images + 1) / 2).to(next(self.vae.parameters()).dtype)
        return self.vae.encode(images).latent_dist.sample(generator).float() * self.scale + self.bias

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        raw = (latents.float() - self.bias) / self.scale
        return self.vae.decode(raw.to(next(self.vae.parameters()).dtype)).sample * 2 - 1


class LatentDenoiser(Denoiser):
    """A ``Denoiser`` whose ``data_shape`` is the latent shape; ``decode`` maps its samples to images.

    ``forward`` is the backbone's alone: the samplers, guidance and REG see latents only. A training batch of
    images is encoded by the codec (text-to-image fine-tuning; ``data.latent.LatentImages`` encodes DiT's).
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction: Prediction, codec: LatentCodec,
                 conditioning: Conditioning | None = None):
        super().__init__(net, schedule, prediction, conditioning)
        if self.data_shape[0] != codec.latent_channels:
            raise ConfigError(f"the backbone works on {self.data_shape[0]} channels but the VAE's latents have "
                              f"{codec.latent_channels}")
        self.codec = codec

    @classmethod
    def over(cls, denoiser: Denoiser, codec: LatentCodec) -> "LatentDenoiser":
        """``denoiser``'s backbone, schedule, prediction and conditioning over ``codec``'s latent space."""
        return cls(denoiser.net, denoiser.schedule, denoiser.prediction, codec, denoiser.conditioning)

    def with_net(self, net: nn.Module) -> "LatentDenoiser":
        return LatentDenoiser(net, self.schedule, self.prediction, self.codec, self.conditioning).train(self.training)

    def training_batch(self, batch) -> tuple[Tensor, Condition]:
        images, keys = batch
        return self.codec.encode(images), self.conditioning.make(keys)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.codec.image_shape(self.data_shape)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.image_shape

    def decode(self, latents: Tensor) -> Tensor:
        return self.codec.decode(latents).float()
