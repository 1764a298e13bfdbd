"""The safe reader of the official EDM2 snapshots: the fixtures' layout read without running their code, and
every global off the allow-list refused before anything runs (docs/edm2.md)."""

import builtins
import io
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_reg.io.edm2_pickle import ALLOWED, EDM2FileError, UnsafePickleError, read_edm2_pickle, safe_load

FIXTURES = Path(__file__).parent / "fixtures"
NETS = ("main", "guide", "uncond")
pytestmark = pytest.mark.usefixtures("one_thread")


def pkl(name: str) -> Path:
    return FIXTURES / f"edm2_official_tiny_{name}.pkl"


@pytest.fixture(scope="module")
def expected():
    return torch.load(FIXTURES / "edm2_official_tiny.pt", weights_only=True)


@pytest.mark.parametrize("name", NETS)
def test_fixture_is_read_without_running_its_code(name, expected, monkeypatch):
    """The canary source in every persistent object raises if run; exec/eval/compile and imports of the
    file's packages also fail the read here, so a reader that ran anything could not pass."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the reader executed code from the file")

    for fn in ("exec", "eval", "compile"):
        monkeypatch.setattr(builtins, fn, forbidden)
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda mod, *a, **k: forbidden() if mod.split(".")[0] in (
        "dnnlib", "torch_utils", "training") else real_import(mod, *a, **k))
    snapshot = read_edm2_pickle(pkl(name))
    monkeypatch.undo()
    assert not {"dnnlib", "torch_utils", "training"} & {m.split(".")[0] for m in sys.modules}
    assert snapshot.class_name == "Precond" and snapshot.init_kwargs == expected["config"][name]
    assert all(v.dtype == torch.float16 for v in snapshot.state_dict.values())
    assert snapshot.state_dict["unet.out_conv.weight"].shape == (4, expected["config"][name]["model_channels"], 3, 3)
    assert ("unet.emb_label.weight" in snapshot.state_dict) == (name != "uncond")
    assert snapshot.encoder == "StabilityVAEEncoder"
    assert snapshot.encoder_kwargs == {"vae_name": "stabilityai/sd-vae-ft-mse"}
    # the encoder's defaults: scale = 0.5 / raw_std, bias = -raw_mean * scale
    raw_mean, raw_std = np.array([5.81, 3.25, 0.12, -2.15]), np.array([4.17, 4.62, 3.71, 3.28])
    np.testing.assert_allclose(snapshot.latent_scale, 0.5 / raw_std, rtol=1e-6)
    np.testing.assert_allclose(snapshot.latent_bias, -raw_mean * 0.5 / raw_std, rtol=1e-6)
    assert snapshot.loss_kwargs == {"P_mean": -0.4, "P_std": 1.0, "sigma_data": 0.5}


def test_the_canary_is_live_under_a_loader_that_runs_the_pickled_source(tmp_path):
    """What the official loader does (``exec(meta['module_src'])``), with a stand-in persistence module:
    the fixture's canary raises, so the test above would have caught a reader that runs it."""
    (tmp_path / "torch_utils").mkdir()
    (tmp_path / "torch_utils" / "__init__.py").write_text("")
    (tmp_path / "torch_utils" / "persistence.py").write_text(
        "def _reconstruct_persistent_obj(meta):\n    exec(meta['module_src'], {})\n")
    (tmp_path / "dnnlib").mkdir()
    (tmp_path / "dnnlib" / "__init__.py").write_text("")
    (tmp_path / "dnnlib" / "util.py").write_text("class EasyDict(dict):\n    pass\n")
    code = f"import pickle; pickle.load(open({str(pkl('guide'))!r}, 'rb'))"
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "RuntimeError: edm2 fixture: the source code pickled in this file was executed" \
        in run.stderr


@pytest.mark.parametrize("module,name", [("os", "system"), ("posix", "system"), ("builtins", "eval"),
                                         ("builtins", "exec"), ("subprocess", "Popen"), ("torch", "load"),
                                         ("torch_utils.persistence", "persistent_class"),
                                         ("dnnlib.util", "call_func_by_name")])
