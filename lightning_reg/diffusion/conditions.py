"""Conditions: what ``D(x, t, y)`` is conditioned on, and the conditioning that owns them.

A condition ``y`` is a tensor or a mapping of tensors (SDXL: prompt embeddings, pooled embeddings, size ids;
Flux: T5 embeddings, pooled CLIP, text ids) whose first dimension is the batch. The functions below batch,
split, index and move either form alike, so guidance, the sampling engine, the callback, sweeps and DDP
sharding never look inside a condition.

A ``Conditioning`` is the denoiser's kind of condition (``Denoiser.conditioning``): how a sample's *key* (a
class id, or a caption) becomes a condition (``make``), the reference condition of classifier-free guidance
(``null``), what is accepted (``check``) and label dropout (``drop``). Class labels (``ClassLabels``) are the
simple case; ``PromptEmbeddings`` is a text encoder's, ``PromptParts`` a prompt condition in several parts
(SDXL); a backbone with its own kind of condition defines a ``conditioning`` attribute (``docs/architecture.md``).
"""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from lightning_reg.errors import ConfigError

Condition = Union[Tensor, Mapping[str, Tensor]]


def apply(fn, y: Condition) -> Condition:
    """``fn`` on the tensor ``y``, or on every tensor of the mapping ``y`` (same keys)."""
    return {key: fn(value) for key, value in y.items()} if isinstance(y, Mapping) else fn(y)


def batch_size(y: Condition) -> int:
    """The shared first dimension of ``y``'s tensors."""
    if not isinstance(y, Mapping):
        return len(y)
    sizes = {key: len(value) for key, value in y.items()}
    if len(set(sizes.values())) != 1:
        raise ConfigError(f"a condition's tensors must share their batch dimension, got {sizes}")
    return next(iter(sizes.values()))


def cat(conditions: Sequence[Condition]) -> Condition:
    """The conditions stacked along the batch dimension."""
    first = conditions[0]
    if isinstance(first, Mapping):
        return {key: torch.cat([y[key] for y in conditions]) for key in first}
    return torch.cat(list(conditions))


