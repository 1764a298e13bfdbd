"""One evaluation path for generated images, shared by ``SamplingCallback``, ``evaluate.py`` and ``sweep.py``.

    evaluator = build_image_evaluator(metrics, image_shape, feature_network="classifier.ckpt")
    evaluator.set_real(reference_uint8_nhwc)                 # once: the reference features (FID, KID)
    row = evaluate_samples(samples_uint8_nhwc, labels, evaluator)  # per setting: {"fid": .., "accuracy": ..}

``feature_network``: ``None`` or ``"inception"`` for torchmetrics' Inception-v3 (its weights from
``inception_weights`` or the torch hub cache), a digits-classifier checkpoint path
(``metrics.classifier.load_feature_network``), or an already loaded ``FeatureNetwork``.
An evaluator is any object with ``names``, ``image_shape``, ``set_real(uint8 NHWC)`` and
``__call__(uint8 NHWC, labels) -> dict[str, float]`` (``metrics.images.ImageMetrics``); an ADM reference
batch evaluator (``metrics.adm``) can follow the same protocol.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from lightning_reg.errors import ConfigError, one_line
from lightning_reg.metrics.images import IMAGE_METRICS, ImageMetrics

INCEPTION = "inception"


def build_image_evaluator(metrics=("fid", "is"), image_shape: tuple[int, int, int] = (3, 32, 32),
                          feature_network=None, inception_weights: str | None = None,
                          num_classes: int | None = None, device="cpu") -> ImageMetrics:
    """``ImageMetrics`` over ``metrics`` (from ``IMAGE_METRICS``: fid, is, kid, accuracy) for images of
    ``image_shape`` (C, H, W). A classifier ``feature_network`` must match ``image_shape`` and, when given,
    ``num_classes`` (the model's classes); ``accuracy`` needs a classifier. Bad input: one ConfigError line."""
    from lightning_reg.metrics.classifier import FeatureNetwork, load_feature_network

    network = feature_network
    if isinstance(network, (str, os.PathLike)) and str(network) != INCEPTION:
        network = load_feature_network(network)
    if isinstance(network, FeatureNetwork):
        network.check_compatible(image_shape, num_classes)
    elif network not in (None, INCEPTION):
        raise ConfigError(f"feature_network must be 'inception', a classifier checkpoint path or a FeatureNetwork, "
                          f"got {type(network).__name__}")
    return ImageMetrics(metrics, image_shape, None if network == INCEPTION else network,
                        inception_weights=inception_weights, device=device)


def evaluate_samples(samples_uint8_nhwc, labels, evaluator) -> dict[str, float]:
    """``evaluator``'s metrics of one set of samples (uint8 NHWC) sampled for ``labels`` (or ``None``)."""
    return evaluator(samples_uint8_nhwc, labels)


def read_samples(path) -> tuple[np.ndarray, np.ndarray | None]:
    """``(uint8 NHWC images, labels or None)`` of a ``samples.npz`` (``samples`` as sample.py writes, or
    ``arr_0`` as the ADM evaluator reads; labels from ``labels`` or ``arr_1``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--samples {path} does not exist")
    try:
        with np.load(path) as data:
            key = next((k for k in ("samples", "arr_0") if k in data.files), None)
            if key is None:
                raise ConfigError(f"--samples {path} holds {data.files}; expected 'samples' or 'arr_0' "
                                  "(uint8 N x H x W x C images) and optionally 'labels'")
            images = data[key]
            label_key = next((k for k in ("labels", "arr_1") if k in data.files), None)
            labels = data[label_key] if label_key else None
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - a truncated or non-npz file
        raise ConfigError(f"--samples {path} is not a readable .npz ({type(err).__name__}: {one_line(err)})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ConfigError(f"--samples {path}: {key} must be uint8 images (N, H, W, C) with C 1 or 3, got "
                          f"{images.dtype} {images.shape}")
    if labels is not None and labels.shape != (len(images),):
        raise ConfigError(f"--samples {path}: labels of shape {labels.shape} for {len(images)} images")
    return images, labels


def loader_images(loader, n: int | None = None) -> np.ndarray:
    """The first ``n`` (all if ``None``) images of a loader of ``(x in [-1, 1] NCHW, y)`` batches, as uint8 NHWC."""
    from lightning_reg.sampling.writer import to_uint8_nhwc

    batches, count = [], 0
    for x, _ in loader:
        batches.append(x)
        count += len(x)
        if n is not None and count >= n:
            break
    if count < 2:
        raise ConfigError(f"the reference needs at least 2 images, found {count}")
    return to_uint8_nhwc(torch.cat(batches)[:n])


def load_reference(reference: str, image_shape: tuple[int, int, int], num_reference: int | None = None,
                   split: str = "test", seed: int = 0) -> np.ndarray:
    """Reference images as uint8 NHWC: an ``.npz`` of images (``arr_0``/``samples``/``images``; sizes must
    equal ``image_shape``), ``digits:mnist`` / ``digits:sklearn`` (the offline digits' ``split``), or a
    dataset folder / hub name (``ImageDataModule``; resized to ``image_size`` as for training). At most
    ``num_reference`` images, a seeded random subset for datasets."""
    from lightning_reg.data.images import ImageDataModule

    channels, size = image_shape[0], image_shape[1]
    if str(reference).endswith(".npz"):
        images = _npz_images(reference)
        if (images.shape[3], *images.shape[1:3]) != tuple(image_shape):
            raise ConfigError(f"--reference {reference} holds (C, H, W) = {(images.shape[3], *images.shape[1:3])} "
                              f"images but the samples are {tuple(image_shape)}; give a reference of the same size")
        return images[:num_reference]
    name = reference
    if str(reference).startswith("digits:"):
        from lightning_reg.data.digits import prepare_digits
        name = str(prepare_digits(source=str(reference).split(":", 1)[1]))
    data = ImageDataModule(name=name, split=split, image_size=size, channels=channels, val_fraction=0.0,
                           seed=seed, max_samples=num_reference, batch_size=256)
    data.setup("fit")
    return loader_images(DataLoader(data.train_set, batch_size=256), num_reference)


def _npz_images(path) -> np.ndarray:
    if not Path(path).is_file():
        raise ConfigError(f"--reference {path} does not exist")
    with np.load(path) as data:
        key = next((k for k in ("arr_0", "samples", "images") if k in data.files), None)
        if key is None:
            raise ConfigError(f"--reference {path} holds {data.files}; expected images under 'arr_0', 'samples' "
                              "or 'images'")
        images = data[key]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ConfigError(f"--reference {path}: {key} must be uint8 (N, H, W, C) images, got {images.dtype} "
                          f"{images.shape}")
    return images


def write_row(path, row: dict) -> None:
    """``row`` as ``path``: a JSON object (``.json``, replaced) or a CSV line (``.csv``, appended; header once)."""
    from lightning_reg.sampling.writer import atomic_write, write_json

    path = Path(path)
    if path.suffix == ".json":
        write_json(path, row)
    elif path.suffix == ".csv":
        rows = list(csv.DictReader(path.open())) if path.is_file() else []
        columns = list(dict.fromkeys([c for r in rows for c in r] + list(row)))

        def write(f):
            out = csv.DictWriter(f, fieldnames=columns)
            out.writeheader()
            out.writerows(rows + [row])

        atomic_write(path, write, binary=False)
    else:
        raise ConfigError(f"--output {path} must end in .json or .csv")


__all__ = ["IMAGE_METRICS", "INCEPTION", "build_image_evaluator", "evaluate_samples", "load_reference",
           "loader_images", "read_samples", "write_row"]
