"""Stable Diffusion 1.x/2.x, SDXL and SD3 components as backbones (docs/text_to_image.md).

SD 1.x/2.x: the condition ``y`` is a prompt embedding ``(B, L, D)``, the text encoder's last hidden states,
computed once per prompt by ``PromptEncoder`` before sampling; ``PromptUNet`` runs diffusers'
``UNet2DConditionModel`` on scaled VAE latents. SDXL: the condition is a mapping (``SDXLPromptEncoder``, as
``StableDiffusionXLPipeline.encode_prompt`` and ``_get_add_time_ids``): ``prompt_embeds`` ``(B, L, D1 + D2)``, the
two text encoders' penultimate hidden states concatenated, ``text_embeds`` ``(B, P)``, the second encoder's
pooled projection, and ``time_ids`` ``(B, 6)``, the size ids; ``SDXLUNet`` hands the last two to the UNet as
``added_cond_kwargs``. SD3 (``SD3PromptEncoder``, as ``StableDiffusion3Pipeline.encode_prompt``): ``prompt_embeds``
``(B, L + S, W)``, both CLIP encoders' penultimate hidden states concatenated and zero-padded to T5's width ``W``,
then T5's ``S`` tokens (zeros without T5), and ``pooled_projections`` ``(B, P1 + P2)``, both CLIP encoders' pooled
projections; ``SD3Transformer`` runs ``SD3Transformer2DModel`` on them. ``text_denoiser`` puts any of them under the
pipeline's schedule and prediction type (epsilon or ``v``; SD3: flow, velocity) with the empty (or negative)
prompt's condition as the reference condition of guidance (``PromptEmbeddings``, ``PromptParts``). The VAE
decodes only after the chain (``LatentDenoiser``), so guidance and REG see the backbone alone, and REG
differentiates the conditional backbone call only.

The modules are handed in already built: reading a pipeline folder (diffusers, transformers, the Hugging Face
cache) is the ``diffusers`` model source's (``lightning_reg.sources.diffusers``).
"""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_reg.diffusion.conditions import Conditioning, PromptEmbeddings, PromptParts
from lightning_reg.diffusion.latent import LatentCodec, LatentDenoiser
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import NoiseSchedule
from lightning_reg.errors import ConfigError


EXTRA_CONDITIONING = ("addition_embed_type", "class_embed_type", "time_cond_proj_dim")  # UNet config keys
TIME_IDS = 6  # SDXL's size ids: original size (h, w), crop top-left (y, x), target size (h, w)
T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length (at most 512)


def checkpoint_frozen(backbone: nn.Module) -> None:
    """diffusers' gradient checkpointing on a frozen backbone, for sampling. diffusers recomputes blocks in backward
    whenever grad is on, eval mode too; the recomputation runs outside REG's functional_call, on the module's own
    weights: frozen, it saves what the forward on detached weights saved (training switches it on itself)."""
    backbone.requires_grad_(False).enable_gradient_checkpointing()


def check_widths(null: Mapping[str, Tensor], widths: Mapping[str, tuple[int, str]], backbone: str) -> None:
    """Each null part's last dimension against the width ``backbone`` takes (``widths``: key -> (width, where))."""
    for key, (width, where) in widths.items():
        if null[key].shape[-1] != width:
            raise ConfigError(f"the prompt encoder's {key} have width {null[key].shape[-1]} but the {backbone} takes "
                              f"{width} ({where})")


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
            checkpoint_frozen(unet)

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
        added = f"its added embedding, beside {TIME_IDS} size ids"
        check_widths(null, {"prompt_embeds": (self.embedding_dim, "cross attention"),
                            "text_embeds": (self.pooled_dim, added)}, "UNet")
        return PromptParts(null, {"time_ids": (TIME_IDS,)}, encoder)


