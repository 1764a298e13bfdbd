"""Class-conditional image datasets from Hugging Face ``datasets``.

``name`` is one of
- a hub dataset name (``uoft-cs/cifar10``, ``ylecun/mnist``), loaded with
  ``datasets.load_dataset(name, split=split, cache_dir=cache_dir)``;
- a local folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``load_from_disk``);
- a local image tree, one subfolder per class (``<name>/<class>/<file>.png``, or
  ``<name>/<split>/<class>/...``), loaded with ``datasets.load_dataset("imagefolder", data_dir=name)``:
  columns ``image`` and ``label`` (class names = folder names, sorted).
Batches are ``(x, y)``: ``x`` float (B, C, H, W) in [-1, 1], ``y`` long (B,). Images of any size and
mode are converted (to ``L`` or ``RGB``, shorter side resized, centre-cropped).
"""

from __future__ import annotations

import io
import os

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from lightning_reg.errors import ConfigError, one_line

# Files that ``save_to_disk`` writes (a DatasetDict, a Dataset); any other folder is an image tree.
_SAVED_MARKERS = ("dataset_dict.json", "state.json")


def open_image(value, where: str) -> Image.Image:
    """A PIL image from a dataset cell (an undecoded ``datasets.Image`` dict, a PIL image or an array);
    a ConfigError naming ``where`` (file or row) when it cannot be decoded."""
    try:
        if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
            img = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
            img.load()
            return img
        if isinstance(value, Image.Image):
            return value
        return Image.fromarray(np.asarray(value, dtype=np.uint8))
    except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files
        raise ConfigError(f"cannot decode the image {where} ({type(err).__name__}: {one_line(err, 200)}); "
                          "remove or replace it") from None


class _ImageLabelDataset(Dataset):
    """Rows ``indices`` of a HF split (images left undecoded), yielding transformed ``(x, y)``."""

    def __init__(self, hf, indices, image_key: str, label_key: str, mode: str, transform, describe):
        self.hf, self.indices = hf, [int(i) for i in indices]
        self.image_key, self.label_key, self.mode, self.transform = image_key, label_key, mode, transform
        self.describe = describe  # row -> "file ... / row r of split s of name", for error messages

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, i: int) -> Image.Image:
        """Image ``i`` decoded and converted to ``mode``."""
        row = self.indices[i]
        value = self.hf[row][self.image_key]
        return open_image(value, self.describe(row, value)).convert(self.mode)

    def verify(self) -> None:
        """Decode every image once, so that a broken file stops the run before it writes anything."""
        for i in range(len(self)):
            self.image(i)

    def __getitem__(self, i: int):
        label = self.hf[self.indices[i]][self.label_key]
        return self.transform(self.image(i)), torch.tensor(int(label), dtype=torch.long)


