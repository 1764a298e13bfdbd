"""Figures for the toy experiments and image samples (matplotlib, Agg canvas; PNGs written atomically)."""

from __future__ import annotations

import math

import numpy as np
import torch
from einops import rearrange, repeat
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_reg.data.toy import ToyDistribution
from lightning_reg.errors import ConfigError
from lightning_reg.io.files import atomic_write

_COLUMNS = 4  # panels per row
_GRID = 200  # density evaluation points per axis
CAPTION_HEIGHT = 14  # pixels of the caption row above each grid of labelled_grids
MIN_CAPTION_FONT = 7  # pixels: a smaller caption is not legible


def _class_colour(label: int, num_classes: int | None) -> str:
    """``tab10`` colours per class; the null label (``num_classes``) is grey."""
    return "0.4" if label == num_classes else f"C{label % 10}"


def _class_name(label: int, num_classes: int | None) -> str:
    return "unconditional" if label == num_classes else f"class {label}"


def _density(distribution: ToyDistribution, label: int, points: np.ndarray) -> np.ndarray:
    """``p(x | y=label)`` at (N, D) points."""
    return distribution.mixture(label).log_prob(torch.as_tensor(points)).exp().numpy()


def _limits(samples: list[np.ndarray], distribution: ToyDistribution | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis window holding the 0.5-99.5% sample quantiles and every target component (+4 std)."""
    points = np.concatenate(samples)
    low, high = np.nanquantile(points, 0.005, axis=0), np.nanquantile(points, 0.995, axis=0)
    if distribution is not None:
        means, pad = distribution.unconditional.means.numpy(), 4 * distribution.unconditional.stds.max().item()
        low, high = np.minimum(low, means.min(0) - pad), np.maximum(high, means.max(0) + pad)
    return low, high


def _panel_1d(ax, samples, labels, distribution, num_classes, low, high) -> None:
    """Histogram per class with the true conditional density on top."""
    bins = np.linspace(low[0], high[0], 81)
    grid = np.linspace(low[0], high[0], 400)
    for label in np.unique(labels).tolist():
        colour = _class_colour(label, num_classes)
        ax.hist(samples[labels == label, 0], bins=bins, density=True, alpha=0.45, color=colour,
                label=_class_name(label, num_classes))
        if distribution is not None:
            ax.plot(grid, _density(distribution, label, grid[:, None]), color=colour, lw=1.5)
    ax.set_xlabel("x")


def _panel_2d(ax, samples, labels, distribution, num_classes, low, high) -> None:
    """Samples coloured by label over faint contours of each requested class's true density."""
    xs, ys = np.linspace(low[0], high[0], _GRID), np.linspace(low[1], high[1], _GRID)
    grid = rearrange(np.stack(np.meshgrid(xs, ys), -1), "h w d -> (h w) d")
    for label in np.unique(labels).tolist():
        colour = _class_colour(label, num_classes)
        density = None if distribution is None else rearrange(
            _density(distribution, label, grid), "(h w) -> h w", h=_GRID)
        if density is not None and density.max() > 0:  # zero when wild samples stretch the window
            ax.contourf(xs, ys, density, levels=[0.1 * density.max(), 1.01 * density.max()], colors=[colour], alpha=0.15)
        ax.scatter(*samples[labels == label].T, s=2, alpha=0.5, color=colour, linewidths=0,
                   label=_class_name(label, num_classes))
    ax.set_xlim(low[0], high[0])
    ax.set_ylim(low[1], high[1])
    ax.set_aspect("equal")


def scatter_figure(samples_by_setting: dict[str, tuple[np.ndarray, np.ndarray]],
                   distribution: ToyDistribution | None = None, title: str = "") -> Figure:
    """One panel per guidance setting: per-class histograms (1D) or a labelled scatter (2D).

    ``samples_by_setting`` maps a panel title to ``(samples (N, D), labels (N,))``; with a
    ``distribution`` the true conditional densities are overlaid.
    """
    if not samples_by_setting:
        raise ConfigError("scatter_figure needs at least one (samples, labels) setting")
    settings = {name: (np.asarray(x, dtype=np.float64).reshape(len(x), -1), np.asarray(y).reshape(-1))
                for name, (x, y) in samples_by_setting.items()}
    dim = {x.shape[1] for x, _ in settings.values()}
    if dim not in ({1}, {2}):
        raise ConfigError(f"scatter_figure plots 1D or 2D samples of one dimension, got dimensions {sorted(dim)}")
    panel = _panel_1d if dim == {1} else _panel_2d
    num_classes = None if distribution is None else distribution.num_classes
    low, high = _limits([x for x, _ in settings.values()], distribution)

    rows, cols = math.ceil(len(settings) / _COLUMNS), min(len(settings), _COLUMNS)
    fig = Figure(figsize=(4 * cols, 4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, (x, y)) in zip(axes, settings.items()):
        panel(ax, x, y, distribution, num_classes, low, high)
        ax.set_title(name)
    for ax in axes[len(settings):]:
        ax.set_axis_off()
    axes[0].legend(loc="upper right", fontsize="small", markerscale=4)
    if title:
        fig.suptitle(title)
    return fig


def image_grid(images_uint8_nhwc, nrow: int) -> np.ndarray:
    """Tile N images (N, H, W, C) into a (rows H, nrow W, 3) uint8 grid, row-major, blank-padded."""
    images = np.asarray(images_uint8_nhwc)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or nrow < 1:
        raise ConfigError(f"image_grid needs uint8 (N, H, W, 1 or 3) images and nrow >= 1, "
                          f"got dtype {images.dtype}, shape {images.shape}, nrow {nrow}")
    if images.shape[-1] == 1:
        images = repeat(images, "n h w 1 -> n h w 3")
    blank = (-len(images)) % nrow
    images = np.concatenate([images, np.zeros((blank, *images.shape[1:]), np.uint8)])
    return rearrange(images, "(r c) h w ch -> (r h) (c w) ch", c=nrow)


def caption_row(text: str, width: int, height: int = CAPTION_HEIGHT) -> np.ndarray:
    """``text`` in black on a white (height, width, 3) uint8 row, left-aligned, in the largest font size that fits
    (down to ``MIN_CAPTION_FONT``; beyond that its end is cut off)."""
    from PIL import Image, ImageDraw, ImageFont

    for size in range(height - 3, MIN_CAPTION_FONT - 1, -1):
        font = ImageFont.load_default(size=size)
        left, top, right, bottom = font.getbbox(text)
        if right - left + 2 <= width:
            break
    row = Image.new("L", (width, height), 255)
    ImageDraw.Draw(row).text((1 - left, (height - (bottom - top)) // 2 - top), text, fill=0, font=font)
    return repeat(np.asarray(row), "h w -> h w 3")


def labelled_grids(grids: dict[str, np.ndarray]) -> np.ndarray:
    """The (H, W, 3) uint8 ``grids`` (``image_grid``'s, of one width) stacked top to bottom in their order, each
    under a ``caption_row`` naming it: (sum of H + CAPTION_HEIGHT per grid, W, 3)."""
    arrays = {name: np.asarray(grid) for name, grid in grids.items()}
    first = next(iter(arrays.values()), None)
    if first is None or any(a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or a.shape[1] != first.shape[1]
                            for a in arrays.values()):
        raise ConfigError("labelled_grids needs at least one uint8 (H, W, 3) grid, all of one width, got "
                          f"{ {name: (str(a.dtype), a.shape) for name, a in arrays.items()} }")
    return np.concatenate([part for name, a in arrays.items() for part in (caption_row(name, a.shape[1]), a)])


def save_figure(fig: Figure, path) -> None:
    """Write ``fig`` as a PNG at ``path`` atomically (``atomic_write``), creating its folder."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
