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
