"""A safe reader for the official EDM2 snapshots (``edm2-*.pkl``, Karras et al. 2024), see docs/edm2.md.

The official files are plain pickles in which every network object is a call
``torch_utils.persistence._reconstruct_persistent_obj(meta)``; the official loader runs ``meta['module_src']``
(Python source carried by the file) with ``exec``. This reader resolves only an explicit allow-list of
globals (``ALLOWED``): the persistence call becomes ``PersistentObject(class_name, state)``, which keeps
``meta['state']`` and never looks at ``module_src``; numpy arrays become ``NumpyArray``, rebuilt from their
pickled bytes in a numeric dtype (numpy's own ``__setstate__`` never runs: it takes dtype flags and fields that
turn a float array into an object one); torch's nested storage blobs are read with
``torch.load(weights_only=True)``; every other global is refused (``UnsafePickleError``) before anything runs.

What is then taken from the result is checked as data (``EDM2Snapshot``): each field of its type, the
constructor arguments plain data within a budget (``plain_data``: a tree shared through the pickle memo cannot
expand), each module visited once, each tensor floating point and within its storage. A small file cannot cost
large memory or time, and every problem is one ``EDM2FileError`` line naming the file.

A leaf module (stdlib, numpy, torch, ``lightning_reg.io.plain``).
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

from lightning_reg.errors import ConfigError
from lightning_reg.io.plain import plain_data

MAX_NAME_CHARS = 256  # a class, module or tensor name
MAX_KEY_CHARS = 4_096  # a state-dict key: names joined by dots
MAX_KWARGS_ITEMS, MAX_KWARGS_CHARS = 1_000, 1_000  # one set of constructor arguments (official ones: < 30 values)
MAX_ENTRIES = 20_000  # modules and tensor slots walked (the official xxl network: 204 modules, 203 tensors)
MAX_MODULE_DEPTH = 16  # the official networks: 4
MAX_LATENT_VALUES = 64  # the latent scale or bias: one value per channel
MODULE_TABLES = ("_parameters", "_buffers", "_modules")


class EDM2FileError(ValueError):
    """A file that is not a readable EDM2 snapshot (one line naming the file and what is wrong)."""


class UnsafePickleError(EDM2FileError):
    """The pickle names a global outside the allow-list; nothing from it was run."""


def kind_of(value) -> str:
    """What ``value`` is, for an error line (never its contents, which may be huge)."""
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor"
    return f"a {type(value).__name__}"


@dataclass
class PersistentObject:
    """What ``_reconstruct_persistent_obj(meta)`` stands for here: the class name and its ``__dict__``."""

    class_name: str
    state: dict

    def __setstate__(self, state) -> None:
        raise UnsafePickleError("the file rebuilds a persistent object after creating it (BUILD); EDM2 snapshots "
                                "do not")


class ModuleState:
    """A plain torch container (``ModuleDict``) as its pickled ``__dict__``; built by ``NEWOBJ`` + ``BUILD``."""

    state = None

    def __setstate__(self, state) -> None:
        self.state = state


def reconstruct_persistent_obj(meta) -> PersistentObject:
    """Stand-in for ``torch_utils.persistence._reconstruct_persistent_obj``: reads ``class_name`` and
    ``state`` only; ``module_src`` (the source the official loader executes) is never read."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise EDM2FileError("a persistent object in the file is not of the EDM2 snapshot layout (type 'class' "
                            "with a state dict)")
    return PersistentObject(checked_name(meta.get("class_name"), "a persistent object's class_name"), meta["state"])


def load_storage_bytes(data: bytes):
    """``torch.storage._load_from_bytes`` with ``weights_only=True``: a nested ``torch.save`` blob of one storage."""
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise UnsafePickleError("a nested torch storage blob holds more than tensor data (torch.load with "
                                "weights_only=True refused it; nothing from it was run)") from None


