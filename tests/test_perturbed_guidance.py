"""Perturbed-branch guiders (``guidance/perturbed.py``): PAG, SEG and SLG as more guidance terms, each with REG.

On a tiny SD 1.x UNet (conftest's components, nothing downloaded): PAG equals ``StableDiffusionPAGPipeline`` over a
DDIM chain, CFG + PAG and PAG alone; PAG, SEG and SLG equal diffusers' guider classes (``forward``) on predictions
made under diffusers' own hooks (attention-score skip, ``SmoothedEnergyGuidanceHook`` on ``to_q``, transformer-block
skip); REG paper and vjp on each equal autograd on the conditional UNet call alone, the perturbed prediction (by
diffusers' hooks) a constant; the conditional branch never runs perturbed, and the hooks leave with the call even
when it raises. On our UNet and DiT: PAG and SLG equal a copy of the network with the attention replaced by its
``v`` path or the block removed.
"""

import copy
from contextlib import contextmanager

import pytest
import torch
from helpers import LATENT, PROMPTS, embeddings, our_denoiser
from torch import nn

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.predictions import Prediction, eps_from_x0
from lightning_reg.diffusion.samplers import ddim
from lightning_reg.diffusion.schedules import VPSchedule
from lightning_reg.errors import ConfigError
from lightning_reg.guidance import GuidedDenoiser, make_guidance
from lightning_reg.guidance.perturbed import smoothed_queries
from lightning_reg.models.dit import DiT
from lightning_reg.models.unet import UNet

MID = "mid_block.attentions.0.transformer_blocks"  # the mid block's transformer stack: diffusers' hooks' fqn
W2, SCALE, T = 4.5, 2.0, torch.tensor(601.0)  # CFG's guidance_scale (w2), the perturbed term's scale, a time
# our term for each kind; seg: the Gaussian of std 1 (clipped to the 4x4 token grid's 5 taps); seg_mean: infinite
OURS = {"pag": {"layers": ["mid"]}, "seg": {"layers": ["mid"], "blur_sigma": 1.0}, "seg_mean": {"layers": ["mid"]},
        "slg": {"layers": [f"{MID}.0"]}}


@pytest.fixture(scope="module")
def sd(clip_tokenizer, tiny_components):
    """The tiny epsilon components, our text denoiser over them, the prompts' and the empty prompt's embeddings."""
    parts = tiny_components(clip_tokenizer)
    cond, null = embeddings(parts, PROMPTS), embeddings(parts, [""])
    return parts, our_denoiser(parts, null), cond, null


def term_of(kind: str, scale: float = SCALE) -> dict:
    return {kind.removesuffix("_mean"): {"scale": scale, **OURS[kind]}}


@contextmanager
def diffusers_hooks(unet, kind: str):
    """``unet`` under diffusers' own hooks for ``kind`` on the mid block. SEG: diffusers 0.42 swaps the authors'
    branches (it takes the mean below ``blur_threshold_inf`` and blurs above it), so the threshold is set on the side
    that runs the branch ours runs: the Gaussian for a finite sigma, the mean for the infinite blur."""
    from diffusers.hooks import HookRegistry, LayerSkipConfig
    from diffusers.hooks.layer_skip import _apply_layer_skip_hook
    from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceHook

    name = f"test_{kind}"
    if kind == "pag":
        _apply_layer_skip_hook(unet, LayerSkipConfig([0], fqn=MID, skip_attention=False, skip_attention_scores=True,
                                                     skip_ff=False), name=name)
    elif kind == "slg":
        _apply_layer_skip_hook(unet, LayerSkipConfig([0], fqn=MID), name=name)
    else:
        to_q = unet.get_submodule(f"{MID}.0.attn1.to_q")
        threshold = 0.5 if kind == "seg" else 9999.0  # below sigma 1: their Gaussian branch; above: their mean
        HookRegistry.check_if_exists_or_initialize(to_q).register_hook(SmoothedEnergyGuidanceHook(1.0, threshold),
                                                                       name)
    try:
        yield
    finally:
        HookRegistry.check_if_exists_or_initialize(unet).remove_hook(name, recurse=True)