def split(y: Condition, size: int) -> list[Condition]:
    """``y`` in consecutive batches of ``size`` rows (the last may be smaller)."""
    if not isinstance(y, Mapping):
        return list(y.split(size))
    parts = {key: value.split(size) for key, value in y.items()}
    return [{key: parts[key][i] for key in parts} for i in range(-(-batch_size(y) // size))]


def index(y: Condition, rows) -> Condition:
    """The rows ``rows`` (indices or a mask) of ``y``."""
    return apply(lambda value: value[rows], y)


def to(y: Condition, device) -> Condition:
    return apply(lambda value: value.to(device), y)


def select(mask: Tensor, a: Condition, b: Condition) -> Condition:
    """Row ``i`` of ``a`` where ``mask[i]``, of ``b`` elsewhere."""
    def pick(first: Tensor, second: Tensor) -> Tensor:
        return torch.where(mask.view(-1, *[1] * (first.ndim - 1)), first, second)

    if isinstance(a, Mapping):
        return {key: pick(a[key], b[key]) for key in a}
    return pick(a, b)


def describe(y) -> str:
    """A condition's type and shape, for errors: ``torch.int64 (2, 1)``, ``{label: torch.int64 (2,)}``, ``list``."""
    if isinstance(y, Mapping):
        return "{" + ", ".join(f"{key}: {describe(value)}" for key, value in y.items()) + "}"
    return f"{y.dtype} {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__


class Conditioning(nn.Module):
    """A denoiser's kind of condition (module docstring). A module, so buffers (a null embedding) and encoders
    move with the denoiser.

    ``num_classes``: the classes of ``make``'s keys (0: keys are captions, ``takes_prompts``).
    ``has_null``: whether the network learned a null condition (label dropout); without one, guidance needs a
    separate reference model.
    """

    num_classes: int = 0
    takes_prompts: bool = False
    has_null: bool = True

    def make(self, keys) -> Condition:
        """The conditions of per-sample keys: class ids (a tensor) or captions (a list of strings)."""
        raise NotImplementedError

    def null(self, y: Condition) -> Condition:
        """The reference condition of classifier-free guidance for the batch ``y`` (same batch size)."""
        raise NotImplementedError

    def check(self, y: Condition, allow_null: bool = False) -> None:
        """Refuse what this conditioning does not accept (``allow_null``: the null condition too, in training)."""

    def drop(self, y: Condition, mask: Tensor) -> Condition:
        """Label dropout: rows ``mask`` replaced by the null condition."""
        return select(mask, self.null(y), y)

    def refuse_null(self, what: str) -> None:
        if not self.has_null:
            raise ConfigError(f"{what} was trained without a null condition (no label dropout), so classifier-free "
                              "guidance has no unconditional prediction to use; guide it with a reference model "
                              "({method: autoguidance, reference_checkpoint: FILE})")


class ClassLabels(Conditioning):
    """Class ids in ``[0, num_classes)``; the null label is ``num_classes`` (label dropout, docs/theory.md §3)."""

    def __init__(self, num_classes: int, has_null: bool = True):
        super().__init__()
        self.num_classes, self.has_null = int(num_classes), bool(has_null)

    def make(self, keys) -> Tensor:
        return torch.as_tensor(keys).long()

    def null(self, y: Tensor) -> Tensor:
        self.refuse_null("this network")
        return torch.full_like(y, self.num_classes)

    def check(self, y: Tensor, allow_null: bool = False) -> None:
        if not isinstance(y, Tensor) or torch.is_floating_point(y) or y.ndim != 1:
            raise ConfigError(f"a class-conditional model's condition is a 1-D tensor of class ids (B,), got "
                              f"{describe(y)}")
        top = self.num_classes + int(allow_null and self.has_null)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= top):
            raise ConfigError(f"label ids must lie in [0, {top - 1}] for a model with num_classes={self.num_classes}; "
                              f"got min {int(y.min())}, max {int(y.max())}")


class PromptEmbeddings(Conditioning):
    """A text encoder's prompt embeddings ``(B, L, D)``. ``null_embedding`` ``(L, D)`` is the empty or negative
    prompt's: the reference condition of every guidance method (diffusers' ``negative_prompt_embeds``).
    ``encoder`` (optional) turns captions into embeddings; it runs before the chain, never inside guidance or REG."""

    takes_prompts = True

    def __init__(self, null_embedding: Tensor, encoder: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("null_embedding", null_embedding.detach().reshape(null_embedding.shape[-2:]))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.null_embedding.shape)

    def make(self, keys: Sequence[str]) -> Tensor:
        if self.encoder is None:
            raise ConfigError("this text-to-image denoiser has no prompt encoder: give PromptEmbeddings one")
        return self.encoder(list(keys)).to(self.null_embedding)

    def null(self, y: Tensor) -> Tensor:
        return self.null_embedding.to(y).expand_as(y)

    def check(self, y: Tensor, allow_null: bool = False) -> None:
        if (not isinstance(y, Tensor) or not torch.is_floating_point(y) or y.ndim != 3
                or tuple(y.shape[1:]) != self.shape):
            raise ConfigError(f"a text-to-image model's condition is a prompt embedding (B, "
                              f"{', '.join(map(str, self.shape))}) from its text encoder, got {describe(y)}")


class PromptParts(Conditioning):
    """A prompt condition in parts, a mapping of tensors (SDXL: ``prompt_embeds`` (B, L, D), ``text_embeds`` (B, P),
    ``time_ids`` (B, 6); docs/text_to_image.md). ``null`` holds the empty or negative prompt's parts, one sample's
    (no batch dimension): the reference condition of every guidance method. ``shared`` names the parts that
    belong to the sample rather than the prompt, with their per-sample shapes (SDXL's size ids): the null
    condition takes the condition's own, as the pipeline hands one ``add_time_ids`` to both branches. ``encoder``
    (optional) turns captions into conditions; it runs before the chain, never inside guidance or REG."""

    takes_prompts = True

    def __init__(self, null: Mapping[str, Tensor], shared: Mapping[str, Sequence[int]],
                 encoder: nn.Module | None = None):
        super().__init__()
        self.encoder, self.null_keys = encoder, tuple(null)
        self.shared = {key: tuple(shape) for key, shape in shared.items()}
        for key, value in null.items():
            self.register_buffer(f"null_{key}", value.detach().clone())

    def null_part(self, key: str) -> Tensor:
        return getattr(self, f"null_{key}")

    @property
    def shape(self) -> dict[str, tuple[int, ...]]:
        """Each part's per-sample shape."""
        return {**{key: tuple(self.null_part(key).shape) for key in self.null_keys}, **self.shared}

    def make(self, keys: Sequence[str]) -> dict[str, Tensor]:
        if self.encoder is None:
            raise ConfigError("this text-to-image denoiser has no prompt encoder: give PromptParts one")
        like = self.null_part(self.null_keys[0])
        return apply(lambda value: value.to(like), self.encoder(list(keys)))

    def null(self, y: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {key: y[key] if key in self.shared else self.null_part(key).to(y[key]).expand_as(y[key])
                for key in self.shape}

    def check(self, y, allow_null: bool = False) -> None:
        shapes = self.shape
        if (not isinstance(y, Mapping) or set(y) != set(shapes)
                or any(not isinstance(value, Tensor) or not torch.is_floating_point(value)
                       or tuple(value.shape[1:]) != shapes[key] for key, value in y.items())):
            wanted = ", ".join(f"{key}: (B, {', '.join(map(str, shape))})" for key, shape in shapes.items())
            raise ConfigError(f"a text-to-image model's condition is a mapping {{{wanted}}} from its prompt encoder, "
                              f"got {describe(y)}")
        batch_size(y)
