"""A safe reader for the official EDM2 snapshots (``edm2-*.pkl``, Karras et al. 2024), see docs/edm2.md.

The official files are plain pickles in which every network object is a call
``torch_utils.persistence._reconstruct_persistent_obj(meta)``; the official loader runs ``meta['module_src']``
(Python source carried by the file) with ``exec``. This reader resolves only an explicit allow-list of
globals (``ALLOWED``): the persistence call becomes ``PersistentObject(class_name, state)``, which keeps
``meta['state']`` and never looks at ``module_src``; torch's nested storage blobs are read with
``torch.load(weights_only=True)``; every other global is refused (``UnsafePickleError``) before anything
runs. The result is a plain state dict, the constructor arguments and the encoder's latent scale/bias.

A leaf module (stdlib, numpy, torch).
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor


class EDM2FileError(ValueError):
    """A file that is not a readable EDM2 snapshot (one line naming the file and what is wrong)."""


class UnsafePickleError(EDM2FileError):
    """The pickle names a global outside the allow-list; nothing from it was run."""


@dataclass
class PersistentObject:
    """What ``_reconstruct_persistent_obj(meta)`` stands for here: the class name and its ``__dict__``."""

    class_name: str
    state: dict


class ModuleState:
    """A plain torch container (``ModuleDict``) as its pickled ``__dict__``; built by ``NEWOBJ`` + ``BUILD``."""

    def __setstate__(self, state: dict) -> None:
        self.state = state


def reconstruct_persistent_obj(meta: dict) -> PersistentObject:
    """Stand-in for ``torch_utils.persistence._reconstruct_persistent_obj``: reads ``class_name`` and
    ``state`` only; ``module_src`` (the source the official loader executes) is never read."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise EDM2FileError("a persistent object in the file is not of the EDM2 snapshot layout (type 'class' "
                            "with a state dict)")
    return PersistentObject(str(meta.get("class_name")), meta["state"])


def load_storage_bytes(data: bytes):
    """``torch.storage._load_from_bytes`` with ``weights_only=True``: a nested ``torch.save`` blob of one storage."""
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise UnsafePickleError("a nested torch storage blob holds more than tensor data (torch.load with "
                                "weights_only=True refused it; nothing from it was run)") from None


def numpy_dtype(obj, align=False, copy=False):
    """``numpy.dtype`` for numeric and boolean dtypes only (no object arrays)."""
    dtype = np.dtype(obj, align, copy)
    if dtype.kind not in "biufc":
        raise UnsafePickleError(f"the file holds a numpy array of dtype {dtype}; only numeric arrays are read")
    return dtype


def _reconstruct_array(subtype, shape, dtype):
    """numpy's ``_reconstruct(ndarray, shape, dtype)``: an empty array that ``BUILD`` then fills."""
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"numpy _reconstruct of {subtype!r}; only numpy.ndarray is read")
    return np.ndarray.__new__(np.ndarray, shape, dtype)