class ImageDataModule(L.LightningDataModule):
    """Train/val loaders for a class-conditional image dataset.

    Args:
        name: a hub dataset (``uoft-cs/cifar10``), a ``save_to_disk`` folder or an image-folder tree.
        split, image_key, label_key: which split and columns hold the training images and the integer class ids.
        val_split: validate on this whole split (e.g. ``test``) ...
        val_fraction: ... or on this share of the (shuffled) training split (default 0.01 when
            ``val_split`` is not set). The validation images are also the FID reference.
        image_size, channels: images are resized (shorter side), centre-cropped and scaled to [-1, 1].
        batch_size, num_workers: of both loaders.
        cache_dir: where hub (and image-folder) datasets are cached.
        seed: of the train/validation split.
        max_samples: use only this many images of each split (quick runs).
        random_flip: horizontal flips of the training images (DiT/ADM augment with them).
        classes: keep only the images of these class ids (labels unchanged; ``num_classes`` becomes
            ``max(classes) + 1``, so a model trained on digits 0-4 can later be fine-tuned on 0-9).
        verify_images: decode every used image once in ``setup`` (before a run writes anything), so a
            corrupt file is reported by name; turn off for very large datasets (a corrupt image then
            fails with the same message when it is first loaded).
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
        val_fraction: float | None = None,
        seed: int = 0,
        max_samples: int | None = None,
        random_flip: bool = False,
        val_split: str | None = None,
        classes: list[int] | None = None,
        verify_images: bool = True,
    ):
        super().__init__()
        for field, value, low in (("image_size", image_size, 1), ("batch_size", batch_size, 1),
                                  ("num_workers", num_workers, 0), ("max_samples", max_samples or 2, 2)):
            if value < low:
                raise ConfigError(f"{field} must be an integer >= {low}, got {value}")
        if channels not in (1, 3):
            raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if val_split is not None and val_fraction is not None:
            raise ConfigError(f"set val_split ({val_split!r}) or val_fraction ({val_fraction}), not both")
        if val_split is None and val_fraction is None:
            val_fraction = 0.01
        if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if val_split is not None and val_split == split:
            raise ConfigError(f"val_split={val_split!r} is the training split; pick another split or use val_fraction")
        if classes is not None and (not classes or min(classes) < 0 or len(set(classes)) != len(classes)):
            raise ConfigError(f"classes must be distinct class ids >= 0, got {classes}")
        self.save_hyperparameters()
        self.name, self.split, self.val_split = name, split, val_split
        self.image_key, self.label_key = image_key, label_key
        self.image_size, self.channels, self.batch_size = image_size, channels, batch_size
        self.num_workers, self.cache_dir, self.val_fraction = num_workers, cache_dir, val_fraction or 0.0
        self.seed, self.max_samples, self.random_flip = seed, max_samples, random_flip
        self.classes, self.verify_images = classes, verify_images
        self.transform = v2.Compose([
            v2.ToImage(),
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * channels, [0.5] * channels),  # [0, 1] -> [-1, 1]
        ])
        self._splits: dict[str, tuple] = {}  # split -> (dataset with undecoded images, labels)
        self._num_classes: int | None = None
        self.train_set = self.val_set = None

    # ----------------------------------------------------------------- loading
    @property
    def is_local(self) -> bool:
        return os.path.isdir(self.name)

    @property
    def is_saved(self) -> bool:
        """A folder written by ``save_to_disk`` (else a local folder is an image-folder tree)."""
        return self.is_local and any(os.path.isfile(os.path.join(self.name, f)) for f in _SAVED_MARKERS)

    def _load(self, split: str):
        import datasets

        if self.is_saved:
            try:
                ds = datasets.load_from_disk(self.name)
            except FileNotFoundError as e:
                raise ConfigError(f"data name={self.name!r} is a folder but not a dataset written by "
                                  f"Dataset.save_to_disk ({one_line(e, 300)})") from None
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ConfigError(f"split={split!r} not in {self.name!r}; available splits: {list(ds)}. "
                                      "Set `split` / `val_split` to one of them.")
                return ds[split]
            if split != self.split:
                raise ConfigError(f"{self.name!r} is a single Dataset without splits; val_split={split!r} "
                                  "needs a DatasetDict, use val_fraction instead")
            return ds
        if self.is_local:
            try:
                return datasets.load_dataset("imagefolder", data_dir=self.name, split=split, cache_dir=self.cache_dir)
            except Exception as e:  # noqa: BLE001 - no images, unknown split, unreadable tree ...
                raise ConfigError(f"could not load the image folder {self.name!r} (split={split!r}): "
                                  f"{type(e).__name__}: {one_line(e, 300)}. Expected one subfolder of images per "
                                  "class (or <split>/<class>/ subfolders).") from None
        try:
            return datasets.load_dataset(self.name, split=split, cache_dir=self.cache_dir)
        except Exception as e:  # noqa: BLE001 - offline, unknown name, hub errors ...
            raise ConfigError(
                f"could not load dataset {self.name!r} (split={split!r}) from the Hugging Face hub: "
                f"{type(e).__name__}: {one_line(e, 300)}. Without network access the dataset must be "
                f"pre-downloaded into cache_dir={self.cache_dir!r} (run `datasets.load_dataset({self.name!r}, "
                f"cache_dir={self.cache_dir!r})` on a machine with network), or `name` must be a local "
                "folder written with `Dataset.save_to_disk` or a folder of class subfolders."
            ) from e

    def _validate(self, ds) -> np.ndarray:
        """The split's labels as an integer array; a ConfigError naming the column when they are unusable."""
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
        return labels

    def _split(self, split: str):
        """``(dataset with undecoded images, labels)`` of ``split``, loaded and checked once."""
        if split not in self._splits:
            import datasets

            ds = self._load(split)
            labels = self._validate(ds)
            if isinstance(ds.features[self.image_key], datasets.Image):
                ds = ds.cast_column(self.image_key, datasets.Image(decode=False))
            self._splits[split] = ds, labels
            if split == self.split:
                n = getattr(ds.features[self.label_key], "num_classes", None)
                self._num_classes = int(n) if n is not None else int(labels.max()) + 1 if labels.size else 0
                if self.classes is not None:
                    if max(self.classes) >= self._num_classes:
                        raise ConfigError(f"classes={self.classes} but {self.name!r} has {self._num_classes} classes")
                    self._num_classes = max(self.classes) + 1
        return self._splits[split]

    def prepare_data(self) -> None:
        """Download (hub names only) into ``cache_dir``; called on one process."""
        if not self.is_local:
            self._load(self.split)

    def _rows(self, split: str, generator: torch.Generator) -> torch.Tensor:
        """Shuffled rows of ``split`` (only the kept ``classes``; at most ``max_samples``)."""
        _, labels = self._split(split)
        rows = torch.randperm(len(labels), generator=generator)
        if self.classes is not None:
            rows = rows[torch.from_numpy(np.isin(labels[rows.numpy()], self.classes))]
        return rows if self.max_samples is None else rows[: self.max_samples]

    def _describe(self, split: str):
        def describe(row: int, value) -> str:
            path = value.get("path") if isinstance(value, dict) else None
            return f"{path} (row {row} of split {split!r} of {self.name!r})" if path else \
                f"at row {row} of split {split!r} of {self.name!r}"
        return describe

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        generator = torch.Generator().manual_seed(self.seed)
        perm = self._rows(self.split, generator)
        if self.val_split is None:
            n_val = int(round(self.val_fraction * len(perm)))
            if self.val_fraction > 0 and len(perm) > 1:
                n_val = min(max(n_val, 1), len(perm) - 1)
            val_split, val_rows, train_rows = self.split, perm[:n_val], perm[n_val:]
        else:
            val_split, val_rows, train_rows = self.val_split, self._rows(self.val_split, generator), perm
        mode = "RGB" if self.channels == 3 else "L"

        def make(split, rows, transform):
            ds, _ = self._split(split)
            return _ImageLabelDataset(ds, rows.tolist(), self.image_key, self.label_key, mode, transform,
                                      self._describe(split))

        train_transform = self.transform
        if self.random_flip:
            train_transform = v2.Compose([v2.RandomHorizontalFlip(), self.transform])
        val_set, train_set = make(val_split, val_rows, self.transform), make(self.split, train_rows, train_transform)
        if self.verify_images:
            train_set.verify()
            val_set.verify()
        self.val_set, self.train_set = val_set, train_set

    # -------------------------------------------------------------- properties
    @property
    def num_classes(self) -> int:
        """From the label column's ``ClassLabel`` feature, else ``max(label) + 1``."""
        if self._num_classes is None:
            self._split(self.split)
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
