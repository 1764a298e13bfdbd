"""Reading files we do not trust, and writing files atomically: the one place either happens.

Every reader answers bad input with one ``ConfigError`` line in one vocabulary::

    <field> <path> does not exist[; hint]
    <field> <path> is not a <what> (<problem>)
    <field> <path> holds pickled objects other than tensors and plain data, ...: refused, so it is not a <what> (...)

``read_torch`` is the only ``torch.load`` of the project: ``weights_only=True`` (tensors and plain data,
so loading runs no code) on a ``torch.save`` zip archive, memory-mapped; ``check_torch_weights`` vets a file
that a library will load itself. ``unwrap_state_dict`` finds the
weights inside a checkpoint and ``load_weights`` loads them strictly, naming what differs
(``state_dict_mismatch``). Writers go through ``atomic_write``: a file under its final name is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn

from lightning_reg.errors import ConfigError, one_line

NOT_A_ZIP = ("it cannot be read as a torch weights file: not a torch.save zip archive, so truncated or in "
             "another format")


def require_file(path, field: str, hint: str = "") -> Path:
    """``path`` as a ``Path`` if it is a file; else ``<field> <path> does not exist[; hint]``."""
    path = Path(path)
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"{field} {path} {problem}{f'; {hint}' if hint else ''}")
    return path


def refuse(path, field: str, what: str, problem: str) -> ConfigError:
    """The error for a file that is not what was asked: ``<field> <path> is not a <what> (<problem>)``."""
    return ConfigError(f"{field} {path} is not a {what} ({problem})")


def read_torch(path, field: str, what: str = "PyTorch checkpoint", safe_globals: Sequence[type] = (),
               mmap: bool = True, hint: str = ""):
    """The object ``torch.save`` wrote to ``path``, loaded with ``weights_only=True`` on the CPU.

    ``safe_globals``: classes besides tensors and plain data the file may hold (e.g. the ``argparse.Namespace``
    that DiT's training script saves). A missing, truncated, foreign or code-holding file is one ConfigError.
    """
    path = require_file(path, field, hint)
    if not zipfile.is_zipfile(path):
        raise refuse(path, field, what, NOT_A_ZIP)
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        detail = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), one_line(err, 150))
        raise ConfigError(f"{field} {path} holds pickled objects other than tensors and plain data, which could "
                          f"run code when loaded: refused, so it is not a {what} (UnpicklingError: {detail})") from None
    except Exception as err:  # noqa: BLE001 - a damaged archive fails in many ways
        raise refuse(path, field, what, f"it cannot be read as a torch weights file: {type(err).__name__}: "
                                        f"{one_line(err, 150)}") from None


def check_torch_weights(path, field: str, what: str, hint: str = "") -> Path:
    """``path``, once ``read_torch`` found nothing in it but tensors and plain data: for libraries that load the
    file themselves without ``weights_only`` (torch-fidelity's Inception-v3), which then cannot run code from it."""
    read_torch(path, field, what, hint=hint)
    return Path(path)


def require_keys(checkpoint, keys: Sequence[str], path, field: str, what: str) -> Mapping:
    """``checkpoint`` if it is a mapping holding every one of ``keys``; else one ConfigError naming the first
    missing key (a ``KeyError``, in the words of the file's reader)."""
    if not isinstance(checkpoint, Mapping):
        raise refuse(path, field, what, f"it holds a {type(checkpoint).__name__}, not a dict")
    missing = [k for k in keys if k not in checkpoint]
    if missing:
        raise refuse(path, field, what, f"KeyError: it has no {missing[0]!r}; it holds {list(checkpoint)[:5]}")
    return checkpoint


def unwrap_state_dict(checkpoint, path, field: str, under: Sequence[str] = ("ema", "model"),
                      prefix: str = "") -> dict[str, Tensor]:
    """The state dict in ``checkpoint``: itself, or the first of ``under`` holding a mapping; with ``prefix``
    only the keys starting with it, the prefix removed. Entries that are not tensors: one ConfigError."""
    if isinstance(checkpoint, Mapping):
        checkpoint = next((checkpoint[k] for k in under if isinstance(checkpoint.get(k), Mapping)), checkpoint)
    where = f"plain, or under {' or '.join(repr(k) for k in under)}" if under else "plain"
    if not isinstance(checkpoint, Mapping):
        raise ConfigError(f"{field} {path} holds a {type(checkpoint).__name__}, not a state dict ({where})")
    if prefix:
        checkpoint = {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}
    others = [k for k, v in checkpoint.items() if not isinstance(v, Tensor)]
    if others:
        raise ConfigError(f"{field} {path} is not a state dict ({where}): its entries {others[:4]} are not tensors")
    return dict(checkpoint)


def state_dict_mismatch(expected: Mapping, found: Mapping, limit: int = 3) -> str:
    """What differs between two state dicts (missing / unexpected keys, other shapes), or ``""``."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} {tuple(found[k].shape)} (needs {tuple(v.shape)})"
              for k, v in expected.items() if k in found and found[k].shape != v.shape]
    parts = [f"{what}: {', '.join(items[:limit])}{f' (+{len(items) - limit} more)' if len(items) > limit else ''}"
             for what, items in (("missing", missing), ("unexpected", unexpected), ("shapes", shapes)) if items]
    return "; ".join(parts)


def load_weights(module: nn.Module, state_dict: Mapping[str, Tensor], path, field: str, what: str) -> nn.Module:
    """``module`` with ``state_dict`` loaded strictly; a mismatch is one ConfigError naming what differs."""
    mismatch = state_dict_mismatch(module.state_dict(), state_dict)
    if mismatch:
        raise refuse(path, field, what, f"its weights do not fit: {mismatch}")
    module.load_state_dict(state_dict, strict=True)
    return module


def file_sha256(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def quiet_loading():
    """transformers' "Loading weights" progress bar (on stderr) and the loaders' warnings off while loading
    pretrained folders, so a failure is still one ``error:`` line; the bar's setting is restored after."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def tree_sha256(path) -> str:
    """``file_sha256`` of a file; of a folder (a diffusers pipeline), the sha256 of its files' relative paths and
    ``file_sha256``s in sorted order (links followed, as the loaders follow them)."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def atomic_write(path, write: Callable[[object], None], binary: bool = True) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, data: dict) -> None:
    atomic_write(path, lambda f: json.dump(data, f, indent=2, sort_keys=True, default=str), binary=False)


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def read_npz_images(path, flag: str, image_keys: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray | None]:
    """``(uint8 NHWC images under the first of image_keys, labels or None)`` of an ``.npz`` (labels from
    ``labels`` or ``arr_1``); a missing, unreadable or ill-formed file is one ConfigError naming ``flag``."""
    path = require_file(path, flag)
    try:
        with np.load(path) as data:  # allow_pickle is False: object arrays are refused
            key = next((k for k in image_keys if k in data.files), None)
            if key is None:
                raise ConfigError(f"{flag} {path} holds {data.files}; expected uint8 N x H x W x C images under "
                                  f"{' or '.join(repr(k) for k in image_keys)} (and optionally 'labels')")
            images = data[key]
            label_key = next((k for k in ("labels", "arr_1") if k in data.files), None)
            labels = data[label_key] if label_key else None
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - a truncated or non-npz file
        raise ConfigError(f"{flag} {path} is not a readable .npz ({type(err).__name__}: {one_line(err)})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ConfigError(f"{flag} {path}: {key} must be uint8 images (N, H, W, C) with C 1 or 3, got "
                          f"{images.dtype} {images.shape}")
    return images, labels


def to_uint8_nhwc(images) -> np.ndarray:
    """Images in [-1, 1], (N, C, H, W), as uint8 (N, H, W, C): ``round((x + 1) * 127.5)`` clipped to [0, 255]."""
    images = torch.as_tensor(images)
    return rearrange(((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), "n c h w -> n h w c").numpy()
