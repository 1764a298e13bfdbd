"""The loading layer: every reader refuses a file whose unpickling runs code, a truncated file and a file of
another format with one ``ConfigError`` line naming the file, and never runs the code; ``load_model`` reads a
checkpoint once."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_reg.errors import ConfigError
from lightning_reg.io.files import atomic_path, atomic_write, read_npz_images, read_torch
from lightning_reg.io.vae import load_autoencoder
from lightning_reg.metrics.classifier import load_feature_network
from lightning_reg.models.dit import read_state_dict
from lightning_reg.sources import SOURCES, ModelSpec, load_model
from helpers import classifier_checkpoint, tiny_autoencoder

FIXTURE = Path(__file__).parent / "fixtures" / "dit_official_tiny.pt"


class RunsCode:
    """Unpickling this object runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def torch_files(tmp_path: Path, good: Path, marker: Path) -> dict[str, Path]:
    """The three bad files for a torch reader: code, the first half of ``good``, and a JSON file."""
    torch.save({"state_dict": {}, "payload": RunsCode(marker)}, tmp_path / "code.pt")
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "foreign.pt").write_text(json.dumps({"state_dict": {"w": [1, 2]}}))
    return {kind: tmp_path / f"{kind}.pt" for kind in ("code", "truncated", "foreign")}


@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    lightning_ckpt = folder / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(3)}, "hyper_parameters": {}}, lightning_ckpt)
    dit = folder / "dit.pt"
    torch.save(torch.load(FIXTURE, weights_only=True)["state_dict"], dit)
    return {"lightning": lightning_ckpt, "dit": dit, "classifier": classifier_checkpoint(folder / "clf.ckpt")}