def unet_eps(unet, x, t, y):
    return unet(x, torch.full((len(x),), float(t)), encoder_hidden_states=y).sample


def no_hooks(net: nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


@pytest.mark.parametrize("guidance_scale", [W2, 1.0])
def test_pag_reproduces_the_pag_pipeline(sd, guidance_scale, one_thread):
    """REG off: DDIM over CFG + PAG (``guidance_scale`` 4.5) and PAG alone (1: the pipeline's CFG is off, ours is
    ``method: conditional``) gives ``StableDiffusionPAGPipeline``'s latents (its identity-attention processors on
    ``pag_applied_layers``) from the same embeddings and initial latents."""
    from diffusers import StableDiffusionPAGPipeline

    parts, denoiser, cond, null = sd
    layers = ["mid", "up_blocks.0.attentions.1"]
    pipe = StableDiffusionPAGPipeline(**parts, safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False, pag_applied_layers=layers)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(len(PROMPTS), *LATENT, generator=torch.Generator().manual_seed(3))
    theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=null.expand_as(cond), latents=latents,
                  num_inference_steps=4, guidance_scale=guidance_scale, pag_scale=3.0, eta=0.0,
                  output_type="latent").images

    main = {"method": "cfg", "scale": guidance_scale, "convention": "w2"} if guidance_scale > 1 else {
        "method": "conditional"}
    ours = ddim(GuidedDenoiser(denoiser, make_guidance(**main, pag={"scale": 3.0, "layers": layers}), cond), latents,
                denoiser.schedule, 4, eta=0.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    without = ddim(GuidedDenoiser(denoiser, make_guidance(**main), cond), latents, denoiser.schedule, 4, eta=0.0)
    assert (ours - without).abs().max() > 1e-3  # PAG moved the chain
    assert no_hooks(parts["unet"])


@pytest.mark.parametrize("kind", list(OURS))
def test_each_term_equals_diffusers_guider_on_its_hooks(sd, kind, one_thread):
    """REG off, one step: our CFG + perturbed term equals diffusers' guider class (``forward(pred_cond, pred_uncond,
    pred_perturbed)`` after ``set_state``, inside its ``start``/``stop`` windows) on UNet outputs, the perturbed one
    made under diffusers' hooks."""
    from diffusers.guiders import PerturbedAttentionGuidance, SkipLayerGuidance, SmoothedEnergyGuidance
    from diffusers.hooks import LayerSkipConfig, SmoothedEnergyGuidanceConfig

    parts, denoiser, cond, null = sd
    unet = parts["unet"]
    guiders = {
        "pag": lambda: PerturbedAttentionGuidance(W2, SCALE, 0.0, 1.0, perturbed_guidance_config=LayerSkipConfig(
            [0], fqn=MID, skip_attention=False, skip_attention_scores=True, skip_ff=False)),
        "seg": lambda: SmoothedEnergyGuidance(W2, SCALE, seg_guidance_config=SmoothedEnergyGuidanceConfig(
            [0], fqn=MID)),
        "slg": lambda: SkipLayerGuidance(W2, SCALE, 0.0, 1.0, skip_layer_config=LayerSkipConfig([0], fqn=MID))}
    guider = guiders[kind.removesuffix("_mean")]()
    guider.set_state(step=1, num_inference_steps=10, timestep=T)
    x = torch.randn(len(PROMPTS), *LATENT, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        eps_c, eps_u = unet_eps(unet, x, T, cond), unet_eps(unet, x, T, null.expand_as(cond))
        with diffusers_hooks(unet, kind):
            eps_p = unet_eps(unet, x, T, cond)
    theirs = guider.forward(eps_c, eps_u, eps_p).pred

    x0 = GuidedDenoiser(denoiser, make_guidance("cfg", scale=W2, convention="w2", **term_of(kind)), cond)(x, T)
    a, s = denoiser.coefficients(T, x)
    torch.testing.assert_close(eps_from_x0(x0, x, a, s), theirs, rtol=1e-4, atol=1e-5)
    assert (eps_p - eps_c).abs().max() > 1e-3  # the perturbation matters here


def test_the_blur_equals_diffusers_on_square_and_ragged_grids():
    """``smoothed_queries`` equals diffusers' ``SmoothedEnergyGuidanceHook`` on a ``to_q`` output (the branch it
    runs chosen as above) for token counts that are a square (odd and even sides) or not (the extra tokens kept)
    and several sigmas."""
    from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceHook

    g = torch.Generator().manual_seed(0)
    for tokens in (16, 25, 20, 64):
        query = torch.randn(2, tokens, 6, generator=g)
        for sigma in (0.3, 1.0, 2.5):
            theirs = SmoothedEnergyGuidanceHook(sigma, blur_threshold_inf=sigma / 2).post_forward(None, query.clone())
            torch.testing.assert_close(smoothed_queries(query, sigma), theirs, rtol=1e-6, atol=1e-6)
        mean = SmoothedEnergyGuidanceHook(1.0).post_forward(None, query.clone())
        torch.testing.assert_close(smoothed_queries(query, float("inf")), mean, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["pag", "seg", "slg"])
@pytest.mark.parametrize("reg", ["paper", "vjp"])
def test_reg_on_each_term_equals_the_hand_computation(sd, kind, reg, one_thread):
    """With ``G = w (eps_c - eps_u) + w_p (eps_c - eps_p)``: paper ``eps_c + G (1 - s_t grad_x 1^T eps_c)``, vjp
    ``eps_c + G - s_t J_eps^T G``, by autograd on the conditional UNet call only; ``eps_u`` and ``eps_p`` (diffusers'
    hooks) constants."""
    parts, denoiser, cond, null = sd
    unet = parts["unet"]
    x = torch.randn(len(PROMPTS), *LATENT, generator=torch.Generator().manual_seed(6))
    a, s = denoiser.coefficients(T, x)
    x0_bar = GuidedDenoiser(denoiser, make_guidance("cfg", scale=W2, convention="w2", reg=reg, **term_of(kind)),
                            cond)(x, T)

    x_in = x.clone().requires_grad_(True)
    eps_c = unet_eps(unet, x_in, T, cond)
    with torch.no_grad():
        eps_u = unet_eps(unet, x, T, null.expand_as(cond))
        with diffusers_hooks(unet, kind):
            eps_p = unet_eps(unet, x, T, cond)
    big_g = ((W2 - 1) * (eps_c - eps_u) + SCALE * (eps_c - eps_p)).detach()
    if reg == "paper":
        (grad,) = torch.autograd.grad(eps_c.sum(), x_in)
        expected = eps_c.detach() + big_g * (1 - s * grad)
    else:
        (jtg,) = torch.autograd.grad(eps_c, x_in, grad_outputs=big_g)
        expected = eps_c.detach() + big_g - s * jtg
    torch.testing.assert_close(eps_from_x0(x0_bar, x, a, s), expected, rtol=1e-4, atol=1e-5)
    assert (expected - eps_c.detach() - big_g).abs().max() > 1e-4  # the rectification is not negligible


@pytest.mark.parametrize("reg", ["paper", "vjp"])
def test_the_conditional_branch_under_reg_is_never_perturbed(sd, reg, one_thread):
    """PAG alone with REG: the UNet runs twice, the perturbed reference without grad and with the hooks on, then the
    conditional branch with grad, no hook anywhere, its output the plain UNet's (not the perturbed one's); no null
    forward (the rule does not guide), and no hook is left."""
    parts, denoiser, cond, null = sd
    unet, target = parts["unet"], parts["unet"].get_submodule(f"{MID}.0.attn1")
    x = torch.randn(len(PROMPTS), *LATENT, generator=torch.Generator().manual_seed(7))
    calls = []
    record = unet.register_forward_hook(lambda m, args, out: calls.append(
        (torch.is_grad_enabled(), len(target._forward_pre_hooks), out[0].detach())))
    try:
        GuidedDenoiser(denoiser, make_guidance("conditional", reg=reg, **term_of("pag")), cond)(x, T)
    finally:
        record.remove()
    assert [(grad, hooks > 0) for grad, hooks, _ in calls] == [(False, True), (True, False)]
    with torch.no_grad():
        plain = unet_eps(unet, x, T, cond)
    torch.testing.assert_close(calls[1][2], plain, rtol=1e-5, atol=1e-6)
    assert (calls[0][2] - plain).abs().max() > 1e-3
    assert no_hooks(unet)


@pytest.mark.parametrize("kind", ["pag", "seg", "slg"])
def test_hooks_leave_when_the_perturbed_call_raises(sd, kind, one_thread):
    """A module inside the perturbed layer raises during the perturbed call: the error reaches the caller, no hook
    and no torch function mode is left, and a plain forward equals the one before."""
    parts, denoiser, cond, null = sd
    unet = parts["unet"]
    x = torch.randn(len(PROMPTS), *LATENT, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        before = unet_eps(unet, x, T, cond)
    target = unet.get_submodule(f"{MID}.0" if kind == "slg" else f"{MID}.0.attn1")
    seen = []

    def fail(module, args, output):
        seen.append(bool(target._forward_hooks))
        raise RuntimeError("inside the perturbed call")

    failing = unet.get_submodule(f"{MID}.0.attn1.to_out.0").register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="inside the perturbed call"):
            GuidedDenoiser(denoiser, make_guidance("cfg", scale=1.0, **term_of(kind)), cond)(x, T)
    finally:
        failing.remove()
    assert seen == [True]  # it raised with the perturbation installed
    assert no_hooks(unet) and torch._C._len_torch_function_stack() == 0
    with torch.no_grad():
        torch.testing.assert_close(unet_eps(unet, x, T, cond), before, rtol=0, atol=0)


def perturbed_weights(net: nn.Module, seed: int) -> nn.Module:
    """``net`` with its zero-initialised layers moved off zero, so every branch differs (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net.eval()


def identity_attention_unet(block):
    """Our UNet's attention with the identity map: ``x + proj(v)``, ``v`` the last third of ``qkv``."""
    return lambda x: x + block.proj(block.qkv(block.norm(x)).chunk(3, dim=1)[2])


def identity_attention_dit(attention):
    """DiT's attention with the identity map: ``proj(v)``, ``v`` the last third of ``qkv``."""
    return lambda x: attention.proj(attention.qkv(x).chunk(3, dim=-1)[2])


class SkippedBlock(nn.Module):
    def forward(self, x, c):
        return x


def hand_unet(net, kind):
    copied = copy.deepcopy(net)
    if kind == "pag":
        copied.middle[0].attention.forward = identity_attention_unet(copied.middle[0].attention)
    else:
        copied.middle[0].attention = None  # the Stage skips its attention
    return copied


def hand_dit(net, kind):
    copied = copy.deepcopy(net)
    if kind == "pag":
        copied.blocks[1].attn.forward = identity_attention_dit(copied.blocks[1].attn)
    else:
        copied.blocks[1] = SkippedBlock()
    return copied


OUR_NETS = {
    "unet": (lambda: UNet(num_classes=3, image_size=8, channels=3, base_channels=8, channel_mult=(1, 2),
                          attention_resolutions=(4,), num_heads=2), {"pag": ["middle"], "slg": ["middle.0.attention"]},
             hand_unet),
    "dit": (lambda: DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=3, num_heads=2,
                        num_classes=3), {"pag": [1], "slg": ["blocks.1$"]}, hand_dit)}


@pytest.mark.parametrize("net_name", list(OUR_NETS))
@pytest.mark.parametrize("kind", ["pag", "slg"])
def test_our_unet_and_dit_equal_a_hand_perturbed_copy(net_name, kind, one_thread):
    """One CFG + PAG (or SLG) step on our UNet (layers by name) and DiT (PAG by block index, SLG by an anchored
    name): equal to CFG's step plus ``w_p (x0_c - x0_p)`` with ``x0_p`` from a copy of the network whose attention
    returns its ``v`` path (PAG) or whose block is gone (SLG); and different from CFG alone."""
    build, layers, hand = OUR_NETS[net_name]
    torch.manual_seed(0)
    net = perturbed_weights(build(), seed=1)
    model = Denoiser(net, VPSchedule(1000), Prediction("eps"))
    x, y = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 2])
    guided = GuidedDenoiser(model, make_guidance("cfg", scale=1.5, **{kind: {"scale": SCALE, "layers": layers[kind]}}),
                            y)(x, T)
    with torch.no_grad():
        x0_c, x0_u = model(x, T, y), model(x, T, torch.full_like(y, 3))
        x0_p = Denoiser(hand(net, kind), VPSchedule(1000), Prediction("eps"))(x, T, y)
    cfg = x0_c + 1.5 * (x0_c - x0_u)
    torch.testing.assert_close(guided, cfg + SCALE * (x0_c - x0_p), rtol=1e-5, atol=1e-6)
    assert (guided - cfg).abs().max() > 1e-3
    assert no_hooks(net)