def test_any_other_global_is_refused_and_nothing_runs(module, name, tmp_path):
    marker = tmp_path / "ran"
    payload = f"c{module}\n{name}\n(S'touch {marker}'\ntR.".encode()
    with pytest.raises(UnsafePickleError) as err:
        safe_load(payload, "evil.pkl")
    message = str(err.value)
    assert "\n" not in message and f"refusing global {module}.{name}" in message and "evil.pkl" in message
    assert not marker.exists()


def test_a_refused_global_deep_inside_a_real_snapshot_is_refused(tmp_path):
    data = pkl("uncond").read_bytes().replace(b"\x8c\x0bcollections\x94\x8c\x0bOrderedDict",
                                               b"\x8c\x0bsubprocess_\x94\x8c\x0bPopenPopen_")
    with pytest.raises(UnsafePickleError, match=r"refusing global subprocess_\.PopenPopen_"):
        safe_load(data)


def test_the_allow_list_is_the_fixtures_globals_plus_older_numpy():
    listed = {"collections.OrderedDict", "dnnlib.util.EasyDict", "numpy._core.multiarray._reconstruct", "numpy.dtype",
              "numpy.ndarray", "torch._utils._rebuild_parameter", "torch._utils._rebuild_tensor_v2",
              "torch.nn.modules.container.ModuleDict", "torch.storage._load_from_bytes",
              "torch_utils.persistence._reconstruct_persistent_obj"}
    assert {f"{m}.{n}" for m, n in ALLOWED} == listed | {"numpy.core.multiarray._reconstruct"}


def test_nested_storages_are_read_weights_only(monkeypatch):
    seen = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("weights_only")) or real(*a, **k))
    read_edm2_pickle(pkl("guide"))
    assert seen and all(w is True for w in seen)


def test_object_arrays_are_refused():
    payload = pickle.dumps(np.array([None, 1], dtype=object), protocol=4)
    with pytest.raises(EDM2FileError, match="numpy array of dtype object"):
        safe_load(payload)


def test_bad_files_are_one_line(tmp_path):
    truncated = tmp_path / "edm2-cut.pkl"
    truncated.write_bytes(pkl("main").read_bytes()[:50_000])
    cases = {truncated: "is not a readable EDM2 snapshot", FIXTURES / "dit_official_tiny.pt": "is a zip file",
             tmp_path / "missing.pkl": "cannot read EDM2 snapshot"}
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": 1}))
    cases[plain] = "not an EDM2 snapshot: expected a dict with the network under 'ema'"
    for path, message in cases.items():
        with pytest.raises(EDM2FileError) as err:
            read_edm2_pickle(path)
        assert message in str(err.value) and "\n" not in str(err.value) and str(path) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edm2-cut.pkl", "plain.pkl"]  # nothing written


def test_a_storage_blob_that_is_not_weights_only_is_refused():
    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    blob = io.BytesIO()
    torch.save(Evil(), blob, _use_new_zipfile_serialization=False)
    data = blob.getvalue()
    payload = b"\x80\x04ctorch.storage\n_load_from_bytes\nB" + struct.pack("<I", len(data)) + data + b"\x85R."
    with pytest.raises(UnsafePickleError, match="nested torch storage blob holds more than tensor data"):
        safe_load(payload)


RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's _reconstruct: the global numpy pickles every array with


@pytest.mark.parametrize("array", [np.arange(6, dtype=">f8").reshape(2, 3), np.asfortranarray(np.ones((2, 3), "f4")),
                                   np.array([1, -2], np.int16), np.array([True, False])])
def test_numeric_arrays_are_rebuilt_from_their_bytes(array):
    """Byte order, Fortran order and the dtype are kept; the array is numpy's own pickle read by the stand-ins."""
    rebuilt = safe_load(pickle.dumps(array, protocol=4)).array
    assert rebuilt.dtype == array.dtype and rebuilt.flags.f_contiguous == array.flags.f_contiguous
    np.testing.assert_array_equal(rebuilt, array)


