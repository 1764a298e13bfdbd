"""SD3 / SD3.5 (``StableDiffusion3Pipeline``) over tiny random components built from configs, as diffusers' own SD3
pipeline tests build them, with a T5 tokenizer over a local vocabulary (nothing downloaded): the chain reproduces
the pipeline with REG off (its ``FlowMatchEulerDiscreteScheduler`` through the scheduler adapter, with the folder's
shift), the prompt encoder is ``encode_prompt`` with and without T5, REG equals a float64 hand computation on the
transformer, and a saved folder samples through ``sample.py`` with its errors in one line."""

import copy
import shutil

import numpy as np
import pytest
import torch
from helpers import (CLIP_TOKENS, HAND_METHODS, LATENT, PROMPTS, T5_WIDTH, check_flow_reg_by_hand, check_prompt_parts,
                     edit_json, joint_prompt_embeds, local_t5_tokenizer, make_sd3_components,
                     refuse_edited_pipeline)
from helpers import SD3_SHIFT as SHIFT  # the builder's scheduler shift

from lightning_reg.diffusion.latent import LatentCodec
from lightning_reg.diffusion.samplers import get_sampler
from lightning_reg.diffusion.schedulers import Scheduled
from lightning_reg.diffusion.schedules import FlowSchedule
from lightning_reg.errors import ConfigError
from lightning_reg.guidance import GuidedDenoiser, make_guidance
from lightning_reg.models.stable_diffusion import SD3PromptEncoder, SD3Transformer, text_denoiser
from lightning_reg.sampling.cli import main as sample_main
from lightning_reg.sampling.engine import generate
from lightning_reg.sources.diffusers import flow_schedule_from_scheduler_config, load_text_to_image

EULER = "diffusers:FlowMatchEulerDiscreteScheduler"
T5_TOKENS = 256
SHAPE = {"prompt_embeds": (CLIP_TOKENS + T5_TOKENS, T5_WIDTH), "pooled_projections": (12,)}  # CLIP 8 + 12, pooled 6 + 6
WITH_T5 = [True, False]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def t5_tokenizer():
    return local_t5_tokenizer()


def without_t5(parts: dict) -> dict:
    return {**parts, "text_encoder_3": None, "tokenizer_3": None}


def sd3_pipeline(parts: dict):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def our_encoder(parts: dict) -> SD3PromptEncoder:
    t5 = (parts["tokenizer_3"], parts["text_encoder_3"]) if parts["text_encoder_3"] is not None else None
    return SD3PromptEncoder([parts["tokenizer"], parts["tokenizer_2"]],
                            [parts["text_encoder"], parts["text_encoder_2"]], t5, T5_WIDTH)


def our_denoiser(parts: dict, null: dict):
    scheduler = parts["scheduler"]  # its config as saved: with its class
    schedule, prediction = flow_schedule_from_scheduler_config({"_class_name": type(scheduler).__name__,
                                                                **scheduler.config})
    return text_denoiser(SD3Transformer(parts["transformer"]), schedule, prediction, LatentCodec(parts["vae"]),
                         null).eval()


@pytest.fixture(scope="module")
def sd3_parts(clip_tokenizer, t5_tokenizer):
    return make_sd3_components(clip_tokenizer, t5_tokenizer)


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory, sd3_parts):
    folder = tmp_path_factory.mktemp("sd3") / "tiny-sd3"
    sd3_pipeline(sd3_parts).save_pretrained(folder)
    return folder


def record_timesteps(transformer, seen: list):
    """A hook recording the one ``timestep`` of each transformer call."""
    def hook(module, args, kwargs):
        timestep = kwargs["timestep"]
        assert (timestep == timestep[0]).all()
        seen.append(timestep[0].clone())
    return transformer.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("t5", WITH_T5)
