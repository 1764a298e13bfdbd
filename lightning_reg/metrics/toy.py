"""Exact toy metrics: the target densities are known mixtures (``lightning_reg.data.toy``).

* ``mean_log_likelihood``: ``(1/N) sum_i log p(x_i | y_i)`` under the true conditional.
* ``energy_distance``: Székely's ``2 E|X-Y| - E|X-X'| - E|Y-Y'|``.
* ``sliced_wasserstein``: ``E_theta W2(theta^T X, theta^T Y)`` over random unit directions.
* ``on_shape_fraction``: share of samples within ``radius`` stds of a component of their class.
"""

from __future__ import annotations

from functools import partial

import torch
from einops import rearrange
from torch import Tensor

from lightning_reg.data.toy import ToyDistribution
from lightning_reg.errors import ConfigError, check_int, check_names

_CHUNK = 1024  # rows per block of pairwise distances: bounds memory at _CHUNK * N floats
TOY_METRICS = ("log_likelihood", "energy_distance", "sliced_wasserstein", "on_shape")  # on_shape: 2D only


def _points(x, name: str) -> Tensor:
    """Samples as a float64 (N, D) tensor; 1D data may come as (N,)."""
    x = torch.as_tensor(x).to(torch.float64)
    if x.ndim == 0 or len(x) == 0:
        raise ConfigError(f"{name} must be a non-empty (N, D) array of samples, got shape {tuple(x.shape)}")
    return rearrange(x, "n ... -> n (...)")


def _labelled(samples, labels) -> tuple[Tensor, Tensor]:
    x = _points(samples, "samples")
    y = torch.as_tensor(labels).long().reshape(-1)
    if len(y) != len(x):
        raise ConfigError(f"labels must hold one label per sample: got {len(y)} labels for {len(x)} samples")
    return x, y