class SD3Transformer(nn.Module):
    """An ``SD3Transformer2DModel`` (MMDiT; SD3, SD3.5) as a backbone ``net(x, t, y)``, ``y`` the mapping of
    ``SD3PromptEncoder``: ``prompt_embeds`` is the joint attention's context, ``pooled_projections`` joins the time
    embedding, as ``StableDiffusion3Pipeline`` calls it; ``t`` is the flow schedule's ``1000 t``, the pipeline's
    ``timestep`` (its scheduler's ``sigma * 1000``). Its output is the flow velocity ``eps - x0``."""

    num_classes = 0

    def __init__(self, transformer: nn.Module, gradient_checkpointing: bool = False):
        super().__init__()
        config = transformer.config
        out_channels = config.out_channels or config.in_channels
        if out_channels != config.in_channels:
            raise ConfigError(f"the transformer has {config.in_channels} input and {out_channels} output channels: "
                              "only text-to-image transformers are covered")
        self.data_shape = (config.in_channels, config.sample_size, config.sample_size)
        self.transformer = transformer
        if gradient_checkpointing:
            checkpoint_frozen(transformer)

    @property
    def joint_attention_dim(self) -> int:
        return int(self.transformer.config.joint_attention_dim)

    def forward(self, x: Tensor, t: Tensor, y: Mapping[str, Tensor]) -> Tensor:
        return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=y["prompt_embeds"].to(x.dtype),
                                pooled_projections=y["pooled_projections"].to(x.dtype), return_dict=False)[0]

    def prompt_conditioning(self, null: Mapping[str, Tensor], encoder: nn.Module | None) -> Conditioning:
        """``PromptParts`` with the null parts ``null`` (``prompt_embeds`` (L, W), ``pooled_projections`` (P,);
        checked against the transformer's widths)."""
        check_widths(null, {"prompt_embeds": (self.joint_attention_dim, "joint attention"),
                            "pooled_projections": (int(self.transformer.config.pooled_projection_dim),
                                                   "pooled projections")}, "transformer")
        return PromptParts(null, {}, encoder)


def text_denoiser(net: PromptUNet | SD3Transformer, schedule: NoiseSchedule, prediction: Prediction,
                  codec: LatentCodec, null: Tensor | Mapping[str, Tensor],
                  prompt_encoder: nn.Module | None = None) -> LatentDenoiser:
    """A ``LatentDenoiser`` over ``net`` whose condition is a prompt embedding ``(B, L, D)`` (``PromptUNet``:
    ``PromptEmbeddings``) or a mapping (``SDXLUNet``, ``SD3Transformer``: ``PromptParts``). ``null`` is the empty or
    negative prompt's condition (``prompt_encoder.null``), the reference condition of every guidance method;
    ``prompt_encoder`` turns captions into conditions."""
    return LatentDenoiser(net, schedule, prediction, codec, net.prompt_conditioning(null, prompt_encoder))


def prompt_ids(tokenizer, prompts: list[str], length: int | None = None) -> Tensor:
    """The token ids of ``prompts`` padded and truncated to ``length`` (default the tokenizer's
    ``model_max_length``), as diffusers' ``encode_prompt``; a longer prompt is truncated with a warning, as diffusers
    does."""
    length = int(length or tokenizer.model_max_length)
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


class CLIPPair(nn.Module):
    """Two CLIP tokenizers and text encoders run on the same prompts (SDXL, SD3), each tokenizer padding to their
    shared ``model_max_length`` (``prompt_ids``); ``family`` names the model in errors."""

    def __init__(self, tokenizers: Sequence, text_encoders: Sequence[nn.Module], family: str):
        super().__init__()
        lengths = [int(tokenizer.model_max_length) for tokenizer in tokenizers]
        if len(set(lengths)) != 1:
            raise ConfigError(f"{family}'s tokenizers must share their model_max_length, got {lengths}")
        self.tokenizers = list(tokenizers)
        self.text_encoders = nn.ModuleList(encoder.eval().requires_grad_(False) for encoder in text_encoders)

    @property
    def max_length(self) -> int:
        return int(self.tokenizers[0].model_max_length)

    @torch.no_grad()
    def clip_outputs(self, prompts: list[str]) -> list:
        """Each encoder's output on ``prompts``, with its hidden states."""
        return [encoder(prompt_ids(tokenizer, prompts).to(device_of(encoder)), output_hidden_states=True)
                for tokenizer, encoder in zip(self.tokenizers, self.text_encoders)]

    def penultimate(self, outputs: list) -> Tensor:
        """The encoders' penultimate hidden states concatenated, ``(B, L, D1 + D2)`` (no ``clip_skip``)."""
        return torch.cat([out.hidden_states[-2] for out in outputs], dim=-1)


