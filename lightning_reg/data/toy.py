"""The paper's toy problems (docs/theory.md §4) as Lightning data modules with known densities.

* ``Toy1D``: one condition, ``p(x|y)`` a mixture with means [0.5, 1.5], stds [0.25, 0.25]; the
  "unconditional" density is a *different* mixture (means [-1, 1], stds [0.5, 0.5]), not the class
  marginal, so the data itself supplies null-labelled samples (``null_fraction``).
* ``Toy2D``: two classes, each a Gaussian mixture, so densities, scores and the exact denoiser are all
  closed-form. ``task="ring_cross"``: a ring (class 0) and a cross (class 1), dense mixtures along the
  shapes, which do not overlap (``R_0`` is constant on each shape). ``task="overlap"``: each class a
  blob of its own plus a blob at the origin that both share, so ``R_0 = [p(x|y)/p(x)]^w`` varies where
  the samples land.

Batches are ``(x, y)`` with ``y`` in ``[0, num_classes]``; ``num_classes`` is the null label.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_reg.data.mixtures import GaussianMixture
from lightning_reg.errors import ConfigError


class ToyDistribution:
    """Class-conditional mixtures ``p(x|y)`` plus the unconditional ``p(x)`` (default: class marginal)."""

    def __init__(self, conditionals: list[GaussianMixture], unconditional: GaussianMixture | None = None):
        self.conditionals = conditionals
        self.unconditional = unconditional or GaussianMixture.combine(conditionals)

    @property
    def num_classes(self) -> int:
        return len(self.conditionals)

    @property
    def dim(self) -> int:
        return self.unconditional.dim

    def mixture(self, label: int) -> GaussianMixture:
        """``p(x|y=label)``; the null label ``num_classes`` gives ``p(x)``."""
        return self.unconditional if label == self.num_classes else self.conditionals[label]

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One sample per label (float64, shape (N, dim))."""
        out = torch.empty(len(labels), self.dim, dtype=torch.float64)
        for label in labels.unique().tolist():
            idx = (labels == label).nonzero().squeeze(1)
            out[idx] = self.mixture(label).sample(len(idx), generator)
        return out

    def log_prob(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(x), dtype=torch.float64)
        for label in labels.unique().tolist():
            idx = (labels == label).nonzero().squeeze(1)
            out[idx] = self.mixture(label).log_prob(x[idx])
        return out


def toy1d_distribution() -> ToyDistribution:
    return ToyDistribution([GaussianMixture([0.5, 1.5], [0.25, 0.25])],
                           unconditional=GaussianMixture([-1.0, 1.0], [0.5, 0.5]))


def ring(radius: float = 1.0, components: int = 48, std: float = 0.06) -> GaussianMixture:
    angle = torch.arange(components, dtype=torch.float64) * (2 * math.pi / components)
    return GaussianMixture(radius * torch.stack([angle.cos(), angle.sin()], 1), [std] * components)


def cross(arm: float = 0.6, components: int = 48, std: float = 0.06) -> GaussianMixture:
    u = torch.linspace(-arm, arm, components // 2, dtype=torch.float64)
    zero = torch.zeros_like(u)
    points = torch.cat([torch.stack([u, zero], 1), torch.stack([zero, u], 1)])
    return GaussianMixture(points, [std] * len(points))


def overlapping_blobs(sign: float, std: float = 0.2) -> GaussianMixture:
    """Two equal blobs: one of the class's own at ``sign * (-0.7, 0.35)`` and one at the origin that both
    classes (``sign = +1, -1``) share; there ``R_0 = 1`` (w = 1), on the class's own blob ``R_0 ≈ 2``."""
    return GaussianMixture(torch.tensor([[-0.7 * sign, 0.35 * sign], [0.0, 0.0]], dtype=torch.float64), [std, std])


TOY2D_TASKS = {"ring_cross": (("ring", "cross"), lambda: [ring(), cross()]),
               "overlap": (("left", "right"), lambda: [overlapping_blobs(1.0), overlapping_blobs(-1.0)])}


def toy2d_distribution(task: str = "ring_cross") -> ToyDistribution:
    """The 2D task ``task`` (``TOY2D_TASKS``: ``ring_cross`` or ``overlap``); unconditional = class marginal."""
    if task not in TOY2D_TASKS:
        raise ConfigError(f"unknown 2D task {task!r}; choose one of {sorted(TOY2D_TASKS)}")
    return ToyDistribution(TOY2D_TASKS[task][1]())


class ToyDataModule(L.LightningDataModule):
    """Deterministic (given ``seed``) train/val sets drawn from a ``ToyDistribution``."""

    def __init__(self, distribution: ToyDistribution, num_train: int = 100_000, num_val: int = 4096,
                 batch_size: int = 512, null_fraction: float = 0.0, seed: int = 0):
        super().__init__()
        if num_train <= 0 or num_val <= 0 or batch_size <= 0:
            raise ConfigError("num_train, num_val and batch_size must be positive")
        if not 0.0 <= null_fraction < 1.0:
            raise ConfigError(f"null_fraction must lie in [0, 1), got {null_fraction}")
        self.distribution = distribution
        self.num_train, self.num_val, self.batch_size = num_train, num_val, batch_size
        self.null_fraction, self.seed = null_fraction, seed

    @property
    def num_classes(self) -> int:
        return self.distribution.num_classes

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (self.distribution.dim,)

    def make_split(self, n: int, seed: int) -> TensorDataset:
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, self.num_classes, (n,), generator=g)
        null = torch.rand(n, generator=g) < self.null_fraction
        labels[null] = self.num_classes
        return TensorDataset(self.distribution.sample(labels, g).float(), labels)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self.make_split(self.num_train, self.seed)
        self.val_set = self.make_split(self.num_val, self.seed + 1)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


class Toy1D(ToyDataModule):
    """The paper's 1D set-up: half of the data are null-labelled draws of the unconditional mixture."""

    def __init__(self, num_train: int = 100_000, num_val: int = 4096, batch_size: int = 512,
                 null_fraction: float = 0.5, seed: int = 0):
        super().__init__(toy1d_distribution(), num_train, num_val, batch_size, null_fraction, seed)


class Toy2D(ToyDataModule):
    """Two classes of ``task`` (ring/cross or overlapping blobs); unconditional = their marginal (learned
    by label dropout)."""

    def __init__(self, num_train: int = 100_000, num_val: int = 4096, batch_size: int = 512,
                 null_fraction: float = 0.0, seed: int = 0, task: str = "ring_cross"):
        super().__init__(toy2d_distribution(task), num_train, num_val, batch_size, null_fraction, seed)


TOY_DISTRIBUTIONS = {"toy1d": toy1d_distribution, "toy2d": toy2d_distribution,
                     "toy2d_overlap": lambda: toy2d_distribution("overlap")}