@pytest.mark.parametrize("negative", ["", "blurry"])
def test_reg_off_reproduces_the_sd3_pipeline(sd3_parts, t5, negative):
    """REG off, CFG at w2 = guidance_scale: our chain through the scheduler adapter (SD3's FlowMatch Euler, its shift
    3 taken from the schedule the scheduler config gave, no sampler options) gives the pipeline's latents and images
    from the same embeddings and initial latents; the transformer sees the pipeline's timesteps (sigma * 1000)."""
    parts = sd3_parts if t5 else without_t5(sd3_parts)
    encoder = our_encoder(parts)
    y, null = encoder(PROMPTS), encoder.null(negative)
    latents = torch.randn(len(PROMPTS), *LATENT, generator=torch.Generator().manual_seed(3))
    call = dict(**joint_prompt_embeds(y, null), latents=latents, num_inference_steps=5, guidance_scale=4.5)
    pipe = sd3_pipeline(parts)
    theirs_timesteps, our_timesteps = [], []
    hook = record_timesteps(parts["transformer"], theirs_timesteps)
    theirs = pipe(**call, output_type="latent").images
    hook.remove()
    theirs_images = pipe(**call, output_type="pt").images

    denoiser = our_denoiser(parts, null)
    assert denoiser.schedule == FlowSchedule(SHIFT)
    guided = GuidedDenoiser(denoiser, make_guidance("cfg", scale=4.5, convention="w2"), y)
    hook = record_timesteps(parts["transformer"], our_timesteps)
    ours = get_sampler(EULER)(guided, latents, denoiser.schedule, 5, prediction=denoiser.prediction.kind)
    hook.remove()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((denoiser.decode(ours) / 2 + 0.5).clamp(0, 1), theirs_images, rtol=1e-4, atol=1e-5)
    assert (ours - latents).abs().max() > 0.1  # a real chain
    distinct = list(dict.fromkeys(float(t) for t in our_timesteps))
    assert distinct == [float(t) for t in theirs_timesteps] == [float(t) for t in pipe.scheduler.timesteps]
    assert distinct[0] == 1000.0 and distinct[1] > 1000 * 0.8  # shifted: uniform 0.8 -> 0.923


@pytest.mark.parametrize("t5", WITH_T5)
@pytest.mark.parametrize("negative", ["", "blurry"])
def test_prompt_encoder_is_the_pipeline_s(sd3_parts, t5, negative):
    """Both parts of a list of prompts and of the null condition equal ``encode_prompt``'s (our empty negative prompt
    is the pipeline's ``negative_prompt=None``, which it encodes as ""); without T5 its tokens are zeros."""
    parts = sd3_parts if t5 else without_t5(sd3_parts)
    pipe, encoder = sd3_pipeline(parts), our_encoder(parts)
    y, null = encoder(PROMPTS), encoder.null(negative)
    check_prompt_parts(y, null, pipe.encode_prompt(PROMPTS, None, None, negative_prompt=negative or None),
                       "pooled_projections", SHAPE)
    assert (y["prompt_embeds"][:, CLIP_TOKENS:].abs().max() > 0) == t5
    assert y["prompt_embeds"][:, :CLIP_TOKENS, 20:].abs().max() == 0  # CLIP's 8 + 12 zero-padded to T5's 32
    if t5:
        with pytest.warns(UserWarning) as caught:  # CLIP's 16 and T5's 256
            encoder(["short", "long " * 80])
        assert any("more than the text encoder's 256: truncated" in str(w.message) for w in caught)


def velocity(transformer, x, t, y):
    """The bare transformer's flow velocity at ``x`` and time ``t`` (``timestep = 1000 t``, as the pipeline)."""
    return transformer(hidden_states=x, timestep=torch.full((len(x),), 1000 * t, dtype=x.dtype),
                       encoder_hidden_states=y["prompt_embeds"], pooled_projections=y["pooled_projections"]).sample


