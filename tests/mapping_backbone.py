"""A test backbone whose condition is a mapping: a class label and a continuous vector (the shape of SDXL's
prompt embeddings plus size ids, in miniature). Everything it needs lives in this file: its conditioning, the
network, and its registration for checkpoint rebuilding; the package is not changed for it.

The vector of class ``k`` is ``(cos 2 pi k / K, sin 2 pi k / K) * radius``; the null condition is the null label
``K`` with a zero vector.
"""

import math

import torch
from torch import nn

from lightning_reg.diffusion.conditions import Conditioning
from lightning_reg.errors import ConfigError
from lightning_reg.module import register_checkpoint_class

KEYS = ("label", "vector")


class LabelAndVector(Conditioning):
    """``{label: (B,) class ids, vector: (B, 2) floats}``."""

    def __init__(self, num_classes: int, radius: float = 1.0):
        super().__init__()
        self.num_classes, self.radius = num_classes, radius

    def vector_of(self, labels: torch.Tensor) -> torch.Tensor:
        angle = 2 * math.pi * labels.double() / self.num_classes
        return (torch.stack([angle.cos(), angle.sin()], dim=1) * self.radius).float()

    def make(self, keys) -> dict:
        labels = torch.as_tensor(keys).long()
        return {"label": labels, "vector": self.vector_of(labels).to(labels.device)}

    def null(self, y: dict) -> dict:
        return {"label": torch.full_like(y["label"], self.num_classes), "vector": torch.zeros_like(y["vector"])}

    def check(self, y, allow_null: bool = False) -> None:
        if not isinstance(y, dict) or sorted(y) != sorted(KEYS):
            raise ConfigError(f"this model's condition is a mapping of {list(KEYS)}, got {type(y).__name__}")
        label, vector = y["label"], y["vector"]
        top = self.num_classes + int(allow_null)
        if label.ndim != 1 or vector.shape != (len(label), 2) or (len(label) and int(label.max()) >= top):
            raise ConfigError(f"label (B,) in [0, {top - 1}] and vector (B, 2), got {tuple(label.shape)}, "
                              f"{tuple(vector.shape)}")


class LabelVectorMLP(nn.Module):
    """``eps(x, t, {label, vector})``: an MLP over ``x``, a time embedding, a label embedding and the vector."""

    def __init__(self, num_classes: int = 2, dim: int = 2, hidden: int = 32, radius: float = 1.0):
        super().__init__()
        self.num_classes, self.data_shape, self.radius = num_classes, (dim,), radius
        self.label_embedding = nn.Embedding(num_classes + 1, hidden)
        self.vector_in = nn.Linear(2, hidden)
        self.inp = nn.Linear(dim + 1, hidden)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    @property
    def conditioning(self) -> LabelAndVector:
        return LabelAndVector(self.num_classes, self.radius)

    def forward(self, x, t, y):
        time = (t / 1000).to(x.dtype)[:, None]
        h = self.inp(torch.cat([x, time], dim=1)) + self.label_embedding(y["label"]) + self.vector_in(y["vector"])
        return self.out(h)


class LinearLabelVector(nn.Module):
    """``eps = A x + B[label] + C vector`` (float64): REG's closed forms hold exactly (``test_mapping_condition``)."""

    def __init__(self, a: torch.Tensor, bias: torch.Tensor, c: torch.Tensor):
        super().__init__()
        self.num_classes, self.data_shape = bias.shape[0] - 1, (a.shape[0],)
        for name, value in (("a", a), ("bias", bias), ("c", c)):
            self.register_buffer(name, value)

    @property
    def conditioning(self) -> LabelAndVector:
        return LabelAndVector(self.num_classes)

    def forward(self, x, t, y):
        return x @ self.a.T + self.bias[y["label"]] + y["vector"].to(x.dtype) @ self.c.T


register_checkpoint_class(LabelVectorMLP)
