"""Flux.1 (``FluxPipeline``) over tiny random components built from configs, as diffusers' own Flux pipeline tests
build them, with tokenizers over local vocabularies (nothing downloaded): with REG off the chain reproduces the
pipeline's true CFG (``true_cfg_scale`` with a negative prompt) from the same embeddings and initial latents, for a
guidance-distilled model (dev: distilled guidance input, resolution-dependent time shift) and one without (schnell);
the prompt encoder is ``encode_prompt``; REG equals a float64 hand computation on the bare transformer; a saved
folder loads and is detected by ``sample.py``, with its errors in one line."""

import copy
import math
import shutil

import numpy as np
import pytest
import torch
from helpers import (CLIP_WIDTH, HAND_METHODS, PROMPTS, T5_WIDTH, check_flow_reg_by_hand, edit_json,
                     joint_prompt_embeds, local_t5_tokenizer, make_flux_components, refuse_edited_pipeline)

from lightning_reg.diffusion.latent import LatentCodec
from lightning_reg.diffusion.samplers import get_sampler
from lightning_reg.diffusion.schedules import FlowSchedule
from lightning_reg.errors import ConfigError
from lightning_reg.guidance import GuidedDenoiser, make_guidance
from lightning_reg.models.stable_diffusion import FluxPromptEncoder, FluxTransformer, text_denoiser
from lightning_reg.sampling.cli import main as sample_main
from lightning_reg.sampling.engine import generate
from lightning_reg.sources.diffusers import flow_schedule_from_scheduler_config, load_text_to_image

LATENT = (4, 8, 8)  # 16 packed tokens of 16 values; 16x16 images through a VAE of factor 2
IMAGE = 16
T5_TOKENS = 24
SHAPE = {"prompt_embeds": (T5_TOKENS, T5_WIDTH), "pooled_projections": (CLIP_WIDTH,)}
DEV_SHIFT = math.exp(0.5 + 0.65 * (16 - 256) / (4096 - 256))  # FluxPipeline's calculate_shift at 16 tokens
MODELS = ["dev", "schnell"]
pytestmark = pytest.mark.usefixtures("one_thread")


def flux_pipeline(parts: dict):
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def our_encoder(parts: dict) -> FluxPromptEncoder:
    return FluxPromptEncoder(parts["tokenizer"], parts["text_encoder"], parts["tokenizer_2"], parts["text_encoder_2"],
                             T5_TOKENS)


def our_denoiser(parts: dict, null: dict):
    net = FluxTransformer(parts["transformer"], LATENT[1:])
    scheduler = parts["scheduler"]  # its config as saved: with its class
    schedule, prediction = flow_schedule_from_scheduler_config({"_class_name": type(scheduler).__name__,
                                                                **scheduler.config}, image_tokens=net.image_tokens)
    return text_denoiser(net, schedule, prediction, LatentCodec(parts["vae"]), null).eval()


@pytest.fixture(scope="module")
def t5_tokenizer():
    return local_t5_tokenizer()


@pytest.fixture(scope="module")
def flux_parts(clip_tokenizer, t5_tokenizer):
    return {model: make_flux_components(clip_tokenizer, t5_tokenizer, model) for model in MODELS}


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory, flux_parts):
    folder = tmp_path_factory.mktemp("flux") / "tiny-flux-dev"
    flux_pipeline(flux_parts["dev"]).save_pretrained(folder)
    return folder


def pack(latents):
    from diffusers import FluxPipeline

    return FluxPipeline._pack_latents(latents, len(latents), *latents.shape[1:])


def unpack(tokens):
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(tokens, IMAGE, IMAGE, 2)


def record_timesteps(transformer, seen: list):
    """A hook recording the one ``timestep`` (the flow time) and ``guidance`` of each transformer call."""
    def hook(module, args, kwargs):
        timestep, guidance = kwargs["timestep"], kwargs["guidance"]
        assert (timestep == timestep[0]).all()
        seen.append((float(timestep[0]), None if guidance is None else guidance.tolist()))
    return transformer.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("negative", ["", "blurry"])