@pytest.mark.parametrize("method, extra", HAND_METHODS)
@pytest.mark.parametrize("reg", ["paper", "vjp"])
def test_reg_matches_a_float64_hand_computation_on_the_sd3_transformer(sd3_parts, method, extra, reg):
    """Flow: ``x0 = x - t v``, ``a_t = 1 - t``. paper: ``x0_c + a_t grad_x(1^T x0_c) ⊙ g``; vjp: ``x0_c + a_t J^T g``
    (``J = d x0_c / d x``), ``g`` the method's term, the null condition the empty prompt's parts; by autograd on the
    bare transformer in float64 at three times, compared in velocity units (``check_flow_reg_by_hand``)."""
    encoder = our_encoder(sd3_parts)
    y32, null32 = encoder(PROMPTS), encoder.null("")
    y, null = ({key: value.double() for key, value in parts.items()} for parts in (y32, null32))
    denoiser = copy.deepcopy(our_denoiser(sd3_parts, null32)).double()
    transformer = denoiser.net.transformer
    x = torch.randn(len(PROMPTS), *LATENT, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    check_flow_reg_by_hand(denoiser, lambda x, t, y: velocity(transformer, x, t, y), x, y, null, method, extra, reg)


def test_the_flow_schedule_s_shift_and_the_vae_s_shift_factor(sd3_parts):
    """``FlowSchedule(shift)`` samples SD3's shifted grid (shift 1: the uniform one) and builds the adapter's FlowMatch
    scheduler with it, which a ``shift`` sampler option replaces; the codec maps latents as the pipeline does."""
    u = torch.linspace(1, 0, 5, dtype=torch.float64)
    torch.testing.assert_close(FlowSchedule(SHIFT).sampling_times(4), SHIFT * u / (1 + (SHIFT - 1) * u))
    assert torch.equal(FlowSchedule().sampling_times(4), u)
    for bad in (0.0, -1.0, "3"):
        with pytest.raises(ConfigError, match="shift must be"):
            FlowSchedule(bad)
    euler = EULER.removeprefix("diffusers:")
    assert Scheduled(euler, FlowSchedule(SHIFT), 4, prediction="velocity").scheduler.config.shift == SHIFT
    assert Scheduled(euler, FlowSchedule(SHIFT), 4, {"shift": 1.0}).scheduler.config.shift == 1.0
    dpm = Scheduled("DPMSolverMultistepScheduler", FlowSchedule(SHIFT), 4, prediction="velocity").scheduler
    assert dpm.config.flow_shift == SHIFT and dpm.config.use_flow_sigmas

    vae, codec = sd3_parts["vae"], LatentCodec(sd3_parts["vae"])
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(2))
    latents = codec.encode(images, torch.Generator().manual_seed(2))
    torch.testing.assert_close(latents, (z - 0.0609) * 1.5305)
    with torch.no_grad():
        torch.testing.assert_close(codec.decode(latents), vae.decode(latents / 1.5305 + 0.0609).sample)


