"""Plain helpers and constants that several test modules share (fixtures live in ``conftest.py``): no test
module imports from another."""

import math
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import VPSchedule

# train.py's config of the tiny ToyMLP of sample.py's and sweep.py's tests (50 steps on Toy2D).
TRAIN_CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 50
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
model:
  net:
    class_path: lightning_reg.models.mlp.ToyMLP
    init_args: {num_classes: 2, dim: 2, hidden: 32, blocks: 1, x_scale: 1.0}
  lr: 0.005
  warmup_steps: 5
  ema_decay: 0.5
data:
  class_path: lightning_reg.data.toy.Toy2D
  init_args: {num_train: 2048, num_val: 128, batch_size: 128}
"""
# sample.py over that checkpoint: 30 samples in 3 shards of 10, batches of 4 inside a shard.
TOY_SAMPLE_ARGS = ["--num_samples", "30", "--shard_size", "10", "--batch_size", "4", "--steps", "6", "--seed", "5",
                   "--guidance", "{method: cfg, scale: 1.0, reg: paper}"]
TINY_CLASSIFIER = {"widths": (8, 16), "num_features": 32}


def classifier_checkpoint(path, image_size: int = 8, channels: int = 1, num_classes: int = 10, seed: int = 0):
    """A checkpoint as ``ClassifierTraining`` writes it (its ``on_save_checkpoint``), of an untrained tiny net."""
    from lightning_reg.metrics.classifier import ClassifierTraining

    torch.manual_seed(seed)
    module = ClassifierTraining(num_classes, image_size, channels, **TINY_CLASSIFIER)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def tiny_autoencoder():
    """4 blocks, like the SD VAE: downsampling by 8, 4 latent channels; 18k parameters."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 8, 8),
                         layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32)


def tiny_latent_dit(num_classes: int = 3):
    """A DiT on 4x4x4 latents (32x32 images), its zero-initialised layers perturbed so REG has a gradient."""
    from lightning_reg.models.dit import DiT

    torch.manual_seed(1)
    net = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
              num_classes=num_classes)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def train_tiny_dit(folder: Path, image_size: int, channels: int, *data_args: str) -> Path:
    """train.py, 2 steps of a 3-class DiT (width 32, depth 1) on ``image_size`` x ``channels`` inputs from the
    data module ``data_args``; its checkpoint."""
    from lightning_reg.cli import main as train_main

    train_main(["fit", "--seed_everything", "0", "--trainer.max_steps", "2", "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
                "--trainer.default_root_dir", str(folder), "--trainer.accelerator", "cpu",
                "--model.net", "lightning_reg.models.dit.DiT", "--model.net.num_classes", "3",
                "--model.net.input_size", str(image_size), "--model.net.in_channels", str(channels),
                "--model.net.hidden_size", "32", "--model.net.depth", "1", "--model.net.num_heads", "2", *data_args])
    (ckpt,) = folder.glob("checkpoints/*.ckpt")
    return ckpt


# --- guidance backbones with closed forms (test_guidance, test_reg_modes, test_guiders) ----------------------

NUM_CLASSES = 2
NULL = NUM_CLASSES
# a fixed non-diagonal, non-symmetric matrix; its column sums A^T 1 = (0.5, 0.6, 0.3)
A = torch.tensor([[0.3, -0.2, 0.5], [0.1, 0.4, -0.3], [0.1, 0.4, 0.1]], dtype=torch.float64)
BIAS = torch.tensor([[1.0, -2.0, 0.5], [-0.5, 1.5, 2.0], [0.2, 0.1, -0.3]], dtype=torch.float64)  # last row: null


class LinearEps(nn.Module):
    """``eps = A x + b_y`` on the flattened sample; ``A`` is (D, D) for ``D = prod(data_shape)``."""

    def __init__(self, a: torch.Tensor, bias: torch.Tensor, data_shape=(3,)):
        super().__init__()
        self.num_classes, self.data_shape = bias.shape[0] - 1, tuple(data_shape)
        self.register_buffer("a", a)
        self.register_buffer("bias", bias)

    def forward(self, x, t, y):
        flat = rearrange(x, "b ... -> b (...)")
        out = flat @ self.a.T + self.bias[y]
        return out.reshape(x.shape)


