"""Sampling cost of DiT-XL/2 (``--model``) at 256x256 (32x32x4 latents): CFG, REG and its cheaper modes.

The public architecture (``DIT_CONFIGS["DiT-XL/2"]``, learned sigma, 1,000 classes) with random weights
(cost does not depend on them; the zero-initialised adaLN and output layers get N(0, 0.02) weights so the
backward pass does real work). One sampling step is one ``GuidedDenoiser`` step (guidance on channels
0-2, as the public sampler) as ``guidance_cost.measure`` times it (the methods of ``guidance_cost.METHODS``,
back to back in every round, medians over rounds).
Throughput: images per second of one step (batch / step time); a 250-step image takes 250 steps.

Memory, per method (a separate pass after the timing): ``common.memory``.

    python benchmarks/dit_xl_sampling.py [--device cpu|cuda] [--model DiT-XL/2] [--batch 4] [--precision fp32|bf16]
                                         [--repeats 3] [--warmup 1] [--threads N] [--compile]
"""

from __future__ import annotations

import argparse

import torch
from guidance_cost import cfg_reference, denoiser, measure, public_dit

def table(result: dict[str, dict], batch: int, device: torch.device) -> str:
    cpu = device.type == "cpu"
    head = ("| method | step wall s | images/s per step | wall / CFG | step CPU s | CPU / CFG | "
            + ("peak RSS above resting, MiB | peak / CFG | autograd saved, MiB |" if cpu
               else "peak alloc. above resting, MiB | peak / CFG |"))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in result.items():
        cfg = result[cfg_reference(device)]
        peak_ratio = f"{r['peak'] / cfg['peak']:.2f}" if cfg["peak"] >= 2 ** 20 else "-"
        row = (f"| {name} | {r['wall']:.2f} | {batch / r['wall']:.3f} | {r['wall_ratio']:.2f} | {r['cpu']:.2f} | "
               f"{r['cpu_ratio']:.2f} | {r['peak'] / 2 ** 20:.0f} | {peak_ratio} |")
        lines.append(row + (f" {r['saved'] / 2 ** 20:.0f} |" if cpu else ""))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--model", default="DiT-XL/2", help="a DIT_CONFIGS name (DiT-S/8 for a quick check)")
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--precision", default="fp32", help="fp32 or bf16 (autocast, as sample.py)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone (as sample.py --compile)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = denoiser(public_dit(args.model), device)
    if args.compile:
        model.net.compile()
    result = measure(model, args.batch, device, args.repeats, args.warmup, args.precision, guidance_channels=[0, 1, 2])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model}, 32x32x4 latents (256x256 images), batch {args.batch}, {args.precision}"
          f"{', compiled' if args.compile else ''}: one step at t = 500/1000, median of {args.repeats} "
          f"({where}, torch {torch.__version__})")
    print(table(result, args.batch, device))


if __name__ == "__main__":
    main()