def test_a_saved_sd3_folder_loads_and_samples_through_sample_py(sd3_folder, sd3_parts, tmp_path):
    """load_text_to_image reads the folder (the scheduler's shift into the flow schedule, T5 as model_index.json
    names it; REG the same with gradient checkpointing); sample.py --checkpoint FOLDER --prompts FILE with the
    folder's FlowMatch Euler and REG paper writes generate()'s samples over the captions."""
    loaded = load_text_to_image(str(sd3_folder))
    meta = loaded.meta
    assert meta["pipeline"] == "StableDiffusion3Pipeline" and meta["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert meta["schedule"] == {"shift": SHIFT} and meta["prediction"] == "velocity"
    assert meta["condition_shape"] == {key: list(shape) for key, shape in SHAPE.items()}
    assert meta["t5"] is True and meta["max_sequence_length"] == T5_TOKENS
    assert meta["latent_scale_shift"] == [1.5305, 0.0609] and meta["image_shape"] == [3, 16, 16]
    y = loaded.denoiser.conditioning.make(PROMPTS)
    for key, value in our_encoder(sd3_parts)(PROMPTS).items():
        torch.testing.assert_close(y[key], value, rtol=0, atol=0)
    checkpointed = load_text_to_image(str(sd3_folder), gradient_checkpointing=True).denoiser
    x, t = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(6)), torch.tensor(0.7, dtype=torch.float64)
    torch.testing.assert_close(*(GuidedDenoiser(denoiser, make_guidance("cfg", scale=2.0, reg="paper"), y)(x, t)
                                 for denoiser in (checkpointed, loaded.denoiser)), rtol=1e-5, atol=1e-6)

    prompts = tmp_path / "captions.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    sample_main(["--checkpoint", str(sd3_folder), "--prompts", str(prompts), "--output", str(out), "--num_samples",
                 "2", "--batch_size", "2", "--steps", "3", "--seed", "4", "--sampler", EULER, "--guidance",
                 "{method: cfg, scale: 2.0, reg: paper}"])
    with np.load(out / "samples.npz") as f:
        samples = f["arr_0"]
    assert samples.shape == (2, 16, 16, 3) and samples.dtype == np.uint8
    assert (out / "prompts.txt").read_text().splitlines() == PROMPTS
    expected = generate(loaded.denoiser, make_guidance("cfg", scale=2.0, reg="paper"), y, range(2), sampler=EULER,
                        steps=3, seed=4, batch_size=2)
    assert np.abs(samples.astype(int) - ((expected.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()).max() <= 1


def test_an_sd3_folder_without_t5_loads(sd3_parts, tmp_path):
    """``text_encoder_3: [null, null]`` (diffusers' SD3 without T5): T5's tokens are zeros of the transformer's
    joint attention width."""
    folder = tmp_path / "no-t5"
    sd3_pipeline(without_t5(sd3_parts)).save_pretrained(folder)
    loaded = load_text_to_image(str(folder), negative_prompt="blurry")
    assert loaded.meta["t5"] is False
    assert loaded.meta["condition_shape"]["prompt_embeds"] == list(SHAPE["prompt_embeds"])
    null = loaded.denoiser.conditioning.null(loaded.denoiser.conditioning.make(PROMPTS))
    expected = our_encoder(without_t5(sd3_parts)).null("blurry")
    torch.testing.assert_close(null["prompt_embeds"][0], expected["prompt_embeds"], rtol=0, atol=0)
    assert null["prompt_embeds"][:, CLIP_TOKENS:].abs().max() == 0


@pytest.mark.parametrize("edit, message", [
    (lambda f: edit_json(f / "model_index.json", _class_name="StableDiffusion3ControlNetPipeline"),
     r"is a StableDiffusion3ControlNetPipeline pipeline: only .*\(ControlNet, video ... are not\)"),
    (lambda f: shutil.rmtree(f / "transformer"),
     r"lacks the component folder\(s\) \['transformer'\]: a StableDiffusion3Pipeline needs"),
])
def test_controlnet_and_a_missing_transformer_are_refused_by_sample_py(sd3_folder, tmp_path, refused, edit, message):
    refuse_edited_pipeline(refused, sd3_folder, tmp_path, edit, message, "--sampler", EULER)


def narrow_t5(folder):
    """text_encoder_3 replaced by a T5 of width 24 (the transformer's joint attention takes 32)."""
    from transformers import T5Config, T5EncoderModel

    shutil.rmtree(folder / "text_encoder_3")
    config = T5Config(vocab_size=98, d_model=24, d_kv=8, d_ff=16, num_layers=1, num_heads=2, pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(config).save_pretrained(folder / "text_encoder_3")


@pytest.mark.parametrize("edit, message", [
    (lambda f: shutil.rmtree(f / "tokenizer_3"), r"lacks the component folder\(s\) \['tokenizer_3'\]"),
    (lambda f: edit_json(f / "model_index.json", text_encoder=["transformers", "CLIPTextModel"]),
     r"text_encoder is \['transformers', 'CLIPTextModel'\], not the CLIPTextModelWithProjection"),
    (lambda f: edit_json(f / "model_index.json", text_encoder_3=["transformers", "UMT5EncoderModel"]),
     r"text_encoder_3 is \['transformers', 'UMT5EncoderModel'\], not a T5EncoderModel"),
    (lambda f: edit_json(f / "scheduler" / "scheduler_config.json", use_dynamic_shifting=True),
     "use_dynamic_shifting=True is not covered: of a FlowMatch scheduler only a fixed shift is read"),
    (lambda f: edit_json(f / "scheduler" / "scheduler_config.json", _class_name="EulerDiscreteScheduler"),
     "EulerDiscreteScheduler is not a FlowMatch scheduler"),
    (lambda f: edit_json(f / "vae" / "config.json", latents_mean=[0.0] * 4, latents_std=[1.0] * 4),
     "the VAE normalises its latents by latents_mean/latents_std"),
    (narrow_t5, r"prompt_embeds have width 24 but the transformer takes 32 \(joint attention\)"),
])
def test_bad_sd3_folders_one_line(sd3_folder, tmp_path, edit, message):
    folder = shutil.copytree(sd3_folder, tmp_path / "pipe")
    edit(folder)
    with pytest.raises(ConfigError, match=message) as err:
        load_text_to_image(str(folder))
    assert "\n" not in str(err.value)
