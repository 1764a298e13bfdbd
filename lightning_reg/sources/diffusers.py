"""The ``diffusers`` source: a diffusers ``StableDiffusionPipeline`` (SD 1.x / 2.x), ``StableDiffusionXLPipeline``
(SDXL base), ``StableDiffusion3Pipeline`` (SD3, SD3.5) or ``FluxPipeline`` (Flux.1) folder or cached hub name
(docs/text_to_image.md): its UNet (``models.stable_diffusion.PromptUNet``, ``SDXLUNet``) or transformer
(``SD3Transformer``, ``FluxTransformer``) under the schedule and prediction type of its scheduler config (VP with
epsilon or ``v``; SD3, Flux: flow with its time shift, velocity), its VAE's latents and its prompt encoder; the
condition is a prompt embedding (SDXL, SD3, Flux: a mapping of embeddings, pooled embeddings and, for SDXL, size
ids), the reference condition of guidance the empty (or negative) prompt's.

Everything that reads a pipeline lives here (diffusers and transformers are imported inside the functions that
need them; folders are vetted by ``io.pretrained`` before a library reads them, the Hugging Face cache is read,
never the network). The source owns ``ModelSpec.negative_prompt`` and ``gradient_checkpointing``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.latent import LatentCodec, LatentDenoiser
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import SPACINGS, FlowSchedule, NoiseSchedule, VPSchedule
from lightning_reg.errors import ConfigError, check_number, one_line
from lightning_reg.io.pretrained import check_folder, load_pretrained, local_folder
from lightning_reg.models.stable_diffusion import (FLUX_LATENT_SIDE, T5_LIMIT, T5_TOKENS, FluxPromptEncoder,
                                                   FluxTransformer, PromptEncoder, PromptUNet, SD3PromptEncoder,
                                                   SD3Transformer, SDXLPromptEncoder, SDXLUNet, text_denoiser)
from lightning_reg.sources.base import ModelSource, ModelSpec, register_source

SD, SDXL, SD3 = "StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline"
FLUX = "FluxPipeline"
# one UNet or transformer, CLIP text encoder(s) (and T5), AutoencoderKL
PIPELINES = {SD: "SD 1.x/2.x", SDXL: "SDXL base", SD3: "SD3 / SD3.5", FLUX: "Flux.1"}
FLOW_PIPELINES = (SD3, FLUX)
REFINERS = ("StableDiffusionXLImg2ImgPipeline",)  # SDXL's refiner (and SDXL image-to-image): out of scope
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v"}
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
COMPONENTS = {SD: ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}
COMPONENTS[SDXL] = (*COMPONENTS[SD], "text_encoder_2", "tokenizer_2")
COMPONENTS[SD3] = COMPONENTS[FLUX] = ("transformer", *COMPONENTS[SDXL][1:])  # Flux: text_encoder_2 is T5
T5 = ("text_encoder_3", "tokenizer_3")  # SD3's optional T5: model_index.json names both, or neither (null)
PROJECTED = ("CLIPTextModelWithProjection", "pooled projection")
# the text encoder classes model_index.json must name, and what the backbone takes of each
ENCODERS = {SDXL: {"text_encoder_2": PROJECTED}, SD3: {"text_encoder": PROJECTED, "text_encoder_2": PROJECTED},
            FLUX: {"text_encoder": ("CLIPTextModel", "pooled output"),
                   "text_encoder_2": ("T5EncoderModel", "hidden states")}}
LIBRARIES = ("diffusers", "transformers", "stable_diffusion")  # of model_index.json's components
# FlowMatch scheduler options that would change the pipelines' chain beyond the time shift: refused when set (but
# Flux's use_dynamic_shifting, the first)
FLOW_OPTIONS = ("use_dynamic_shifting", "shift_terminal", "invert_sigmas", "stochastic_sampling", "use_karras_sigmas",
                "use_exponential_sigmas", "use_beta_sigmas")


def schedule_from_scheduler_config(config: Mapping, field: str = "scheduler") -> tuple[VPSchedule, Prediction]:
    """The VP schedule and prediction target of a diffusers scheduler config, stepped as its DDIM scheduler
    (``DDIMScheduler.from_config``: the keys it shares with the config, DDIM's defaults for the others)."""
    from diffusers import DDIMScheduler

    config = dict(config)
    if "beta_schedule" not in config:  # EDM (Playground v2.5) and flow-matching scheduler configs: no betas
        raise ConfigError(f"{field}: {str(config.get('_class_name'))[:80]} has no beta_schedule: only DDPM-type (VP) "
                          f"schedules are covered here (EDM pipelines are not; flow matching is {SD3}'s and "
                          f"{FLUX}'s)")
    betas = config["beta_schedule"]
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


def flow_schedule_from_scheduler_config(config: Mapping, field: str = "scheduler",
                                        image_tokens: int | None = None) -> tuple[FlowSchedule, Prediction]:
    """The flow schedule and velocity prediction of a FlowMatch scheduler config (SD3's and Flux's
    ``FlowMatchEulerDiscreteScheduler``) over ``num_train_timesteps`` 1000 (the transformer's time ``1000 t``): its
    fixed ``shift`` (diffusers' default 1), or, given ``image_tokens`` (Flux: the packed latents' sequence length)
    and with ``use_dynamic_shifting``, the shift ``FluxPipeline`` computes for that length (``dynamic_shift``). The
    other ``FLOW_OPTIONS`` set to anything but their defaults are refused."""
    name = str(config.get("_class_name"))[:80]
    if not name.startswith("FlowMatch"):
        raise ConfigError(f"{field}: {name} is not a FlowMatch scheduler: {SD3} and {FLUX} folders sample with flow "
                          "matching")
    if config.get("num_train_timesteps", 1000) != 1000:
        raise ConfigError(f"{field}: num_train_timesteps {str(config['num_train_timesteps'])[:40]} is not supported: "
                          "the flow schedule's transformer time is 1000 t")
    dynamic = image_tokens is not None and bool(config.get("use_dynamic_shifting"))
    for key in FLOW_OPTIONS[dynamic:]:
        if config.get(key):
            raise ConfigError(f"{field}: {key}={str(config[key])[:40]} is not covered: of a FlowMatch scheduler only "
                              "a fixed shift is read (resolution-dependent shifting is Flux's)")
    try:
        shift = dynamic_shift(config, image_tokens) if dynamic else config.get("shift", 1.0)
        return FlowSchedule(shift), Prediction("velocity")
    except ConfigError as err:  # a shift that is not a positive number
        raise ConfigError(f"{field}: {err}") from None


def dynamic_shift(config: Mapping, image_tokens: int) -> float:
    """``FluxPipeline``'s resolution-dependent time shift: ``mu`` linear in the image's sequence length, from
    ``base_shift`` at ``base_image_seq_len`` to ``max_shift`` at ``max_image_seq_len`` (its ``calculate_shift``),
    then the scheduler's ``time_shift(mu, 1, t)``, ``e^mu / (e^mu + 1/t - 1)`` (``time_shift_type`` exponential,
    the default) or ``mu / (mu + 1/t - 1)`` (linear): the flow schedule's time shift with shift ``e^mu`` or ``mu``."""
    (n_0, n_1), (mu_0, mu_1) = ([check_number(key, config.get(key, default)) for key, default in pair] for pair in
                                ((("base_image_seq_len", 256), ("max_image_seq_len", 4096)),
                                 (("base_shift", 0.5), ("max_shift", 1.15))))
    if n_1 == n_0:
        raise ConfigError(f"base_image_seq_len and max_image_seq_len are both {n_0:g}: the shift has no slope")
    mu = mu_0 + (mu_1 - mu_0) * (image_tokens - n_0) / (n_1 - n_0)
    kind = config.get("time_shift_type", "exponential")
    if kind not in ("exponential", "linear"):
        raise ConfigError(f"time_shift_type {str(kind)[:40]!r} is not supported; supported: exponential, linear")
    return math.exp(mu) if kind == "exponential" else mu


def schedule_of(kind: str, config: Mapping, field: str, image_tokens: int | None = None
                ) -> tuple[NoiseSchedule, Prediction]:
    """The schedule and prediction of a ``kind`` pipeline's scheduler config: flow for SD3 and Flux (Flux's shift
    for ``image_tokens``), VP for SD and SDXL."""
    if kind in FLOW_PIPELINES:
        return flow_schedule_from_scheduler_config(config, field, image_tokens if kind == FLUX else None)
    return schedule_from_scheduler_config(config, field)


@dataclass
class TextToImage:
    """A loaded pipeline folder: the denoiser, its prompt encoder and what was read (for ``meta.json``)."""

    denoiser: LatentDenoiser
    prompt_encoder: PromptEncoder
    meta: dict = field(default_factory=dict)


def resolve_pipeline_folder(source: str, field: str = "--checkpoint", cache_dir: str | None = None) -> Path:
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
    covered = f"only {list(PIPELINES)} ({', '.join(PIPELINES.values())}) are covered"
    if not isinstance(kind, str):
        raise ConfigError(f"{field}: _class_name {str(kind)[:80]} names a custom pipeline, whose code is never run: "
                          f"{covered}")
    for name, entry in index.items():
        library = entry[0] if isinstance(entry, list) and entry and not name.startswith("_") else None
        if library is not None and library not in LIBRARIES:
            raise ConfigError(f"{field}: component {name[:40]!r} comes from {str(library)[:80]!r}, code that is "
                              f"never run: a pipeline's components come from {list(LIBRARIES)}")
    if kind in REFINERS:
        raise ConfigError(f"{field} is a {kind} pipeline (SDXL's refiner, image-to-image): out of scope, only "
                          f"text-to-image from noise is covered; give the base model's {SDXL} folder")
    if kind not in PIPELINES:
        raise ConfigError(f"{field} is a {kind[:80]} pipeline: {covered} (ControlNet, video ... are not)")
    if kind == SDXL and not isinstance(index.get("force_zeros_for_empty_prompt", True), bool):
        raise ConfigError(f"{field}: force_zeros_for_empty_prompt must be true or false, got "
                          f"{str(index['force_zeros_for_empty_prompt'])[:80]}")
    for name, (cls, what) in ENCODERS.get(kind, {}).items():
        entry = index.get(name)
        if not (isinstance(entry, list) and entry[-1:] == [cls]):
            raise ConfigError(f"{field}: {name} is {str(entry)[:80]}, not the {cls} whose {what} the "
                              f"{PIPELINES[kind]} backbone takes")
    t5 = index.get("text_encoder_3")
    if kind == SD3 and has_t5(index) and not (isinstance(t5, list) and t5[-1:] == ["T5EncoderModel"]):
        raise ConfigError(f"{field}: text_encoder_3 is {str(t5)[:80]}, not a T5EncoderModel "
                          "(or null: SD3 without T5)")
    return kind


def has_t5(index: dict) -> bool:
    """Whether an SD3 ``model_index.json`` names T5 (``text_encoder_3``; ``[null, null]`` or absent: no T5)."""
    return index.get("text_encoder_3") not in (None, [None, None])


def flux_latent_size(image_size: int | None, codec: LatentCodec) -> tuple[int, int]:
    """Flux's latent ``(H, W)``: ``FluxPipeline``'s default (``FLUX_LATENT_SIDE``), or square images of side
    ``image_size`` pixels, a multiple of twice the VAE's factor (the packed latents' 2x2 patches)."""
    if image_size is None:
        return FLUX_LATENT_SIDE, FLUX_LATENT_SIDE
    step = 2 * codec.downsample
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0 or image_size % step:
        raise ConfigError(f"image_size {image_size!r}: Flux's images must be a positive multiple of {step} pixels "
                          f"(the VAE's factor {codec.downsample} times the packed latents' 2x2 patches)")
    return image_size // codec.downsample, image_size // codec.downsample


def clip_pair(parts: dict) -> tuple[list, list]:
    """SDXL's and SD3's two CLIP tokenizers and text encoders."""
    return [parts["tokenizer"], parts["tokenizer_2"]], [parts["text_encoder"], parts["text_encoder_2"]]


def load_text_to_image(source: str, *, negative_prompt: str = "", gradient_checkpointing: bool = False,
                       field: str = "--checkpoint", cache_dir: str | None = None, image_size: int | None = None,
                       distilled_guidance: float | None = None, max_sequence_length: int | None = None
                       ) -> TextToImage:
    """A ``StableDiffusionPipeline`` (SD 1.x / 2.x), ``StableDiffusionXLPipeline`` (SDXL base),
    ``StableDiffusion3Pipeline`` (SD3, SD3.5; T5 optional) or ``FluxPipeline`` (Flux.1 dev, schnell) folder as a
    ``TextToImage``; one ConfigError line for a missing folder, another pipeline kind (SDXL's refiner, ControlNet
    ...), code in the folder, a missing or unloadable component or an unsupported scheduler or VAE. Every folder is
    vetted before a library reads it (``io.pretrained``). SDXL's ``force_zeros_for_empty_prompt`` is read from
    ``model_index.json``; its size ids are the pipeline's defaults (the UNet's sample size times the VAE's scale
    factor, no crop). SD3's scheduler ``shift`` becomes the flow schedule's (what ``--sampler
    diffusers:FlowMatchEulerDiscreteScheduler`` is built with); Flux's is the shift ``FluxPipeline`` computes for
    the image's sequence length (``use_dynamic_shifting``) or the fixed one. T5 runs at the pipeline's default
    ``max_sequence_length`` unless given (SD3 256, Flux 512, at most 512). Flux only: ``image_size``, the square
    images' side in pixels (default the pipeline's, 1024 with an 8x VAE), and ``distilled_guidance``, a
    guidance-distilled model's guidance input (default the pipeline's 3.5; refused for a model without)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    folder = resolve_pipeline_folder(source, field, cache_dir)
    if not (folder / "model_index.json").is_file():
        raise ConfigError(f"{field} {source} has no model_index.json: it is not a diffusers pipeline folder")
    configs = check_folder(folder, field, "diffusers pipeline folder", weights=False)
    index = configs["model_index.json"]
    kind = check_model_index(index, f"{field} {source}")
    components = (*COMPONENTS[kind], *(T5 if kind == SD3 and has_t5(index) else ()))
    missing = [name for name in components if not (folder / name).is_dir()]
    if missing:
        optional = f" (and {list(T5)} where model_index.json names T5)" if kind == SD3 else ""
        raise ConfigError(f"{field} {source} lacks the component folder(s) {missing}: a {kind} needs "
                          f"{list(COMPONENTS[kind])}{optional}")
    for name, value in (("image_size", image_size), ("distilled_guidance", distilled_guidance)):
        if value is not None and kind != FLUX:
            raise ConfigError(f"{field} {source}: {name} is read for {FLUX} folders only, not a {kind}")
    if max_sequence_length is not None and kind not in FLOW_PIPELINES:
        raise ConfigError(f"{field} {source}: max_sequence_length is T5's ({SD3}, {FLUX}); a {kind} has no T5")
    scheduler_config = check_folder(folder / "scheduler", field, "scheduler folder", weights=False).get(
        "scheduler_config.json")
    if scheduler_config is None:
        raise ConfigError(f"{field} {source}: scheduler/scheduler_config.json does not exist")
    flux = kind == FLUX
    loaders = {"unet": UNet2DConditionModel, "transformer": FluxTransformer2DModel if flux else SD3Transformer2DModel,
               "vae": AutoencoderKL, "text_encoder": CLIPTextModelWithProjection if kind == SD3 else CLIPTextModel,
               "tokenizer": CLIPTokenizer, "text_encoder_2": T5EncoderModel if flux else CLIPTextModelWithProjection,
               "tokenizer_2": T5TokenizerFast if flux else CLIPTokenizer, "text_encoder_3": T5EncoderModel,
               "tokenizer_3": T5TokenizerFast}
    low_memory = {"low_cpu_mem_usage": False}  # diffusers without accelerate
    parts = {name: load_pretrained(cls, folder / name, field, f"{cls.__name__} folder",
                                   **(low_memory if name in ("unet", "transformer", "vae") else {}))
             for name, cls in loaders.items() if name in components}
    if any(parts["vae"].config.get(key) is not None for key in ("latents_mean", "latents_std")):
        raise ConfigError(f"{field} {source}: the VAE normalises its latents by latents_mean/latents_std (Playground "
                          "v2.5 ...): only a scaling_factor and a shift_factor are covered")
    codec = LatentCodec(parts["vae"])
    try:
        if flux:
            net = FluxTransformer(parts["transformer"].eval(), flux_latent_size(image_size, codec), distilled_guidance,
                                  gradient_checkpointing)
            prompt_encoder = FluxPromptEncoder(parts["tokenizer"], parts["text_encoder"], parts["tokenizer_2"],
                                               parts["text_encoder_2"], max_sequence_length or T5_LIMIT)
        elif kind == SD3:
            net = SD3Transformer(parts["transformer"].eval(), gradient_checkpointing)
            t5 = (parts["tokenizer_3"], parts["text_encoder_3"]) if "text_encoder_3" in parts else None
            prompt_encoder = SD3PromptEncoder(*clip_pair(parts), t5, net.joint_attention_dim,
                                              max_sequence_length or T5_TOKENS)
        elif kind == SDXL:
            net = SDXLUNet(parts["unet"].eval(), gradient_checkpointing)
            _, height, width = codec.image_shape(net.data_shape)
            prompt_encoder = SDXLPromptEncoder(*clip_pair(parts), (height, width, 0, 0, height, width),
                                               index.get("force_zeros_for_empty_prompt", True))
        else:
            net = PromptUNet(parts["unet"].eval(), gradient_checkpointing)
            prompt_encoder = PromptEncoder(parts["tokenizer"], parts["text_encoder"])
    except ConfigError as err:  # the components do not fit together
        raise ConfigError(f"{field} {source}: {err}") from None
    schedule, prediction = schedule_of(kind, scheduler_config, f"{field} {source} scheduler",
                                       net.image_tokens if flux else None)
    try:
        denoiser = text_denoiser(net, schedule, prediction, codec, prompt_encoder.null(negative_prompt),
                                 prompt_encoder)
    except ConfigError as err:  # the encoders' widths do not fit the backbone's
        raise ConfigError(f"{field} {source}: {err}") from None
    shape = denoiser.conditioning.shape
    meta = {"pipeline": kind, "source": str(source), "prediction": prediction.kind,
            "scheduler": str(scheduler_config.get("_class_name"))[:80],
            "schedule": {key: value for key, value in vars(schedule).items() if key != "alpha_bar"},
            "latent_shape": list(denoiser.data_shape), "image_shape": list(denoiser.image_shape),
            "condition_shape": {key: list(part) for key, part in shape.items()} if isinstance(shape, dict)
            else list(shape), "prompt_tokens": prompt_encoder.max_length, "negative_prompt": negative_prompt,
            "latent_scale_shift": [codec.scale_factor, codec.shift_factor],
            "gradient_checkpointing": gradient_checkpointing}
    if kind == SDXL:
        meta |= {"time_ids": prompt_encoder.time_ids.tolist(),
                 "force_zeros_for_empty_prompt": prompt_encoder.force_zeros_for_empty_prompt}
    if kind in FLOW_PIPELINES:
        meta |= {"max_sequence_length": prompt_encoder.max_sequence_length}
    if kind == SD3:
        meta |= {"t5": prompt_encoder.t5_encoder is not None}
    if flux:
        meta |= {"distilled_guidance": net.guidance, "image_tokens": net.image_tokens,
                 "dynamic_shifting": bool(scheduler_config.get("use_dynamic_shifting"))}
    return TextToImage(denoiser.eval(), prompt_encoder, meta)


@register_source
class DiffusersSource(ModelSource):
    """A diffusers ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline`` or
    ``FluxPipeline`` folder or cached hub name (``load_text_to_image``, the family read from ``model_index.json``):
    its UNet or transformer under its scheduler's schedule and prediction, its VAE's latents and its prompt encoder
    (``PromptEmbeddings.make``, SDXL's, SD3's and Flux's ``PromptParts.make``)."""

    name, what = "diffusers", "diffusers pipeline folder"
    priority = 10  # first: a pipeline folder is recognised by its model_index.json
    options = ("negative_prompt", "gradient_checkpointing")
    option_hint = "a diffusers text-to-image pipeline (--checkpoint), not a {what}"

    def claims(self, spec: ModelSpec) -> bool:
        return spec.model is None and spec.checkpoint is not None and is_pipeline(spec.checkpoint)

    def check(self, spec: ModelSpec) -> None:
        super().check(spec)
        if spec.vae is not None:
            raise ConfigError(f"--vae: a diffusers pipeline brings its own VAE ({spec.field} {spec.checkpoint}/vae); "
                              "leave --vae unset")

    def location(self, spec: ModelSpec) -> str:
        return str(resolve_pipeline_folder(spec.checkpoint, spec.field))

    def read(self, spec: ModelSpec) -> TextToImage:
        return load_text_to_image(spec.checkpoint, negative_prompt=spec.negative_prompt,
                                  gradient_checkpointing=spec.gradient_checkpointing, field=spec.field)

    def denoiser(self, spec: ModelSpec, contents: TextToImage) -> Denoiser:
        return contents.denoiser
