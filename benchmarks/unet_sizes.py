"""Training and sampling cost of candidate UNet sizes for the CPU digits config (16x16 grayscale).

Per candidate: parameters; one training step of ``--batch`` (``plain_training_step``: diffusion loss,
backward, AdamW, EMA, as ``ConditionalDiffusion`` does it); one CFG sampling step for ``--batch``
samples (a no-grad forward of 2 x batch); one CFG + REG (paper) step for ``--batch`` samples (a no-grad
forward of batch, a forward of batch with a graph, one backward to x). All calls are interleaved in every
round (benchmarks/common.py); medians after warm-up, wall-clock and process CPU seconds.

    python benchmarks/unet_sizes.py [--threads N] [--batch 128] [--image-size 16] [--repeats 5] [--warmup 2]
"""

from __future__ import annotations

import argparse

import torch
from common import interleaved_times, medians, plain_optimizer, plain_training_step

from lightning_reg.guidance import GuidedDenoiser, make_guidance
from lightning_reg.models.unet import UNet
from lightning_reg.module import ConditionalDiffusion

CANDIDATES = {
    "b16 (1,2) attn 8": dict(base_channels=16, channel_mult=(1, 2), attention_resolutions=(8,)),
    "b16 (1,2) no attn": dict(base_channels=16, channel_mult=(1, 2), attention_resolutions=()),
    "b24 (1,2) no attn": dict(base_channels=24, channel_mult=(1, 2), attention_resolutions=()),
    "b32 (1,2) attn 8": dict(base_channels=32, channel_mult=(1, 2), attention_resolutions=(8,)),
    "b32 (1,2) no attn": dict(base_channels=32, channel_mult=(1, 2), attention_resolutions=()),
    "b32 (1,2,2) attn 8": dict(base_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(8,)),
    "b48 (1,2) attn 8": dict(base_channels=48, channel_mult=(1, 2), attention_resolutions=(8,)),
}
OPERATIONS = ("train step", "CFG step", "REG step")


def candidate_calls(net: UNet, batch: int):
    """The three timed calls of one candidate, on fixed random data."""
    module = ConditionalDiffusion(net, lr=1e-4, warmup_steps=0)
    optimizer, scheduler = plain_optimizer(module)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *net.data_shape, generator=g)
    y = torch.randint(0, net.num_classes, (batch,), generator=g)
    t = torch.tensor(500.0)
    denoiser = module.ema_denoiser().eval()
    cfg = GuidedDenoiser(denoiser, make_guidance("cfg", scale=1.0), y)
    reg = GuidedDenoiser(denoiser, make_guidance("cfg", scale=1.0, reg="paper"), y)
    with torch.no_grad():  # the zero output convolution would make REG's backward trivial
        for p in module.ema.module.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return {"train step": lambda: plain_training_step(module, optimizer, scheduler, x, y),
            "CFG step": torch.no_grad()(lambda: cfg(x, t)),
            "REG step": torch.no_grad()(lambda: reg(x, t))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--batch", type=int, default=128, help="training batch and samples per sampling step")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    nets = {name: UNet(num_classes=10, image_size=args.image_size, channels=1, **kw) for name, kw in CANDIDATES.items()}
    calls = {(name, op): call for name, net in nets.items() for op, call in candidate_calls(net, args.batch).items()}
    result = medians(interleaved_times(calls, args.repeats, args.warmup, torch.device("cpu")),
                     reference=next(iter(calls)))
    print(f"UNet candidates, {args.image_size}x{args.image_size}x1, batch {args.batch}, median of {args.repeats} "
          f"(CPU, {torch.get_num_threads()} threads, torch {torch.__version__}); seconds wall (CPU)")
    print("| UNet | params | " + " | ".join(f"{op}, s" for op in OPERATIONS) + " |")
    print("|---|---|" + "---|" * len(OPERATIONS))
    for name, net in nets.items():
        cells = [f"{result[name, op]['wall']:.3f} ({result[name, op]['cpu']:.3f})" for op in OPERATIONS]
        print(f"| {name} | {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
