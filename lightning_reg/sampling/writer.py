"""The output folder of ``sample.py``: shards, the run fingerprint, and the final files, all written atomically.

Layout::

    run.json                 fingerprint of the arguments that decide the samples (resume check)
    shard_00000.npz ...      indices, samples, labels of samples [k S, (k + 1) S)   (S = shard size)
    samples.npz              arr_0: samples (float32 toy data, uint8 NHWC images, as the ADM evaluator reads
                             them), labels: their classes (text-to-image: their captions' lines); in index order
    prompts.txt              text-to-image only: sample i's caption on line i
    images/000000.png ...    image data only, plus images/grid.png
    meta.json                checkpoint sha256, resolved config, seeds, versions, wall time, world size

Every file is written to a temporary name in the same folder and renamed with ``os.replace``, so a
file under its final name is always complete: an interrupted run leaves only finished shards, and a
restart with the same fingerprint skips them.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from lightning_reg.errors import ConfigError, one_line
from lightning_reg.io.files import atomic_write, read_json, write_json

RUN_FILE, SAMPLES_FILE, META_FILE, IMAGES_DIR, PROMPTS_FILE = "run.json", "samples.npz", "meta.json", "images", \
    "prompts.txt"
SHARD_GLOB = "shard_*.npz"


def shard_path(folder: Path, k: int) -> Path:
    return Path(folder) / f"shard_{k:05d}.npz"


def shard_ranges(num_samples: int, shard_size: int) -> list[range]:
    """Index ranges of the shards: ``[k S, min((k + 1) S, N))``."""
    return [range(start, min(start + shard_size, num_samples)) for start in range(0, num_samples, shard_size)]


def _run_files(folder: Path) -> list[Path]:
    """What a sampling run leaves in ``folder`` (other files are never touched)."""
    names = [RUN_FILE, SAMPLES_FILE, META_FILE, IMAGES_DIR, PROMPTS_FILE]
    return sorted(folder.glob(SHARD_GLOB)) + [folder / n for n in names if (folder / n).exists()]


def fingerprint_changes(previous: dict | None, fingerprint: dict) -> list[str]:
    """The keys whose values differ between a stored fingerprint (``None``: none stored) and ``fingerprint`` as it
    reads back from JSON (tuples as lists); empty when they agree."""
    current, previous = json.loads(json.dumps(fingerprint, sort_keys=True, default=str)), previous or {}
    return sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))


def check_output(folder, fingerprint: dict, overwrite: bool) -> None:
    """Refuse (``ConfigError``) a folder holding another run's files unless ``overwrite``; creates nothing.

    The same fingerprint (a restart) is accepted: its finished shards are reused.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output {folder} is a file; give a folder")
    existing = _run_files(folder) if folder.is_dir() else []
    if overwrite or not existing:
        return
    run_file = folder / RUN_FILE
    previous = read_json(run_file) if run_file.is_file() else None
    changed = fingerprint_changes(previous, fingerprint)
    if changed:
        detail = f"arguments differ in {changed}" if previous is not None else f"it has no {RUN_FILE}"
        raise ConfigError(f"--output {folder} holds another sampling run ({detail}); choose another folder "
                          "or pass --overwrite true to delete its samples")


def prepare_output(folder, fingerprint: dict, overwrite: bool) -> None:
    """Create ``folder``, delete a previous run's files if ``overwrite``, and write ``run.json``."""
    folder = Path(folder)
    check_output(folder, fingerprint, overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for path in _run_files(folder):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    write_json(folder / RUN_FILE, fingerprint)


def write_shard(folder, k: int, indices: Tensor, samples: Tensor, labels: Tensor) -> None:
    atomic_write(shard_path(folder, k), lambda f: np.savez(f, indices=indices.numpy(), samples=samples.numpy(),
                                                           labels=labels.numpy()))


def read_shards(folder, num_shards: int) -> tuple[np.ndarray, np.ndarray]:
    """``(samples, labels)`` of shards ``0 .. num_shards - 1``, checked to be in index order."""
    parts = []
    for k in range(num_shards):
        path = shard_path(folder, k)
        try:
            with np.load(path) as shard:
                parts.append((shard["indices"], shard["samples"], shard["labels"]))
        except Exception as err:  # noqa: BLE001 - a truncated or overwritten file
            raise ConfigError(f"shard {path} is unreadable ({type(err).__name__}: {one_line(err, 200)}); delete "
                              "it and run the same command again to regenerate it") from None
    indices = np.concatenate([p[0] for p in parts])
    if not np.array_equal(indices, np.arange(len(indices))):
        raise RuntimeError(f"shards in {folder} do not cover the indices 0..{len(indices) - 1} in order")
    return np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


def write_png(path, image_hwc: np.ndarray) -> None:
    image = Image.fromarray(image_hwc[..., 0] if image_hwc.shape[-1] == 1 else image_hwc)
    atomic_write(path, lambda f: image.save(f, format="png"))


def write_images(folder, images_nhwc: np.ndarray, grid: np.ndarray) -> None:
    """``images/{i:06d}.png`` per sample and ``images/grid.png``."""
    out = Path(folder) / IMAGES_DIR
    out.mkdir(exist_ok=True)
    for i, image in enumerate(images_nhwc):
        write_png(out / f"{i:06d}.png", image)
    write_png(out / "grid.png", grid)


def save_npz(file, **arrays: np.ndarray) -> None:
    """``np.savez`` with a fixed time stamp on each member, so equal arrays give a byte-identical file
    (``np.savez`` stamps the time of writing)."""
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            with archive.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w",
                              force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def write_samples(folder, samples: np.ndarray, labels: np.ndarray) -> None:
    """``samples.npz``: ``arr_0`` (the key ADM's ``evaluator.py`` and DiT's ``sample_ddp.py`` use) and ``labels``;
    the same samples always give the same bytes."""
    atomic_write(Path(folder) / SAMPLES_FILE, lambda f: save_npz(f, arr_0=samples, labels=labels))


def write_prompts(folder, prompts: list[str]) -> None:
    """``prompts.txt`` beside ``samples.npz``: sample ``i``'s caption on line ``i`` (what CLIP score compares)."""
    atomic_write(Path(folder) / PROMPTS_FILE, lambda f: f.write("".join(p + "\n" for p in prompts).encode()))
