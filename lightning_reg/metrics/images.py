"""Image metrics through torchmetrics: FID, Inception Score, KID and class accuracy (docs/theory.md §4: FID vs IS fronts).

By default the features are torch-fidelity's Inception-v3 (``pt_inception-2015-12-05``), whose
weights must already sit in the torch hub cache or at ``inception_weights`` (nothing is downloaded at
run time here). A ``FeatureNetwork`` (the project's digits classifier, ``metrics.classifier``) stands in
for it offline: its penultimate features for FID and KID, its logits for IS and for ``accuracy`` (the
share of samples it assigns to the label they were sampled for). Any other ``nn.Module`` mapping uint8
NCHW images to (N, D) features can stand in too (IS reads its outputs as logits; no accuracy).

Returned keys: ``fid``; ``is`` and ``is_std`` (over 10 splits); ``kid`` and ``kid_std`` (over subsets);
``accuracy``.
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
from torchmetrics.classification import MulticlassAccuracy
from tqdm.auto import tqdm

from lightning_reg.errors import ConfigError, check_names
from lightning_reg.io.files import check_torch_weights
from lightning_reg.metrics.classifier import FeatureNetwork

IMAGE_METRICS = ("fid", "is", "kid", "accuracy")
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's pt_inception-2015-12-05
INCEPTION_WHAT = "torch weights file of Inception-v3"
KID_SUBSET_SIZE = 1000  # torchmetrics' default; lowered to the number of images when there are fewer
_BATCH = 100


def _images(images, name: str) -> Tensor:
    """uint8 NHWC (array or tensor) -> uint8 NCHW tensor."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or len(images) < 2:
        raise ConfigError(f"{name} must be a uint8 (N, H, W, C) batch with N >= 2, "
                          f"got dtype {images.dtype} and shape {tuple(images.shape)}")
    return rearrange(images, "n h w c -> n c h w")