class NumpyDtype:
    """Stand-in for ``numpy.dtype(name, align, copy)`` and its ``BUILD``: a numeric dtype given by name, whose
    pickled state may set its byte order and nothing else."""

    def __init__(self, name, align=False, copy=False):
        if not isinstance(name, str):
            raise UnsafePickleError(f"a numpy dtype is given by {kind_of(name)}, not by its name")
        self.dtype = np.dtype(name)
        if self.dtype.kind not in "biufc":
            raise UnsafePickleError(f"the file holds a numpy array of dtype {self.dtype}; only numeric arrays are read")

    def __setstate__(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 8 and isinstance(state[1], str)
                and state[1] in ("<", ">", "|", "=") and all(part is None for part in state[2:5])):
            raise UnsafePickleError("a numpy dtype's pickled state is not that of a numeric dtype (it has fields, a "
                                    "sub-array or no byte order); only numeric arrays are read")
        if state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


class NumpyArray:
    """Stand-in for numpy's ``_reconstruct(ndarray, shape, dtype)`` and its ``BUILD``: ``array``, the pickled
    bytes read by ``numpy.frombuffer`` in a ``NumpyDtype`` (``None`` until built)."""

    array = None

    def __init__(self, *args):
        if args:
            raise UnsafePickleError("the file calls numpy.ndarray itself; numpy arrays are read only in the form "
                                    "numpy pickles them (_reconstruct, then their bytes)")

    def __setstate__(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[1], tuple)
                and isinstance(state[2], NumpyDtype) and isinstance(state[4], bytes)):
            raise UnsafePickleError("a numpy array's pickled state is not a numeric array's (shape, numeric dtype, "
                                    "bytes); only numeric arrays are read")
        _, shape, dtype, fortran, data = state
        self.array = np.frombuffer(data, dtype.dtype).reshape(shape, order="F" if fortran is True else "C").copy("K")


def reconstruct_array(subtype, shape, dtype) -> NumpyArray:
    """numpy's ``_reconstruct(ndarray, shape, dtype)``: the empty array that ``BUILD`` then fills."""
    if subtype is not NumpyArray:
        raise UnsafePickleError(f"numpy _reconstruct of {kind_of(subtype)}; only numpy.ndarray is read")
    return NumpyArray()


ALLOWED = {
    ("collections", "OrderedDict"): dict,
    ("dnnlib.util", "EasyDict"): dict,
    ("numpy._core.multiarray", "_reconstruct"): reconstruct_array,
    ("numpy.core.multiarray", "_reconstruct"): reconstruct_array,
    ("numpy", "ndarray"): NumpyArray,
    ("numpy", "dtype"): NumpyDtype,
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
                f"refusing global {module[:100]}.{name[:100]}: it is not on the EDM2 snapshot allow-list, so the file "
                f"may run code when loaded (nothing from it was run)") from None

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing a persistent id ({kind_of(pid)}): EDM2 snapshots have none")


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
        detail = str(err).splitlines()[0][:300] if str(err) else "no detail"
        raise EDM2FileError(f"{name} is not a readable EDM2 snapshot ({type(err).__name__}: {detail}); "
                            "is the file complete?") from None