class SDXLPromptEncoder(CLIPPair):
    """SDXL's two tokenizers and CLIP text encoders (the second ``CLIPTextModelWithProjection``) and its size ids,
    as ``StableDiffusionXLPipeline.encode_prompt`` (no ``clip_skip``) and ``_get_add_time_ids``: prompts -> a
    mapping of ``prompt_embeds`` ``(B, L, D1 + D2)``, both encoders' penultimate hidden states concatenated,
    ``text_embeds`` ``(B, P)``, the second's pooled projection, and ``time_ids`` ``(B, 6)``, one row a prompt.

    ``time_ids``: original size (h, w), crop top-left (y, x), target size (h, w); the pipeline's default is
    ``(H, W, 0, 0, H, W)``, ``H, W`` its default image size. ``force_zeros_for_empty_prompt`` (the pipeline's
    config): the empty negative prompt's null parts are zeros (``null``)."""

    def __init__(self, tokenizers: Sequence, text_encoders: Sequence[nn.Module], time_ids: Sequence[float],
                 force_zeros_for_empty_prompt: bool = True):
        super().__init__(tokenizers, text_encoders, "SDXL")
        if len(time_ids) != TIME_IDS:
            raise ConfigError(f"SDXL's size ids are {TIME_IDS} numbers, got {len(time_ids)}")
        self.register_buffer("time_ids", torch.tensor([float(i) for i in time_ids]))
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)

    def forward(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        prompts = list(prompts)
        outputs = self.clip_outputs(prompts)
        return {"prompt_embeds": self.penultimate(outputs), "text_embeds": outputs[-1].text_embeds,
                "time_ids": self.time_ids.repeat(len(prompts), 1)}

    def null(self, negative_prompt: str = "") -> dict[str, Tensor]:
        """The null parts ``prompt_embeds`` (L, D), ``text_embeds`` (P,): ``negative_prompt``'s, or zeros for the
        empty one with ``force_zeros_for_empty_prompt`` (the pipeline's ``negative_prompt=None``)."""
        parts = self([negative_prompt])
        zeros = self.force_zeros_for_empty_prompt and not negative_prompt
        return {key: torch.zeros_like(parts[key][0]) if zeros else parts[key][0]
                for key in ("prompt_embeds", "text_embeds")}


class SD3PromptEncoder(CLIPPair):
    """SD3's text stack, as ``StableDiffusion3Pipeline.encode_prompt`` (no ``clip_skip``): CLIP-L and CLIP-G
    (both ``CLIPTextModelWithProjection``) and T5 (``t5``: its tokenizer and ``T5EncoderModel``, or None, as diffusers
    allows). Prompts -> a mapping of ``prompt_embeds`` ``(B, L + S, W)``, the CLIP encoders' penultimate hidden
    states concatenated (``L`` tokens) and zero-padded to T5's width ``W``, then T5's last hidden states
    (``S = max_sequence_length`` tokens; without T5 zeros of width ``width``, the transformer's
    ``joint_attention_dim``), and ``pooled_projections`` ``(B, P1 + P2)``, both CLIP encoders' pooled projections.
    There is no ``force_zeros_for_empty_prompt``: the null parts are the negative (by default the empty) prompt's."""

    def __init__(self, tokenizers: Sequence, text_encoders: Sequence[nn.Module], t5: tuple | None, width: int,
                 max_sequence_length: int = T5_TOKENS):
        super().__init__(tokenizers, text_encoders, "SD3")
        if not 0 < max_sequence_length <= 512:
            raise ConfigError(f"SD3's max_sequence_length must lie in [1, 512] (the pipeline's limit), got "
                              f"{max_sequence_length}")
        self.t5_tokenizer, self.t5_encoder = (t5[0], t5[1].eval().requires_grad_(False)) if t5 else (None, None)
        self.width, self.max_sequence_length = int(width), int(max_sequence_length)

    def forward(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        prompts = list(prompts)
        outputs = self.clip_outputs(prompts)
        clip = self.penultimate(outputs)
        if self.t5_encoder is None:
            t5 = clip.new_zeros(len(prompts), self.max_sequence_length, self.width)
        else:
            ids = prompt_ids(self.t5_tokenizer, prompts, self.max_sequence_length)
            with torch.no_grad():
                t5 = self.t5_encoder(ids.to(device_of(self.t5_encoder)))[0]
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2),
                "pooled_projections": torch.cat([out.text_embeds for out in outputs], dim=-1)}

    def null(self, negative_prompt: str = "") -> dict[str, Tensor]:
        """The null parts ``prompt_embeds`` (L + S, W), ``pooled_projections`` (P1 + P2,): ``negative_prompt``'s."""
        return {key: value[0] for key, value in self([negative_prompt]).items()}
