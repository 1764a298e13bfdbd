"""The Stable Diffusion VAE (``diffusers.AutoencoderKL``) from a local folder or the local Hugging Face cache.

diffusers reads the weights itself (safetensors, or ``torch.load`` with ``weights_only`` for ``.bin``); this
reader decides where they may come from (never the network) and words its errors as ``io.files`` does.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

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
