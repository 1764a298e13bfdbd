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
    """Rows ``indices`` of a HF split (images left undecoded), yielding ``(x, y)``: ``x`` the image converted to
    ``mode``, resized and cropped by ``resize`` (uint8), optionally flipped, scaled to [-1, 1]."""

    def __init__(self, hf, indices, labels, image_key: str, mode: str, resize, flip: bool, describe):
        self.hf, self.indices = hf, [int(i) for i in indices]
        self.labels = torch.as_tensor(labels[self.indices], dtype=torch.long)
        self.image_key, self.mode, self.resize, self.flip = image_key, mode, resize, flip
        self.describe = describe  # row -> "file ... / row r of split s of name", for error messages
        self.cache: torch.Tensor | None = None  # uint8 (N, C, H, W) once ``decode_all(keep=True)`` ran

    def __len__(self) -> int:
        return len(self.indices)

    def pixels(self, i: int) -> torch.Tensor:
        """Image ``i`` as uint8 (C, H, W): decoded, converted to ``mode``, resized and cropped."""
        if self.cache is not None:
            return self.cache[i]
        row = self.indices[i]
        value = self.hf[row][self.image_key]
        return self.resize(open_image(value, self.describe(row, value)).convert(self.mode)).as_subclass(torch.Tensor)

    def decode_all(self, keep: bool) -> None:
        """Decode every image once (a broken file stops the run before it writes anything); ``keep``: hold
        them in memory as uint8, so that epochs no longer decode PNGs."""
        pixels = [self.pixels(i) for i in range(len(self))]
        if keep and pixels:
            self.cache = torch.stack(pixels)

    def __getitem__(self, i: int):
        x = self.pixels(i).float() / 127.5 - 1.0  # [0, 255] -> [-1, 1]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]


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
        in_memory: keep the decoded, resized images in memory (uint8; implies the check above), so an
            epoch does not decode them again: for small datasets (the digits: 4,000 images at 16x16
            take 1 MB, and an epoch's loading drops from seconds to milliseconds).
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
        in_memory: bool = False,
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
        self.classes, self.verify_images, self.in_memory = classes, verify_images, in_memory
        self.resize = v2.Compose([v2.ToImage(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])
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

        def make(split, rows, flip):
            ds, labels = self._split(split)
            return _ImageLabelDataset(ds, rows.tolist(), labels, self.image_key, mode, self.resize, flip,
                                      self._describe(split))

        val_set, train_set = make(val_split, val_rows, False), make(self.split, train_rows, self.random_flip)
        if self.verify_images or self.in_memory:
            train_set.decode_all(keep=self.in_memory)
            val_set.decode_all(keep=self.in_memory)
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
