"""A tiny offline class-conditional image dataset, for tests and docs.

Writes a ``datasets.Dataset`` with PIL images in column ``"img"`` and a
``ClassLabel`` column ``"label"`` via ``save_to_disk``, so the real
``ImageDataModule`` loading path (``load_from_disk``) can run without network.
"""

from __future__ import annotations

import os

import numpy as np

_COLORS = [(230, 60, 60), (60, 200, 80), (60, 90, 230), (240, 200, 40), (200, 60, 220), (40, 210, 220)]


def _pattern(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Class ``label``: colour x pattern (distinct for up to 24 classes) plus small noise."""
    yy, xx = np.mgrid[:size, :size]
    period = max(size // 4, 1)
    kind = (label // len(_COLORS) + label) % 4
    if kind == 0:
        mask = (yy // period) % 2 == 0  # horizontal stripes
    elif kind == 1:
        mask = (xx // period) % 2 == 0  # vertical stripes
    elif kind == 2:
        mask = ((xx // period) + (yy // period)) % 2 == 0  # checkerboard
    else:
        mask = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size / 3) ** 2  # disc
    color = np.array(_COLORS[label % len(_COLORS)], dtype=np.float32)
    img = np.where(mask[..., None], color, 0.25 * color)
    img = img + rng.normal(0.0, 8.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_synthetic_image_dataset(
    path: str | os.PathLike, num_classes: int = 4, n_per_class: int = 16, image_size: int = 16, seed: int = 0
) -> str:
    """Write ``num_classes * n_per_class`` RGB images (sorted by class) to ``path``; return ``path``."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    labels = [c for c in range(num_classes) for _ in range(n_per_class)]
    images = [Image.fromarray(_pattern(c, image_size, rng)) for c in labels]
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=[f"class_{c}" for c in range(num_classes)])}
    )
    ds = datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)
    ds.save_to_disk(str(path))
    return str(path)
