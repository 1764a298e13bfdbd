"""Training data in the latent space of the Stable Diffusion VAE (latent diffusion, Rombach et al. 2022).

``LatentImages`` wraps an image datamodule and replaces each batch's images by their scaled VAE latents
(``diffusion.latent.LatentCodec``); sample the model with ``sample.py --vae`` (the same VAE).
"""

from __future__ import annotations

import lightning as L

from lightning_reg.diffusion.latent import LatentCodec
from lightning_reg.io.vae import load_autoencoder


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
