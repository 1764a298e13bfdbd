"""CLIP score (Hessel et al. 2021) of images against their captions, through torchmetrics' ``CLIPScore``, with a
CLIP model from a local folder (``CLIPModel`` and ``CLIPProcessor`` saved by ``save_pretrained``; the paper's
protocol uses ``openai/clip-vit-base-patch16``): nothing is downloaded at run time (docs/text_to_image.md).

The score is torchmetrics': ``max(100 * mean(cos(E_image, E_text)), 0)`` over all image-caption pairs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from lightning_reg.errors import ConfigError
from lightning_reg.io.pretrained import check_folder, load_pretrained
from lightning_reg.metrics.images import _images

_BATCH = 100
WHAT = "CLIP model and processor folder"


class ProjectedCLIP(torch.nn.Module):
    """``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return the projected embeddings as a
    tensor, which torchmetrics' CLIP score expects (transformers 5 returns an output object holding them as
    ``pooler_output``)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _embedding(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._embedding(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._embedding(self.model.get_text_features(*args, **kwargs))


def clip_loader(folder: str | Path, field: str = "--clip-model"):
    """A loader of ``(CLIPModel, CLIPProcessor)`` from a local folder, for ``CLIPScore``; the folder is vetted
    now (``io.pretrained.check_folder``: data only, no custom code, weights checked) and again when loaded."""
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        problem = "has no config.json" if folder.is_dir() else "is not a folder"
        raise ConfigError(f"{field} {folder} {problem}: give a folder written by CLIPModel.save_pretrained and "
                          "CLIPProcessor.save_pretrained (e.g. a local copy of openai/clip-vit-base-patch16)")
    check_folder(folder, field, WHAT)

    def load():
        from transformers import CLIPModel, CLIPProcessor

        return (ProjectedCLIP(load_pretrained(CLIPModel, folder, field, WHAT)),
                load_pretrained(CLIPProcessor, folder, field, WHAT))

    return load


def clip_score(images, prompts: Sequence[str], clip_model: str | Path, *, device="cpu", batch_size: int = _BATCH,
               field: str = "--clip-model") -> float:
    """The CLIP score of uint8 (N, H, W, C) images against ``prompts`` (one per image), batches of ``batch_size``;
    ``field`` names ``clip_model`` in errors."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    images, prompts = _images(images, "images"), list(prompts)
    if len(images) != len(prompts) or not prompts:
        raise ConfigError(f"CLIP score needs one caption per image, got {len(images)} images and {len(prompts)} "
                          "captions")
    metric = CLIPScore(model_name_or_path=clip_loader(clip_model, field)).to(device)
    for start in range(0, len(images), batch_size):
        metric.update(list(images[start:start + batch_size].to(device)), prompts[start:start + batch_size])
    return float(metric.compute())