def tiny_dit_model():
    torch.manual_seed(0)
    net = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    return Denoiser(net.eval(), VPSchedule(1000), Prediction("eps"))


@pytest.mark.parametrize("params, message", [
    ({"pag": {"layers": ["nothing"]}}, r"pag layer 'nothing' matches no self-attention module of DiT"),
    ({"pag": {"layers": [5]}}, r"pag layer 5 is outside DiT.blocks \(2 blocks\)"),
    ({"slg": {"layers": []}}, r"slg layers must be a non-empty list"),
    ({"slg": {"layers": ["("]}}, r"slg layers must be a non-empty list .*regular expressions"),
    ({"pag": "mid"}, r"pag must be a mapping"),
    ({"pag": {"scale": 1.0, "layer": [0]}}, r"guidance 'pag': unknown 'layer' \(did you mean 'layers'\?\)"),
    ({"pag": {"scale": 1.0}}, r"bad parameters for guidance 'pag': .*layers"),
    ({"seg": {"layers": [0], "blur_sigma": 0}}, r"seg blur_sigma must be a number > 0"),
    ({"pag": {"layers": [0], "scale": -1.0}}, r"scale=-1.0 is below 0"),
    ({"slg": {"layers": ["x_embedder"]}}, r"slg cannot skip PatchEmbedder"),
])
def test_bad_terms_raise_one_config_error(params, message, one_thread):
    """Every bad term is one ConfigError naming the field, when built, bound or (a block that cannot be skipped)
    at its first guided call."""
    with pytest.raises(ConfigError, match=message):
        model = tiny_dit_model()
        GuidedDenoiser(model, make_guidance("cfg", scale=1.0, **params), torch.tensor([0, 1]))(
            torch.randn(2, 3, 8, 8), T)


def test_integer_layers_need_a_transformer_stack(one_thread):
    model = Denoiser(UNet(num_classes=3, image_size=8, channels=3, base_channels=8), VPSchedule(1000),
                     Prediction("eps"))
    with pytest.raises(ConfigError, match="UNet has no transformer stack .* name the layers by pattern"):
        GuidedDenoiser(model, make_guidance("cfg", pag={"layers": [0]}), torch.tensor([0]))
