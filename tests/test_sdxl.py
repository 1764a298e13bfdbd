"""SDXL (``StableDiffusionXLPipeline``, base model) over tiny random components built from configs, as diffusers'
own SDXL pipeline tests build them (nothing downloaded): the chain reproduces the pipeline with REG off (its
default ``EulerDiscreteScheduler`` through the scheduler adapter, and DDIM), the prompt encoder and size ids are
the pipeline's, REG equals a hand computation on the UNet, and a saved folder samples through ``sample.py`` with
its errors in one line."""

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import (LATENT, PROMPTS, check_prompt_parts, edit_json, make_sdxl_components, refuse_edited_pipeline,
                     reg_eps_by_hand)

from lightning_reg.diffusion.latent import LatentCodec
from lightning_reg.diffusion.predictions import eps_from_x0
from lightning_reg.diffusion.samplers import get_sampler
from lightning_reg.errors import ConfigError
from lightning_reg.guidance import GuidedDenoiser, make_guidance
from lightning_reg.models.stable_diffusion import SDXLPromptEncoder, SDXLUNet, text_denoiser
from lightning_reg.sampling.cli import main as sample_main
from lightning_reg.sampling.engine import generate
from lightning_reg.sources.diffusers import load_text_to_image, schedule_from_scheduler_config

PREDICTION_TYPES = ["epsilon", "v_prediction"]
EULER = "diffusers:EulerDiscreteScheduler"
TIME_IDS = [16.0, 16.0, 0.0, 0.0, 16.0, 16.0]  # the pipeline's default: 8x8 latents, VAE factor 2, no crop
SHAPE = {"prompt_embeds": (16, 20), "text_embeds": (6,), "time_ids": (6,)}  # 16 tokens, widths 8 + 12, pooled 6
pytestmark = pytest.mark.usefixtures("one_thread")


def sdxl_pipeline(parts: dict, scheduler=None, force_zeros: bool = True):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**{**parts, "scheduler": scheduler or parts["scheduler"]},
                                     force_zeros_for_empty_prompt=force_zeros, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def our_encoder(parts: dict, force_zeros: bool = True) -> SDXLPromptEncoder:
    return SDXLPromptEncoder([parts["tokenizer"], parts["tokenizer_2"]],
                             [parts["text_encoder"], parts["text_encoder_2"]], TIME_IDS, force_zeros)


def our_denoiser(parts: dict, null: dict):
    schedule, prediction = schedule_from_scheduler_config(parts["scheduler"].config)
    return text_denoiser(SDXLUNet(parts["unet"]), schedule, prediction, LatentCodec(parts["vae"]), null).eval()


