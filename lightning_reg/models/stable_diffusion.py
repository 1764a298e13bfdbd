"""Stable Diffusion 1.x/2.x and SDXL components as backbones (docs/text_to_image.md).

SD 1.x/2.x: the condition ``y`` is a prompt embedding ``(B, L, D)``, the text encoder's last hidden states,
computed once per prompt by ``PromptEncoder`` before sampling; ``PromptUNet`` runs diffusers'
``UNet2DConditionModel`` on scaled VAE latents. SDXL: the condition is a mapping (``SDXLPromptEncoder``, as
``StableDiffusionXLPipeline.encode_prompt`` and ``_get_add_time_ids``): ``prompt_embeds`` ``(B, L, D1 + D2)``, the
two text encoders' penultimate hidden states concatenated, ``text_embeds`` ``(B, P)``, the second encoder's
pooled projection, and ``time_ids`` ``(B, 6)``, the size ids; ``SDXLUNet`` hands the last two to the UNet as
``added_cond_kwargs``. ``text_denoiser`` puts either under the pipeline's schedule and prediction type
(epsilon or ``v``) with the empty (or negative) prompt's condition as the reference condition of guidance
(``PromptEmbeddings``, ``PromptParts``). The VAE decodes only after the chain (``LatentDenoiser``), so guidance
and REG see the UNet alone, and REG differentiates the conditional UNet call only.

The modules are handed in already built: reading a pipeline folder (diffusers, transformers, the Hugging Face
cache) is the ``diffusers`` model source's (``lightning_reg.sources.diffusers``).
"""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_reg.diffusion.conditions import Conditioning, PromptEmbeddings, PromptParts
from lightning_reg.diffusion.latent import LatentCodec, LatentDenoiser
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import VPSchedule
from lightning_reg.errors import ConfigError


EXTRA_CONDITIONING = ("addition_embed_type", "class_embed_type", "time_cond_proj_dim")  # UNet config keys
TIME_IDS = 6  # SDXL's size ids: original size (h, w), crop top-left (y, x), target size (h, w)


class PromptUNet(nn.Module):
    """``UNet2DConditionModel`` as a backbone ``net(x, t, y)`` with ``y`` the prompt embedding (cross attention).

    ``num_classes = 0``: there are no class labels, the condition is the embedding. ``extra_conditioning``: the
    UNet config's extra conditioning the wrapper hands over (SD 1.x/2.x: none), ``covered`` what errors call it.
    """

    num_classes = 0
    extra_conditioning: dict = {}
    covered = "SD 1.x/2.x UNets (prompt embedding and time only)"

    def __init__(self, unet: nn.Module, gradient_checkpointing: bool = False):
        super().__init__()
        config = unet.config
        extra = {key: config.get(key) for key in EXTRA_CONDITIONING if config.get(key) is not None}
        if extra != self.extra_conditioning:
            raise ConfigError(f"the UNet's extra conditioning is {extra or 'none'}: only {self.covered} are "
                              "covered here (LCM, upscaler ... are not)")
        if config.in_channels != config.out_channels:
            raise ConfigError(f"the UNet has {config.in_channels} input and {config.out_channels} output channels "
                              "(inpainting, learned variance ...): only text-to-image UNets are covered")
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

    def prompt_conditioning(self, null: Tensor, encoder: nn.Module | None) -> Conditioning:
        """``PromptEmbeddings`` with the null embedding ``null`` ``(L, D)`` (checked against cross attention)."""
        if null.shape[-1] != self.embedding_dim:
            raise ConfigError(f"the null embedding has width {null.shape[-1]} but the UNet's cross "
                              f"attention takes {self.embedding_dim}")
        return PromptEmbeddings(null, encoder)


class SDXLUNet(PromptUNet):
    """An SDXL base ``UNet2DConditionModel`` as a backbone ``net(x, t, y)``, ``y`` the mapping of
    ``SDXLPromptEncoder``: ``prompt_embeds`` feeds cross attention, ``text_embeds`` and ``time_ids`` the added
    embedding (``added_cond_kwargs``, as ``StableDiffusionXLPipeline`` calls it)."""

    extra_conditioning = {"addition_embed_type": "text_time"}
    covered = "SDXL base UNets (addition_embed_type text_time: pooled text embeddings and size ids)"

    @property
    def pooled_dim(self) -> int:
        """The width of ``text_embeds`` the added embedding takes beside the ``TIME_IDS`` embedded size ids
        (the pipeline's ``_get_add_time_ids`` check)."""
        config = self.unet.config
        return int(config.projection_class_embeddings_input_dim) - TIME_IDS * int(config.addition_time_embed_dim)

    def forward(self, x: Tensor, t: Tensor, y: Mapping[str, Tensor]) -> Tensor:
        added = {"text_embeds": y["text_embeds"].to(x.dtype), "time_ids": y["time_ids"].to(x.dtype)}
        return self.unet(x, t, encoder_hidden_states=y["prompt_embeds"].to(x.dtype), added_cond_kwargs=added,
                         return_dict=False)[0]

    def prompt_conditioning(self, null: Mapping[str, Tensor], encoder: nn.Module | None) -> Conditioning:
        """``PromptParts`` with the null parts ``null`` (``prompt_embeds`` (L, D), ``text_embeds`` (P,); checked
        against the UNet's widths); ``time_ids`` are shared."""
        widths = {"prompt_embeds": (self.embedding_dim, "cross attention"),
                  "text_embeds": (self.pooled_dim, f"its added embedding, beside {TIME_IDS} size ids")}
        for key, (width, where) in widths.items():
            if null[key].shape[-1] != width:
                raise ConfigError(f"the prompt encoder's {key} have width {null[key].shape[-1]} but the UNet takes "
                                  f"{width} ({where})")
        return PromptParts(null, {"time_ids": (TIME_IDS,)}, encoder)