def test_reg_off_reproduces_the_flux_pipeline_s_true_cfg(flux_parts, model, negative):
    """REG off, CFG at w2 = true_cfg_scale with the negative prompt's parts as the reference: our flow_euler over the
    folder's schedule (dev: the shift FluxPipeline computes for 16 tokens; schnell: none) gives the pipeline's
    latents and images from the same embeddings and initial latents; the transformer sees the pipeline's times and,
    for dev, its distilled guidance 3.5 in both branches."""
    parts = flux_parts[model]
    encoder = our_encoder(parts)
    y, null = encoder(PROMPTS), encoder.null(negative)
    latents = torch.randn(len(PROMPTS), *LATENT, generator=torch.Generator().manual_seed(3))
    call = dict(**joint_prompt_embeds(y, null), latents=pack(latents), height=IMAGE, width=IMAGE,
                num_inference_steps=4, true_cfg_scale=3.0)
    pipe = flux_pipeline(parts)
    theirs_calls, our_calls = [], []
    hook = record_timesteps(parts["transformer"], theirs_calls)
    theirs = unpack(pipe(**call, output_type="latent").images)
    hook.remove()
    theirs_images = pipe(**call, output_type="pt").images

    denoiser = our_denoiser(parts, null)
    assert denoiser.schedule == FlowSchedule(DEV_SHIFT if model == "dev" else 1.0)
    guided = GuidedDenoiser(denoiser, make_guidance("cfg", scale=3.0, convention="w2"), y)
    hook = record_timesteps(parts["transformer"], our_calls)
    ours = get_sampler("flow_euler")(guided, latents, denoiser.schedule, 4)
    hook.remove()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((denoiser.decode(ours) / 2 + 0.5).clamp(0, 1), theirs_images, rtol=1e-4, atol=1e-5)
    assert (ours - latents).abs().max() > 0.1  # a real chain
    assert len(our_calls) == len(theirs_calls) == 8  # two branches a step
    for (ours_t, ours_g), (theirs_t, theirs_g) in zip(our_calls, theirs_calls):
        assert ours_t == pytest.approx(theirs_t, rel=1e-6) and ours_g == theirs_g
    assert theirs_calls[0][1] == ([3.5, 3.5] if model == "dev" else None)


