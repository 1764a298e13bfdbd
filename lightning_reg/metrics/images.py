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

from lightning_reg.errors import ConfigError

IMAGE_METRICS = ("fid", "is", "kid")
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's pt_inception-2015-12-05
_BATCH = 100


def _images(images, name: str) -> Tensor:
    """uint8 NHWC (array or tensor) -> uint8 NCHW tensor."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or len(images) < 2:
        raise ConfigError(f"{name} must be a uint8 (N, H, W, C) batch with N >= 2, "
                          f"got dtype {images.dtype} and shape {tuple(images.shape)}")
    return rearrange(images, "n h w c -> n c h w")


def _build(name: str, feature_extractor: nn.Module | None, image_shape: tuple[int, ...], num_samples: int) -> Metric:
    """The torchmetrics metric ``name``, on ``feature_extractor`` if given, else on Inception-v3."""
    custom = {} if feature_extractor is None else {"feature": feature_extractor}
    try:
        with warnings.catch_warnings():  # IS and KID warn that they buffer all features: intended here
            warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
            if name == "fid":
                return FrechetInceptionDistance(**custom, **({"input_img_size": image_shape} if custom else {}))
            if name == "is":
                return InceptionScore(**custom)
            return KernelInceptionDistance(**custom, subset_size=min(1000, num_samples))
    except OSError as err:  # urllib's URLError included: the weights are not cached and cannot be fetched
        path = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS)
        raise ConfigError(f"the FID Inception weights (torch-fidelity's pt_inception-2015-12-05) must be in the "
                          f"torch hub cache: copy them to {path} (or pass feature_extractor=...); "
                          f"fetching them failed: {err}") from err


@torch.no_grad()
def image_metrics(fake_uint8_nhwc, real_uint8_nhwc, metrics=("fid", "is"),
                  feature_extractor: nn.Module | None = None, device="cpu") -> dict[str, float]:
    """FID / IS / KID of ``fake`` images against ``real`` ones (IS uses the fake images only).

    Deterministic: the random IS splits and KID subsets are drawn from a fixed seed.
    """
    unknown = set(metrics) - set(IMAGE_METRICS)
    if unknown:
        raise ConfigError(f"metrics: unknown {sorted(unknown)}; choose from {list(IMAGE_METRICS)}")
    fake, real = _images(fake_uint8_nhwc, "fake images"), _images(real_uint8_nhwc, "real images")
    if fake.shape[1:] != real.shape[1:]:
        raise ConfigError(f"fake and real images must share (C, H, W): got {tuple(fake.shape[1:])} "
                          f"and {tuple(real.shape[1:])}")
    out = {}
    for name in metrics:
        metric = _build(name, feature_extractor, tuple(real.shape[1:]), min(len(fake), len(real))).to(device)
        sets = [(fake, {})] if name == "is" else [(fake, {"real": False}), (real, {"real": True})]
        batches = [(batch, flag) for images, flag in sets for batch in images.split(_BATCH)]
        for batch, flag in tqdm(batches, desc=name, leave=False):
            metric.update(batch.to(device), **flag)
        with torch.random.fork_rng(devices=[]):  # IS splits and KID subsets are drawn with the global RNG
            torch.manual_seed(0)
            value = metric.compute()
        if isinstance(value, tuple):  # IS and KID: (mean, std)
            out[name], out[f"{name}_std"] = value[0].item(), value[1].item()
        else:
            out[name] = value.item()
    return out