def text_denoiser(net: PromptUNet, schedule: VPSchedule, prediction: Prediction, codec: LatentCodec,
                  null: Tensor | Mapping[str, Tensor], prompt_encoder: nn.Module | None = None) -> LatentDenoiser:
    """A ``LatentDenoiser`` over ``net`` whose condition is a prompt embedding ``(B, L, D)`` (``PromptUNet``:
    ``PromptEmbeddings``) or SDXL's mapping (``SDXLUNet``: ``PromptParts``). ``null`` is the empty or negative
    prompt's condition (``prompt_encoder.null``), the reference condition of every guidance method;
    ``prompt_encoder`` turns captions into conditions."""
    return LatentDenoiser(net, schedule, prediction, codec, net.prompt_conditioning(null, prompt_encoder))


def prompt_ids(tokenizer, prompts: list[str]) -> Tensor:
    """The token ids of ``prompts`` padded and truncated to the tokenizer's ``model_max_length``, as diffusers'
    ``encode_prompt``; a longer prompt is truncated with a warning, as diffusers does."""
    length = int(tokenizer.model_max_length)
    for i, prompt in enumerate(prompts):
        n = len(tokenizer(prompt).input_ids)
        if n > length:
            warnings.warn(f"prompt {i} has {n} tokens, more than the text encoder's {length}: "
                          f"truncated (as diffusers does): {prompt[:60]!r}...", stacklevel=2)
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class PromptEncoder(nn.Module):
    """The pipeline's tokenizer and CLIP text encoder: prompts -> embeddings ``(B, L, D)``, as diffusers'
    ``encode_prompt`` (padding to ``model_max_length``, last hidden states; ``prompt_ids``)."""

    def __init__(self, tokenizer, text_encoder: nn.Module):
        super().__init__()
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.eval().requires_grad_(False)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def forward(self, prompts: Sequence[str]) -> Tensor:
        ids = prompt_ids(self.tokenizer, list(prompts))
        with torch.no_grad():
            return self.text_encoder(ids.to(device_of(self.text_encoder)))[0]

    def null(self, negative_prompt: str = "") -> Tensor:
        """The null condition: ``negative_prompt``'s embedding ``(L, D)`` (the empty prompt's by default)."""
        return self([negative_prompt])[0]


class SDXLPromptEncoder(nn.Module):
    """SDXL's two tokenizers and CLIP text encoders (the second ``CLIPTextModelWithProjection``) and its size ids,
    as ``StableDiffusionXLPipeline.encode_prompt`` (no ``clip_skip``) and ``_get_add_time_ids``: prompts -> a
    mapping of ``prompt_embeds`` ``(B, L, D1 + D2)``, both encoders' penultimate hidden states concatenated,
    ``text_embeds`` ``(B, P)``, the second's pooled projection, and ``time_ids`` ``(B, 6)``, one row a prompt.

    ``time_ids``: original size (h, w), crop top-left (y, x), target size (h, w); the pipeline's default is
    ``(H, W, 0, 0, H, W)``, ``H, W`` its default image size. ``force_zeros_for_empty_prompt`` (the pipeline's
    config): the empty negative prompt's null parts are zeros (``null``)."""

    def __init__(self, tokenizers: Sequence, text_encoders: Sequence[nn.Module], time_ids: Sequence[float],
                 force_zeros_for_empty_prompt: bool = True):
        super().__init__()
        lengths = [int(tokenizer.model_max_length) for tokenizer in tokenizers]
        if len(set(lengths)) != 1:
            raise ConfigError(f"SDXL's tokenizers must share their model_max_length, got {lengths}")
        if len(time_ids) != TIME_IDS:
            raise ConfigError(f"SDXL's size ids are {TIME_IDS} numbers, got {len(time_ids)}")
        self.tokenizers = list(tokenizers)
        self.text_encoders = nn.ModuleList(encoder.eval().requires_grad_(False) for encoder in text_encoders)
        self.register_buffer("time_ids", torch.tensor([float(i) for i in time_ids]))
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)

    @property
    def max_length(self) -> int:
        return int(self.tokenizers[0].model_max_length)

    def forward(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        prompts, hidden = list(prompts), []
        with torch.no_grad():
            for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
                out = encoder(prompt_ids(tokenizer, prompts).to(device_of(encoder)), output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "text_embeds": out.text_embeds,
                "time_ids": self.time_ids.repeat(len(prompts), 1)}

    def null(self, negative_prompt: str = "") -> dict[str, Tensor]:
        """The null parts ``prompt_embeds`` (L, D), ``text_embeds`` (P,): ``negative_prompt``'s, or zeros for the
        empty one with ``force_zeros_for_empty_prompt`` (the pipeline's ``negative_prompt=None``)."""
        parts = self([negative_prompt])
        zeros = self.force_zeros_for_empty_prompt and not negative_prompt
        return {key: torch.zeros_like(parts[key][0]) if zeros else parts[key][0]
                for key in ("prompt_embeds", "text_embeds")}
