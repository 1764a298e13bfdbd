"""Text-to-image latent diffusion over diffusers' Stable Diffusion components (docs/text_to_image.md).

The condition ``y`` is a prompt embedding ``(B, L, D)``: the text encoder's last hidden states, computed
once per prompt by ``PromptEncoder`` before sampling. The reference condition of guidance is the empty
(or negative) prompt's embedding, ``TextDenoiser.null_condition``. ``UNet2DConditionModel`` runs on
scaled VAE latents read through the schedule and prediction type of the pipeline's scheduler config
(SD 1.x: epsilon, SD 2.x: ``v``); the VAE decodes only after the chain (``LatentDenoiser``), so guidance
and REG see the UNet alone, and REG differentiates the conditional UNet call only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_reg.diffusion.latent import LatentCodec, LatentDenoiser
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import SPACINGS, VPSchedule
from lightning_reg.errors import ConfigError, one_line
from lightning_reg.io.pretrained import check_folder, load_pretrained, local_folder

PIPELINES = ("StableDiffusionPipeline",)  # SD 1.x and 2.x (one UNet, one CLIP text encoder, AutoencoderKL)
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v"}
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
LIBRARIES = ("diffusers", "transformers", "stable_diffusion")  # of model_index.json's components (SD 1.x/2.x)


def schedule_from_scheduler_config(config: Mapping, field: str = "scheduler") -> tuple[VPSchedule, Prediction]:
    """The VP schedule and prediction target of a diffusers scheduler config, stepped as its DDIM scheduler
    (``DDIMScheduler.from_config``: the keys it shares with the config, DDIM's defaults for the others)."""
    from diffusers import DDIMScheduler

    config = dict(config)
    betas = config.get("beta_schedule", "linear")
    if betas not in BETA_SCHEDULES or config.get("trained_betas") is not None:
        raise ConfigError(f"{field}: beta_schedule {betas!r}{' with trained_betas' * bool(config.get('trained_betas'))}"
                          f" is not supported; supported: {sorted(BETA_SCHEDULES)}")
    for flag in ("rescale_betas_zero_snr", "thresholding", "clip_sample"):
        if config.get(flag, False):
            raise ConfigError(f"{field}: {flag}=true is not supported (latent SD schedulers leave it false)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # diffusers' notes on keys DDIM does not take
            ddim = DDIMScheduler.from_config(config).config
    except Exception as err:  # noqa: BLE001 - values DDIM's constructor refuses
        raise ConfigError(f"{field}: not a usable scheduler config ({type(err).__name__}: {one_line(err, 200)})") \
            from None
    if ddim.timestep_spacing not in SPACINGS[1:]:  # diffusers' own
        raise ConfigError(f"{field}: timestep_spacing {ddim.timestep_spacing!r} is not supported; supported: "
                          f"{list(SPACINGS[1:])}")
    kind = ddim.prediction_type
    if kind not in PREDICTION_TYPES:
        raise ConfigError(f"{field}: prediction_type {kind!r} is not supported; supported: "
                          f"{sorted(PREDICTION_TYPES)} (SD 1.x epsilon, SD 2.x v_prediction)")
    try:
        schedule = VPSchedule(int(ddim.num_train_timesteps), BETA_SCHEDULES[betas], float(ddim.beta_start),
                              float(ddim.beta_end), spacing=ddim.timestep_spacing,
                              steps_offset=int(ddim.steps_offset), final_alpha_one=bool(ddim.set_alpha_to_one))
    except (ConfigError, TypeError, ValueError) as err:  # ours, or values of the wrong type
        raise ConfigError(f"{field}: {one_line(err, 200)}") from None
    return schedule, Prediction(PREDICTION_TYPES[kind])


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


class TextDenoiser(LatentDenoiser):
    """A ``LatentDenoiser`` over a ``PromptUNet`` whose condition is a prompt embedding ``(B, L, D)``.

    ``null_embedding`` ``(L, D)`` (or ``(1, L, D)``) is the empty or negative prompt's embedding: the
    reference condition of CFG and of every guidance method (diffusers' ``negative_prompt_embeds``).
    ``prompt_encoder`` (optional) turns captions into conditions (``encode``); it runs before the chain, never
    inside guidance or REG.
    """

    def __init__(self, net: PromptUNet, schedule: VPSchedule, prediction: Prediction, codec: LatentCodec,
                 null_embedding: Tensor, prompt_encoder: PromptEncoder | None = None):
        super().__init__(net, schedule, prediction, codec)
        self.prompt_encoder = prompt_encoder
        null_embedding = null_embedding.detach().reshape(null_embedding.shape[-2:])
        if null_embedding.shape[-1] != net.embedding_dim:
            raise ConfigError(f"the null embedding has width {null_embedding.shape[-1]} but the UNet's cross "
                              f"attention takes {net.embedding_dim}")
        self.register_buffer("null_embedding", null_embedding)

    @property
    def condition_shape(self) -> tuple[int, int]:
        return tuple(self.null_embedding.shape)

    def null_condition(self, y: Tensor) -> Tensor:
        return self.null_embedding.to(y).expand_as(y)

    def with_net(self, net: PromptUNet) -> "TextDenoiser":
        """This denoiser over another copy of its UNet (the EMA weights of fine-tuning), sharing the rest."""
        return TextDenoiser(net, self.schedule, self.prediction, self.codec, self.null_embedding,
                            self.prompt_encoder).train(self.training)

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """The conditions ``(B, L, D)`` of ``prompts``, on this denoiser's device."""
        if self.prompt_encoder is None:
            raise ConfigError("this text-to-image denoiser has no prompt encoder: pass the pipeline's to TextDenoiser")
        return self.prompt_encoder(prompts).to(self.null_embedding)

    def check_labels(self, y: Tensor, allow_null: bool = False) -> None:
        """Conditions must be prompt embeddings ``(B, L, D)`` shaped like the null embedding."""
        if not torch.is_floating_point(y) or y.ndim != 3 or tuple(y.shape[1:]) != self.condition_shape:
            raise ConfigError(f"a text-to-image model's condition is a prompt embedding (B, "
                              f"{', '.join(map(str, self.condition_shape))}) from its text encoder, got "
                              f"{y.dtype} {tuple(y.shape)}")


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


@dataclass
class TextToImage:
    """A loaded pipeline folder: the denoiser, its prompt encoder and what was read (for ``meta.json``)."""

    denoiser: TextDenoiser
    prompt_encoder: PromptEncoder
    meta: dict = field(default_factory=dict)


def resolve_pipeline_folder(source: str, field: str = "--pipeline", cache_dir: str | None = None) -> Path:
    """A local pipeline folder, or a hub name's snapshot already in the Hugging Face cache; never downloads."""
    return local_folder(source, field, "a diffusers pipeline folder (save_pretrained, with model_index.json) or a "
                                       "cached hub name such as stable-diffusion-v1-5/stable-diffusion-v1-5", cache_dir)


def is_pipeline(source: str, cache_dir: str | None = None) -> bool:
    """Whether ``source`` is a diffusers pipeline: a folder with ``model_index.json``, or a hub name whose
    snapshot (with one) is in the local Hugging Face cache."""
    try:
        return (resolve_pipeline_folder(str(source), cache_dir=cache_dir) / "model_index.json").is_file()
    except ConfigError:
        return False


def check_model_index(index: dict, field: str) -> str:
    """The pipeline class of ``model_index.json``; a class or component that would come from the folder's own
    code (a custom pipeline, a library other than ``LIBRARIES``) or another pipeline kind is one ConfigError."""
    kind = index.get("_class_name")
    if not isinstance(kind, str):
        raise ConfigError(f"{field}: _class_name {str(kind)[:80]} names a custom pipeline, whose code is never run: "
                          f"only {list(PIPELINES)} (SD 1.x/2.x) is covered")
    for name, entry in index.items():
        library = entry[0] if isinstance(entry, list) and entry and not name.startswith("_") else None
        if library is not None and library not in LIBRARIES:
            raise ConfigError(f"{field}: component {name[:40]!r} comes from {str(library)[:80]!r}, code that is "
                              f"never run: a pipeline's components come from {list(LIBRARIES)}")
    if kind not in PIPELINES:
        raise ConfigError(f"{field} is a {kind} pipeline: only {list(PIPELINES)} (SD 1.x/2.x) is covered (SDXL, SD3 "
                          "and Flux are not)")
    return kind


def load_text_to_image(source: str, *, negative_prompt: str = "", gradient_checkpointing: bool = False,
                       field: str = "--pipeline", cache_dir: str | None = None) -> TextToImage:
    """A ``StableDiffusionPipeline`` folder (SD 1.x / 2.x) as a ``TextToImage``; one ConfigError line for a
    missing folder, another pipeline kind, code in the folder, a missing or unloadable component or an
    unsupported scheduler. Every folder is vetted before a library reads it (``io.pretrained``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = resolve_pipeline_folder(source, field, cache_dir)
    if not (folder / "model_index.json").is_file():
        raise ConfigError(f"{field} {source} has no model_index.json: it is not a diffusers pipeline folder")
    configs = check_folder(folder, field, "diffusers pipeline folder", weights=False)
    kind = check_model_index(configs["model_index.json"], f"{field} {source}")
    missing = [name for name in COMPONENTS if not (folder / name).is_dir()]
    if missing:
        raise ConfigError(f"{field} {source} lacks the component folder(s) {missing}: a text-to-image pipeline "
                          f"needs {list(COMPONENTS)}")
    scheduler_config = check_folder(folder / "scheduler", field, "scheduler folder", weights=False).get(
        "scheduler_config.json")
    if scheduler_config is None:
        raise ConfigError(f"{field} {source}: scheduler/scheduler_config.json does not exist")
    schedule, prediction = schedule_from_scheduler_config(scheduler_config, f"{field} {source} scheduler")
    loaders = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "tokenizer": CLIPTokenizer}
    low_memory = {"low_cpu_mem_usage": False}  # diffusers without accelerate
    parts = {name: load_pretrained(cls, folder / name, field, f"{cls.__name__} folder",
                                   **(low_memory if name in ("unet", "vae") else {}))
             for name, cls in loaders.items()}
    prompt_encoder = PromptEncoder(parts["tokenizer"], parts["text_encoder"])
    net = PromptUNet(parts["unet"].eval(), gradient_checkpointing)
    denoiser = TextDenoiser(net, schedule, prediction, LatentCodec(parts["vae"]), prompt_encoder([negative_prompt]),
                            prompt_encoder)
    meta = {"pipeline": kind, "source": str(source), "prediction": prediction.kind,
            "schedule": {key: value for key, value in vars(schedule).items() if key != "alpha_bar"},
            "latent_shape": list(denoiser.data_shape), "image_shape": list(denoiser.image_shape),
            "condition_shape": list(denoiser.condition_shape), "prompt_tokens": prompt_encoder.max_length,
            "negative_prompt": negative_prompt, "gradient_checkpointing": gradient_checkpointing}
    return TextToImage(denoiser.eval(), prompt_encoder, meta)
