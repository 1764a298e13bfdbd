"""Reading files we do not trust, and writing files atomically: the one place either happens.

Every reader answers bad input with one ``ConfigError`` line in one vocabulary::

    <field> <path> does not exist[; hint]
    <field> <path> is not a <what> (<problem>)
    <field> <path> holds pickled objects other than tensors and plain data, ...: refused, so it is not a <what> (...)

``read_torch`` is the only ``torch.load`` of the project: ``weights_only=True`` (tensors and plain data,
so loading runs no code) on a ``torch.save`` zip archive, memory-mapped; ``check_torch_weights`` vets a file
that a library will load itself. ``unwrap_state_dict`` finds the
weights inside a checkpoint and ``load_weights`` loads them strictly, naming what differs
(``state_dict_mismatch``). Writers go through ``atomic_path`` (a file or folder written under a temporary name,
then renamed) or ``atomic_write`` (the same, for a writer of an open file): a file under its final name is complete.
Text, JSON and ``.npz`` files are read within budgets (``read_text``, ``read_json``, ``NpzArchive``): sizes are
checked before the contents are read or decompressed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn

from lightning_reg.errors import ConfigError, does_not_exist, one_line
from lightning_reg.io.plain import plain_data

MAX_JSON_BYTES = 16 << 20  # run.json, meta.json: a few KB when the project writes them
MAX_NPZ_BYTES = 16 << 30  # what an .npz may declare uncompressed: 50,000 RGB 256 x 256 images are 9.2 GiB

NOT_A_ZIP = ("it cannot be read as a torch weights file: not a torch.save zip archive, so truncated or in "
             "another format")


def require_file(path, field: str, hint: str = "") -> Path:
    """``path`` as a ``Path`` if it is a file; else ``<field> <path> does not exist[; hint]``."""
    path = Path(path)
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else does_not_exist(path)
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
        with torch.serialization.safe_globals(list(safe_globals)), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's remarks on the file's pickle protocol: the refusal says it all
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


def build_within(build: Callable[[], nn.Module], weights: Mapping, what: str) -> nn.Module:
    """``build()`` once its shapes, built on the meta device (no memory), equal those of ``weights`` (a state
    dict read from the same file): arguments from a file cannot allocate more than the weights it holds."""
    try:
        with torch.device("meta"):
            mismatch = state_dict_mismatch(build().state_dict(), weights)
    except ConfigError:
        raise
    except (TypeError, ValueError, RuntimeError, AssertionError, ZeroDivisionError) as err:  # our constructors
        raise ConfigError(f"its arguments do not build a {what} ({type(err).__name__}: {one_line(err)})") from None
    if mismatch:
        raise ConfigError(f"its weights do not fit the {what} it describes ({mismatch})")
    return build()


def file_sha256(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


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


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temporary path to write ``path``'s file or folder to, renamed to ``path`` (``os.replace``) when the block
    ends without an error and removed when it raises: a file under its final name is complete.

    The temporary path has ``path``'s own name (a writer that adds a missing ``.npz`` finds it) inside a fresh
    hidden folder beside ``path`` (the same file system, so the rename is atomic); ``path``'s folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield folder / path.name
        os.replace(folder / path.name, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def atomic_write(path, write: Callable[[object], None], binary: bool = True) -> None:
    """Call ``write(file)`` on a file opened at ``atomic_path(path)``: binary, or UTF-8 text with no line-ending
    translation (``newline=""``, as ``csv`` needs)."""
    text = {} if binary else {"encoding": "utf-8", "newline": ""}
    with atomic_path(path) as tmp, open(tmp, "wb" if binary else "w", **text) as f:
        write(f)


def write_json(path, data: dict) -> None:
    atomic_write(path, lambda f: json.dump(data, f, indent=2, sort_keys=True, default=str), binary=False)


def read_text(path, field: str, what: str, max_bytes: int) -> str:
    """The UTF-8 text of the regular file ``path``, read to at most ``max_bytes`` bytes (a device or a pipe is not
    a regular file); a missing, larger, unreadable or non-UTF-8 file is one ConfigError."""
    path = require_file(path, field)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as err:
        raise refuse(path, field, what, f"it cannot be read: {type(err).__name__}: {one_line(err, 150)}") from None
    if len(data) > max_bytes:
        raise refuse(path, field, what, f"it is larger than {max_bytes:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise refuse(path, field, what, f"not UTF-8 text: {err.reason} at byte {err.start:,}") from None


def read_json(path, field: str = "the file") -> dict:
    """The JSON object in ``path`` (``run.json``, ``meta.json``: files the project wrote, read back) as plain data
    of bounded size (``plain_data``); a file over ``MAX_JSON_BYTES``, not JSON or not an object is one ConfigError."""

    text = read_text(path, field, "JSON object", MAX_JSON_BYTES)
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise refuse(path, field, "JSON object", f"{type(err).__name__}: {one_line(err, 150)}") from None
    if not isinstance(value, dict):
        raise refuse(path, field, "JSON object", f"it holds a {type(value).__name__}")
    return plain_data(value, f"{field} {path}", finite=False)


class NpzArchive:
    """An ``.npz`` read within budget (``with NpzArchive(path, field, what) as npz``): opening checks what its
    members declare in all (at most ``MAX_NPZ_BYTES`` uncompressed), ``header(key)`` reads one member's ``.npy``
    header (numbers, not objects; exactly as many bytes as the member declares), both before any data is
    decompressed; ``array(key)`` then reads the data. ``keys``: the arrays' names. Every problem is one
    ConfigError ``<field> <path> is not a <what> (<problem>)``."""

    def __init__(self, path, field: str, what: str = "readable .npz"):
        self.path, self.field, self.what = require_file(path, field), field, what
        self.archive = self._guarded(lambda: zipfile.ZipFile(self.path))
        members = self.archive.infolist()
        declared = sum(m.file_size for m in members)
        if declared > MAX_NPZ_BYTES:
            self.archive.close()
            raise self.refuse(f"its members declare {declared:,} bytes uncompressed, over the {MAX_NPZ_BYTES:,} "
                              "bytes an .npz may hold here (MAX_NPZ_BYTES)")
        self.keys = [m.filename.removesuffix(".npy") for m in members if m.filename.endswith(".npy")]
        self._headers: dict[str, tuple[tuple[int, ...], np.dtype]] = {}

    def __enter__(self) -> "NpzArchive":
        return self

    def __exit__(self, *exc) -> None:
        self.archive.close()

    def refuse(self, problem: str) -> ConfigError:
        return refuse(self.path, self.field, self.what, problem)

    def header(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        """``(shape, dtype)`` of array ``key``, from its header alone."""
        if key not in self._headers:
            self._headers[key] = self._guarded(lambda: self._read_header(key))
        return self._headers[key]

    def array(self, key: str) -> np.ndarray:
        """Array ``key``, once its header is checked: as many bytes in memory as the header declares."""
        self.header(key)

        def read() -> np.ndarray:
            with self.archive.open(f"{key}.npy") as member:
                return np.lib.format.read_array(member, allow_pickle=False)

        return self._guarded(read)

    def _read_header(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        info = self.archive.getinfo(f"{key}.npy")
        with self.archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version not in ((1, 0), (2, 0)):
                raise self.refuse(f"{key} is in .npy format {version[0]}.{version[1]}; only 1.0 and 2.0 are read")
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(member)
            data_offset = member.tell()
        if dtype.hasobject:
            raise self.refuse(f"{key} holds Python objects ({dtype}), which could run code when loaded; only "
                              "arrays of numbers are read")
        if any(n < 0 for n in shape):
            raise self.refuse(f"{key} has the shape {shape}")
        needed = data_offset + math.prod(shape) * dtype.itemsize
        if needed != info.file_size:
            raise self.refuse(f"{key}'s header ({dtype} {shape}) needs {needed:,} bytes, but the archive declares "
                              f"{info.file_size:,}")
        return tuple(shape), dtype

    def _guarded(self, read: Callable):
        try:
            return read()
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - a truncated, foreign or damaged archive fails in many ways
            raise self.refuse(f"{type(err).__name__}: {one_line(err, 200)}") from None


def read_npz_images(path, flag: str, image_keys: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray | None]:
    """``(uint8 NHWC images under the first of image_keys, integer labels or None)`` of an ``.npz`` (labels from
    ``labels`` or ``arr_1``), both checked from their headers before they are read (``NpzArchive``); a missing,
    unreadable or ill-formed file is one ConfigError naming ``flag``."""
    with NpzArchive(path, flag) as npz:
        key = next((k for k in image_keys if k in npz.keys), None)
        if key is None:
            raise ConfigError(f"{flag} {npz.path} holds {npz.keys}; expected uint8 N x H x W x C images under "
                              f"{' or '.join(repr(k) for k in image_keys)} (and optionally 'labels')")
        shape, dtype = npz.header(key)
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
            raise ConfigError(f"{flag} {npz.path}: {key} must be uint8 images (N, H, W, C) with C 1 or 3, got "
                              f"{dtype} {shape}")
        label_key = next((k for k in ("labels", "arr_1") if k in npz.keys), None)
        if label_key is not None:
            label_shape, label_dtype = npz.header(label_key)
            if label_dtype.kind not in "iu" or label_shape != shape[:1]:
                raise ConfigError(f"{flag} {npz.path}: {label_key} must be integer labels ({shape[0]},), one per "
                                  f"image, got {label_dtype} {label_shape}")
        return npz.array(key), npz.array(label_key) if label_key is not None else None


def to_uint8_nhwc(images) -> np.ndarray:
    """Images in [-1, 1], (N, C, H, W), as uint8 (N, H, W, C): ``round((x + 1) * 127.5)`` clipped to [0, 255]."""
    images = torch.as_tensor(images)
    return rearrange(((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), "n c h w -> n h w c").numpy()