def test_prompt_encoder_is_the_pipeline_s(flux_parts):
    """Both parts of a list of prompts and of a negative prompt equal ``encode_prompt``'s (its text ids are zeros,
    which the backbone makes itself); a prompt longer than T5's max_sequence_length is truncated with a warning,
    as diffusers does."""
    parts = flux_parts["dev"]
    pipe, encoder = flux_pipeline(parts), our_encoder(parts)
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, max_sequence_length=T5_TOKENS)
    y = encoder(PROMPTS)
    assert {key: tuple(value.shape[1:]) for key, value in y.items()} == SHAPE
    torch.testing.assert_close(y["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(y["pooled_projections"], pooled, rtol=0, atol=0)
    assert text_ids.abs().max() == 0 and text_ids.shape == (T5_TOKENS, 3)
    negative_embeds, negative_pooled, _ = pipe.encode_prompt("blurry", None, max_sequence_length=T5_TOKENS)
    null = encoder.null("blurry")
    torch.testing.assert_close(null["prompt_embeds"], negative_embeds[0], rtol=0, atol=0)
    torch.testing.assert_close(null["pooled_projections"], negative_pooled[0], rtol=0, atol=0)
    with pytest.warns(UserWarning) as caught:  # CLIP's 16 tokens and T5's 24
        long = encoder(["a seven", "a seven " * 4])  # 6 CLIP tokens and 5 to 6 T5 tokens a repeat
    assert [str(w.message).split(":")[0] for w in caught] == [
        "prompt 1 has 26 tokens, more than the text encoder's 16", "prompt 1 has 25 tokens, more than the text "
        f"encoder's {T5_TOKENS}"]
    assert long["prompt_embeds"].shape[1] == T5_TOKENS


def velocity(transformer, x, t, y):
    """The bare transformer's flow velocity at latents ``x`` and time ``t``, as ``FluxPipeline`` calls it: latents
    packed and ids by the pipeline's own helpers, ``timestep = t``, the distilled guidance 3.5 (dev)."""
    from diffusers import FluxPipeline

    rows, cols = x.shape[2] // 2, x.shape[3] // 2
    guidance = torch.full((len(x),), 3.5, dtype=x.dtype) if transformer.config.guidance_embeds else None
    out = transformer(hidden_states=pack(x), timestep=torch.full((len(x),), t, dtype=x.dtype), guidance=guidance,
                      encoder_hidden_states=y["prompt_embeds"], pooled_projections=y["pooled_projections"],
                      txt_ids=torch.zeros(y["prompt_embeds"].shape[1], 3, dtype=x.dtype),
                      img_ids=FluxPipeline._prepare_latent_image_ids(len(x), rows, cols, x.device, x.dtype)).sample
    return unpack(out)


@pytest.mark.parametrize("method, extra", HAND_METHODS)
@pytest.mark.parametrize("reg", ["paper", "vjp"])
def test_reg_matches_a_float64_hand_computation_on_the_flux_transformer(flux_parts, method, extra, reg):
    """REG paper and vjp on the dev model (true CFG, and APG, against the empty prompt's parts) equal autograd on the
    bare transformer in float64 at three times, in velocity units (``check_flow_reg_by_hand``): the distilled
    guidance input is a constant of both branches."""
    encoder = our_encoder(flux_parts["dev"])
    y32, null32 = encoder(PROMPTS), encoder.null("")
    y, null = ({key: value.double() for key, value in parts.items()} for parts in (y32, null32))
    denoiser = copy.deepcopy(our_denoiser(flux_parts["dev"], null32)).double()
    transformer = denoiser.net.transformer
    x = torch.randn(len(PROMPTS), *LATENT, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    check_flow_reg_by_hand(denoiser, lambda x, t, y: velocity(transformer, x, t, y), x, y, null, method, extra, reg)


def test_reg_without_true_cfg_on_a_distilled_model_is_refused(flux_parts):
    """dev with guidance weight 0 (its distilled guidance only): REG has no term to rectify, refused in one line;
    schnell (no distilled guidance) and dev with true CFG are not refused."""
    y = our_encoder(flux_parts["dev"])(PROMPTS)
    dev, schnell = (our_denoiser(flux_parts[model], {key: value[0] for key, value in y.items()}) for model in MODELS)
    with pytest.raises(ConfigError, match=r"reg: paper on a guidance-distilled Flux model without true CFG: its "
                                          r"distilled guidance \(3.5\) is a model input") as err:
        GuidedDenoiser(dev, make_guidance("cfg", scale=0.0, reg="paper"), y)
    assert "\n" not in str(err.value)
    for denoiser, guidance in ((schnell, make_guidance("cfg", scale=0.0, reg="paper")),
                               (dev, make_guidance("cfg", scale=1.5, convention="w2", reg="paper")),
                               (dev, make_guidance("cfg", scale=0.0))):
        GuidedDenoiser(denoiser, guidance, y)


def test_a_saved_flux_folder_loads_and_is_sampled_from_python(flux_folder, flux_parts):
    """load_text_to_image reads the folder as data: FluxPipeline from model_index.json, the dynamic shift for the
    image's 16 tokens, the distilled guidance (3.5 by default, or given), T5 at the pipeline's 512 tokens or given;
    the denoiser's conditions are our encoder's; REG with gradient checkpointing equals REG without."""
    loaded = load_text_to_image(str(flux_folder), image_size=IMAGE, max_sequence_length=T5_TOKENS)
    meta = loaded.meta
    assert meta["pipeline"] == "FluxPipeline" and meta["prediction"] == "velocity"
    assert meta["schedule"] == {"shift": pytest.approx(DEV_SHIFT, rel=1e-12)} and meta["dynamic_shifting"] is True
    assert meta["condition_shape"] == {key: list(shape) for key, shape in SHAPE.items()}
    assert meta["distilled_guidance"] == 3.5 and meta["image_tokens"] == 16 and meta["max_sequence_length"] == T5_TOKENS
    assert meta["latent_shape"] == list(LATENT) and meta["image_shape"] == [3, IMAGE, IMAGE]
    assert meta["latent_scale_shift"] == [0.3611, 0.1159]
    y = loaded.denoiser.conditioning.make(PROMPTS)
    for key, value in our_encoder(flux_parts["dev"])(PROMPTS).items():
        torch.testing.assert_close(y[key], value, rtol=0, atol=0)
    checkpointed = load_text_to_image(str(flux_folder), image_size=IMAGE, max_sequence_length=T5_TOKENS,
                                      gradient_checkpointing=True).denoiser
    x, t = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(6)), torch.tensor(0.7, dtype=torch.float64)
    guidance = make_guidance("cfg", scale=2.0, convention="w2", reg="paper")
    torch.testing.assert_close(*(GuidedDenoiser(denoiser, guidance, y)(x, t) for denoiser in (checkpointed,
                                                                                              loaded.denoiser)),
                               rtol=1e-5, atol=1e-6)
    other = load_text_to_image(str(flux_folder), image_size=2 * IMAGE, distilled_guidance=5.0)
    assert other.meta["distilled_guidance"] == 5.0 and other.meta["max_sequence_length"] == 512
    assert other.meta["latent_shape"] == [4, 16, 16] and other.meta["image_tokens"] == 64
    assert other.denoiser.schedule.shift > DEV_SHIFT  # more tokens, more shift
    samples = generate(loaded.denoiser, guidance, y, range(2), sampler="flow_euler", steps=2, seed=4, batch_size=2)
    assert samples.shape == (2, 3, IMAGE, IMAGE) and torch.isfinite(samples).all()


def test_sample_py_detects_flux_and_refuses_reg_without_true_cfg(flux_folder, tmp_path, refused):
    """sample.py --checkpoint FOLDER --prompts FILE reads FluxPipeline from model_index.json and refuses REG on the
    distilled model at guidance weight 0 in one line, before sampling (nothing written)."""
    refuse_edited_pipeline(refused, flux_folder, tmp_path, lambda folder: None,
                           r"reg: vjp on a guidance-distilled Flux model without true CFG", "--guidance",
                           "{method: cfg, scale: 0.0, reg: vjp}")


@pytest.mark.slow  # Flux's default size: 4096 image tokens, ~15 s on the shared CPU
def test_sample_py_samples_a_flux_folder_at_its_default_size(flux_folder, tmp_path):
    """sample.py --checkpoint FOLDER --prompts FILE on the dev folder (no size given: the pipeline's default 128x128
    latents, 256 px through this VAE) with true CFG and REG paper writes generate()'s sample of the caption."""
    prompts = tmp_path / "captions.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    out = tmp_path / "out"
    guidance = "{method: cfg, scale: 2.0, convention: w2, reg: paper}"
    sample_main(["--checkpoint", str(flux_folder), "--prompts", str(prompts), "--output", str(out), "--num_samples",
                 "1", "--steps", "1", "--seed", "4", "--sampler", "flow_euler", "--guidance", guidance])
    with np.load(out / "samples.npz") as f:
        samples = f["arr_0"]
    assert samples.shape == (1, 256, 256, 3) and samples.dtype == np.uint8
    loaded = load_text_to_image(str(flux_folder))
    expected = generate(loaded.denoiser, make_guidance("cfg", scale=2.0, convention="w2", reg="paper"),
                        loaded.denoiser.conditioning.make(PROMPTS[:1]), range(1), sampler="flow_euler", steps=1, seed=4,
                        batch_size=1)
    assert np.abs(samples.astype(int) - ((expected.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()).max() <= 1


@pytest.mark.parametrize("edit, message", [
    (lambda f: shutil.rmtree(f / "text_encoder_2"),
     r"lacks the component folder\(s\) \['text_encoder_2'\]: a FluxPipeline needs \['transformer', 'vae', "),
    (lambda f: edit_json(f / "model_index.json", text_encoder_2=["transformers", "CLIPTextModelWithProjection"]),
     r"text_encoder_2 is \['transformers', 'CLIPTextModelWithProjection'\], not the T5EncoderModel whose hidden "
     r"states the Flux.1 backbone takes"),
])
def test_bad_flux_folders_are_refused_by_sample_py(flux_folder, tmp_path, refused, edit, message):
    refuse_edited_pipeline(refused, flux_folder, tmp_path, edit, message)


@pytest.mark.parametrize("edit, options, message", [
    (None, {"image_size": 18}, r"image_size 18: Flux's images must be a positive multiple of 4 pixels"),
    (None, {"max_sequence_length": 600}, r"Flux's max_sequence_length must be an integer in \[1, 512\]"),
    (lambda f: edit_json(f / "scheduler" / "scheduler_config.json", time_shift_type="cosine"),
     {}, "time_shift_type 'cosine' is not supported; supported: exponential, linear"),
    (lambda f: edit_json(f / "scheduler" / "scheduler_config.json", shift_terminal=0.1),
     {}, "shift_terminal=0.1 is not covered"),
    (lambda f: edit_json(f / "transformer" / "config.json", guidance_embeds=False),
     {"distilled_guidance": 4.0}, r"distilled guidance 4.0: the transformer takes no guidance input"),
])
def test_bad_flux_folders_and_options_one_line(flux_folder, tmp_path, edit, options, message):
    folder = shutil.copytree(flux_folder, tmp_path / "pipe")
    if edit is not None:
        edit(folder)
    with pytest.raises(ConfigError, match=message) as err:
        load_text_to_image(str(folder), **options)
    assert "\n" not in str(err.value)


def test_flux_options_are_refused_for_other_families(tiny_pipeline):
    with pytest.raises(ConfigError, match="image_size is read for FluxPipeline folders only, not a "
                                          "StableDiffusionPipeline"):
        load_text_to_image(str(tiny_pipeline), image_size=64)
