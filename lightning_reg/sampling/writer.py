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

Links: ``--output`` itself may be a symbolic link to a folder (the user named it, as they name any path); links
inside it are not followed. A run file above (or ``images``) that is a link, or not a plain file (a folder),
is refused before anything is written, read or deleted, with or without ``--overwrite``: a folder handed to
the user cannot make a run write, read or delete outside it. A restart reads only the headers of its finished
shards before sampling (``NpzArchive``): shards of another length, sample shape or type are refused then.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from lightning_reg.errors import ConfigError
from lightning_reg.io.files import NpzArchive, atomic_write, read_json, write_json

RUN_FILE, SAMPLES_FILE, META_FILE, IMAGES_DIR, PROMPTS_FILE = "run.json", "samples.npz", "meta.json", "images", \
    "prompts.txt"
SHARD_GLOB = "shard_*.npz"
SHARD_ARRAYS = ("indices", "samples", "labels")


def shard_path(folder: Path, k: int) -> Path:
    return Path(folder) / f"shard_{k:05d}.npz"


def shard_ranges(num_samples: int, shard_size: int) -> list[range]:
    """Index ranges of the shards: ``[k S, min((k + 1) S, N))``."""
    return [range(start, min(start + shard_size, num_samples)) for start in range(0, num_samples, shard_size)]


def _run_files(folder: Path) -> list[Path]:
    """What a sampling run leaves in ``folder`` (other files are never touched), links included."""
    names = [RUN_FILE, SAMPLES_FILE, META_FILE, IMAGES_DIR, PROMPTS_FILE]
    return sorted(folder.glob(SHARD_GLOB)) + [folder / n for n in names if os.path.lexists(folder / n)]


def _unsafe_entries(files: list[Path]) -> list[str]:
    """What is wrong with each of a run's ``files`` that a run must not follow or remove: a link, or an entry of
    another kind than a plain file (``images``: a folder)."""
    problems = []
    for path in files:
        if path.is_symlink():
            problems.append(f"{path.name} is a link to {os.readlink(path)}")
        elif path.name == IMAGES_DIR and not path.is_dir():
            problems.append(f"{path.name} is not a folder")
        elif path.name != IMAGES_DIR and not path.is_file():
            problems.append(f"{path.name} is not a plain file")
    return problems


def fingerprint_changes(previous: dict | None, fingerprint: dict) -> list[str]:
    """The keys whose values differ between a stored fingerprint (``None``: none stored) and ``fingerprint`` as it
    reads back from JSON (tuples as lists); empty when they agree."""
    current, previous = json.loads(json.dumps(fingerprint, sort_keys=True, default=str)), previous or {}
    return sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))


def check_output(folder, fingerprint: dict, overwrite: bool, sample_shape: tuple[int, ...]) -> None:
    """Refuse (``ConfigError``) a folder holding another run's files unless ``overwrite``, and links or odd
    entries among a run's files in any case; creates and deletes nothing.

    The same fingerprint (a restart) is accepted: its finished shards are reused once their headers show this
    run's length and ``sample_shape`` (``fingerprint``'s ``num_samples`` and ``shard_size``).
    """
    folder = Path(folder)
    if folder.is_symlink() and not folder.exists():
        raise ConfigError(f"--output {folder} is a link to {os.readlink(folder)}, which does not exist; give a "
                          "folder")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output {folder} is a file; give a folder")
    existing = _run_files(folder) if folder.is_dir() else []
    unsafe = _unsafe_entries(existing)
    if unsafe:
        raise ConfigError(f"--output {folder}: {'; '.join(unsafe[:3])}; a run never writes, reads or deletes "
                          "through links or odd entries in its folder (nor with --overwrite): remove them or "
                          "choose another folder")
    if overwrite or not existing:
        return
    run_file = folder / RUN_FILE
    previous = read_json(run_file, "--output") if run_file.exists() else None
    changed = fingerprint_changes(previous, fingerprint)
    if changed:
        detail = f"arguments differ in {changed}" if previous is not None else f"it has no {RUN_FILE}"
        raise ConfigError(f"--output {folder} holds another sampling run ({detail}); choose another folder "
                          "or pass --overwrite true to delete its samples")
    for k, indices in enumerate(shard_ranges(fingerprint["num_samples"], fingerprint["shard_size"])):
        if shard_path(folder, k).exists():
            with _open_shard(shard_path(folder, k)) as shard:
                found, wanted = _shard_shape(shard), (len(indices), tuple(sample_shape))
                if found != wanted:
                    raise shard.refuse(f"it holds {found[0]} samples of shape {found[1]}; this run's shard {k} "
                                       f"holds {wanted[0]} of shape {wanted[1]}")


def prepare_output(folder, fingerprint: dict, overwrite: bool, sample_shape: tuple[int, ...]) -> None:
    """Create ``folder``, delete a previous run's files if ``overwrite`` (once ``check_output`` found each of
    them safe to delete), and write ``run.json``."""
    folder = Path(folder)
    check_output(folder, fingerprint, overwrite, sample_shape)
    folder.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for path in _run_files(folder):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    write_json(folder / RUN_FILE, fingerprint)


def write_shard(folder, k: int, indices: Tensor, samples: Tensor, labels: Tensor) -> None:
    atomic_write(shard_path(folder, k), lambda f: np.savez(f, indices=indices.numpy(), samples=samples.numpy(),
                                                           labels=labels.numpy()))


@contextmanager
def _open_shard(path: Path):
    """The shard at ``path`` as an ``NpzArchive``; errors about it end in how to regenerate it."""
    try:
        with NpzArchive(path, "shard", "sampling shard") as shard:
            yield shard
    except ConfigError as err:
        raise ConfigError(f"{err}; delete it and run the same command again to regenerate it") from None


def _shard_shape(shard: NpzArchive) -> tuple[int, tuple[int, ...]]:
    """``(n, sample shape)`` of a shard, from its headers: integer ``indices`` and ``labels`` of length n and n
    float ``samples``."""
    missing = [k for k in SHARD_ARRAYS if k not in shard.keys]
    if missing:
        raise shard.refuse(f"it has no {missing}")
    (indices, indices_type), (samples, samples_type), (labels, labels_type) = map(shard.header, SHARD_ARRAYS)
    if (len(indices) != 1 or labels != indices or samples[:1] != indices or indices_type.kind not in "iu"
            or labels_type.kind not in "iu" or samples_type.kind != "f"):
        raise shard.refuse(f"it holds indices {indices_type} {indices}, samples {samples_type} {samples} and labels "
                           f"{labels_type} {labels}; expected integers (n,), floats (n, ...) and integers (n,)")
    return indices[0], samples[1:]


def read_shards(folder, num_shards: int) -> tuple[np.ndarray, np.ndarray]:
    """``(samples, labels)`` of shards ``0 .. num_shards - 1``, checked (headers first) to be in index order and of
    one sample shape."""
    parts = []
    for k in range(num_shards):
        with _open_shard(shard_path(folder, k)) as shard:
            shape = _shard_shape(shard)[1]
            if parts and shape != parts[0][1].shape[1:]:
                raise shard.refuse(f"its samples have shape {shape}, those of shard 0 {parts[0][1].shape[1:]}")
            parts.append(tuple(map(shard.array, SHARD_ARRAYS)))
    indices = np.concatenate([p[0] for p in parts])
    if not np.array_equal(indices, np.arange(len(indices))):
        raise ConfigError(f"the shards in {folder} do not cover the indices 0..{len(indices) - 1} in order; delete "
                          "them and run the same command again to regenerate them")
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
