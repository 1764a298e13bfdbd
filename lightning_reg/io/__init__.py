"""The loading layer's leaf: every read of a file we do not trust, and every atomic write (``docs/architecture.md``).

It imports nothing of the project but ``errors``: ``files`` (torch files, state dicts, npz, atomic writes),
``pretrained`` (third-party pretrained folders, vetted, then loaded offline), ``vae`` (the Stable Diffusion VAE),
``edm2_pickle`` (the official EDM2 snapshots), ``edm2`` (their safetensors form; either form read). Model formats
built on these readers live in ``lightning_reg.sources``.
"""

from lightning_reg.io.files import (atomic_write, check_torch_weights, file_sha256, load_weights,
                                    read_json, read_npz_images, read_torch, refuse, require_file, require_keys,
                                    state_dict_mismatch, to_uint8_nhwc, tree_sha256, unwrap_state_dict, write_json)
from lightning_reg.io.pretrained import load_pretrained
from lightning_reg.io.vae import load_autoencoder

__all__ = ["atomic_write", "check_torch_weights", "file_sha256", "load_autoencoder", "load_pretrained", "load_weights",
           "read_json", "read_npz_images", "read_torch", "refuse", "require_file", "require_keys",
           "state_dict_mismatch", "to_uint8_nhwc", "tree_sha256", "unwrap_state_dict", "write_json"]
