"""Class-conditional image datasets from Hugging Face ``datasets``.

``name`` is either a hub dataset name (e.g. ``"cifar10"``), loaded with
``datasets.load_dataset(name, split=split, cache_dir=cache_dir)``, or a local
directory written by ``Dataset.save_to_disk`` (loaded with ``load_from_disk``).
Batches are ``(x, y)``: ``x`` float (B, C, H, W) in [-1, 1], ``y`` long (B,).
"""

from __future__ import annotations

import os

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from lightning_reg.errors import ConfigError, one_line


class _ImageLabelDataset(Dataset):
    """Index a HF dataset (optionally through ``indices``) and yield transformed ``(x, y)``."""

    def __init__(self, hf, indices, image_key: str, label_key: str, mode: str, transform):
        self.hf, self.indices = hf, [int(i) for i in indices]
        self.image_key, self.label_key, self.mode, self.transform = image_key, label_key, mode, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        row = self.hf[self.indices[i]]
        img = row[self.image_key]
        if not isinstance(img, Image.Image):  # e.g. arrays or nested lists
            img = Image.fromarray(np.asarray(img, dtype=np.uint8))
        x = self.transform(img.convert(self.mode))
        return x, torch.tensor(int(row[self.label_key]), dtype=torch.long)


class ImageDataModule(L.LightningDataModule):
    """Train/val loaders for a class-conditional image dataset (deterministic split by ``seed``).

    Args:
        name: a hub dataset (``uoft-cs/cifar10``) or a folder written by ``Dataset.save_to_disk``.
        split, image_key, label_key: which split and columns hold the images and the integer class ids.
        image_size, channels: images are resized (shorter side), centre-cropped and scaled to [-1, 1].
        batch_size, num_workers: of both loaders.
        cache_dir: where hub datasets are cached.
        val_fraction: share of the (shuffled) split held out for validation (and the FID reference).
        seed: of the train/validation split.
        max_samples: use only this many images of the split (quick runs).
        random_flip: horizontal flips of the training images (DiT/ADM augment with them).
    """

    def __init__(
        self,
        name: str = "uoft-cs/cifar10",
        split: str = "train",
        image_key: str = "img",
        label_key: str = "label",
        image_size: int = 32,
        channels: int = 3,
        batch_size: int = 128,
        num_workers: int = 0,
        cache_dir: str = "data",
        val_fraction: float = 0.01,
        seed: int = 0,
        max_samples: int | None = None,
        random_flip: bool = False,
    ):
        super().__init__()
        for field, value, low in (("image_size", image_size, 1), ("batch_size", batch_size, 1),
                                  ("num_workers", num_workers, 0), ("max_samples", max_samples or 2, 2)):
            if value < low:
                raise ConfigError(f"{field} must be an integer >= {low}, got {value}")
        if channels not in (1, 3):
            raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.name, self.split, self.image_key, self.label_key = name, split, image_key, label_key
        self.image_size, self.channels, self.batch_size = image_size, channels, batch_size
        self.num_workers, self.cache_dir, self.val_fraction = num_workers, cache_dir, val_fraction
        self.seed, self.max_samples, self.random_flip = seed, max_samples, random_flip
        self.transform = v2.Compose([
            v2.ToImage(),
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * channels, [0.5] * channels),  # [0, 1] -> [-1, 1]
        ])
        self._hf = None
        self._num_classes: int | None = None
        self.train_set = self.val_set = None

    # ----------------------------------------------------------------- loading
    @property
    def is_local(self) -> bool:
        return os.path.isdir(self.name)

    def _load(self):
        import datasets

        if self.is_local:
            try:
                ds = datasets.load_from_disk(self.name)
            except FileNotFoundError as e:
                raise ConfigError(f"data name={self.name!r} is a folder but not a dataset written by "
                                  f"Dataset.save_to_disk ({one_line(e, 300)})") from None
            if isinstance(ds, datasets.DatasetDict):
                if self.split not in ds:
                    raise ConfigError(f"split={self.split!r} not in {self.name!r}; available splits: {list(ds)}. "
                                      "Set `split` to one of them.")
                ds = ds[self.split]
            return ds
        try:
            return datasets.load_dataset(self.name, split=self.split, cache_dir=self.cache_dir)
        except Exception as e:  # noqa: BLE001 - offline, unknown name, hub errors ...
            raise ConfigError(
                f"could not load dataset {self.name!r} (split={self.split!r}) from the Hugging Face hub: "
                f"{type(e).__name__}: {one_line(e, 300)}. Without network access the dataset must be "
                f"pre-downloaded into cache_dir={self.cache_dir!r} (run `datasets.load_dataset({self.name!r}, "
                f"cache_dir={self.cache_dir!r})` on a machine with network), or `name` must be a local "
                "folder written with `Dataset.save_to_disk`."
            ) from e

    def _validate(self, ds) -> None:
        cols = ds.column_names
        for field, key in (("image_key", self.image_key), ("label_key", self.label_key)):
            if key not in cols:
                raise ConfigError(f"{field}={key!r} is not a column of dataset {self.name!r}; "
                                 f"available columns: {cols}. Pass {field}=<one of these>.")
        labels = np.asarray(ds[self.label_key])
        if not np.issubdtype(labels.dtype, np.integer):
            raise ConfigError(f"label_key={self.label_key!r} must hold integer class ids, got dtype {labels.dtype}. "
                             "Convert it first, e.g. `ds.class_encode_column(label_key)`.")
        if labels.size and labels.min() < 0:
            raise ConfigError(f"label_key={self.label_key!r} has negative labels (min {labels.min()}); labels "
                             "must be class ids in [0, num_classes). Filter out unlabeled (-1) rows first.")
        feature = ds.features[self.label_key]
        n = getattr(feature, "num_classes", None)
        self._num_classes = int(n) if n is not None else int(labels.max()) + 1 if labels.size else 0

    def _dataset(self):
        if self._hf is None:
            ds = self._load()
            self._validate(ds)
            self._hf = ds
        return self._hf

    def prepare_data(self) -> None:
        """Download (hub names only) into ``cache_dir``; called on one process."""
        if not self.is_local:
            self._load()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        ds = self._dataset()
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(self.seed))
        if self.max_samples is not None:
            perm = perm[: self.max_samples]
        n_val = int(round(self.val_fraction * len(perm)))
        if self.val_fraction > 0 and len(perm) > 1:
            n_val = min(max(n_val, 1), len(perm) - 1)
        mode = "RGB" if self.channels == 3 else "L"

        def make(idx, transform):
            return _ImageLabelDataset(ds, idx.tolist(), self.image_key, self.label_key, mode, transform)

        train_transform = self.transform
        if self.random_flip:
            train_transform = v2.Compose([v2.RandomHorizontalFlip(), self.transform])
        self.val_set, self.train_set = make(perm[:n_val], self.transform), make(perm[n_val:], train_transform)

    # -------------------------------------------------------------- properties
    @property
    def num_classes(self) -> int:
        """From the label column's ``ClassLabel`` feature, else ``max(label) + 1``."""
        if self._num_classes is None:
            self._dataset()
        return self._num_classes

    @property
    def data_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    # ------------------------------------------------------------- dataloaders
    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._loader(self.val_set, shuffle=False)