@pytest.fixture(scope="module")
def sdxl_parts(clip_tokenizer):
    return {kind: make_sdxl_components(clip_tokenizer, kind) for kind in PREDICTION_TYPES}


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory, sdxl_parts):
    folder = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    sdxl_pipeline(sdxl_parts["epsilon"]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("sampler", [EULER, "ddim"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("negative", ["", "blurry"])
def test_reg_off_reproduces_the_sdxl_pipeline(sdxl_parts, sampler, prediction_type, negative):
    """REG off, CFG at w2 = guidance_scale: our chain through the scheduler adapter (SDXL's default Euler) or our
    DDIM gives the pipeline's latents and images from the same embeddings and initial latents. The empty negative
    prompt is ``force_zeros_for_empty_prompt``'s zeros on both sides (the pipeline zeroes them itself)."""
    from diffusers import DDIMScheduler

    parts = sdxl_parts[prediction_type]
    encoder = our_encoder(parts)
    y, null = encoder(PROMPTS), encoder.null(negative)
    scheduler = parts["scheduler"] if sampler == EULER else DDIMScheduler.from_config(parts["scheduler"].config)
    latents = torch.randn(len(PROMPTS), *LATENT, generator=torch.Generator().manual_seed(3))
    negatives = dict(negative_prompt_embeds=null["prompt_embeds"].expand_as(y["prompt_embeds"]),
                     negative_pooled_prompt_embeds=null["text_embeds"].expand_as(y["text_embeds"])) if negative else {}
    call = dict(prompt_embeds=y["prompt_embeds"], pooled_prompt_embeds=y["text_embeds"], **negatives,
                latents=latents, num_inference_steps=5, guidance_scale=4.5)
    pipe = sdxl_pipeline(parts, scheduler)
    theirs, theirs_images = (pipe(**call, output_type=kind).images for kind in ("latent", "pt"))

    denoiser = our_denoiser(parts, null)
    if not negative:
        assert all(part.abs().max() == 0 for part in null.values())
    guided = GuidedDenoiser(denoiser, make_guidance("cfg", scale=4.5, convention="w2"), y)
    options = {"prediction": denoiser.prediction.kind} if sampler == EULER else {"eta": 0.0}
    ours = get_sampler(sampler)(guided, latents, denoiser.schedule, 5, **options)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((denoiser.decode(ours) / 2 + 0.5).clamp(0, 1), theirs_images, rtol=1e-4, atol=1e-5)
    assert ours.abs().max() > 0.1  # a real chain, not zeros on both sides


@pytest.mark.parametrize("force_zeros, negative", [(True, ""), (False, ""), (True, "blurry")])
def test_prompt_encoder_and_size_ids_are_the_pipeline_s(sdxl_parts, force_zeros, negative):
    """Both embeddings of a list of prompts and of the null condition equal ``encode_prompt``'s (our empty negative
    prompt is the pipeline's ``negative_prompt=None``); the size ids equal ``_get_add_time_ids``."""
    parts = sdxl_parts["epsilon"]
    pipe, encoder = sdxl_pipeline(parts, force_zeros=force_zeros), our_encoder(parts, force_zeros)
    y, null = encoder(PROMPTS), encoder.null(negative)
    check_prompt_parts(y, null, pipe.encode_prompt(PROMPTS, negative_prompt=negative or None), "text_embeds", SHAPE)
    assert (null["prompt_embeds"].abs().max() == 0) == (force_zeros and not negative)
    time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32, text_encoder_projection_dim=6)
    torch.testing.assert_close(y["time_ids"], time_ids.repeat(len(PROMPTS), 1), rtol=0, atol=0)
    with pytest.warns(UserWarning, match=r"prompt 1 has \d+ tokens, more than the text encoder's 16: truncated"):
        assert encoder(["short", "a very long caption that goes on and on"])["prompt_embeds"].shape == (2, 16, 20)


def unet_eps(parts, prediction_type, x, t, y, a, s):
    """The SDXL UNet's epsilon estimate at ``x`` (``added_cond_kwargs`` as the pipeline passes them)."""
    added = {"text_embeds": y["text_embeds"], "time_ids": y["time_ids"]}
    out = parts["unet"](x, torch.full((len(x),), float(t)), encoder_hidden_states=y["prompt_embeds"],
                        added_cond_kwargs=added).sample
    return out if prediction_type == "epsilon" else a * out + s * x


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("reg", ["paper", "vjp"])
def test_reg_matches_the_hand_computation_on_the_sdxl_unet(sdxl_parts, prediction_type, reg):
    """paper: ``eps_c + w d (1 - s_t grad_x 1^T eps_c)``; vjp: ``eps_c + w (d - s_t J_eps^T d)``, ``d = eps_c -
    eps_u``, the null condition the zeroed negative parts with the condition's own size ids; by autograd on the
    bare UNet; no weight of the UNet, VAE or either text encoder gets a grad."""
    parts = sdxl_parts[prediction_type]
    encoder = our_encoder(parts)
    y, null = encoder(PROMPTS), encoder.null("")
    denoiser = our_denoiser(parts, null)
    x = torch.randn(len(PROMPTS), *LATENT, generator=torch.Generator().manual_seed(5))
    t, w = torch.tensor(601.0), 2.5
    a, s = (float(c) for c in denoiser.schedule.alpha_sigma(t))
    x0_bar = GuidedDenoiser(denoiser, make_guidance("cfg", scale=w, reg=reg), y)(x, t)

    x_in = x.clone().requires_grad_(True)
    eps_c = unet_eps(parts, prediction_type, x_in, t, y, a, s)
    y_null = {"prompt_embeds": torch.zeros_like(y["prompt_embeds"]), "text_embeds": torch.zeros_like(y["text_embeds"]),
              "time_ids": y["time_ids"]}
    with torch.no_grad():
        eps_u = unet_eps(parts, prediction_type, x, t, y_null, a, s)
    expected, d = reg_eps_by_hand(eps_c, x_in, eps_u, w, s, reg)
    torch.testing.assert_close(eps_from_x0(x0_bar, x, a, s), expected, rtol=1e-4, atol=1e-5)
    assert (expected - eps_c.detach() - w * d).abs().max() > 1e-4  # the rectification is not negligible here
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert all(p.grad is None for p in parts[name].parameters()), name


def test_a_saved_sdxl_folder_loads_and_samples_through_sample_py(sdxl_folder, sdxl_parts, tmp_path):
    """load_text_to_image reads the folder (force_zeros from model_index.json, the default size ids); sample.py
    --checkpoint FOLDER --prompts FILE with Euler and REG writes generate()'s samples over the captions."""
    loaded = load_text_to_image(str(sdxl_folder))
    meta = loaded.meta
    assert meta["pipeline"] == "StableDiffusionXLPipeline" and meta["scheduler"] == "EulerDiscreteScheduler"
    assert meta["condition_shape"] == {key: list(shape) for key, shape in SHAPE.items()}
    assert meta["time_ids"] == TIME_IDS and meta["force_zeros_for_empty_prompt"] is True
    assert meta["prediction"] == "eps" and meta["image_shape"] == [3, 16, 16]
    conditioning = loaded.denoiser.conditioning
    y = conditioning.make(PROMPTS)
    for key, value in our_encoder(sdxl_parts["epsilon"])(PROMPTS).items():
        torch.testing.assert_close(y[key], value, rtol=0, atol=0)
    null = conditioning.null(y)
    assert null["time_ids"] is y["time_ids"] and null["prompt_embeds"].abs().max() == 0

    prompts = tmp_path / "captions.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    guidance = "{method: cfg, scale: 2.0, reg: paper}"
    sample_main(["--checkpoint", str(sdxl_folder), "--prompts", str(prompts), "--output", str(out), "--num_samples",
                 "2", "--batch_size", "2", "--steps", "3", "--seed", "4", "--sampler", EULER, "--guidance", guidance])
    with np.load(out / "samples.npz") as f:
        samples = f["arr_0"]
    assert samples.shape == (2, 16, 16, 3) and samples.dtype == np.uint8
    assert (out / "prompts.txt").read_text().splitlines() == PROMPTS
    expected = generate(loaded.denoiser, make_guidance("cfg", scale=2.0, reg="paper"), y, range(2), sampler=EULER,
                        steps=3, seed=4, batch_size=2)
    assert np.abs(samples.astype(int) - ((expected.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()).max() <= 1


@pytest.mark.parametrize("edit, message", [
    (lambda f: edit_json(f / "model_index.json", _class_name="StableDiffusionXLImg2ImgPipeline"),
     r"is a StableDiffusionXLImg2ImgPipeline pipeline \(SDXL's refiner, image-to-image\): out of scope"),
    (lambda f: shutil.rmtree(f / "text_encoder_2"),
     r"lacks the component folder\(s\) \['text_encoder_2'\]: a StableDiffusionXLPipeline needs"),
])
def test_refiner_and_missing_encoder_folders_are_refused_by_sample_py(sdxl_folder, tmp_path, refused, edit, message):
    refuse_edited_pipeline(refused, sdxl_folder, tmp_path, edit, message)


def narrow_projection(folder):
    """text_encoder_2 replaced by one with a 4-wide projection (the UNet's added embedding takes 6)."""
    shutil.rmtree(folder / "text_encoder_2")
    make_sdxl_components(None, projection_dim=4)["text_encoder_2"].save_pretrained(folder / "text_encoder_2")


@pytest.mark.parametrize("edit, message", [
    (lambda f: edit_json(f / "model_index.json", text_encoder_2=["transformers", "CLIPTextModel"]),
     r"text_encoder_2 is \['transformers', 'CLIPTextModel'\], not the CLIPTextModelWithProjection"),
    (lambda f: edit_json(f / "model_index.json", force_zeros_for_empty_prompt="yes"),
     "force_zeros_for_empty_prompt must be true or false, got yes"),
    (lambda f: (f / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "EDMDPMSolverMultistepScheduler", "sigma_min": 0.002, "sigma_max": 80.0})),
     "EDMDPMSolverMultistepScheduler has no beta_schedule: only DDPM-type"),
    (lambda f: edit_json(f / "vae" / "config.json", latents_mean=[0.0] * 4, latents_std=[1.0] * 4),
     "the VAE normalises its latents by latents_mean/latents_std"),
    (lambda f: edit_json(f / "unet" / "config.json", addition_embed_type=None),
     r"the UNet's extra conditioning is none: only SDXL base UNets"),
    (narrow_projection, r"text_embeds have width 4 but the UNet takes 6 \(its added embedding, beside 6 size ids\)"),
    (lambda f: edit_json(f / "text_encoder_2" / "config.json", auto_map={"AutoModel": "evil.Model"}),
     "names custom code of the folder, which is never run"),
])
def test_bad_sdxl_folders_one_line(sdxl_folder, tmp_path, edit, message):
    folder = shutil.copytree(sdxl_folder, tmp_path / "pipe")
    edit(folder)
    with pytest.raises(ConfigError, match=message) as err:
        load_text_to_image(str(folder))
    assert "\n" not in str(err.value)


def test_bad_sdxl_conditions(sdxl_parts):
    parts = sdxl_parts["epsilon"]
    encoder = our_encoder(parts)
    denoiser = our_denoiser(parts, encoder.null(""))
    y = encoder(PROMPTS)
    without_ids = {key: value for key, value in y.items() if key != "time_ids"}
    for bad in (y["prompt_embeds"], {**y, "time_ids": y["time_ids"][:, :5]}, without_ids):
        with pytest.raises(ConfigError, match=r"a mapping \{prompt_embeds: \(B, 16, 20\), text_embeds: \(B, 6\), "
                                              r"time_ids: \(B, 6\)\} from its prompt encoder, got"):
            GuidedDenoiser(denoiser, make_guidance("cfg"), bad)
    with pytest.raises(ConfigError, match="must share their batch dimension"):
        denoiser.conditioning.check({**y, "time_ids": y["time_ids"][:1]})
