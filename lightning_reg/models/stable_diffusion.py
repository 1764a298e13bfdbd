"""Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux.1 components as backbones (docs/text_to_image.md).

SD 1.x/2.x: the condition ``y`` is a prompt embedding ``(B, L, D)``, the text encoder's last hidden states,
computed once per prompt by ``PromptEncoder`` before sampling; ``PromptUNet`` runs diffusers'
``UNet2DConditionModel`` on scaled VAE latents. SDXL: the condition is a mapping (``SDXLPromptEncoder``, as
``StableDiffusionXLPipeline.encode_prompt`` and ``_get_add_time_ids``): ``prompt_embeds`` ``(B, L, D1 + D2)``, the
two text encoders' penultimate hidden states concatenated, ``text_embeds`` ``(B, P)``, the second encoder's
pooled projection, and ``time_ids`` ``(B, 6)``, the size ids; ``SDXLUNet`` hands the last two to the UNet as
``added_cond_kwargs``. SD3 (``SD3PromptEncoder``, as ``StableDiffusion3Pipeline.encode_prompt``): ``prompt_embeds``
``(B, L + S, W)``, both CLIP encoders' penultimate hidden states concatenated and zero-padded to T5's width ``W``,
then T5's ``S`` tokens (zeros without T5), and ``pooled_projections`` ``(B, P1 + P2)``, both CLIP encoders' pooled
projections; ``SD3Transformer`` runs ``SD3Transformer2DModel`` on them. Flux (``FluxPromptEncoder``, as
``FluxPipeline.encode_prompt``): ``prompt_embeds`` ``(B, S, W)``, T5's hidden states, and ``pooled_projections``
``(B, P)``, CLIP's pooled output; ``FluxTransformer`` runs ``FluxTransformer2DModel`` on packed latents with their
position ids and, for guidance-distilled models, the fixed distilled guidance input. ``text_denoiser`` puts any
of them under the pipeline's schedule and prediction type (epsilon or ``v``; SD3, Flux: flow, velocity) with the
empty (or negative) prompt's condition as the reference condition of guidance (``PromptEmbeddings``,
``PromptParts``). The VAE
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
from einops import rearrange
from torch import Tensor, nn

from lightning_reg.diffusion.conditions import Conditioning, PromptEmbeddings, PromptParts
from lightning_reg.diffusion.latent import LatentCodec, LatentDenoiser
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import NoiseSchedule
from lightning_reg.errors import ConfigError, check_number


EXTRA_CONDITIONING = ("addition_embed_type", "class_embed_type", "time_cond_proj_dim")  # UNet config keys
TIME_IDS = 6  # SDXL's size ids: original size (h, w), crop top-left (y, x), target size (h, w)
T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length (at most 512)
T5_LIMIT = 512  # the pipelines' limit on max_sequence_length; FluxPipeline's default
FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale: a guidance-distilled model's guidance input
FLUX_LATENT_SIDE = 128  # FluxPipeline's default_sample_size: latents of its default images (1024 px, VAE factor 8)


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


class JointTransformer(nn.Module):
    """What SD3's and Flux's transformers share as backbones: text-to-image only (as many output as input
    channels), the prompt condition in parts (``prompt_embeds`` the joint attention's context,
    ``pooled_projections`` joining the time embedding), ``data_shape`` the latent shape ``(C, H, W)``."""

    num_classes = 0

    def __init__(self, transformer: nn.Module, data_shape: tuple[int, int, int], gradient_checkpointing: bool):
        super().__init__()
        config = transformer.config
        out_channels = config.out_channels or config.in_channels
        if out_channels != config.in_channels:
            raise ConfigError(f"the transformer has {config.in_channels} input and {out_channels} output channels: "
                              "only text-to-image transformers are covered")
        self.data_shape = tuple(data_shape)
        self.transformer = transformer
        if gradient_checkpointing:
            checkpoint_frozen(transformer)

    @property
    def joint_attention_dim(self) -> int:
        return int(self.transformer.config.joint_attention_dim)

    def prompt_conditioning(self, null: Mapping[str, Tensor], encoder: nn.Module | None) -> Conditioning:
        """``PromptParts`` with the null parts ``null`` (``prompt_embeds`` (L, W), ``pooled_projections`` (P,);
        checked against the transformer's widths)."""
        check_widths(null, {"prompt_embeds": (self.joint_attention_dim, "joint attention"),
                            "pooled_projections": (int(self.transformer.config.pooled_projection_dim),
                                                   "pooled projections")}, "transformer")
        return PromptParts(null, {}, encoder)


class SD3Transformer(JointTransformer):
    """An ``SD3Transformer2DModel`` (MMDiT; SD3, SD3.5) as a backbone ``net(x, t, y)``, ``y`` the mapping of
    ``SD3PromptEncoder``: ``prompt_embeds`` is the joint attention's context, ``pooled_projections`` joins the time
    embedding, as ``StableDiffusion3Pipeline`` calls it; ``t`` is the flow schedule's ``1000 t``, the pipeline's
    ``timestep`` (its scheduler's ``sigma * 1000``). Its output is the flow velocity ``eps - x0``."""

    # a joint block's outputs, named by its inputs: a block skipped by SLG returns these (guidance/perturbed.py)
    block_returns = ("encoder_hidden_states", "hidden_states")

    def __init__(self, transformer: nn.Module, gradient_checkpointing: bool = False):
        config = transformer.config
        super().__init__(transformer, (config.in_channels, config.sample_size, config.sample_size),
                         gradient_checkpointing)

    def forward(self, x: Tensor, t: Tensor, y: Mapping[str, Tensor]) -> Tensor:
        return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=y["prompt_embeds"].to(x.dtype),
                                pooled_projections=y["pooled_projections"].to(x.dtype), return_dict=False)[0]