def checked_name(value, where: str) -> str:
    """A class, module or tensor name: a non-empty string without dots, at most ``MAX_NAME_CHARS`` long."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS or "." in value:
        shown = repr(value[:40]) if isinstance(value, str) else kind_of(value)
        raise EDM2FileError(f"{where} is {shown}, not a name (a string of 1 to {MAX_NAME_CHARS} characters "
                            "without dots)")
    return value


def checked_tensor(value, where: str) -> Tensor:
    """``value`` detached (no hooks, no grad): a dense floating-point tensor no larger than its storage (a view
    with stride 0 can stand for 10^9 values over one)."""
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.layout != torch.strided:
        raise EDM2FileError(f"{where} is {kind_of(value)}, not a floating-point tensor")
    stored = value.untyped_storage().nbytes() // value.element_size()
    if value.numel() > stored:
        raise EDM2FileError(f"{where} is a view of {value.numel():,} values over a storage of {stored:,} (repeated "
                            "by its strides); refused")
    return value.detach()


def checked_kwargs(value, where: str) -> dict:
    """Constructor arguments: a dict of plain data within ``MAX_KWARGS_ITEMS`` values (``plain_data``)."""
    if not isinstance(value, dict):
        raise EDM2FileError(f"{where} is {kind_of(value)}, not a dict of constructor arguments")
    try:
        return plain_data(value, where, max_items=MAX_KWARGS_ITEMS, max_chars=MAX_KWARGS_CHARS)
    except ConfigError as err:
        raise EDM2FileError(str(err)) from None


def checked_latent(value, where: str) -> np.ndarray | None:
    """The latent scale or bias as float32 (``None`` stays ``None``): at most ``MAX_LATENT_VALUES`` finite real
    numbers, from a numeric array, a tensor, a flat list or a number."""
    if value is None:
        return None
    if isinstance(value, NumpyArray):
        value = value.array  # None when the file never filled it
    if isinstance(value, Tensor):
        value = checked_tensor(value, where)
        size = value.numel()
    elif isinstance(value, np.ndarray) or type(value) in (int, float):
        size = np.size(value)
    elif isinstance(value, list) and all(type(v) in (int, float) for v in value):
        size = len(value)
    else:
        raise EDM2FileError(f"{where} is {kind_of(value)}, not numbers (one per latent channel)")
    if size > MAX_LATENT_VALUES:
        raise EDM2FileError(f"{where} holds {size:,} values; at most {MAX_LATENT_VALUES} are read (one per latent "
                            "channel)")
    array = value.float().numpy() if isinstance(value, Tensor) else np.asarray(value)
    if array.dtype.kind not in "iuf" or not np.isfinite(array).all():
        raise EDM2FileError(f"{where} must be finite real numbers, got {array.dtype} values {array.tolist()}")
    return array.astype(np.float32)


def module_state_dict(obj, name: str = "ema") -> dict[str, Tensor]:
    """A flat ``state_dict`` (tensors as stored, checked later by ``EDM2Snapshot``) from a module's pickled
    ``_parameters`` / ``_buffers`` / ``_modules`` (buffers listed in ``_non_persistent_buffers_set`` are left
    out, as ``Module.state_dict`` does). Each module is visited once: one reached twice (shared through the
    pickle memo, a walk that doubles per level), more than ``MAX_ENTRIES`` modules and tensor slots or a tree
    deeper than ``MAX_MODULE_DEPTH`` is refused."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    walked = 0

    def count(where: str) -> None:
        nonlocal walked
        walked += 1
        if walked > MAX_ENTRIES:
            raise EDM2FileError(f"{where}: the network holds more than {MAX_ENTRIES:,} modules and tensor slots; "
                                "refused")

    def visit(module, prefix: str) -> None:
        where = f"{name} module {prefix[:-1][:200]!r}" if prefix else f"{name} network"
        if id(module) in seen:
            raise EDM2FileError(f"{where} is a module reached a second time (the file shares one module between "
                                "places); EDM2 networks share none")
        if prefix.count(".") > MAX_MODULE_DEPTH:
            raise EDM2FileError(f"{where} is nested deeper than {MAX_MODULE_DEPTH} modules; refused")
        count(where)
        seen.add(id(module))
        state = module.state if isinstance(module, (PersistentObject, ModuleState)) else None
        if not isinstance(state, dict):
            raise EDM2FileError(f"{where} is {kind_of(module)} (state: {kind_of(state)}), not a pickled torch module")
        tables = [state.get(table, {}) for table in MODULE_TABLES]
        skip = state.get("_non_persistent_buffers_set", set())
        if not all(isinstance(table, dict) for table in tables) or not isinstance(skip, set):
            raise EDM2FileError(f"{where}: {' / '.join(MODULE_TABLES)} / _non_persistent_buffers_set are "
                                f"{', '.join(kind_of(t) for t in (*tables, skip))}; expected three dicts and a set")
        for table_name, table in zip(MODULE_TABLES, tables):
            for key, value in table.items():
                count(where)
                key = checked_name(key, f"{where}: a name in {table_name}")
                if value is None or (table_name == "_buffers" and key in skip):
                    continue
                if table_name == "_modules":
                    visit(value, f"{prefix}{key}.")
                else:
                    out[prefix + key] = value

    visit(obj, "")
    return out


