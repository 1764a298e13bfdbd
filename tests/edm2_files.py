"""EDM2 snapshot pickles for tests: a fixture read into plain Python objects, changed, and written back in the
official layout (every network object a ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` call;
``ModuleDict`` containers, tensors and numpy arrays pickled by torch and numpy themselves).

Reading resolves the fixture's globals to ``Persistent`` and ``dict`` or to torch's and numpy's own functions (our
fixtures are trusted; their pickled source is never run); writing names the persistence global through a stub
module that exists only while the pickler runs.
"""

from __future__ import annotations

import io
import pickle
import sys
import types
from pathlib import Path
from unittest import mock

FIXTURES = Path(__file__).parent / "fixtures"


class Persistent:
    """A pickled network object: the ``meta`` of its ``_reconstruct_persistent_obj`` call (``state`` inside);
    ``build``: a state the pickle then sets on the result (``BUILD``), which official files never do."""

    def __init__(self, meta: dict, build=None):
        self.meta, self.build = meta, build

    @property
    def state(self) -> dict:
        return self.meta["state"]


class FixtureUnpickler(pickle.Unpickler):
    STAND_INS = {("torch_utils.persistence", "_reconstruct_persistent_obj"): Persistent,
                 ("dnnlib.util", "EasyDict"): dict, ("collections", "OrderedDict"): dict}

    def find_class(self, module: str, name: str):
        if (module, name) in self.STAND_INS:
            return self.STAND_INS[(module, name)]
        assert module.split(".")[0] in ("torch", "numpy"), f"unexpected global {module}.{name} in a fixture"
        return super().find_class(module, name)


def read_tree(name: str = "main") -> dict:
    """``edm2_official_tiny_<name>.pkl`` as a dict of ``Persistent`` objects (``ema``, ``encoder``, ``loss_fn``);
    the ``ModuleDict`` containers inside are real ones (their state: ``vars(container)``)."""
    return FixtureUnpickler(io.BytesIO((FIXTURES / f"edm2_official_tiny_{name}.pkl").read_bytes())).load()


def _reconstruct_persistent_obj(meta):
    raise AssertionError("a stub for pickling only")


class SnapshotPickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, Persistent):
            return (_reconstruct_persistent_obj, (obj.meta,)) + ((obj.build,) if obj.build is not None else ())
        return NotImplemented


def snapshot_bytes(tree) -> bytes:
    """``tree`` pickled in the official layout (protocol 4, as the public files)."""
    persistence = types.ModuleType("torch_utils.persistence")
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    _reconstruct_persistent_obj.__module__ = persistence.__name__
    stubs = {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence}
    out = io.BytesIO()
    with mock.patch.dict(sys.modules, stubs):
        SnapshotPickler(out, protocol=4).dump(tree)
    return out.getvalue()


def write_tree(tree, path) -> Path:
    path = Path(path)
    path.write_bytes(snapshot_bytes(tree))
    return path


def shared_tree(depth: int, leaf=0.5) -> list:
    """A list of two references to one list, ``depth`` levels down: a few bytes pickled (the memo shares each
    level), ``2 ** depth`` leaves once expanded."""
    node = [leaf]
    for _ in range(depth):
        node = [node, node]
    return node


def module(state: dict | None = None, class_name: str = "Module") -> Persistent:
    """A network object with empty parameter, buffer and module tables (``state`` overrides)."""
    return Persistent({"type": "class", "class_name": class_name, "module_src": "raise RuntimeError('ran')",
                       "state": {"_parameters": {}, "_buffers": {}, "_modules": {}, **(state or {})}})


class Pickled:
    """An object that pickles as the call ``fn(*args)`` (``REDUCE``), then ``BUILD`` with ``state`` when one is
    given: any call a hostile file can make to a global it names."""

    def __init__(self, fn, *args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)