def patch_ids(rows: int, cols: int) -> Tensor:
    """The position ids ``(rows * cols, 3)`` of a grid of 2x2 latent patches in row-major order: ``(0, row, col)``,
    as ``FluxPipeline`` gives its packed latents (text tokens: all zeros)."""
    grid = torch.cartesian_prod(torch.arange(rows), torch.arange(cols))
    return F.pad(grid, (1, 0)).float()


class FluxTransformer(JointTransformer):
    """A ``FluxTransformer2DModel`` (Flux.1 dev, schnell) as a backbone ``net(x, t, y)`` on latents ``x``
    ``(B, C, H, W)``, ``y`` the mapping of ``FluxPromptEncoder``. As ``FluxPipeline`` calls it: ``x`` is packed into
    its ``H W / 4`` 2x2 patches of ``4 C`` values (channel, then row and column in the patch) with position ids
    ``(0, row, col)``, the text tokens get ids 0, the timestep is the flow time ``t`` (the schedule's ``1000 t``
    over 1000: the transformer multiplies by 1000 itself); the output velocity ``eps - x0`` is unpacked.

    ``guidance``: a guidance-distilled model's (``guidance_embeds``, dev) guidance input, the pipeline's
    ``guidance_scale`` (default ``FLUX_GUIDANCE``), the same for every call and both branches of guidance: a fixed
    model input, not a guidance method; ``None`` for a model without one (schnell). ``latent_size``: ``(H, W)``,
    even (default the pipeline's ``FLUX_LATENT_SIDE``; the transformer has no sample size of its own)."""

    def __init__(self, transformer: nn.Module, latent_size: Sequence[int] = (FLUX_LATENT_SIDE, FLUX_LATENT_SIDE),
                 guidance: float | None = None, gradient_checkpointing: bool = False):
        config = transformer.config
        if config.patch_size != 1 or config.in_channels % 4:
            raise ConfigError(f"the transformer takes patch_size {config.patch_size} and {config.in_channels} input "
                              "channels: Flux's take packed 2x2 latent patches (patch_size 1, 4 x latent channels)")
        height, width = (int(side) for side in latent_size)
        if height <= 0 or width <= 0 or height % 2 or width % 2:
            raise ConfigError(f"Flux's latents are packed in 2x2 patches: their size must be even, got "
                              f"{height}x{width}")
        super().__init__(transformer, (config.in_channels // 4, height, width), gradient_checkpointing)
        if config.guidance_embeds:
            guidance = check_number("Flux's distilled guidance", FLUX_GUIDANCE if guidance is None else guidance, 0.0)
        elif guidance is not None:
            raise ConfigError(f"distilled guidance {guidance}: the transformer takes no guidance input "
                              "(guidance_embeds false, e.g. Flux.1 schnell); leave it unset")
        self.guidance = guidance

    @property
    def image_tokens(self) -> int:
        """The packed latents' sequence length (what ``FluxPipeline`` shifts its times by)."""
        _, height, width = self.data_shape
        return height * width // 4

    def forward(self, x: Tensor, t: Tensor, y: Mapping[str, Tensor]) -> Tensor:
        _, _, height, width = x.shape
        text = y["prompt_embeds"].to(x.dtype)
        guidance = None if self.guidance is None else x.new_full((len(x),), self.guidance)
        out = self.transformer(hidden_states=rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=2, q=2),
                               timestep=t / 1000, guidance=guidance, encoder_hidden_states=text,
                               pooled_projections=y["pooled_projections"].to(x.dtype),
                               txt_ids=text.new_zeros(text.shape[1], 3),
                               img_ids=patch_ids(height // 2, width // 2).to(x), return_dict=False)[0]
        return rearrange(out, "b (h w) (c p q) -> b c (h p) (w q)", h=height // 2, p=2, q=2)

    def check_guidance(self, guidance) -> None:
        """A guidance-distilled model guided by nothing but its distilled input (no true CFG weight, no other
        term) has no guidance term for REG to rectify: REG is refused there (``Guidance.bind``)."""
        if self.guidance is not None and guidance.rectifier.mode != "none" and not guidance.rule.guides \
                and not guidance.terms:
            raise ConfigError(f"reg: {guidance.rectifier.mode} on a guidance-distilled Flux model without true CFG: "
                              f"its distilled guidance ({self.guidance}) is a model input, not a guidance term, "
                              "and with guidance weight 0 there is nothing to rectify; give true CFG a weight "
                              "(diffusers' true_cfg_scale s is {method: cfg, scale: s, convention: w2}, s > 1, "
                              "with --negative_prompt) or set reg: none")


def text_denoiser(net: PromptUNet | JointTransformer, schedule: NoiseSchedule, prediction: Prediction,
                  codec: LatentCodec, null: Tensor | Mapping[str, Tensor],
                  prompt_encoder: nn.Module | None = None) -> LatentDenoiser:
    """A ``LatentDenoiser`` over ``net`` whose condition is a prompt embedding ``(B, L, D)`` (``PromptUNet``:
    ``PromptEmbeddings``) or a mapping (``SDXLUNet``, ``SD3Transformer``, ``FluxTransformer``: ``PromptParts``).
    ``null`` is the empty or negative prompt's condition (``prompt_encoder.null``), the reference condition of every
    guidance method; ``prompt_encoder`` turns captions into conditions."""
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


def check_t5_length(family: str, max_sequence_length: int) -> int:
    """T5's ``max_sequence_length``, in ``[1, T5_LIMIT]`` (the pipelines' limit)."""
    if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
            or not 0 < max_sequence_length <= T5_LIMIT:
        raise ConfigError(f"{family}'s max_sequence_length must be an integer in [1, {T5_LIMIT}] (the pipeline's "
                          f"limit), got {max_sequence_length!r}")
    return max_sequence_length


@torch.no_grad()
def t5_states(tokenizer, encoder: nn.Module, prompts: list[str], length: int) -> Tensor:
    """T5's last hidden states ``(B, length, W)`` of ``prompts`` padded and truncated to ``length`` tokens
    (``prompt_ids``), as the pipelines' ``_get_t5_prompt_embeds``."""
    return encoder(prompt_ids(tokenizer, prompts, length).to(device_of(encoder)))[0]


def null_parts(encoder: nn.Module, negative_prompt: str) -> dict[str, Tensor]:
    """The null condition of a prompt encoder of parts: ``negative_prompt``'s parts, one sample's."""
    return {key: value[0] for key, value in encoder([negative_prompt]).items()}


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
        self.max_sequence_length = check_t5_length("SD3", max_sequence_length)
        self.t5_tokenizer, self.t5_encoder = (t5[0], t5[1].eval().requires_grad_(False)) if t5 else (None, None)
        self.width = int(width)

    def forward(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        prompts = list(prompts)
        outputs = self.clip_outputs(prompts)
        clip = self.penultimate(outputs)
        if self.t5_encoder is None:
            t5 = clip.new_zeros(len(prompts), self.max_sequence_length, self.width)
        else:
            t5 = t5_states(self.t5_tokenizer, self.t5_encoder, prompts, self.max_sequence_length)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2),
                "pooled_projections": torch.cat([out.text_embeds for out in outputs], dim=-1)}

    def null(self, negative_prompt: str = "") -> dict[str, Tensor]:
        """The null parts ``prompt_embeds`` (L + S, W), ``pooled_projections`` (P1 + P2,): ``negative_prompt``'s."""
        return null_parts(self, negative_prompt)


class FluxPromptEncoder(nn.Module):
    """Flux's text stack, as ``FluxPipeline.encode_prompt``: a CLIP tokenizer and ``CLIPTextModel`` (its pooled
    output) and a T5 tokenizer and ``T5EncoderModel``. Prompts -> a mapping of ``prompt_embeds`` ``(B, S, W)``, T5's
    last hidden states (``S = max_sequence_length``, the pipeline's default ``T5_LIMIT``), and
    ``pooled_projections`` ``(B, P)``, CLIP's pooled output; each tokenizer pads and truncates (with a warning, as
    diffusers) to its length (``prompt_ids``). The null parts are the negative (by default the empty) prompt's, as
    the pipeline's true CFG encodes ``negative_prompt``."""

    def __init__(self, tokenizer, text_encoder: nn.Module, t5_tokenizer, t5_encoder: nn.Module,
                 max_sequence_length: int = T5_LIMIT):
        super().__init__()
        self.max_sequence_length = check_t5_length("Flux", max_sequence_length)
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.eval().requires_grad_(False)
        self.t5_tokenizer, self.t5_encoder = t5_tokenizer, t5_encoder.eval().requires_grad_(False)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def forward(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        prompts = list(prompts)
        with torch.no_grad():
            pooled = self.text_encoder(prompt_ids(self.tokenizer, prompts).to(device_of(self.text_encoder)))
        return {"prompt_embeds": t5_states(self.t5_tokenizer, self.t5_encoder, prompts, self.max_sequence_length),
                "pooled_projections": pooled.pooler_output}

    def null(self, negative_prompt: str = "") -> dict[str, Tensor]:
        """The null parts ``prompt_embeds`` (S, W), ``pooled_projections`` (P,): ``negative_prompt``'s."""
        return null_parts(self, negative_prompt)