class SmoothNet(nn.Module):
    """A nonlinear float64 backbone ``tanh(W1 x + e_y + t c) @ W2`` with fixed random weights."""

    def __init__(self, dim: int = 3, hidden: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_classes, self.data_shape = NUM_CLASSES, (dim,)
        self.w1 = nn.Parameter(torch.randn(hidden, dim, generator=g, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.randn(dim, hidden, generator=g, dtype=torch.float64) / hidden ** 0.5)
        self.emb = nn.Parameter(torch.randn(NUM_CLASSES + 1, hidden, generator=g, dtype=torch.float64))
        self.c = nn.Parameter(torch.randn(hidden, generator=g, dtype=torch.float64) * 1e-3)

    def forward(self, x, t, y):
        return torch.tanh(x @ self.w1.T + self.emb[y] + t[:, None] * self.c) @ self.w2.T


class Counting(nn.Module):
    """Wraps a backbone; records each call's batch size and grad mode, and counts backward passes."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.num_classes, self.data_shape = net, net.num_classes, net.data_shape
        self.calls, self.backwards = [], 0

    def forward(self, x, t, y):
        out = self.net(x, t, y)
        self.calls.append((x.shape[0], torch.is_grad_enabled()))
        if out.requires_grad:
            out.register_hook(self._count_backward)
        return out

    def _count_backward(self, grad):
        self.backwards += 1


def vp_s(t: int, T: int = 1000) -> tuple[float, float]:
    """``(a_t, s_t)`` of DDPM linear betas 1e-4..0.02, computed here from the definition."""
    abar = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / (T - 1)) for i in range(t + 1))
    return math.sqrt(abar), math.sqrt(1 - abar)


def linear_model(a=A, bias=BIAS, data_shape=(3,)) -> Denoiser:
    return Denoiser(LinearEps(a, bias, data_shape), VPSchedule(1000), Prediction("eps"))


# Stable Diffusion over tiny components (conftest's ``tiny_components``): the latent shape, two captions, our
# text denoiser over the parts and their prompt embeddings.
LATENT = (4, 8, 8)
PROMPTS = ["a seven", "a red dot"]


def our_denoiser(parts: dict, null_embedding, gradient_checkpointing: bool = False):
    from lightning_reg.diffusion.latent import LatentCodec
    from lightning_reg.models.stable_diffusion import PromptUNet, text_denoiser
    from lightning_reg.sources.diffusers import schedule_from_scheduler_config

    schedule, prediction = schedule_from_scheduler_config(parts["scheduler"].config)
    return text_denoiser(PromptUNet(parts["unet"], gradient_checkpointing), schedule, prediction,
                         LatentCodec(parts["vae"]), null_embedding).eval()


def embeddings(parts: dict, prompts):
    from lightning_reg.models.stable_diffusion import PromptEncoder

    return PromptEncoder(parts["tokenizer"], parts["text_encoder"])(prompts)


def edit_json(path, **changes):
    """Rewrite the JSON file ``path`` with ``changes`` merged in (a pipeline folder made hostile or odd)."""
    import json

    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def reg_eps_by_hand(eps_c: torch.Tensor, x_in: torch.Tensor, eps_u: torch.Tensor, w: float, s, reg: str):
    """REG's guided epsilon by autograd on the conditional branch ``eps_c(x_in)`` (``x_in`` requires grad):
    ``paper``: ``eps_c + w d (1 - s grad_x sum(eps_c))``; ``vjp``: ``eps_c + w (d - s J^T d)``, ``d = eps_c - eps_u``.
    Returns the guided epsilon and ``d``."""
    d = (eps_c - eps_u).detach()
    if reg == "paper":
        (grad,) = torch.autograd.grad(eps_c.sum(), x_in)
        return eps_c.detach() + w * d * (1 - s * grad), d
    (jtd,) = torch.autograd.grad(eps_c, x_in, grad_outputs=d)
    return eps_c.detach() + w * (d - s * jtd), d


def refuse_edited_pipeline(refused, folder, tmp_path, edit, message, *args):
    """A copy of the pipeline ``folder`` changed by ``edit(copy)`` is refused by ``sample.py`` (with ``args``): one
    ``error:`` line matching ``message``, nothing written (conftest's ``refused``)."""
    import shutil

    from lightning_reg.sampling.cli import main as sample_main

    copy = shutil.copytree(folder, tmp_path / "pipe")
    edit(copy)
    (tmp_path / "p.txt").write_text("a seven\n")
    refused(lambda: sample_main(["--checkpoint", str(copy), "--prompts", str(tmp_path / "p.txt"), "--output",
                                 str(tmp_path / "out"), "--num_samples", "2", "--steps", "2", *args]),
            message, tmp_path / "out")


# --- flow-matching text-to-image (SD3, Flux): a local T5 tokenizer, REG against a float64 hand computation -----

FLOW_TIMES = (0.93, 0.6, 0.21)  # REG by hand at these flow times (APG's norm threshold 1 clips at the first two)


def local_t5_tokenizer():
    """A T5 tokenizer (Unigram) over a local vocabulary: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, characters and
    word-initial lower-case letters; 98 ids, ``model_max_length`` 512 (SD3's and Flux's T5 tokenizer config)."""
    import string

    from transformers import T5TokenizerFast

    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), *((c, -3.0) for c in chars),
             *(("▁" + c, -2.5) for c in string.ascii_lowercase)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def hand_term(method: str, x0_c, x0_u, w):
    """The guidance term ``g`` in x0 units: CFG ``w d``; APG ``w (d_orth + eta d_par)`` of the clipped ``d``
    (eta 0.25, threshold 1), ``d_par`` along ``x0_c`` per sample."""
    d = x0_c - x0_u
    if method == "cfg":
        return w * d
    norm = lambda v: torch.linalg.vector_norm(v, dim=(1, 2, 3), keepdim=True)  # noqa: E731
    d = d * (1 / norm(d)).clamp(max=1)
    unit = x0_c / norm(x0_c)
    parallel = (d * unit).sum(dim=(1, 2, 3), keepdim=True) * unit
    return w * (d - parallel + 0.25 * parallel)


HAND_METHODS = [("cfg", {}), ("apg", {"eta": 0.25, "norm_threshold": 1.0})]  # hand_term's methods and options


def check_flow_reg_by_hand(denoiser, velocity, x, y, null, method: str, extra: dict, reg: str,
                           w: float = 2.5, perturbed=None) -> float:
    """REG on the float64 flow ``denoiser`` (condition ``y``, null parts ``null``) against autograd on the bare
    network ``velocity(x, t, y)`` at ``FLOW_TIMES``: ``x0 = x - t v``, ``a_t = 1 - t``; paper:
    ``x0_c + a_t grad_x(1^T x0_c) ⊙ g``, vjp: ``x0_c + a_t J^T g`` (``J = d x0_c / d x``), ``g = hand_term``; compared
    in velocity units (rtol 1e-9), the rectification not negligible, no weight with a grad. ``perturbed``: ``(w_p,
    velocity_p)`` of a perturbed-branch term given in ``extra`` (SLG): ``g`` gains ``w_p (x0_c - x0_p)``,
    ``x0_p = x - t velocity_p(x, t, y)`` a constant. Returns the largest |difference| in velocity units."""
    from lightning_reg.guidance import GuidedDenoiser, make_guidance

    y_null = {key: value.expand_as(y[key]) for key, value in null.items()}
    worst = 0.0
    for t in FLOW_TIMES:
        x0_bar = GuidedDenoiser(denoiser, make_guidance(method, scale=w, reg=reg, **extra), y)(
            x, torch.tensor(t, dtype=torch.float64))
        x_in = x.clone().requires_grad_(True)
        x0_c = x_in - t * velocity(x_in, t, y)
        with torch.no_grad():
            x0_u = x - t * velocity(x, t, y_null)
            x0_p = None if perturbed is None else x - t * perturbed[1](x, t, y)
        g = hand_term(method, x0_c.detach(), x0_u, w)
        if perturbed is not None:
            g = g + perturbed[0] * (x0_c.detach() - x0_p)
        if reg == "paper":
            (grad,) = torch.autograd.grad(x0_c.sum(), x_in)
            expected = x0_c.detach() + (1 - t) * grad * g
        else:
            (jtg,) = torch.autograd.grad(x0_c, x_in, grad_outputs=g)
            expected = x0_c.detach() + (1 - t) * jtg
        torch.testing.assert_close((x - x0_bar) / t, (x - expected) / t, rtol=1e-9, atol=1e-10)
        worst = max(worst, float(((x0_bar - expected) / t).abs().max()))
        assert ((expected - x0_c.detach() - g) / t).abs().max() > 1e-3  # the rectification is not negligible
    assert all(p.grad is None for p in denoiser.parameters())
    return worst


# --- tiny SDXL, SD3 and Flux components (test_sdxl, test_sd3, test_flux; conftest's ``family_folder``) -----------

# stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json, the prediction type aside
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
                  "num_train_timesteps": 1000, "sample_max_value": 1.0, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
                  "use_karras_sigmas": False}
SD3_SHIFT = 3.0  # SD3's and SD3.5's scheduler/scheduler_config.json
# the tiny T5's width (SD3's and Flux's joint attention width), SD3's CLIP tokens, Flux's CLIP width
T5_WIDTH, CLIP_TOKENS, CLIP_WIDTH = 32, 16, 8
# black-forest-labs/FLUX.1-dev's and -schnell's scheduler/scheduler_config.json
FLUX_DYNAMIC = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15}
FLUX_SCHEDULERS = {"dev": {**FLUX_DYNAMIC, "shift": 3.0, "use_dynamic_shifting": True},
                   "schnell": {**FLUX_DYNAMIC, "shift": 1.0, "use_dynamic_shifting": False}}