def _inception(inception_weights: str, output: str) -> nn.Module:
    """torch-fidelity's Inception-v3 from the file ``inception_weights``: pool features (``"2048"``) or IS logits."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    check_torch_weights(inception_weights, "inception_weights", INCEPTION_WHAT,
                        f"it must be torch-fidelity's {INCEPTION_WEIGHTS} (pt_inception-2015-12-05)")
    return NoTrainInceptionV3("inception-v3-compat", [output], feature_extractor_weights_path=inception_weights)


def _build(name: str, feature_extractor: nn.Module | None, image_shape: tuple[int, ...],
           inception_weights: str | None = None) -> Metric:
    """The torchmetrics metric ``name`` on ``feature_extractor`` if given, else on Inception-v3.

    A ``FeatureNetwork`` gives its features to FID and KID and its logits to IS and accuracy. Real features
    survive ``reset()`` (they are computed once), and ``compute()`` never synchronises across processes:
    one process evaluates what it is given.
    """
    common = {"sync_on_compute": False}
    if name == "accuracy":
        if not isinstance(feature_extractor, FeatureNetwork):
            raise ConfigError("metric accuracy needs a classifier as the feature network (a checkpoint of "
                              "`python train_classifier.py fit`), not Inception or a plain module")
        return MulticlassAccuracy(feature_extractor.num_classes, average="micro", **common)
    if isinstance(feature_extractor, FeatureNetwork):
        feature_extractor = feature_extractor.logits if name == "is" else feature_extractor.features
    elif feature_extractor is None and inception_weights is not None:
        feature_extractor = _inception(inception_weights, "logits_unbiased" if name == "is" else "2048")
        image_shape = (3, 299, 299)  # Inception resizes its input to 299 x 299
    custom = {} if feature_extractor is None else {"feature": feature_extractor}
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS)
    if not custom and os.path.isfile(cached):  # torch.hub loads the cached file without weights_only
        check_torch_weights(cached, "the torch hub cache's Inception weights", INCEPTION_WHAT)
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
                          f"torch hub cache: copy them to {path} (or pass inception_weights=<file>, or a "
                          f"classifier feature network); fetching them failed: {err}") from err


class ImageMetrics:
    """FID / IS / KID / accuracy of generated images against one fixed set of real images (IS and accuracy
    use the generated ones only; accuracy also their labels).

    The metrics (and the Inception weights) are built at construction, so a missing file fails before any
    work; the real images' features are extracted once (``set_real``) and reused by every call.
    Deterministic: the random IS splits and KID subsets are drawn from a fixed seed. Grayscale images are
    repeated to 3 channels for Inception.
    """

    def __init__(self, metrics=("fid", "is"), image_shape: tuple[int, int, int] = (3, 32, 32),
                 feature_extractor: nn.Module | None = None, device="cpu", inception_weights: str | None = None):
        self.names = check_names(metrics, IMAGE_METRICS, "metrics")
        self.image_shape = tuple(image_shape)
        if isinstance(feature_extractor, FeatureNetwork):
            feature_extractor.check_compatible(self.image_shape)
        self.feature_extractor = feature_extractor
        self.metrics = {name: _build(name, feature_extractor, self.image_shape, inception_weights)
                        for name in self.names}
        self.num_real = None
        self.to(device)

    def to(self, device) -> "ImageMetrics":
        self.device = torch.device(device)
        self.metrics = {name: metric.to(self.device) for name, metric in self.metrics.items()}
        if self.feature_extractor is not None:  # accuracy reads its logits outside any torchmetrics module
            self.feature_extractor.to(self.device)
        return self

    def _update(self, name: str, images: Tensor, desc: str, labels: Tensor | None = None, **flag) -> None:
        metric = self.metrics[name]
        gray_inception = self.feature_extractor is None and images.shape[1] == 1
        batches = images.split(_BATCH)
        label_batches = labels.split(_BATCH) if name == "accuracy" else [None] * len(batches)
        for batch, batch_labels in zip(tqdm(batches, desc=desc, leave=False), label_batches):
            batch = batch.to(self.device)
            if name == "accuracy":
                metric.update(self.feature_extractor.logits(batch), batch_labels.to(self.device))
            else:
                metric.update(batch.expand(-1, 3, -1, -1) if gray_inception else batch, **flag)

    def _check_shape(self, images: Tensor, name: str) -> None:
        if tuple(images.shape[1:]) != self.image_shape:
            raise ConfigError(f"{name} must share (C, H, W) = {self.image_shape}, got {tuple(images.shape[1:])}")

    def _labels(self, labels, n: int) -> Tensor:
        """``labels`` as a long tensor of ``n`` classes of the feature network (accuracy)."""
        if labels is None:
            raise ConfigError("metric accuracy needs the labels the samples were drawn for")
        labels = torch.as_tensor(labels).long()
        num_classes = self.feature_extractor.num_classes
        if labels.shape != (n,) or (n and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes):
            raise ConfigError(f"accuracy needs one label in [0, {num_classes}) per sample (the feature network's "
                              f"classes), got shape {tuple(labels.shape)} for {n} samples"
                              + (f" and values {int(labels.min())}..{int(labels.max())}" if labels.numel() else ""))
        return labels

    @torch.no_grad()
    def set_real(self, real_uint8_nhwc) -> None:
        """Extract the reference features of the real images (FID and KID)."""
        real = _images(real_uint8_nhwc, "real images")
        self._check_shape(real, "real images")
        for name, metric in self.metrics.items():
            if name in ("fid", "kid"):
                metric.reset_real_features = True  # drop an earlier reference
                metric.reset()
                metric.reset_real_features = False
                self._update(name, real, f"{name} real", real=True)
        self.num_real = len(real)

    @torch.no_grad()
    def __call__(self, fake_uint8_nhwc, labels=None) -> dict[str, float]:
        """The metrics of ``fake`` against the real images of ``set_real``; ``labels``: the classes the
        samples were drawn for (needed by ``accuracy`` only)."""
        fake = _images(fake_uint8_nhwc, "fake images")
        self._check_shape(fake, "fake images")
        if self.num_real is None and {"fid", "kid"} & set(self.names):
            raise RuntimeError("ImageMetrics: call set_real(real_images) before computing FID or KID")
        labels = self._labels(labels, len(fake)) if "accuracy" in self.names else None
        out = {}
        for name, metric in self.metrics.items():
            self._update(name, fake, name, labels, **({"real": False} if name in ("fid", "kid") else {}))
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


def image_metrics(fake_uint8_nhwc, real_uint8_nhwc, metrics=("fid", "is"), feature_extractor: nn.Module | None = None,
                  device="cpu", labels=None) -> dict[str, float]:
    """FID / IS / KID / accuracy of ``fake`` images against ``real`` ones, in one call (see ``ImageMetrics``)."""
    real = _images(real_uint8_nhwc, "real images")
    evaluate = ImageMetrics(metrics, tuple(real.shape[1:]), feature_extractor, device)
    evaluate.set_real(real_uint8_nhwc)
    return evaluate(fake_uint8_nhwc, labels)