def _two_sets(x, y) -> tuple[Tensor, Tensor]:
    x, y = _points(x, "x"), _points(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ConfigError(f"x and y must share a dimension, got {x.shape[1]} and {y.shape[1]}")
    return x, y


def mean_log_likelihood(samples, labels, distribution: ToyDistribution) -> float:
    """``(1/N) sum_i log p(x_i | y_i)`` under the target conditional mixtures."""
    x, y = _labelled(samples, labels)
    return distribution.log_prob(x, y).mean().item()


def _mean_pairwise_distance(x: Tensor, y: Tensor) -> Tensor:
    """``sum_ij |x_i - y_j|`` / (N M), accumulated over row blocks (exact distances, no matmul trick)."""
    total = sum(torch.cdist(block, y, compute_mode="donot_use_mm_for_euclid_dist").sum()
                for block in x.split(_CHUNK))
    return total / (len(x) * len(y))


def energy_distance(x, y) -> float:
    """Székely's energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|``.

    The within-set terms are U-statistics (the zero diagonal is excluded: divide by ``N (N - 1)``).
    """
    x, y = _two_sets(x, y)
    if len(x) < 2 or len(y) < 2:
        raise ConfigError("energy_distance needs at least 2 samples in each set")
    within = [_mean_pairwise_distance(s, s) * len(s) / (len(s) - 1) for s in (x, y)]
    return (2 * _mean_pairwise_distance(x, y) - within[0] - within[1]).item()


def _wasserstein2_1d(u: Tensor, v: Tensor) -> Tensor:
    """Exact W2 between empirical 1D distributions, column-wise: ``(int_0^1 (F_u^-1(q) - F_v^-1(q))^2 dq)^1/2``.

    The quantile functions are step functions with breaks at ``i/N`` and ``j/M``; between merged
    breaks both are constant, so the integral is a finite sum (equal sizes: mean of sorted gaps^2).
    """
    n, m = len(u), len(v)
    breaks = torch.cat([torch.zeros(1, dtype=torch.float64),
                        torch.arange(1, n + 1, dtype=torch.float64) / n,
                        torch.arange(1, m + 1, dtype=torch.float64) / m]).unique()  # sorted
    mid, width = (breaks[1:] + breaks[:-1]) / 2, breaks.diff()
    qu = u.sort(0).values[(mid * n).long().clamp(max=n - 1)]
    qv = v.sort(0).values[(mid * m).long().clamp(max=m - 1)]
    return ((qu - qv) ** 2 * width[:, None]).sum(0).sqrt()


def sliced_wasserstein(x, y, projections: int = 128, seed: int = 0) -> float:
    """``(1/P) sum_p W2(theta_p^T X, theta_p^T Y)`` over ``P`` random unit directions (seeded).

    In 1D every direction is ``+-1``, so this is the exact W2 between the two sample sets.
    """
    x, y = _two_sets(x, y)
    check_int("projections", projections)
    theta = torch.randn(projections, x.shape[1], dtype=torch.float64,
                        generator=torch.Generator().manual_seed(seed))
    theta = theta / theta.norm(dim=1, keepdim=True)
    return _wasserstein2_1d(x @ theta.T, y @ theta.T).mean().item()


def on_shape_fraction(samples, labels, distribution: ToyDistribution, radius: float = 3.0) -> float:
    """Share of samples whose nearest component mean ``mu_k`` of ``p(x|y)`` has ``|x - mu_k| <= radius sigma_k``."""
    x, y = _labelled(samples, labels)
    hits = 0
    for label in y.unique().tolist():
        mixture = distribution.mixture(label)
        dist = torch.cdist(x[y == label], mixture.means)  # (n_label, K)
        nearest, k = dist.min(1)
        hits += (nearest <= radius * mixture.stds[k]).sum().item()
    return hits / len(x)


def toy_metrics(samples, labels, distribution: ToyDistribution, seed: int = 0,
                metrics=None) -> dict[str, float]:
    """The toy metrics named in ``metrics`` (default: all of ``TOY_METRICS`` that apply to the data).

    Two-sample metrics compare each class with fresh target draws for the same labels:
    ``energy_distance`` and ``sliced_wasserstein`` are computed per class and averaged with weights
    ``n_c / N``. ``on_shape`` is defined for 2D data only.
    """
    names = toy_metric_names(distribution, metrics)
    x, y = _labelled(samples, labels)
    target = distribution.sample(y, torch.Generator().manual_seed(seed))
    out = {}
    if "log_likelihood" in names:
        out["log_likelihood"] = mean_log_likelihood(x, y, distribution)
    per_class = {"energy_distance": energy_distance, "sliced_wasserstein": partial(sliced_wasserstein, seed=seed)}
    for name in (n for n in per_class if n in names):
        out[name] = sum((y == label).sum().item() / len(y) * per_class[name](x[y == label], target[y == label])
                        for label in y.unique().tolist())
    if "on_shape" in names:
        out["on_shape"] = on_shape_fraction(x, y, distribution)
    return out


def toy_metric_names(distribution: ToyDistribution, metrics=None) -> tuple[str, ...]:
    """``metrics`` checked against the toy metrics that apply to ``distribution``; ``None``: all of them."""
    applicable = TOY_METRICS if distribution.dim == 2 else tuple(m for m in TOY_METRICS if m != "on_shape")
    if metrics is None:
        return applicable
    return check_names(metrics, applicable, f"metrics of {distribution.dim}D toy data")


class ToyEvaluator:
    """The toy metrics as an evaluator (the ``metrics.evaluate`` protocol: ``names``, ``__call__(samples, labels)``)
    of samples against ``distribution``'s exact densities and fresh draws seeded by ``seed``."""

    def __init__(self, distribution: ToyDistribution, seed: int = 0, metrics=None):
        self.distribution, self.seed = distribution, seed
        self.names = toy_metric_names(distribution, metrics)

    def __call__(self, samples, labels) -> dict[str, float]:
        return toy_metrics(samples, labels, self.distribution, seed=self.seed, metrics=self.names)
