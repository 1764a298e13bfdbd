"""Image metrics through torchmetrics: FID, Inception Score, KID and class accuracy (docs/theory.md §4: FID vs IS fronts).

By default the features are torch-fidelity's Inception-v3 (``pt_inception-2015-12-05``), whose
weights must already sit in the torch hub cache or at ``inception_weights`` (``inception_weights_file``:
vetted, never downloaded). A ``FeatureNetwork`` (the project's digits classifier, ``metrics.classifier``) stands in
for it offline: its penultimate features for FID and KID, its logits for IS and for ``accuracy`` (the
share of samples it assigns to the label they were sampled for). Any other ``nn.Module`` mapping uint8
NCHW images to (N, D) features can stand in too (IS reads its outputs as logits; no accuracy).
Every metric reads one pass of the network over each image set (``ImageMetrics.features``); the
reference's features can be cached on disk (``reference_cache``, docs/image_metrics.md).

Returned keys: ``fid``; ``is`` and ``is_std`` (over 10 splits); ``kid`` and ``kid_std`` (over subsets;
``KID_NOTE``); ``accuracy``.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from einops import rearrange
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.classification import MulticlassAccuracy
from tqdm.auto import tqdm

from lightning_reg.errors import ConfigError, check_names, one_line
from lightning_reg.io.files import atomic_write, check_torch_weights, read_torch
from lightning_reg.metrics.classifier import FeatureNetwork

IMAGE_METRICS = ("fid", "is", "kid", "accuracy")
DEFAULT_IMAGE_METRICS = ("fid", "is")  # what every caller computes when not told (accuracy added with a classifier)
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's pt_inception-2015-12-05
INCEPTION_WHAT = "torch weights file of Inception-v3"
KID_SUBSET_SIZE = 1000  # torchmetrics' default; lowered to the number of images when there are fewer
KID_NOTE = ("kid is the unbiased estimate of the squared MMD between the two feature sets (cubic polynomial kernel, "
            "mean over subsets; kid_std their spread), reported x1, not x1000: unbiased, so it is near 0 and can be "
            "negative when the sets are close")
_BATCH = 100


def _short(ids: list[int]) -> str:
    """Class ids for a message: the list, or past 12 of them their count and range."""
    return str(ids) if len(ids) <= 12 else f"{len(ids)} classes ({ids[0]}..{ids[-1]})"


def _images(images, name: str) -> Tensor:
    """uint8 NHWC (array or tensor) -> uint8 NCHW tensor."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or len(images) < 2:
        raise ConfigError(f"{name} must be a uint8 (N, H, W, C) batch with N >= 2, "
                          f"got dtype {images.dtype} and shape {tuple(images.shape)}")
    return rearrange(images, "n h w c -> n c h w")


def inception_weights_file(inception_weights: str | os.PathLike | None = None,
                           field: str = "inception_weights") -> Path:
    """The Inception-v3 weights file: ``inception_weights``, else the torch hub cache's copy, vetted with
    ``check_torch_weights`` (torch-fidelity loads it without ``weights_only``); never downloaded: a missing
    file is one ConfigError naming where it goes and ``field`` (``--inception_weights`` for a flag, else a key)."""
    if inception_weights is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
        if not cached.is_file():
            as_flag = field.startswith("--")  # evaluate.py's flag, or a key (--evaluation, the callback)
            weights = f"{field} FILE" if as_flag else f"{field}: FILE"
            network = "--feature_network FILE" if as_flag else "feature_network: FILE"
            raise ConfigError(f"the Inception weights of FID/IS (torch-fidelity's pt_inception-2015-12-05) are not at "
                              f"{cached}, and nothing is downloaded at run time: copy {INCEPTION_WEIGHTS} to that "
                              f"path, or give its path as {weights}, or use the digits classifier as {network}")
        inception_weights = cached
    return check_torch_weights(inception_weights, field, INCEPTION_WHAT,
                               f"it must be torch-fidelity's {INCEPTION_WEIGHTS} (pt_inception-2015-12-05)")


