"""Cost of one guided step on the Stable Diffusion 1.5 UNet: CFG against CFG+REG (paper, vjp), REG with and
without gradient checkpointing.

The UNet is SD 1.5's architecture (``UNet2DConditionModel`` with its published config: blocks 320-640-1280-1280,
2 layers a block, cross attention of width 768, 8 heads; 860M parameters) with random weights, on 64x64x4
latents (512x512 images) and random prompt embeddings of 77 x 768; one ``GuidedDenoiser`` call at t = 500 of
SD's scaled-linear schedule under ``torch.no_grad()`` as the samplers run it. CFG is one no-grad call of 2B;
REG is the unconditional call of B without a graph, the conditional call of B with one and the backward to
the latents (``docs/text_to_image.md``). The methods run interleaved in every round (``common.py``); ratios to
CFG are medians over rounds of the ratio within a round. Memory (``common.memory``): on CUDA the peak allocated
above the resting state; on CPU the peak resident set above resting and the bytes of the tensors the autograd
graph saves between forward and backward (parameters excluded; with checkpointing, the recomputation in backward
holds one block's activations more at a time).

    python benchmarks/sd_cost.py [--batches 1 2 4] [--repeats 1] [--warmup 0] [--threads N]
                                 [--device cpu|cuda] [--dtype fp32|fp16|bf16]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from common import interleaved_times, medians, memory
from guidance_cost import table

from lightning_reg.diffusion.latent import LatentCodec
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import VPSchedule
from lightning_reg.diffusion.latent import LatentDenoiser
from lightning_reg.models.stable_diffusion import PromptUNet, text_denoiser
from lightning_reg.guidance import GuidedDenoiser, make_guidance

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
PROMPT_TOKENS = 77
METHODS = {  # name: (guidance, gradient checkpointing)
    "cfg": (dict(method="cfg", scale=7.5, convention="w2"), False),
    "cfg+reg(paper)": (dict(method="cfg", scale=7.5, convention="w2", reg="paper"), False),
    "cfg+reg(vjp)": (dict(method="cfg", scale=7.5, convention="w2", reg="vjp"), False),
    "cfg+reg(paper), ckpt": (dict(method="cfg", scale=7.5, convention="w2", reg="paper"), True),
    "cfg+reg(vjp), ckpt": (dict(method="cfg", scale=7.5, convention="w2", reg="vjp"), True),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sd15_denoiser(device: torch.device, dtype: torch.dtype) -> LatentDenoiser:
    """SD 1.5's UNet (random weights, frozen) and schedule; a tiny VAE stands in for the codec, which a
    guided step never runs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval().requires_grad_(False)
    vae = AutoencoderKL(block_out_channels=(4, 4, 4, 4), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=2)
    schedule = VPSchedule(1000, "scaled_linear", 0.00085, 0.012, spacing="leading", steps_offset=1,
                          final_alpha_one=False)
    null = torch.randn(PROMPT_TOKENS, SD15_UNET["cross_attention_dim"])
    return text_denoiser(PromptUNet(unet), schedule, Prediction("eps"), LatentCodec(vae), null).to(device, dtype).eval()


def guided_step(guided: GuidedDenoiser, unet, checkpointing: bool, x, t) -> None:
    """One guided call with the UNet's gradient checkpointing set as the method asks."""
    unet.enable_gradient_checkpointing() if checkpointing else unet.disable_gradient_checkpointing()
    with torch.no_grad():
        guided(x, t)


def measure(model: LatentDenoiser, batch: int, device: torch.device, repeats: int, warmup: int) -> dict[str, dict]:
    g = torch.Generator().manual_seed(batch)
    dtype = model.conditioning.null_embedding.dtype
    x = torch.randn(batch, *model.data_shape, generator=g).to(device, dtype)
    y = torch.randn(batch, *model.conditioning.shape, generator=g).to(device, dtype)
    t, unet = torch.tensor(500.0), model.net.unet
    steps = {name: partial(guided_step, GuidedDenoiser(model, make_guidance(**guidance), y), unet, checkpointing,
                           x, t) for name, (guidance, checkpointing) in METHODS.items()}
    result = medians(interleaved_times(steps, repeats, warmup, device), reference="cfg")
    for name, step in steps.items():
        result[name].update(memory(step, model, device))
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1], help="batch sizes (prompts per step)")
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights and latents")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = sd15_denoiser(device, DTYPES[args.dtype])
    rows = [("SD 1.5 UNet 64x64x4", batch, measure(model, batch, device, args.repeats, args.warmup))
            for batch in args.batches]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    params = sum(p.numel() for p in model.net.parameters()) / 1e6
    print(f"SD 1.5 UNet ({params:.0f}M parameters, random weights), 64x64x4 latents, one guided step at t = 500, "
          f"{args.dtype}, median of {args.repeats} ({where}, torch {torch.__version__})")
    print(table(rows, device))


if __name__ == "__main__":
    main()