class Call:
    """Pickles as ``fn(*args)``, then ``BUILD`` with ``state`` when one is given."""

    def __init__(self, fn, *args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


FLAGGED_AS_OBJECT = Call(np.dtype, "f8", False, True, state=(3, "|", None, None, None, -1, -1, 63))


@pytest.mark.parametrize("payload, message", [
    (Call(np.ndarray, (2,), "O"), "calls numpy.ndarray itself"),
    (Call(np.dtype, "O", False, True), "numpy array of dtype object"),
    (Call(RECONSTRUCT, np.ndarray, (0,), b"b", state=(1, (2,), FLAGGED_AS_OBJECT, False, [{}, "x"])),
     "pickled state is not a numeric array's"),
    (Call(RECONSTRUCT, np.ndarray, (0,), b"b", state=(1, (1,), Call(np.dtype, "V8", False, True), False, b"\0" * 8)),
     "numpy array of dtype |V8"),
])
def test_no_route_builds_an_object_array(payload, message):
    """numpy's own ``__setstate__`` takes dtype flags that make a float64 array hold object pointers from a list;
    every way to a non-numeric array (calling ``ndarray``, an object dtype, such flags, a void dtype) is refused."""
    with pytest.raises(UnsafePickleError, match=message):
        safe_load(pickle.dumps(payload, protocol=4))


def test_newobj_of_ndarray_builds_nothing():
    """``NEWOBJ`` skips ``__init__``: the stand-in it makes holds no array until its bytes are read."""
    payload = b"\x80\x04cnumpy\nndarray\nK\x02\x85\x81."  # numpy.ndarray.__new__(ndarray, 2)
    assert safe_load(payload).array is None


def test_tensors_are_detached_and_within_their_storage(tmp_path):
    """A stored parameter with ``requires_grad`` comes out a plain tensor; a view repeating its storage is refused."""
    from edm2_files import read_tree, write_tree

    tree = read_tree("guide")
    parameters = tree["ema"].state["_modules"]["unet"].state["_parameters"]
    parameters["out_gain"] = torch.nn.Parameter(torch.ones([], dtype=torch.float16))
    snapshot = read_edm2_pickle(write_tree(tree, tmp_path / "grad.pkl"))
    assert type(snapshot.state_dict["unet.out_gain"]) is torch.Tensor
    assert not snapshot.state_dict["unet.out_gain"].requires_grad
    parameters["out_gain"] = torch.ones(1, dtype=torch.float16).expand(3)
    with pytest.raises(EDM2FileError, match=r"unet\.out_gain'\] is a view of 3 values over a storage of 1 "):
        read_edm2_pickle(write_tree(tree, tmp_path / "strided.pkl"))


def test_what_meta_json_records_is_checked_before_the_first_sample(monkeypatch, tmp_path, refused):
    """What a source records of its files goes into ``meta.json`` checked when the job is built (a record made
    cyclic here behind the reader's back): one line, nothing written, nothing sampled. It used to fail after the
    last sample, with no ``meta.json``."""
    import json

    import lightning_reg.sources.edm2 as edm2_source
    from lightning_reg.sampling.cli import main as sample_main
    from helpers import tiny_autoencoder

    tiny_autoencoder().save_pretrained(tmp_path / "vae")
    loop = []
    loop.append(loop)
    monkeypatch.setattr(edm2_source, "snapshot_metadata", lambda snapshot: {"loss_kwargs": {"loop": loop}})
    monkeypatch.setattr("lightning_reg.sampling.cli.generate", lambda *a, **k: pytest.fail("sampled"))
    guidance = {"method": "cfg", "scale": 2.0, "convention": "w2", "reg": "none",
                "reference_checkpoint": str(pkl("guide"))}
    out = tmp_path / "out"
    refused(lambda: sample_main(["--format", "edm2", "--checkpoint", str(pkl("main")), "--vae", str(tmp_path / "vae"),
                                 "--guidance", json.dumps(guidance), "--sampler", "edm_heun", "--num_samples", "2",
                                 "--output", str(out)]), r"meta\.json\.source\.loss_kwargs\.loop\[0\]: contains itself",
            out)
