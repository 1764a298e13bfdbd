"""Text-to-image over diffusers' Stable Diffusion components (tiny random ones, built from configs as diffusers'
own pipeline tests do, nothing downloaded): equivalence with ``StableDiffusionPipeline``, REG against a hand
computation on the UNet, what REG's backward touches, gradient checkpointing, loading and its errors."""

import shutil

import pytest
import torch
from helpers import LATENT, PROMPTS, edit_json, embeddings, our_denoiser, reg_eps_by_hand

from lightning_reg.diffusion.samplers import ddim
from lightning_reg.models.stable_diffusion import PromptEncoder
from lightning_reg.sources.diffusers import load_text_to_image
from lightning_reg.errors import ConfigError
from lightning_reg.guidance import GuidedDenoiser, make_guidance

PREDICTION_TYPES = ["epsilon", "v_prediction"]


@pytest.fixture(scope="module")
def sd_parts(clip_tokenizer, tiny_components):
    return {kind: tiny_components(clip_tokenizer, kind) for kind in PREDICTION_TYPES}


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory, sd_parts):
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    StableDiffusionPipeline(**sd_parts["v_prediction"], safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder




@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("steps", [4, 7])
def test_ddim_cfg_reproduces_the_stable_diffusion_pipeline(sd_parts, prediction_type, steps, one_thread):
    """REG off: our DDIM (eta 0) over the wrapped UNet, CFG at w2 = diffusers' guidance_scale, gives the
    pipeline's own latents and images from the same prompt embeddings and initial latents."""
    from diffusers import StableDiffusionPipeline

    parts = sd_parts[prediction_type]
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    cond, null = embeddings(parts, PROMPTS), embeddings(parts, [""])
    latents = torch.randn(len(PROMPTS), *LATENT, generator=torch.Generator().manual_seed(3))
    call = dict(prompt_embeds=cond, negative_prompt_embeds=null.expand_as(cond), latents=latents,
                num_inference_steps=steps, guidance_scale=4.5, eta=0.0)
    theirs = pipe(**call, output_type="latent").images
    theirs_images = pipe(**call, output_type="pt").images

    denoiser = our_denoiser(parts, null)
    guided = GuidedDenoiser(denoiser, make_guidance("cfg", scale=4.5, convention="w2"), cond)
    ours = ddim(guided, latents, denoiser.schedule, steps, eta=0.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((denoiser.decode(ours) / 2 + 0.5).clamp(0, 1), theirs_images, rtol=1e-4, atol=1e-5)
    assert ours.abs().max() > 0.1  # a real chain, not zeros on both sides


def unet_eps(parts, prediction_type, x, t, y, a, s):
    """The UNet's epsilon estimate at ``x``: its output (epsilon models) or ``a F + s x`` (``v`` models)."""
    out = parts["unet"](x, torch.full((len(x),), float(t)), encoder_hidden_states=y).sample
    return out if prediction_type == "epsilon" else a * out + s * x


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("reg", ["paper", "vjp"])
def test_reg_matches_the_hand_computation_on_the_unet(sd_parts, prediction_type, reg, one_thread):
    """paper: ``eps_c + w (eps_c - eps_u)(1 - sqrt(1 - abar_t) grad_x 1^T eps_c)``; vjp: ``eps_c + w (d - s_t
    J_eps^T d)``, by autograd on the bare UNet; and no weight of the UNet, VAE or text encoder gets a grad."""
    from lightning_reg.diffusion.predictions import eps_from_x0

    parts = sd_parts[prediction_type]
    cond, null = embeddings(parts, PROMPTS), embeddings(parts, [""])
    denoiser = our_denoiser(parts, null)
    x = torch.randn(len(PROMPTS), *LATENT, generator=torch.Generator().manual_seed(5))
    t, w = torch.tensor(601.0), 2.5
    a, s = (float(c) for c in denoiser.schedule.alpha_sigma(t))
    x0_bar = GuidedDenoiser(denoiser, make_guidance("cfg", scale=w, reg=reg), cond)(x, t)

    x_in = x.clone().requires_grad_(True)
    eps_c = unet_eps(parts, prediction_type, x_in, t, cond, a, s)
    with torch.no_grad():
        eps_u = unet_eps(parts, prediction_type, x, t, null.expand_as(cond), a, s)
    expected, d = reg_eps_by_hand(eps_c, x_in, eps_u, w, s, reg)
    torch.testing.assert_close(eps_from_x0(x0_bar, x, a, s), expected, rtol=1e-4, atol=1e-5)
    assert (expected - eps_c.detach() - w * d).abs().max() > 1e-4  # the rectification is not negligible here
    for p in parts["unet"].parameters():
        p.grad = None  # the hand computation above never asked for weight grads; make sure
    GuidedDenoiser(denoiser, make_guidance("cfg", scale=w, reg=reg), cond)(x, t)
    for name in ("unet", "vae", "text_encoder"):
        assert all(p.grad is None for p in parts[name].parameters()), name


@pytest.mark.parametrize("reg", ["none", "paper"])
def test_reg_calls_the_unet_once_with_a_graph_and_never_the_vae_or_text_encoder(sd_parts, reg, one_thread):
    parts = sd_parts["epsilon"]
    cond, null = embeddings(parts, PROMPTS), embeddings(parts, [""])
    denoiser = our_denoiser(parts, null)
    calls = {name: [] for name in ("unet", "vae", "text_encoder")}
    hooks = [parts[name].register_forward_hook(
        lambda module, args, out, name=name: calls[name].append((torch.is_grad_enabled(), len(args[0]))))
        for name in calls]
    try:
        with torch.no_grad():  # as the samplers run it
            GuidedDenoiser(denoiser, make_guidance("cfg", scale=2.0, reg=reg, branch_layout="batched"), cond)(torch.randn(2, *LATENT), 401.0)
    finally:
        for hook in hooks:
            hook.remove()
    # CFG (batched layout): one no-grad call of 2B; REG: the unconditional call without a graph, the conditional with one
    assert calls["unet"] == ([(False, 4)] if reg == "none" else [(False, 2), (True, 2)])
    assert calls["vae"] == [] and calls["text_encoder"] == []


def saved_tensor_count(call) -> int:
    count = [0]

    def pack(t):
        count[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call()
    return count[0]


@pytest.mark.parametrize("reg", ["paper", "vjp"])
def test_gradient_checkpointing_gives_the_same_reg_with_a_smaller_graph(clip_tokenizer, tiny_components, reg,
                                                                      one_thread):
    results, saved = [], []
    for checkpointing in (False, True):
        parts = tiny_components(clip_tokenizer)  # fresh UNet: checkpointing is switched on in place
        cond, null = embeddings(parts, PROMPTS), embeddings(parts, [""])
        guided = GuidedDenoiser(our_denoiser(parts, null, checkpointing), make_guidance("cfg", scale=3.0, reg=reg),
                                cond)
        x = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(7))
        results.append(guided(x, torch.tensor(301.0)))
        saved.append(saved_tensor_count(lambda: guided(x, torch.tensor(301.0))))
        assert parts["unet"].is_gradient_checkpointing == checkpointing
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)
    assert saved[1] < saved[0] / 2


def test_load_a_pipeline_folder(pipeline_folder, sd_parts, one_thread):
    loaded = load_text_to_image(str(pipeline_folder), negative_prompt="blurry")
    denoiser, meta = loaded.denoiser, loaded.meta
    assert meta["pipeline"] == "StableDiffusionPipeline" and meta["prediction"] == "v"
    assert meta["latent_shape"] == list(LATENT) and meta["image_shape"] == [3, 16, 16]
    assert meta["condition_shape"] == [16, 8] and meta["prompt_tokens"] == 16
    assert meta["schedule"] | {"alpha_bar": None} == {
        "num_timesteps": 1000, "betas": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
        "spacing": "leading", "steps_offset": 1, "final_alpha_one": False, "alpha_bar": None}
    parts = sd_parts["v_prediction"]
    torch.testing.assert_close(denoiser.conditioning.null_embedding, embeddings(parts, ["blurry"])[0])
    y = loaded.prompt_encoder(PROMPTS)
    torch.testing.assert_close(y, embeddings(parts, PROMPTS))
    x = torch.randn(2, *LATENT)
    with torch.no_grad():
        out = parts["unet"](x, torch.full((2,), 21.0), encoder_hidden_states=y).sample
    a, s = denoiser.coefficients(torch.tensor(21.0), x)
    torch.testing.assert_close(denoiser(x, torch.tensor(21.0), y), a * x - s * out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(denoiser.conditioning.null(y), denoiser.conditioning.null_embedding.expand(2, 16, 8))


def test_bad_conditions_and_long_prompts(sd_parts, one_thread):
    parts = sd_parts["epsilon"]
    encoder = PromptEncoder(parts["tokenizer"], parts["text_encoder"])
    denoiser = our_denoiser(parts, encoder([""]))
    with pytest.raises(ConfigError, match=r"prompt embedding \(B, 16, 8\).*torch.int64 \(2,\)"):
        GuidedDenoiser(denoiser, make_guidance("cfg"), torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match=r"prompt embedding \(B, 16, 8\).*\(2, 77, 8\)"):
        denoiser.conditioning.check(torch.zeros(2, 77, 8))
    long = "a very long caption that goes on and on"
    with pytest.warns(UserWarning, match=r"prompt 1 has \d+ tokens, more than the text encoder's 16: truncated"):
        y = encoder(["short", long])
    assert y.shape == (2, 16, 8)


def corrupt(folder, tmp_path, edit):
    target = tmp_path / "pipe"
    shutil.copytree(folder, target)
    edit(target)
    return str(target)


@pytest.mark.parametrize("edit, message", [
    (lambda f: shutil.rmtree(f / "unet"), r"lacks the component folder\(s\) \['unet'\]"),
    (lambda f: (f / "model_index.json").unlink(), "has no model_index.json"),
    (lambda f: edit_json(f / "model_index.json", _class_name="StableVideoDiffusionPipeline"),
     r"is a StableVideoDiffusionPipeline pipeline: only .*\(ControlNet, video ... are not\)"),
    (lambda f: edit_json(f / "scheduler" / "scheduler_config.json", prediction_type="sample"),
     "prediction_type 'sample' is not supported; supported: \\['epsilon', 'v_prediction'\\]"),
    (lambda f: edit_json(f / "scheduler" / "scheduler_config.json", rescale_betas_zero_snr=True),
     "rescale_betas_zero_snr=true is not supported"),
    (lambda f: edit_json(f / "scheduler" / "scheduler_config.json", beta_schedule="sigmoid"),
     r"beta_schedule 'sigmoid' is not supported; supported: \['linear', 'scaled_linear', 'squaredcos_cap_v2'\]"),
    (lambda f: edit_json(f / "scheduler" / "scheduler_config.json", timestep_spacing="random"),
     r"scheduler: timestep_spacing 'random' is not supported; supported: \['leading', 'trailing', 'linspace'\]"),
    (lambda f: edit_json(f / "scheduler" / "scheduler_config.json", steps_offset=-1),
     "scheduler: steps_offset must be a non-negative integer, got -1"),
    (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights"),
     "unet is not a loadable UNet2DConditionModel folder"),
])
def test_bad_pipeline_folders_one_line(pipeline_folder, tmp_path, edit, message, one_thread):
    with pytest.raises(ConfigError, match=message) as err:
        load_text_to_image(corrupt(pipeline_folder, tmp_path, edit))
    assert "\n" not in str(err.value)


def test_missing_folder_and_uncached_hub_name(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="does not exist: give a diffusers pipeline folder"):
        load_text_to_image(str(tmp_path / "nothing"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="neither a folder nor in the local Hugging Face cache"):
        load_text_to_image("someone/not-cached", cache_dir=str(tmp_path / "cache"))


def test_a_cached_hub_name_loads_without_network(pipeline_folder, hub_cache, one_thread):
    """A hub name resolves in a Hugging Face cache (the layout ``huggingface-cli download`` writes)."""
    loaded = load_text_to_image("someone/tiny-sd", cache_dir=hub_cache(pipeline_folder, "someone/tiny-sd"))
    reference = load_text_to_image(str(pipeline_folder))
    for got, want in zip(loaded.denoiser.state_dict().values(), reference.denoiser.state_dict().values()):
        assert torch.equal(got, want)
