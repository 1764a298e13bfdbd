"""A small digits classifier, trained by this project, as the offline feature network of the image metrics.

Its penultimate features stand in for Inception's pool features in FID and KID, its logits for Inception's
in IS, and its predictions give the class accuracy of samples (the share assigned to the label they were
sampled for). Train it with::

    python train_classifier.py fit --config configs/mnist_classifier.yaml

The checkpoint records the architecture (``feature_network``: image size, channels, classes, widths), so
``load_feature_network(path)`` rebuilds it without the training code's hyper-parameters.
"""

from __future__ import annotations


import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_reg.errors import ConfigError
from lightning_reg.io.files import build_within, load_weights, read_torch, refuse, require_keys, unwrap_state_dict
from lightning_reg.io.plain import check_arguments

ARCH_KEY = "feature_network"  # the checkpoint entry that records the architecture


class DigitClassifier(nn.Module):
    """Conv blocks (3x3 conv, GroupNorm, SiLU, 2x2 max-pool per width) -> ``num_features`` -> class logits.

    ``forward(x)`` takes images in [-1, 1], (N, C, H, W), and returns ``(features, logits)``.
    """

    def __init__(self, num_classes: int = 10, image_size: int = 16, channels: int = 1,
                 widths: tuple[int, ...] = (16, 32), num_features: int = 128, dropout: float = 0.2):
        super().__init__()
        if image_size % 2 ** len(widths):
            raise ConfigError(f"image_size={image_size} must be divisible by 2^len(widths) = {2 ** len(widths)}")
        self.num_classes, self.image_size, self.channels = num_classes, image_size, channels
        self.widths, self.num_features = tuple(widths), num_features
        blocks, c_in = [], channels
        for width in widths:
            blocks += [nn.Conv2d(c_in, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(), nn.MaxPool2d(2)]
            c_in = width
        side = image_size // 2 ** len(widths)
        self.body = nn.Sequential(*blocks, nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(c_in * side * side, num_features), nn.SiLU())
        self.head = nn.Linear(num_features, num_classes)

    @property
    def data_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    @property
    def arch(self) -> dict:
        return {"num_classes": self.num_classes, "image_size": self.image_size, "channels": self.channels,
                "widths": list(self.widths), "num_features": self.num_features}

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(x)
        return features, self.head(features)


class _Readout(nn.Module):
    """uint8 NCHW images -> one output (0: features, 1: logits) of a frozen classifier: a torchmetrics ``feature=``."""

    def __init__(self, classifier: DigitClassifier, output: int):
        super().__init__()
        self.classifier, self.output = classifier, output

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(from_uint8(images))[self.output]


def from_uint8(images: Tensor) -> Tensor:
    """uint8 images in [0, 255] -> [-1, 1], as the classifier was trained."""
    return images.float() / 127.5 - 1.0


class FeatureNetwork(nn.Module):
    """A frozen ``DigitClassifier`` in eval mode on uint8 NCHW images: ``features`` (FID, KID) and ``logits``
    (IS, accuracy) readouts, and the image shape / class count it was trained for."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        classifier = classifier.eval().requires_grad_(False)
        self.features, self.logits = _Readout(classifier, 0), _Readout(classifier, 1)
        self.image_shape = classifier.data_shape
        self.num_classes, self.num_features = classifier.num_classes, classifier.num_features
        self.eval()

    def readouts(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(features, logits)`` of uint8 NCHW ``images`` in one forward."""
        return self.features.classifier(from_uint8(images))

    def train(self, mode: bool = True) -> "FeatureNetwork":
        return super().train(False)  # never leaves eval mode (dropout off)

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images)

    def check_compatible(self, image_shape: tuple[int, ...], num_classes: int | None = None) -> None:
        """ConfigError unless the network was trained on (C, H, W) = ``image_shape`` and ``num_classes`` classes."""
        if tuple(image_shape) != self.image_shape:
            raise ConfigError(f"the feature network was trained on (C, H, W) = {self.image_shape} images, "
                              f"not {tuple(image_shape)}; train a classifier for this image size")
        if num_classes is not None and num_classes != self.num_classes:
            raise ConfigError(f"the feature network has {self.num_classes} classes but the samples have "
                              f"{num_classes}; train a classifier on the same classes")


def load_feature_network(path, field: str = "feature network") -> FeatureNetwork:
    """The frozen classifier of a checkpoint written by ``ClassifierTraining``, read by ``io.read_torch``."""
    what = "digits-classifier checkpoint of ClassifierTraining"
    checkpoint = read_torch(path, field, what, hint="train one with `python train_classifier.py fit --config "
                                                     "configs/mnist_classifier.yaml`")
    require_keys(checkpoint, [ARCH_KEY, "state_dict"], path, field, what)
    weights = unwrap_state_dict(checkpoint["state_dict"], path, field, under=(), prefix="net.")
    try:  # the architecture is data: typed arguments, sizes bounded by the weights the file holds
        arch = check_arguments(DigitClassifier, checkpoint[ARCH_KEY], ARCH_KEY,
                               int_limit=max(sum(w.numel() for w in weights.values()), 1))
        classifier = build_within(lambda: DigitClassifier(**arch), weights, "DigitClassifier")
    except ConfigError as err:
        raise refuse(path, field, what, str(err)) from None
    return FeatureNetwork(load_weights(classifier, weights, path, field, what))


class ClassifierTraining(L.LightningModule):
    """Cross-entropy training of a ``DigitClassifier`` (AdamW with a one-cycle learning rate, random shifts of up to
    ``max_shift`` pixels); logs ``train/loss``, ``val/loss`` and ``val/accuracy`` (the held-out accuracy)."""

    def __init__(self, num_classes: int = 10, image_size: int = 16, channels: int = 1,
                 widths: tuple[int, ...] = (16, 32), num_features: int = 128, dropout: float = 0.2,
                 lr: float = 3e-3, weight_decay: float = 1e-4, max_shift: int = 1):
        super().__init__()
        self.save_hyperparameters()
        self.net = DigitClassifier(num_classes, image_size, channels, tuple(widths), num_features, dropout)
        self.lr, self.weight_decay, self.max_shift = lr, weight_decay, max_shift

    def shift(self, x: Tensor) -> Tensor:
        """Translate each image by a random integer offset in [-max_shift, max_shift]^2 (background -1 fills in)."""
        s = self.max_shift
        if s == 0:
            return x
        padded = F.pad(x, (s, s, s, s), value=-1.0)
        dx, dy = torch.randint(0, 2 * s + 1, (2,)).tolist()
        return padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]

    def training_step(self, batch, batch_idx) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(self.shift(x))[1], y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx) -> None:
        x, y = batch
        logits = self.net(x)[1]
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/accuracy", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        steps = self.trainer.estimated_stepping_batches
        return {"optimizer": optimizer, "lr_scheduler": {
            "scheduler": torch.optim.lr_scheduler.OneCycleLR(optimizer, self.lr, total_steps=steps), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[ARCH_KEY] = self.net.arch