def make_sdxl_components(tokenizer, prediction_type: str = "epsilon", seed: int = 0, projection_dim: int = 6) -> dict:
    """SDXL-like components: a 2-level UNet with ``addition_embed_type="text_time"`` (added embedding: pooled 6 +
    6 size ids x 4) and cross attention of width 8 + 12, the tiny SD VAE, a CLIP text encoder of width 8 and a
    ``CLIPTextModelWithProjection`` of width 12 (projection 6), SDXL's Euler scheduler config."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=20,
                                norm_num_groups=2, addition_embed_type="text_time", addition_time_embed_dim=4,
                                projection_class_embeddings_input_dim=6 + 6 * 4)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=2)
    clip = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, intermediate_size=16, num_attention_heads=2,
                num_hidden_layers=2, vocab_size=1000, max_position_embeddings=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=8, **clip))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=12, projection_dim=projection_dim, **clip))
    scheduler = EulerDiscreteScheduler.from_config({**SDXL_SCHEDULER, "prediction_type": prediction_type})
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                text_encoder_2=text_encoder_2.eval(), tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler)


def make_sd3_components(clip_tokenizer, t5_tokenizer, seed: int = 0) -> dict:
    """SD3-like components: an MMDiT of 2 blocks (width 16, 2x2 patches of 8x8x4 latents, joint attention 32, pooled
    12; SD3.5's layout: dual attention in the first block, RMS qk norm), SD3's VAE layout (no quant convs) with its
    shift and scale factors, two ``CLIPTextModelWithProjection`` of widths 8 and 12 (projections 6), a one-layer T5
    of width 32, SD3's scheduler (shift 3)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                                        caption_projection_dim=16, pooled_projection_dim=12, pos_embed_max_size=8,
                                        dual_attention_layers=(0,), qk_norm="rms_norm")
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=2, shift_factor=0.0609, scaling_factor=1.5305,
                        use_quant_conv=False, use_post_quant_conv=False)
    clip = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, intermediate_size=16, num_attention_heads=2,
                num_hidden_layers=2, vocab_size=1000, max_position_embeddings=CLIP_TOKENS, projection_dim=6)
    t5 = T5Config(vocab_size=len(t5_tokenizer), d_model=T5_WIDTH, d_kv=8, d_ff=16, num_layers=1, num_heads=2,
                  pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return dict(transformer=transformer.eval(), vae=vae.eval(),
                text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=8, **clip)).eval(),
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=12, **clip)).eval(),
                text_encoder_3=T5EncoderModel(t5).eval(), tokenizer=clip_tokenizer, tokenizer_2=clip_tokenizer,
                tokenizer_3=t5_tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(shift=SD3_SHIFT))