READERS = {
    "read_torch": ("lightning", lambda p: read_torch(p, "--file")),
    "lightning source": ("lightning", lambda p: load_model(ModelSpec(str(p), format="lightning"))),
    "dit source": ("dit", lambda p: read_state_dict(p, "--checkpoint")),
    "feature network": ("classifier", lambda p: load_feature_network(p)),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("kind", ["code", "truncated", "foreign"])
def test_torch_readers_refuse_bad_files_with_one_line(good_files, tmp_path, reader, kind):
    good, read = READERS[reader]
    marker = tmp_path / "code_ran"
    path = torch_files(tmp_path, good_files[good], marker)[kind]
    with pytest.raises(ConfigError) as err:
        read(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert ("could run code" in message) if kind == "code" else ("not a torch.save zip archive" in message)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["code", "truncated", "foreign"])
def test_npz_reader_refuses_bad_files_with_one_line(tmp_path, kind):
    marker = tmp_path / "code_ran"
    path = tmp_path / f"{kind}.npz"
    if kind == "code":
        np.savez(path, arr_0=np.array([RunsCode(marker)], dtype=object))
    elif kind == "truncated":
        np.savez(tmp_path / "good.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
        path.write_bytes((tmp_path / "good.npz").read_bytes()[:100])
    else:
        path.write_text("not an archive")
    with pytest.raises(ConfigError) as err:
        read_npz_images(path, "--samples", ("arr_0",))
    assert f"--samples {path} is not a readable .npz" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["code", "truncated", "foreign"])
def test_vae_reader_refuses_bad_weights_with_one_line(tmp_path, kind):
    folder = tmp_path / "vae"
    tiny_autoencoder().save_pretrained(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    marker = tmp_path / "code_ran"
    if kind == "code":  # a .bin instead of safetensors, whose unpickling runs code
        weights.unlink()
        torch.save({"payload": RunsCode(marker)}, folder / "diffusion_pytorch_model.bin")
    elif kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    else:
        shutil.copy(FIXTURE, weights)
    with pytest.raises(ConfigError) as err:
        load_autoencoder(str(folder))
    expected = ("holds pickled objects other than tensors" if kind == "code" else  # vetted before diffusers reads it
                f"--vae {folder} is not a loadable AutoencoderKL folder")
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_registered_sources_and_their_data():
    assert {"lightning", "dit"} <= set(SOURCES)
    dit = SOURCES["dit"]
    assert (dit.schedule, dit.prediction, dit.needs_vae) == (
        {"name": "vp", "num_timesteps": 1000, "betas": "linear"}, "eps", True)
    with pytest.raises(ConfigError, match=r"unknown --format 'pkl'; choose one of \[.*'dit', 'edm2', 'lightning'"):
        load_model(ModelSpec("x.pkl", format="pkl"))


def test_sources_guess_by_priority_and_name_the_owner_of_an_option():
    """Format guessing follows ``priority``, not registration order; another format's option is refused with its
    owner's words (``option_hint``), or else generically with the owner's noun and ``--format``."""
    from lightning_reg.sources import by_priority, owner_of, source_of

    assert [s.name for s in by_priority()] == ["diffusers", "dit", "lightning", "edm2"]
    assert source_of(ModelSpec("x.ckpt")).name == "lightning"
    assert source_of(ModelSpec("x.pt", model="DiT-S/8")).name == "dit"
    assert (owner_of("num_heads").name, owner_of("negative_prompt").name, owner_of("vae")) == ("dit", "diffusers", None)
    edm2, dit = SOURCES["edm2"], SOURCES["dit"]
    with pytest.raises(ConfigError, match=r"^--num_heads is for a public DiT checkpoint: give --model too"):
        edm2.check(ModelSpec("x.pkl", format="edm2", num_heads=4))
    with pytest.raises(ConfigError, match=r"^--negative_prompt is for a diffusers text-to-image pipeline "
                                          r"\(--checkpoint\), not a torch weights file of a DiT$"):
        dit.check(ModelSpec("x.pt", model="DiT-S/8", vae="v", negative_prompt="blurry"))
    assert edm2.refuse_option("x", dit) == ("--x is for a EDM2 snapshot (.pkl or .safetensors) (--format "
                                           "edm2), not a torch weights file of a DiT")


@pytest.mark.parametrize("kind", ["code", "truncated", "foreign"])
def test_inception_weights_are_vetted_before_torch_fidelity_loads_them(good_files, tmp_path, kind):
    """torch-fidelity loads its weights file without ``weights_only``: both Inception readers vet it first."""
    from lightning_reg.metrics.adm import InceptionFeatures
    from lightning_reg.metrics.images import ImageMetrics

    marker = tmp_path / "code_ran"
    path = torch_files(tmp_path, good_files["lightning"], marker)[kind]
    for build in (lambda: ImageMetrics(["fid"], (3, 16, 16), inception_weights=str(path)),
                  lambda: InceptionFeatures(path)):
        with pytest.raises(ConfigError) as err:
            build()
        assert str(path) in str(err.value) and "Inception-v3" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_atomic_path_renames_a_whole_file_or_folder_and_leaves_nothing_on_failure(tmp_path):
    with atomic_path(tmp_path / "new" / "a.npz") as tmp:  # the folder is created; the name keeps its suffix
        assert tmp.name == "a.npz" and tmp.parent.parent == tmp_path / "new"
        np.savez(tmp, x=np.arange(3))
        assert not (tmp_path / "new" / "a.npz").exists()  # nothing under the final name until the block ends
    assert np.load(tmp_path / "new" / "a.npz")["x"].tolist() == [0, 1, 2]
    with atomic_path(tmp_path / "new" / "dataset") as tmp:  # a folder, as datasets' save_to_disk writes one
        (tmp / "part").mkdir(parents=True)
        (tmp / "part" / "data.txt").write_text("x")
    assert (tmp_path / "new" / "dataset" / "part" / "data.txt").read_text() == "x"
    atomic_write(tmp_path / "new" / "rows.csv", lambda f: f.write("a,b\r\n1,2\n"), binary=False)
    assert (tmp_path / "new" / "rows.csv").read_bytes() == b"a,b\r\n1,2\n"  # text as given, no translation

    def broken(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "new" / "a.npz", broken)
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "new" / "dataset") as tmp:
            tmp.mkdir()
            raise RuntimeError
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["a.npz", "dataset", "rows.csv"]
    assert np.load(tmp_path / "new" / "a.npz")["x"].tolist() == [0, 1, 2]  # the complete file stays
