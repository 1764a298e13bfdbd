"""Stable Diffusion 1.x/2.x components as backbones (docs/text_to_image.md).

The condition ``y`` is a prompt embedding ``(B, L, D)``: the text encoder's last hidden states, computed
once per prompt by ``PromptEncoder`` before sampling. ``PromptUNet`` runs diffusers' ``UNet2DConditionModel``
on scaled VAE latents; ``text_denoiser`` puts it under the pipeline's schedule and prediction type (SD 1.x:
epsilon, SD 2.x: ``v``) with the empty (or negative) prompt's embedding as the reference condition of
guidance (``PromptEmbeddings``). The VAE decodes only after the chain (``LatentDenoiser``), so guidance and
REG see the UNet alone, and REG differentiates the conditional UNet call only.

The modules are handed in already built: reading a pipeline folder (diffusers, transformers, the Hugging Face
cache) is the ``diffusers`` model source's (``lightning_reg.sources.diffusers``).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import Tensor, nn

from lightning_reg.diffusion.conditions import PromptEmbeddings
from lightning_reg.diffusion.latent import LatentCodec, LatentDenoiser
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import VPSchedule
from lightning_reg.errors import ConfigError


class PromptUNet(nn.Module):
    """``UNet2DConditionModel`` as a backbone ``net(x, t, y)`` with ``y`` the prompt embedding (cross attention).

    ``num_classes = 0``: there are no class labels, the condition is the embedding.
    """

    num_classes = 0

    def __init__(self, unet: nn.Module, gradient_checkpointing: bool = False):
        super().__init__()
        config = unet.config
        extra = {key: config.get(key) for key in ("addition_embed_type", "class_embed_type", "time_cond_proj_dim")
                 if config.get(key) is not None}
        if extra:
            raise ConfigError(f"the UNet takes extra conditioning {extra} (SDXL, LCM, upscaler ...): only SD 1.x/2.x "
                              "UNets (prompt embedding and time only) are covered")
        if config.in_channels != config.out_channels:
            raise ConfigError(f"the UNet has {config.in_channels} input and {config.out_channels} output channels "
                              "(inpainting, learned variance ...): only SD 1.x/2.x text-to-image UNets are covered")
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        self.data_shape = (config.in_channels, height, width)
        self.unet = unet
        if gradient_checkpointing:
            # diffusers recomputes blocks in backward whenever grad is on, eval mode too. The recomputation
            # runs outside REG's functional_call, on the module's own weights: frozen, it saves what the
            # forward on detached weights saved (sampling only; training switches it on itself)
            unet.requires_grad_(False).enable_gradient_checkpointing()

    @property
    def embedding_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.unet(x, t, encoder_hidden_states=y.to(x.dtype), return_dict=False)[0]


def text_denoiser(net: PromptUNet, schedule: VPSchedule, prediction: Prediction, codec: LatentCodec,
                  null_embedding: Tensor, prompt_encoder: nn.Module | None = None) -> LatentDenoiser:
    """A ``LatentDenoiser`` over ``net`` whose condition is a prompt embedding ``(B, L, D)``
    (``PromptEmbeddings``: ``null_embedding`` is the empty or negative prompt's, the reference condition of
    every guidance method; ``prompt_encoder`` turns captions into conditions)."""
    if null_embedding.shape[-1] != net.embedding_dim:
        raise ConfigError(f"the null embedding has width {null_embedding.shape[-1]} but the UNet's cross "
                          f"attention takes {net.embedding_dim}")
    return LatentDenoiser(net, schedule, prediction, codec, PromptEmbeddings(null_embedding, prompt_encoder))


class PromptEncoder(nn.Module):
    """The pipeline's tokenizer and CLIP text encoder: prompts -> embeddings ``(B, L, D)``, as diffusers'
    ``encode_prompt`` (padding to ``model_max_length``, last hidden states); longer prompts are truncated
    with a warning, as diffusers does."""

    def __init__(self, tokenizer, text_encoder: nn.Module):
        super().__init__()
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.eval().requires_grad_(False)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def forward(self, prompts: Sequence[str]) -> Tensor:
        prompts = list(prompts)
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt").input_ids
        for i, prompt in enumerate(prompts):
            n = len(self.tokenizer(prompt).input_ids)
            if n > self.max_length:
                warnings.warn(f"prompt {i} has {n} tokens, more than the text encoder's {self.max_length}: "
                              f"truncated (as diffusers does): {prompt[:60]!r}...", stacklevel=2)
        with torch.no_grad():
            return self.text_encoder(ids.to(next(self.text_encoder.parameters()).device))[0]
