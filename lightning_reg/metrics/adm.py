"""ADM-comparable evaluation (Dhariwal & Nichol 2021, openai/guided-diffusion ``evaluations/evaluator.py``):
FID, sFID, Inception Score and improved precision/recall against an ADM reference batch.

A reference batch (``VIRTUAL_imagenet256_labeled.npz``) holds ``arr_0`` (uint8 NHWC images) and the
Inception statistics of its images: ``mu``, ``sigma`` (pool_3, 2048-d) and ``mu_s``, ``sigma_s`` (spatial:
the first 7 channels of ``mixed_6/conv``, 17 x 17 x 7 = 2023-d, flattened in TF's NHWC order).

* FID / sFID: the Frechet distance ``|mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})`` with scipy's
  ``sqrtm``; a non-finite square root is retried with ``eps I`` added to both covariances, as ADM does.
* IS: ``exp E_x KL(p(y|x) || p(y))`` over 10 consecutive splits (ADM: splits of 5,000 of 50,000 samples),
  from the logits without the bias (ADM's ``softmax/logits/MatMul``; torch-fidelity's ``logits_unbiased``).
* Precision / recall (Kynkaenniemi et al. 2019, k = 3): a point lies on a set's manifold if its squared
  distance to some member is at most that member's squared distance to its k-th nearest neighbour.

Features come from torch-fidelity's port of the TF Inception graph (``InceptionFeatures``; weights
``weights-inception-2015-12-05-6726825d.pth`` in ``<torch hub dir>/checkpoints``, nothing is downloaded)
or from any other network (``FeatureReadout``), e.g. the digits classifier of ``metrics.classifier``; with
another network the stored Inception statistics do not apply and the reference's are computed from ``arr_0``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from scipy import linalg
from torch import Tensor, nn

from lightning_reg.errors import ConfigError, check_names, does_not_exist
from lightning_reg.io.files import NpzArchive
from lightning_reg.metrics.images import inception_weights_file

ADM_METRICS = ("fid", "sfid", "is", "precision", "recall")
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
_BATCH = 100


@dataclass
class FrechetStatistics:
    """Mean and covariance of a feature set (float64)."""

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features) -> "FrechetStatistics":
        features = np.asarray(features, dtype=np.float64)
        return cls(features.mean(0), np.cov(features, rowvar=False))

    def frechet_distance(self, other: "FrechetStatistics", eps: float = 1e-6) -> float:
        """``|mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^{1/2})``; ADM's eps retry and imaginary check."""
        if self.mu.shape != other.mu.shape or self.sigma.shape != other.sigma.shape:
            raise ConfigError(f"statistics of different feature sizes: {self.mu.shape[0]} vs {other.mu.shape[0]} "
                              "(were they computed with the same feature network?)")
        covmean = linalg.sqrtm(self.sigma @ other.sigma)
        if not np.isfinite(covmean).all():
            warnings.warn(f"Frechet distance: singular covariance product; adding {eps} to the diagonals")
            offset = np.eye(len(self.mu)) * eps
            covmean = linalg.sqrtm((self.sigma + offset) @ (other.sigma + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"Frechet distance: imaginary component {np.abs(covmean.imag).max():.3g} in sqrtm")
            covmean = covmean.real
        diff = self.mu - other.mu
        return float(diff @ diff + np.trace(self.sigma) + np.trace(other.sigma) - 2 * np.trace(covmean))


def inception_score(logits: Tensor, splits: int = 10) -> tuple[float, float]:
    """Mean and std over ``splits`` consecutive chunks of ``exp(mean_x KL(p(y|x) || p(y)))``."""
    scores = []
    for part in torch.as_tensor(logits, dtype=torch.float64).tensor_split(splits):
        log_p = part.log_softmax(1)
        log_marginal = log_p.exp().mean(0).log()
        scores.append((log_p.exp() * (log_p - log_marginal)).sum(1).mean().exp())
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std(unbiased=False))


def _squared_distances(rows: Tensor, cols: Tensor) -> Tensor:
    return torch.cdist(rows, cols).square()


def manifold_radii(features: Tensor, k: int = 3, chunk: int = 1024) -> Tensor:
    """Squared distance of each point to its k-th nearest neighbour in ``features`` (itself excluded)."""
    if len(features) <= k:
        raise ConfigError(f"precision/recall with k={k} needs more than {k} points per set, got {len(features)}")
    return torch.cat([_squared_distances(rows, features).kthvalue(k + 1, dim=1).values
                      for rows in features.split(chunk)])


def _coverage(points: Tensor, manifold: Tensor, radii: Tensor, chunk: int) -> float:
    """Share of ``points`` inside some ball ``|x - m_j|^2 <= radii_j`` of the manifold's members."""
    inside = [(_squared_distances(rows, manifold) <= radii).any(1) for rows in points.split(chunk)]
    return float(torch.cat(inside).double().mean())