ALLOWED = {
    ("collections", "OrderedDict"): dict,
    ("dnnlib.util", "EasyDict"): dict,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_array,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_array,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): numpy_dtype,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch.nn.modules.container", "ModuleDict"): ModuleState,
    ("torch.storage", "_load_from_bytes"): load_storage_bytes,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): reconstruct_persistent_obj,
}


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only ``ALLOWED`` (to the stand-ins above) and refuses the rest."""

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing global {module}.{name}: it is not on the EDM2 snapshot allow-list, so the file may "
                f"run code when loaded (nothing from it was run)") from None

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing persistent id {pid!r}: EDM2 snapshots have none")


def safe_load(data: bytes | BinaryIO, name: str = "<bytes>"):
    """Unpickle ``data`` (bytes or a binary file) with ``SafeUnpickler``; any failure is one ``EDM2FileError``
    line naming ``name``."""
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    start = stream.tell()
    if stream.read(4) == b"PK\x03\x04":
        raise EDM2FileError(f"{name} is a zip file (a torch.save checkpoint such as a DiT or Lightning file), "
                            "not an EDM2 snapshot pickle")
    stream.seek(start)
    try:
        return SafeUnpickler(stream).load()
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{name}: {err}") from None
    except EDM2FileError as err:
        raise EDM2FileError(f"{name}: {err}") from None
    except Exception as err:  # truncated or corrupt: EOFError, UnpicklingError, struct/value errors
        detail = str(err).splitlines()[0] if str(err) else "no detail"
        raise EDM2FileError(f"{name} is not a readable EDM2 snapshot ({type(err).__name__}: {detail}); "
                            "is the file complete?") from None


def module_state_dict(obj, prefix: str = "") -> dict[str, Tensor]:
    """A flat ``state_dict`` from a module's pickled ``_parameters`` / ``_buffers`` / ``_modules``
    (buffers listed in ``_non_persistent_buffers_set`` are left out, as ``Module.state_dict`` does)."""
    state = obj.state
    out: dict[str, Tensor] = {}
    for key, value in state.get("_parameters", {}).items():
        if value is not None:
            out[prefix + key] = value.detach()
    skip = state.get("_non_persistent_buffers_set") or set()
    for key, value in state.get("_buffers", {}).items():
        if value is not None and key not in skip:
            out[prefix + key] = value
    for key, child in state.get("_modules", {}).items():
        if child is not None:
            out.update(module_state_dict(child, f"{prefix}{key}."))
    return out


@dataclass
class EDM2Snapshot:
    """One official EDM2 file, read safely.

    ``class_name``/``init_kwargs``: the network (``Precond``) and its constructor arguments;
    ``state_dict``: its weights and buffers as stored (float16); ``encoder``: the encoder's class name
    and its ``_init_kwargs``; ``latent_scale``/``latent_bias``: ``final = raw * scale + bias`` of
    ``StabilityVAEEncoder`` (``None`` for pixel models); ``loss_kwargs``: the EDM2 loss's arguments.
    """

    class_name: str
    init_kwargs: dict
    state_dict: dict[str, Tensor]
    encoder: str | None = None
    encoder_kwargs: dict = field(default_factory=dict)
    latent_scale: np.ndarray | None = None
    latent_bias: np.ndarray | None = None
    loss_kwargs: dict = field(default_factory=dict)


def _as_snapshot(obj, name: str) -> EDM2Snapshot:
    if not isinstance(obj, dict) or not isinstance(obj.get("ema"), PersistentObject):
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise EDM2FileError(f"{name} is not an EDM2 snapshot: expected a dict with the network under 'ema', "
                            f"got {keys}")
    ema, encoder, loss = obj["ema"], obj.get("encoder"), obj.get("loss_fn")
    snapshot = EDM2Snapshot(ema.class_name, dict(ema.state.get("_init_kwargs", {})), module_state_dict(ema))
    if isinstance(encoder, PersistentObject):
        snapshot.encoder, snapshot.encoder_kwargs = encoder.class_name, dict(encoder.state.get("_init_kwargs", {}))
        for key in ("scale", "bias"):
            if key in encoder.state:
                setattr(snapshot, f"latent_{key}", np.asarray(encoder.state[key], dtype=np.float32))
    if isinstance(loss, PersistentObject):
        snapshot.loss_kwargs = dict(loss.state.get("_init_kwargs", {}))
    return snapshot


def read_edm2_pickle(path: str | Path) -> EDM2Snapshot:
    """Read an official ``edm2-*.pkl`` without running anything from it (see the module docstring)."""
    path = Path(path)
    try:
        stream = path.open("rb")
    except OSError as err:
        raise EDM2FileError(f"cannot read EDM2 snapshot {path}: {err.strerror or err}") from None
    with stream:
        return _as_snapshot(safe_load(stream, str(path)), str(path))