class Inception(nn.Module):
    """torch-fidelity's Inception-v3 (``pt_inception-2015-12-05``, from ``inception_weights_file``): uint8 NCHW
    images -> ``(pool features (N, 2048), IS logits (N, 1008))`` in one forward."""

    def __init__(self, inception_weights: str | None = None):
        from torchmetrics.image.fid import NoTrainInceptionV3

        super().__init__()
        path = inception_weights_file(inception_weights)
        try:
            self.net = NoTrainInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=str(path))
        except Exception as err:  # noqa: BLE001 - load_state_dict on another object, other keys or shapes
            raise ConfigError(f"inception_weights {path} is not a {INCEPTION_WHAT} (its weights do not fit: "
                              f"{type(err).__name__}: {one_line(err, 200)})") from None

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features, logits = self.net._torch_fidelity_forward(images)
        return features.reshape(len(images), -1), logits


class Precomputed(nn.Module):
    """The identity on features already extracted: the torchmetrics metrics' ``feature=`` (``num_features`` wide)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def readouts(network: nn.Module) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """uint8 NCHW images -> ``(features, logits)`` in one forward of ``network``: a ``FeatureNetwork`` gives its
    penultimate features and logits, ``Inception`` its pool features and IS logits, any other module one
    output used as both."""
    if isinstance(network, (FeatureNetwork, Inception)):
        return network.readouts if isinstance(network, FeatureNetwork) else network
    return lambda images: (network(images),) * 2


def _build(name: str, num_features: int, num_classes: int | None) -> Metric:
    """The torchmetrics metric ``name`` over precomputed features (FID, KID), logits (IS) or logits and labels
    (accuracy). Real features survive ``reset()`` (they are computed once), and ``compute()`` never
    synchronises across processes: one process evaluates what it is given."""
    common = {"sync_on_compute": False}
    if name == "accuracy":
        return MulticlassAccuracy(num_classes, average="micro", **common)
    with warnings.catch_warnings():  # IS and KID warn that they buffer all features: intended here
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        if name == "fid":
            return FrechetInceptionDistance(Precomputed(num_features), reset_real_features=False, **common)
        if name == "is":
            return InceptionScore(Precomputed(num_features), **common)
        return KernelInceptionDistance(Precomputed(num_features), subset_size=KID_SUBSET_SIZE,
                                       reset_real_features=False, **common)


def network_fingerprint(network: nn.Module) -> str:
    """sha256 of a network's class and its parameters and buffers (names, shapes, bytes): the reference cache key."""
    digest = hashlib.sha256(type(network).__qualname__.encode())
    for key, value in network.state_dict().items():
        digest.update(f"{key}{tuple(value.shape)}{value.dtype}".encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ImageMetrics:
    """FID / IS / KID / accuracy of generated images against one fixed set of real images (IS and accuracy
    use the generated ones only; accuracy also their labels).

    One pass of the feature network per image set: each batch goes through it once, and FID, KID (features),
    IS and accuracy (logits) all read that pass. The network (and the Inception weights) are loaded at
    construction, so a missing file fails before any work; the real images' features are extracted once
    (``set_real``, from ``reference_cache`` when the same images were seen by the same network before) and
    reused by every call. Deterministic: the random IS splits and KID subsets are drawn from a fixed seed.
    Grayscale images are repeated to 3 channels for Inception.
    """

    def __init__(self, metrics=DEFAULT_IMAGE_METRICS, image_shape: tuple[int, int, int] = (3, 32, 32),
                 feature_extractor: nn.Module | None = None, device="cpu", inception_weights: str | None = None,
                 reference_cache: str | os.PathLike | None = None):
        self.names = check_names(metrics, IMAGE_METRICS, "metrics")
        self.image_shape = tuple(image_shape)
        if isinstance(feature_extractor, FeatureNetwork):
            feature_extractor.check_compatible(self.image_shape)
        elif "accuracy" in self.names:
            raise ConfigError("metric accuracy needs a classifier as the feature network (a checkpoint of "
                              "`python train_classifier.py fit`), not Inception or a plain module")
        self.network = Inception(inception_weights) if feature_extractor is None else feature_extractor
        self.readouts = readouts(self.network)
        self.reference_cache = None if reference_cache is None else Path(reference_cache)
        self.to(device)
        self.num_features = self._num_features()
        num_classes = getattr(feature_extractor, "num_classes", None)
        self.metrics = {name: _build(name, self.num_features, num_classes).to(self.device) for name in self.names}
        self.num_real = None
        self.real_classes = None  # the reference's classes, when set_real was told them

    def _num_features(self) -> int:
        """The width of the features: the network's ``num_features`` (2048 for Inception), else read off one image."""
        if isinstance(self.network, Inception):
            return 2048
        if isinstance(self.network, FeatureNetwork):
            return self.network.num_features
        if hasattr(self.network, "num_features"):
            return int(self.network.num_features)
        with torch.no_grad():
            return self.readouts(torch.zeros(1, *self.image_shape, dtype=torch.uint8, device=self.device))[0].shape[-1]

    def to(self, device) -> "ImageMetrics":
        self.device = torch.device(device)
        self.network.to(self.device)
        if hasattr(self, "metrics"):
            self.metrics = {name: metric.to(self.device) for name, metric in self.metrics.items()}
        return self

    def features(self, images: Tensor, desc: str) -> tuple[Tensor, Tensor]:
        """``(features, logits)`` of uint8 NCHW ``images``: one forward of the network per batch of 100."""
        gray_inception = isinstance(self.network, Inception) and images.shape[1] == 1
        parts = []
        for batch in tqdm(images.split(_BATCH), desc=desc, leave=False, disable=None):  # None: not in a log file
            batch = batch.to(self.device)
            parts.append(self.readouts(batch.expand(-1, 3, -1, -1) if gray_inception else batch))
        return tuple(torch.cat(p) for p in zip(*parts))

    def _check_shape(self, images: Tensor, name: str) -> None:
        if tuple(images.shape[1:]) != self.image_shape:
            raise ConfigError(f"{name} must share (C, H, W) = {self.image_shape}, got {tuple(images.shape[1:])}")

    def _labels(self, labels, n: int) -> Tensor:
        """``labels`` as a long tensor of ``n`` classes of the feature network (accuracy)."""
        if labels is None:
            raise ConfigError("metric accuracy needs the labels the samples were drawn for")
        labels = torch.as_tensor(labels).long()
        num_classes = self.network.num_classes
        if labels.shape != (n,) or (n and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes):
            raise ConfigError(f"accuracy needs one label in [0, {num_classes}) per sample (the feature network's "
                              f"classes), got shape {tuple(labels.shape)} for {n} samples"
                              + (f" and values {int(labels.min())}..{int(labels.max())}" if labels.numel() else ""))
        return labels

    def real_features(self, real: Tensor) -> Tensor:
        """The features of the real images, read from / written to ``reference_cache`` under the sha256 of the
        network and the images (``<hash>.pt``), so one reference costs one pass per network, ever."""
        if self.reference_cache is None:
            return self.features(real, "reference")[0]
        digest = hashlib.sha256(network_fingerprint(self.network).encode())
        digest.update(f"{tuple(real.shape)}".encode())
        digest.update(real.contiguous().numpy().tobytes())
        path = self.reference_cache / f"{digest.hexdigest()}.pt"
        if path.is_file():
            features = read_torch(path, "reference_cache", "cached reference features file")
            shape = (len(real), self.num_features)
            if not (isinstance(features, Tensor) and features.is_floating_point() and features.shape == shape):
                held = f"{features.dtype} {tuple(features.shape)}" if isinstance(features, Tensor) else \
                    type(features).__name__
                raise ConfigError(f"reference_cache {path} holds {held}, not the {shape} float features of the "
                                  "reference images: delete it to recompute them")
            return features
        features = self.features(real, "reference")[0]
        atomic_write(path, lambda f: torch.save(features.cpu(), f))  # creates the folder
        return features

    @torch.no_grad()
    def set_real(self, real_uint8_nhwc, classes=None) -> None:
        """Extract the reference features of the real images (FID and KID); ``classes``: their class ids, if
        known (FID and KID then warn when the samples were drawn for other classes, ``check_classes``)."""
        self.real_classes = None if classes is None else sorted(set(torch.as_tensor(classes).tolist()))
        real = _images(real_uint8_nhwc, "real images")
        self._check_shape(real, "real images")
        distances = [name for name in self.metrics if name in ("fid", "kid")]
        features = self.real_features(real).to(self.device) if distances else None
        for name in distances:
            metric = self.metrics[name]
            metric.reset_real_features = True  # drop an earlier reference
            metric.reset()
            metric.reset_real_features = False
            metric.update(features, real=True)
        self.num_real = len(real)

    def check_classes(self, labels) -> None:
        """Warn when FID or KID compare samples drawn for some classes with a reference holding others."""
        if labels is None or self.real_classes is None or not {"fid", "kid"} & set(self.names):
            return
        sampled = sorted(set(torch.as_tensor(labels).tolist()))
        extra, missing = sorted(set(self.real_classes) - set(sampled)), sorted(set(sampled) - set(self.real_classes))
        if extra or missing:
            held = (f"holds classes {_short(extra)} the samples were not drawn for" if extra else "") + \
                (" and " if extra and missing else "") + (f"lacks the samples' {_short(missing)}" if missing else "")
            warnings.warn(f"FID/KID compare different class mixtures: the reference {held} (samples: classes "
                          f"{_short(sampled)}); give a reference of the sampled classes only (a dataset reference: "
                          f"reference_kwargs {{classes: {_short(sampled)}}}, evaluate.py's --reference_kwargs, "
                          "sample.py's --evaluation), or read FID/KID as the distance to that other mixture",
                          stacklevel=2)

    @torch.no_grad()
    def __call__(self, fake_uint8_nhwc, labels=None) -> dict[str, float]:
        """The metrics of ``fake`` against the real images of ``set_real``; ``labels``: the classes the
        samples were drawn for (needed by ``accuracy`` only)."""
        fake = _images(fake_uint8_nhwc, "fake images")
        self._check_shape(fake, "fake images")
        if self.num_real is None and {"fid", "kid"} & set(self.names):
            raise RuntimeError("ImageMetrics: call set_real(real_images) before computing FID or KID")
        self.check_classes(labels)
        labels = self._labels(labels, len(fake)) if "accuracy" in self.names else None
        features, logits = self.features(fake, "samples")
        inputs = {"fid": (features,), "kid": (features,), "is": (logits,), "accuracy": (logits, labels)}
        out = {}
        for name, metric in self.metrics.items():
            metric.update(*(t.to(self.device) for t in inputs[name]), **({"real": False} if name in ("fid", "kid") else {}))
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


def image_metrics(fake_uint8_nhwc, real_uint8_nhwc, metrics=DEFAULT_IMAGE_METRICS,
                  feature_extractor: nn.Module | None = None, device="cpu", labels=None) -> dict[str, float]:
    """FID / IS / KID / accuracy of ``fake`` images against ``real`` ones, in one call (see ``ImageMetrics``)."""
    real = _images(real_uint8_nhwc, "real images")
    evaluate = ImageMetrics(metrics, tuple(real.shape[1:]), feature_extractor, device)
    evaluate.set_real(real_uint8_nhwc)
    return evaluate(fake_uint8_nhwc, labels)