@dataclass
class EDM2Snapshot:
    """One official EDM2 file, read safely.

    ``class_name``/``init_kwargs``: the network (``Precond``) and its constructor arguments;
    ``state_dict``: its weights and buffers as stored (float16); ``encoder``: the encoder's class name
    and its ``_init_kwargs``; ``latent_scale``/``latent_bias``: ``final = raw * scale + bias`` of
    ``StabilityVAEEncoder`` (``None`` for pixel models); ``loss_kwargs``: the EDM2 loss's arguments.
    Checked when made, whatever made it (``__post_init__``): names are names, the arguments plain data within
    ``MAX_KWARGS_ITEMS`` values, the tensors floating point within their storage, the latent scale/bias at most
    ``MAX_LATENT_VALUES`` finite numbers; else one ``EDM2FileError`` naming the field.
    """

    class_name: str
    init_kwargs: dict
    state_dict: dict[str, Tensor]
    encoder: str | None = None
    encoder_kwargs: dict = field(default_factory=dict)
    latent_scale: np.ndarray | None = None
    latent_bias: np.ndarray | None = None
    loss_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.class_name = checked_name(self.class_name, "class_name")
        self.encoder = None if self.encoder is None else checked_name(self.encoder, "encoder")
        for key in ("init_kwargs", "encoder_kwargs", "loss_kwargs"):
            setattr(self, key, checked_kwargs(getattr(self, key), key))
        for key in ("latent_scale", "latent_bias"):
            setattr(self, key, checked_latent(getattr(self, key), key))
        if not isinstance(self.state_dict, dict) or len(self.state_dict) > MAX_ENTRIES:
            raise EDM2FileError(f"state_dict is {kind_of(self.state_dict)}, not a dict of at most {MAX_ENTRIES:,} "
                                "tensors")
        for key in self.state_dict:
            if not isinstance(key, str) or len(key) > MAX_KEY_CHARS:
                raise EDM2FileError(f"state_dict has a key that is {kind_of(key)} (or longer than {MAX_KEY_CHARS:,} "
                                    "characters), not a tensor name")
        self.state_dict = {k: checked_tensor(v, f"state_dict[{k[:100]!r}]") for k, v in self.state_dict.items()}


def _as_snapshot(obj, name: str) -> EDM2Snapshot:
    if not isinstance(obj, dict) or not isinstance(obj.get("ema"), PersistentObject):
        keys = sorted(k[:40] for k in obj if isinstance(k, str))[:10] if isinstance(obj, dict) else kind_of(obj)
        raise EDM2FileError(f"{name} is not an EDM2 snapshot: expected a dict with the network under 'ema', "
                            f"got {keys}")
    ema, encoder, loss = obj["ema"], obj.get("encoder"), obj.get("loss_fn")
    for key, value in (("encoder", encoder), ("loss_fn", loss)):
        if value is not None and not isinstance(value, PersistentObject):
            raise EDM2FileError(f"{name}: '{key}' is {kind_of(value)}, not a pickled network object")
    encoder_state = encoder.state if encoder is not None else {}
    try:
        return EDM2Snapshot(ema.class_name, ema.state.get("_init_kwargs", {}), module_state_dict(ema),
                            None if encoder is None else encoder.class_name, encoder_state.get("_init_kwargs", {}),
                            encoder_state.get("scale"), encoder_state.get("bias"),
                            {} if loss is None else loss.state.get("_init_kwargs", {}))
    except EDM2FileError as err:
        raise EDM2FileError(f"{name}: {err}") from None


def read_edm2_pickle(path: str | Path) -> EDM2Snapshot:
    """Read an official ``edm2-*.pkl`` without running anything from it (see the module docstring)."""
    path = Path(path)
    try:
        stream = path.open("rb")
    except OSError as err:
        raise EDM2FileError(f"cannot read EDM2 snapshot {path}: {err.strerror or err}") from None
    with stream:
        return _as_snapshot(safe_load(stream, str(path)), str(path))