def precision_recall(reference: Tensor, samples: Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision (samples on the reference manifold) and recall (reference on the samples' manifold)."""
    reference, samples = reference.float(), samples.float()
    precision = _coverage(samples, reference, manifold_radii(reference, k, chunk), chunk)
    recall = _coverage(reference, samples, manifold_radii(samples, k, chunk), chunk)
    return precision, recall


class InceptionFeatures(nn.Module):
    """torch-fidelity's Inception-v3 (the TF 2015-12-05 graph, TF1 bilinear resize to 299) on uint8 NCHW:
    ``pool`` (pool_3, 2048), ``spatial`` (``Mixed_6d.branch1x1`` = TF ``mixed_6/conv``, first 7 channels,
    NHWC-flattened, 2023) and ``logits`` (1008, without the bias, as ADM's IS)."""

    def __init__(self, weights: str | os.PathLike | None = None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = inception_weights_file(weights or None)  # vetted: torch-fidelity loads it without weights_only
        self.inception = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                     feature_extractor_weights_path=str(path))
        self._spatial: list[Tensor] = []
        self.inception.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, out: self._spatial.append(out))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        self._spatial.clear()
        pool, logits = self.inception(images)
        spatial = rearrange(self._spatial.pop()[:, :SPATIAL_CHANNELS].float(), "n c h w -> n (h w c)")
        return {"pool": pool, "spatial": spatial, "logits": logits}


class FeatureReadout(nn.Module):
    """Any network as ``{"pool", "logits"}``: a ``metrics.classifier.FeatureNetwork`` gives its features and
    logits; a plain module's (N, D) output serves as both (read as class logits for IS). No spatial features."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        if hasattr(self.network, "features") and hasattr(self.network, "logits"):
            return {"pool": self.network.features(images), "logits": self.network.logits(images)}
        out = self.network(images)
        return {"pool": out, "logits": out}


@torch.no_grad()
def extract_features(network: nn.Module, images_uint8_nhwc, device="cpu", batch_size: int = _BATCH) -> dict:
    """``network``'s outputs (dict of (N, D) float tensors on the CPU) for uint8 NHWC images, in batches."""
    parts: dict[str, list[Tensor]] = {}
    for i in range(0, len(images_uint8_nhwc), batch_size):
        batch = rearrange(torch.as_tensor(np.asarray(images_uint8_nhwc[i:i + batch_size])), "n h w c -> n c h w")
        for key, value in network(batch.to(device)).items():
            parts.setdefault(key, []).append(value.float().cpu())
    return {key: torch.cat(value) for key, value in parts.items()}


@dataclass
class AdmReference:
    """An ADM reference batch: its path, ``arr_0``'s shape (images load on demand) and stored statistics."""

    path: Path
    image_shape: tuple[int, ...] | None  # (N, H, W, C) of arr_0
    pool: FrechetStatistics | None
    spatial: FrechetStatistics | None

    def images(self) -> np.ndarray:
        if self.image_shape is None:
            raise ConfigError(f"reference {self.path} has no images ('arr_0'); precision/recall and feature "
                              "networks other than Inception need them")
        with NpzArchive(self.path, "reference") as npz:
            return npz.array("arr_0")


def load_adm_reference(path) -> AdmReference:
    """Read an ADM reference batch (``arr_0``, ``mu``/``sigma``, ``mu_s``/``sigma_s``); one ConfigError line
    for a missing or unreadable file, non-uint8 images or statistics of inconsistent shapes."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"reference {path} {does_not_exist(path)}; ADM's reference batches: "
                          "VIRTUAL_imagenet256_labeled.npz from openai/guided-diffusion's evaluations README")
    with NpzArchive(path, "reference") as npz:  # every array's header checked before it is read
        image_shape = None
        if "arr_0" in npz.keys:
            image_shape, dtype = npz.header("arr_0")
            if len(image_shape) != 4 or dtype != np.uint8:
                raise ConfigError(f"reference {path}: arr_0 must be uint8 (N, H, W, C) images, got {dtype} "
                                  f"{image_shape}")
        stats = {}
        for name, mu, sigma in (("pool", "mu", "sigma"), ("spatial", "mu_s", "sigma_s")):
            if {mu, sigma} <= set(npz.keys):
                (mu_shape, mu_dtype), (sigma_shape, sigma_dtype) = npz.header(mu), npz.header(sigma)
                if (len(mu_shape) != 1 or sigma_shape != mu_shape * 2 or mu_dtype.kind not in "fiu"
                        or sigma_dtype.kind not in "fiu"):
                    raise ConfigError(f"reference {path}: {name} statistics have mean {mu_dtype} {mu_shape} and "
                                      f"covariance {sigma_dtype} {sigma_shape}; expected real (D,) and (D, D)")
                stats[name] = FrechetStatistics(npz.array(mu).astype(np.float64), npz.array(sigma).astype(np.float64))
        if image_shape is None and not stats:
            raise ConfigError(f"reference {path} holds {sorted(npz.keys)}: neither images 'arr_0' nor statistics "
                              "'mu'/'sigma'")
    return AdmReference(path, image_shape, stats.get("pool"), stats.get("spatial"))


class AdmEvaluator:
    """ADM's metrics of sample batches against one reference batch (the ``metrics.evaluate`` evaluator protocol:
    ``names``, ``image_shape``, ``set_real``, ``__call__(samples, labels)``).

    ``use_stored_statistics`` (default: only with ``InceptionFeatures``, as ADM does) takes FID / sFID's reference
    statistics from the batch; otherwise they are computed from the reference images (``arr_0``, or those given
    to ``set_real``) with ``network``, whose features the stored Inception statistics do not describe.
    """

    def __init__(self, reference: AdmReference, network: nn.Module, metrics=ADM_METRICS, device="cpu",
                 batch_size: int = _BATCH, is_splits: int = 10, use_stored_statistics: bool | None = None):
        self.names = check_names(metrics, ADM_METRICS, "metrics")
        self.reference, self.network = reference, network.to(device).eval()
        self.device, self.batch_size, self.is_splits = torch.device(device), batch_size, is_splits
        inception = isinstance(network, InceptionFeatures)
        self.stored = inception if use_stored_statistics is None else use_stored_statistics
        shape = reference.image_shape
        self.image_shape = None if shape is None else (shape[3], shape[1], shape[2])
        self._real: dict[str, Tensor] | None = None
        if self.stored:
            for metric, stats, keys in (("fid", reference.pool, "mu/sigma"), ("sfid", reference.spatial, "mu_s/sigma_s")):
                if metric in self.names and stats is None:
                    raise ConfigError(f"reference {reference.path} has no statistics {keys} for {metric} "
                                      "(ADM reference batches carry them); use an ADM reference batch")
        if "sfid" in self.names and not inception:
            raise ConfigError("sfid needs Inception's spatial features; drop it for another feature network")

    def set_real(self, real_uint8_nhwc) -> None:
        """Use these reference images (instead of the batch's ``arr_0``) for features computed from images."""
        self.image_shape = (real_uint8_nhwc.shape[3], *real_uint8_nhwc.shape[1:3])
        self._real = extract_features(self.network, real_uint8_nhwc, self.device, self.batch_size)

    def _real_features(self) -> dict[str, Tensor]:
        if self._real is None:
            self._real = extract_features(self.network, self.reference.images(), self.device, self.batch_size)
        return self._real

    def _reference_statistics(self, key: str) -> FrechetStatistics:
        if self.stored:
            return self.reference.pool if key == "pool" else self.reference.spatial
        return FrechetStatistics.of(self._real_features()[key].numpy())

    def __call__(self, samples_uint8_nhwc, labels=None) -> dict[str, float]:
        samples = np.asarray(samples_uint8_nhwc)
        if samples.dtype != np.uint8 or samples.ndim != 4 or len(samples) < 2:
            raise ConfigError(f"samples must be a uint8 (N, H, W, C) batch with N >= 2, got {samples.dtype} "
                              f"{samples.shape}")
        shape = (samples.shape[3], *samples.shape[1:3])
        if self.image_shape is not None and shape != self.image_shape:
            raise ConfigError(f"samples are (C, H, W) = {shape} but the reference images are {self.image_shape}; "
                              "sample at the reference's resolution")
        fake = extract_features(self.network, samples, self.device, self.batch_size)
        out = {}
        if "fid" in self.names:
            out["fid"] = FrechetStatistics.of(fake["pool"].numpy()).frechet_distance(self._reference_statistics("pool"))
        if "sfid" in self.names:
            out["sfid"] = FrechetStatistics.of(fake["spatial"].numpy()).frechet_distance(
                self._reference_statistics("spatial"))
        if "is" in self.names:
            out["is"], out["is_std"] = inception_score(fake["logits"], self.is_splits)
        if {"precision", "recall"} & set(self.names):
            out["precision"], out["recall"] = precision_recall(self._real_features()["pool"], fake["pool"])
        return out


def build_adm_evaluator(reference, metrics=None, feature_network=None, inception_weights=None,
                        device="cpu") -> AdmEvaluator:
    """An ``AdmEvaluator`` for the reference batch at ``reference``; ``feature_network``: ``None`` /
    ``"inception"`` (``InceptionFeatures`` from ``inception_weights`` or the torch hub cache), a classifier
    checkpoint path (``metrics.classifier.load_feature_network``) or an ``nn.Module``. ``metrics``: default
    all of ``ADM_METRICS`` (without ``sfid`` for a network other than Inception)."""
    from lightning_reg.metrics.classifier import FeatureNetwork, load_feature_network

    if reference is None:
        raise ConfigError("an ADM evaluation needs --reference: an ADM reference batch such as "
                          "VIRTUAL_imagenet256_labeled.npz")
    ref = load_adm_reference(reference)
    inception = feature_network in (None, "inception")
    if metrics is None:
        metrics = ADM_METRICS if inception else tuple(m for m in ADM_METRICS if m != "sfid")
    if inception:
        return AdmEvaluator(ref, InceptionFeatures(inception_weights), metrics, device)
    if isinstance(feature_network, (str, os.PathLike)):
        feature_network = load_feature_network(feature_network)
    if isinstance(feature_network, FeatureNetwork) and ref.image_shape is not None:
        feature_network.check_compatible((ref.image_shape[3], *ref.image_shape[1:3]))
    return AdmEvaluator(ref, FeatureReadout(feature_network), metrics, device)
