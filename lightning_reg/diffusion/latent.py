"""Latent diffusion (Rombach et al. 2022) with the Stable Diffusion VAE that DiT uses.

The chain runs on scaled latents ``z = scale * E(x)`` (``scale = 0.18215`` for ``stabilityai/sd-vae-ft-ema``
and ``-mse``, read from the VAE's own config); images are ``x = D(z / scale)`` in [-1, 1]. The VAE is
``diffusers.AutoencoderKL``, frozen and always run under ``no_grad``:

* training / fine-tuning: ``LatentImages`` wraps an image datamodule and encodes each batch on its device;
* sampling: ``LatentDenoiser`` is a ``Denoiser`` over the latent space that decodes only after the last
  step, so guidance and REG (``grad_x`` of the backbone) never run through the VAE.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import NoiseSchedule
from lightning_reg.errors import ConfigError, one_line

HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


def load_autoencoder(source: str, field: str = "--vae", cache_dir: str | None = None):
    """An ``AutoencoderKL`` from a local folder (``save_pretrained``) or a hub name already in the local
    Hugging Face cache (``cache_dir``, default the standard cache); never downloads. A ConfigError otherwise."""
    from diffusers import AutoencoderKL

    path = Path(source).expanduser()
    is_hub_name = not path.exists() and HUB_NAME.match(source) and not source.startswith((".", "/", "~"))
    if not path.is_dir() and not is_hub_name:
        problem = "is a file" if path.exists() else "does not exist"
        raise ConfigError(f"{field} {source} {problem}: give a folder written by AutoencoderKL.save_pretrained "
                          "or a hub name such as stabilityai/sd-vae-ft-ema")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # huggingface_hub's deprecation notes on its own arguments
            return AutoencoderKL.from_pretrained(source if is_hub_name else str(path), low_cpu_mem_usage=False,
                                                 local_files_only=True, cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 - missing files, another model type, corrupt weights ...
        if is_hub_name:
            raise ConfigError(f"{field} {source} is neither a folder nor in the local Hugging Face cache, and "
                              f"nothing is downloaded at run time: run `huggingface-cli download {source}` on a "
                              "machine with network and copy the cache here, or give a local folder") from None
        raise ConfigError(f"{field} {source} is not a loadable AutoencoderKL folder ({type(err).__name__}: "
                          f"{one_line(err, 300)})") from None


class LatentCodec(nn.Module):
    """The frozen VAE with its latent scale: ``encode(x) = scale * E(x)``, ``decode(z) = D(z / scale)``."""

    def __init__(self, vae: nn.Module, scale_factor: float | None = None):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scale_factor = float(scale_factor if scale_factor is not None else vae.config.scaling_factor)
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
        return self.vae.encode(images).latent_dist.sample(generator) * self.scale_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in about [-1, 1] (not clamped)."""
        latents = latents.to(next(self.vae.parameters()).dtype)
        return self.vae.decode(latents / self.scale_factor).sample


class LatentDenoiser(Denoiser):
    """A ``Denoiser`` whose ``data_shape`` is the latent shape; ``decode`` maps its samples to images.

    ``forward`` is the backbone's alone: the samplers, guidance and REG see latents only.
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction: Prediction, codec: LatentCodec):
        super().__init__(net, schedule, prediction)
        if self.data_shape[0] != codec.latent_channels:
            raise ConfigError(f"the backbone works on {self.data_shape[0]} channels but the VAE's latents have "
                              f"{codec.latent_channels}")
        self.codec = codec

    @classmethod
    def over(cls, denoiser: Denoiser, codec: LatentCodec) -> "LatentDenoiser":
        """``denoiser``'s backbone, schedule and prediction over ``codec``'s latent space."""
        return cls(denoiser.net, denoiser.schedule, denoiser.prediction, codec)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.codec.image_shape(self.data_shape)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.image_shape

    def decode(self, latents: Tensor) -> Tensor:
        return self.codec.decode(latents).float()


class LatentImages(L.LightningDataModule):
    """An image datamodule's batches ``(x, y)`` with ``x`` replaced by its scaled VAE latent.

    Encoding happens in ``on_after_batch_transfer`` (on the training device, under ``no_grad``), so the
    model trains on latents without knowing about the VAE; sample with ``sample.py --vae`` (same VAE).

    Args:
        data: the image datamodule (e.g. ``ImageDataModule``, images in [-1, 1]).
        vae: a folder written by ``AutoencoderKL.save_pretrained`` or a cached hub name
            (``stabilityai/sd-vae-ft-ema``).
    """

    def __init__(self, data: L.LightningDataModule, vae: str = "stabilityai/sd-vae-ft-ema"):
        super().__init__()
        self.data = data
        self.codec = LatentCodec(load_autoencoder(vae, field="data.vae"))

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    @property
    def data_shape(self) -> tuple[int, int, int]:
        return self.codec.latent_shape(self.data.data_shape)

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.data.setup(stage)

    def train_dataloader(self):
        return self.data.train_dataloader()

    def val_dataloader(self):
        return self.data.val_dataloader()

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        return self.codec.to(x.device).encode(x), y
