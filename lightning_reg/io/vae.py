"""The Stable Diffusion VAE (``diffusers.AutoencoderKL``) from a local folder or the local Hugging Face cache.

The folder is vetted and loaded by ``io.pretrained`` (configs as data, pickled weights checked before diffusers
reads them, safetensors preferred, never the network); errors are worded as ``io.files`` words them.
"""

from __future__ import annotations

from lightning_reg.io.pretrained import load_pretrained, local_folder


def load_autoencoder(source: str, field: str = "--vae", cache_dir: str | None = None):
    """An ``AutoencoderKL`` from a local folder (``save_pretrained``) or a hub name already in the local
    Hugging Face cache (``cache_dir``, default the standard cache); never downloads. A ConfigError otherwise."""
    from diffusers import AutoencoderKL

    folder = local_folder(source, field, "a folder written by AutoencoderKL.save_pretrained or a hub name such as "
                                         "stabilityai/sd-vae-ft-ema", cache_dir)
    return load_pretrained(AutoencoderKL, folder, field, "AutoencoderKL folder", low_cpu_mem_usage=False)