def make_flux_components(clip_tokenizer, t5_tokenizer, model: str = "dev", seed: int = 0) -> dict:
    """Flux-like components: a transformer of one double and one single block (2 heads of 8, rotary axes 2 + 2 + 4,
    joint attention 32, pooled 8; dev: ``guidance_embeds``) on 2x2-packed 8x8x4 latents, Flux's VAE layout (no
    quant convs) with its shift and scale factors, a ``CLIPTextModel`` of width 8, a one-layer T5 of width 32, the
    model's FlowMatch scheduler config."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * LATENT[0], num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                                         pooled_projection_dim=CLIP_WIDTH, guidance_embeds=model == "dev",
                                         axes_dims_rope=(2, 2, 4))
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=LATENT[0], norm_num_groups=2, shift_factor=0.1159, scaling_factor=0.3611,
                        use_quant_conv=False, use_post_quant_conv=False)
    clip = CLIPTextConfig(hidden_size=CLIP_WIDTH, bos_token_id=0, eos_token_id=1, pad_token_id=1, intermediate_size=16,
                          num_attention_heads=2, num_hidden_layers=2, vocab_size=1000, max_position_embeddings=16)
    t5 = T5Config(vocab_size=len(t5_tokenizer), d_model=T5_WIDTH, d_kv=8, d_ff=16, num_layers=1, num_heads=2,
                  pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return dict(transformer=transformer.eval(), vae=vae.eval(), text_encoder=CLIPTextModel(clip).eval(),
                text_encoder_2=T5EncoderModel(t5).eval(), tokenizer=clip_tokenizer, tokenizer_2=t5_tokenizer,
                scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULERS[model]))


def joint_prompt_embeds(y: dict, null: dict) -> dict:
    """SD3's / Flux's pipeline keywords for our prompt parts ``y`` and the negative prompt's ``null`` (broadcast)."""
    return dict(prompt_embeds=y["prompt_embeds"], pooled_prompt_embeds=y["pooled_projections"],
                negative_prompt_embeds=null["prompt_embeds"].expand_as(y["prompt_embeds"]),
                negative_pooled_prompt_embeds=null["pooled_projections"].expand_as(y["pooled_projections"]))


def check_prompt_parts(y: dict, null: dict, pipeline_embeds: tuple, pooled_key: str, shape: dict) -> None:
    """Our prompt parts ``y`` and null parts ``null`` against a pipeline's ``encode_prompt`` output
    ``(embeds, negative_embeds, pooled, negative_pooled)``: the prompts' bit for bit; the null prompt, encoded alone
    (the pipeline's once a prompt), to float32 rounding of another batch size."""
    embeds, negative_embeds, pooled, negative_pooled = pipeline_embeds
    assert {key: tuple(value.shape[1:]) for key, value in y.items()} == shape
    torch.testing.assert_close(y["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(y[pooled_key], pooled, rtol=0, atol=0)
    torch.testing.assert_close(null["prompt_embeds"].expand_as(embeds), negative_embeds)
    torch.testing.assert_close(null[pooled_key].expand_as(pooled), negative_pooled)
