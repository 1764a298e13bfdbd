"""Image metrics through torchmetrics: FID, Inception Score and KID (REG_NOTES §4: FID vs IS fronts).

By default the features are torch-fidelity's Inception-v3 (``pt_inception-2015-12-05``), whose
weights must already sit in the torch hub cache (nothing is downloaded at run time here). Any
``nn.Module`` mapping uint8 NCHW images to (N, D) features can stand in for it (``feature_extractor``);
for IS its outputs are read as class logits.

Returned keys: ``fid``; ``is`` and ``is_std`` (over 10 splits); ``kid`` and ``kid_std`` (over subsets).
"""

from __future__ import annotations

import os
import warnings

import torch
from einops import rearrange
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm

from lightning_reg.errors import ConfigError, check_names

IMAGE_METRICS = ("fid", "is", "kid")
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's pt_inception-2015-12-05
KID_SUBSET_SIZE = 1000  # torchmetrics' default; lowered to the number of images when there are fewer
_BATCH = 100


def _images(images, name: str) -> Tensor:
    """uint8 NHWC (array or tensor) -> uint8 NCHW tensor."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or len(images) < 2:
        raise ConfigError(f"{name} must be a uint8 (N, H, W, C) batch with N >= 2, "
                          f"got dtype {images.dtype} and shape {tuple(images.shape)}")
    return rearrange(images, "n h w c -> n c h w")


def _build(name: str, feature_extractor: nn.Module | None, image_shape: tuple[int, ...]) -> Metric:
    """The torchmetrics metric ``name``, on ``feature_extractor`` if given, else on Inception-v3.

    Real features survive ``reset()`` (they are computed once), and ``compute()`` never synchronises
    across processes: one process evaluates what it is given.
    """
    custom = {} if feature_extractor is None else {"feature": feature_extractor}
    common = {"sync_on_compute": False}
    try:
        with warnings.catch_warnings():  # IS and KID warn that they buffer all features: intended here
            warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
            if name == "fid":
                return FrechetInceptionDistance(**custom, **({"input_img_size": image_shape} if custom else {}),
                                                reset_real_features=False, **common)
            if name == "is":
                return InceptionScore(**custom, **common)
            return KernelInceptionDistance(**custom, subset_size=KID_SUBSET_SIZE, reset_real_features=False, **common)
    except OSError as err:  # urllib's URLError included: the weights are not cached and cannot be fetched
        path = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS)
        raise ConfigError(f"the FID Inception weights (torch-fidelity's pt_inception-2015-12-05) must be in the "
                          f"torch hub cache: copy them to {path} (or pass feature_extractor=...); "
                          f"fetching them failed: {err}") from err


class ImageMetrics:
    """FID / IS / KID of generated images against one fixed set of real images (IS uses the generated ones).

    The metrics (and the Inception weights) are built at construction, so a missing file fails before any
    work; the real images' features are extracted once (``set_real``) and reused by every call.
    Deterministic: the random IS splits and KID subsets are drawn from a fixed seed.
    """

    def __init__(self, metrics=("fid", "is"), image_shape: tuple[int, int, int] = (3, 32, 32),
                 feature_extractor: nn.Module | None = None, device="cpu"):
        self.names = check_names(metrics, IMAGE_METRICS, "metrics")
        self.image_shape, self.device = tuple(image_shape), torch.device(device)
        self.metrics = {name: _build(name, feature_extractor, self.image_shape).to(self.device)
                        for name in self.names}
        self.num_real = None

    def to(self, device) -> "ImageMetrics":
        self.device = torch.device(device)
        self.metrics = {name: metric.to(self.device) for name, metric in self.metrics.items()}
        return self

    def _update(self, metric: Metric, images: Tensor, desc: str, **flag) -> None:
        for batch in tqdm(images.split(_BATCH), desc=desc, leave=False):
            metric.update(batch.to(self.device), **flag)

    def _check_shape(self, images: Tensor, name: str) -> None:
        if tuple(images.shape[1:]) != self.image_shape:
            raise ConfigError(f"{name} must share (C, H, W) = {self.image_shape}, got {tuple(images.shape[1:])}")

    @torch.no_grad()
    def set_real(self, real_uint8_nhwc) -> None:
        """Extract the reference features of the real images (FID and KID)."""
        real = _images(real_uint8_nhwc, "real images")
        self._check_shape(real, "real images")
        for name, metric in self.metrics.items():
            if name != "is":
                metric.reset_real_features = True  # drop an earlier reference
                metric.reset()
                metric.reset_real_features = False
                self._update(metric, real, f"{name} real", real=True)
        self.num_real = len(real)

    @torch.no_grad()
    def __call__(self, fake_uint8_nhwc) -> dict[str, float]:
        """The metrics of ``fake`` against the real images of ``set_real``."""
        fake = _images(fake_uint8_nhwc, "fake images")
        self._check_shape(fake, "fake images")
        if self.num_real is None and set(self.names) - {"is"}:
            raise RuntimeError("ImageMetrics: call set_real(real_images) before computing FID or KID")
        out = {}
        for name, metric in self.metrics.items():
            self._update(metric, fake, name, **({} if name == "is" else {"real": False}))
            if name == "kid":  # a subset cannot be larger than either set
                metric.subset_size = min(KID_SUBSET_SIZE, len(fake), self.num_real)
            with torch.random.fork_rng(devices=[]):  # IS splits and KID subsets are drawn with the global RNG
                torch.manual_seed(0)
                value = metric.compute()
            metric.reset()  # keeps the real features
            if isinstance(value, tuple):  # IS and KID: (mean, std)
                out[name], out[f"{name}_std"] = value[0].item(), value[1].item()
            else:
                out[name] = value.item()
        return out


def image_metrics(fake_uint8_nhwc, real_uint8_nhwc, metrics=("fid", "is"),
                  feature_extractor: nn.Module | None = None, device="cpu") -> dict[str, float]:
    """FID / IS / KID of ``fake`` images against ``real`` ones, in one call (see ``ImageMetrics``)."""
    real = _images(real_uint8_nhwc, "real images")
    evaluate = ImageMetrics(metrics, tuple(real.shape[1:]), feature_extractor, device)
    evaluate.set_real(real_uint8_nhwc)
    return evaluate(fake_uint8_nhwc)
