"""SLG on SD3's joint blocks (``guidance/perturbed.py`` with ``SD3Transformer.block_returns``) over a tiny random
MMDiT of 3 blocks (SD3.5's layout: dual attention in the first, RMS qk norm; the last a ``context_pre_only`` block)
and random prompt parts (the pipeline takes embeddings and returns latents: no text encoder or VAE). REG off, CFG +
SLG gives ``StableDiffusion3Pipeline(skip_guidance_layers=...)``'s latents with its defaults (scale 2.8, steps
``0.01 N < i < 0.2 N`` of 28) mapped to a window of progress; REG on it equals a float64 hand computation whose
reference is the transformer's own ``skip_layers``."""

import copy

import pytest
import torch
from helpers import check_flow_reg_by_hand, joint_prompt_embeds

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.samplers import get_sampler
from lightning_reg.errors import ConfigError
from lightning_reg.guidance import GuidedDenoiser, make_guidance
from lightning_reg.models.stable_diffusion import SD3Transformer
from lightning_reg.sources.diffusers import flow_schedule_from_scheduler_config

EULER = "diffusers:FlowMatchEulerDiscreteScheduler"
SHIFT, STEPS, W2, SLG_SCALE = 3.0, 28, 4.5, 2.8  # SD3's scheduler shift, the pipeline's defaults
# the pipeline's SLG steps 1..5 of 28 (0.28 < i < 5.6) lie at progress 0.0126 .. 0.0702, step 6 at 0.0867
WINDOW = {"start": 0.01, "stop": 0.08}
LATENT, TOKENS, WIDTH, POOLED = (4, 8, 8), 10, 32, 12
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd3():
    """The tiny transformer, SD3's scheduler, two prompts' parts and a negative prompt's (one sample's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=WIDTH,
                                        caption_projection_dim=16, pooled_projection_dim=POOLED,
                                        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")
    g = torch.Generator().manual_seed(1)
    y = {"prompt_embeds": torch.randn(2, TOKENS, WIDTH, generator=g), "pooled_projections": torch.randn(2, POOLED,
                                                                                                        generator=g)}
    null = {"prompt_embeds": torch.randn(TOKENS, WIDTH, generator=g), "pooled_projections": torch.randn(POOLED,
                                                                                                        generator=g)}
    return transformer.eval(), FlowMatchEulerDiscreteScheduler(shift=SHIFT), y, null


def denoiser_of(transformer, scheduler, null) -> Denoiser:
    schedule, prediction = flow_schedule_from_scheduler_config({"_class_name": type(scheduler).__name__,
                                                                **scheduler.config})
    net = SD3Transformer(transformer)
    return Denoiser(net, schedule, prediction, net.prompt_conditioning(null, None))


def skipping_calls(transformer, seen: list):
    """A hook recording, for each transformer call, whether it ran a block skipped (ours: a block with a forward
    hook; the pipeline's: ``skip_layers``)."""
    def hook(module, args, kwargs):
        seen.append(kwargs.get("skip_layers") is not None or any(b._forward_hooks for b in module.transformer_blocks))
    return transformer.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("layers", [[1], [0, 2]])
def test_cfg_and_slg_reproduce_the_sd3_pipeline(sd3, layers):
    """REG off, 28 Euler steps: CFG (w2 4.5) + SLG (2.8 on ``layers``; [0, 2]: the dual-attention block and the last,
    whose text stream is dropped) in our window ``WINDOW`` gives the pipeline's latents with ``skip_guidance_layers``
    and its defaults (start 0.01, stop 0.2 of the steps); both skip at the same 5 steps, and SLG moved the chain."""
    from diffusers import StableDiffusion3Pipeline

    transformer, scheduler, y, null = sd3
    latents = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(3))
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=None, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    theirs_calls, our_calls = [], []
    hook = skipping_calls(transformer, theirs_calls)
    theirs = pipe(**joint_prompt_embeds(y, null), latents=latents, num_inference_steps=STEPS, guidance_scale=W2,
                  skip_guidance_layers=layers,
                  output_type="latent").images
    hook.remove()

    denoiser = denoiser_of(transformer, scheduler, null)
    sample = get_sampler(EULER)
    guidance = make_guidance("cfg", scale=W2, convention="w2", slg={"scale": SLG_SCALE, "layers": layers, **WINDOW})
    hook = skipping_calls(transformer, our_calls)
    ours = sample(GuidedDenoiser(denoiser, guidance, y), latents, denoiser.schedule, STEPS,
                  prediction=denoiser.prediction.kind)
    hook.remove()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert sum(theirs_calls) == sum(our_calls) == 5
    cfg = sample(GuidedDenoiser(denoiser, make_guidance("cfg", scale=W2, convention="w2"), y), latents,
                 denoiser.schedule, STEPS, prediction=denoiser.prediction.kind)
    assert (ours - cfg).abs().max() > 1e-3
    assert not any(m._forward_hooks for m in transformer.modules())


def skip_velocity(transformer, layers):
    """The bare transformer's velocity with ``layers`` skipped by diffusers (``skip_layers``)."""
    return lambda x, t, y: transformer(hidden_states=x, timestep=torch.full((len(x),), 1000 * t, dtype=x.dtype),
                                       encoder_hidden_states=y["prompt_embeds"],
                                       pooled_projections=y["pooled_projections"], skip_layers=layers).sample


@pytest.mark.parametrize("reg", ["paper", "vjp"])
def test_reg_on_cfg_and_slg_matches_a_float64_hand_computation(sd3, reg):
    """``G = w (x0_c - x0_u) + w_s (x0_c - x0_s)``, ``x0_s`` from ``SD3Transformer2DModel(skip_layers=[1])``, a
    constant; paper ``x0_c + a_t grad_x(1^T x0_c) ⊙ G``, vjp ``x0_c + a_t J^T G``, by autograd on the bare transformer
    in float64 at three flow times (``check_flow_reg_by_hand``)."""
    transformer, scheduler, y32, null32 = sd3
    denoiser = copy.deepcopy(denoiser_of(transformer, scheduler, null32)).double()
    bare = denoiser.net.transformer
    y, null = ({key: value.double() for key, value in parts.items()} for parts in (y32, null32))
    x = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    worst = check_flow_reg_by_hand(denoiser, skip_velocity(bare, None), x, y, null, "cfg",
                                   {"slg": {"scale": SLG_SCALE, "layers": [1]}}, reg,
                                   perturbed=(SLG_SCALE, skip_velocity(bare, [1])))
    assert worst < 1e-9


@pytest.mark.parametrize("layers, message", [
    (["transformer_blocks.1.attn$"], r"slg cannot skip Attention: only a block that returns one tensor"),
    ([3], r"slg layer 3 is outside SD3Transformer.transformer.transformer_blocks \(3 blocks\)"),
])
def test_what_is_not_a_joint_block_is_refused(sd3, layers, message):
    """A joint attention (it returns both streams, not as a block does) and a block past the stack: one
    ConfigError, and no hook left."""
    transformer, scheduler, y, null = sd3
    with pytest.raises(ConfigError, match=message):
        GuidedDenoiser(denoiser_of(transformer, scheduler, null), make_guidance("cfg", slg={"layers": layers}), y)(
            torch.randn(2, *LATENT), torch.tensor(0.5, dtype=torch.float64))
    assert not any(m._forward_hooks for m in transformer.modules())
