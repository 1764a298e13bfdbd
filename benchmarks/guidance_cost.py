"""Cost of one guided denoiser call: conditional, CFG, CFG+REG (paper), CFG+REG (vjp).

Per backbone (the toy MLP on 2D points, a small DiT on 32x32x4 latents, the UNet of the 16x16 digits
config) this times one call of
``GuidedDenoiser`` at a mid time under ``torch.no_grad()`` (as the samplers run it): the median of
``--repeats`` rounds after warm-up, the four methods interleaved in every round; a ratio to CFG is
the median over rounds of the ratio within a round, so that load drifting on a shared machine cancels.
Both wall-clock and process CPU time are reported: on a loaded CPU machine the CPU time (best with
``--threads 1``, which leaves no idle-spinning worker threads) is the stable measure of compute.
Memory: on CUDA the peak allocated above the resting state (``torch.cuda.max_memory_allocated``);
on CPU, where torch has no allocator statistics, the bytes the autograd graph holds (tensors saved
for backward, deduplicated, parameters excluded, counted with ``torch.autograd.graph.saved_tensors_hooks``):
that is the memory REG adds over a no-grad forward, and zero for the no-grad methods.

    python benchmarks/guidance_cost.py [--device cpu|cuda] [--batch 4096] [--image-batch 16] [--patch 4]
                                       [--unet-batch 128] [--repeats 10] [--warmup 2] [--threads N]
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from functools import partial

import torch
from common import cuda_peak_bytes, interleaved_times, medians
from torch import nn

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import VPSchedule
from lightning_reg.guidance import GuidedDenoiser, make_guidance
from lightning_reg.models.dit import DiT
from lightning_reg.models.mlp import ToyMLP
from lightning_reg.models.unet import UNet

METHODS = {
    "conditional": dict(method="conditional"),
    "cfg": dict(method="cfg", scale=1.0),
    "cfg+reg(paper)": dict(method="cfg", scale=1.0, reg="paper"),
    "cfg+reg(vjp)": dict(method="cfg", scale=1.0, reg="vjp"),
}


def backbones(batch: int, image_batch: int, patch: int, unet_batch: int):
    """``(name, net, batch)``; the zero-initialised layers (DiT's adaLN and output, the UNet's output
    convolution) get small random weights, so the backward pass does real work."""
    dit = DiT(num_classes=10, input_size=32, in_channels=4, patch_size=patch, hidden_size=256, depth=6, num_heads=4,
              learn_sigma=False)
    unet = UNet(num_classes=10, image_size=16, channels=1, base_channels=32, channel_mult=(1, 2),
                attention_resolutions=(8,))
    with torch.no_grad():
        for p in (*dit.parameters(), *unet.parameters()):
            if not p.any():
                p.normal_(0, 0.02)
    return [("toy MLP, 2D", ToyMLP(num_classes=2, dim=2), batch),
            (f"DiT 32x32x4 /{patch}, w256 d6", dit, image_batch),
            ("UNet 16x16x1, b32 (1,2) attn 8", unet, unet_batch)]


@contextmanager
def saved_tensor_bytes(model: nn.Module, total: list[int]):
    """Adds to ``total[0]`` the bytes of distinct non-parameter storages saved for backward."""
    exclude = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen = set()

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exclude and ptr not in seen:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def peak_memory(call, model: nn.Module, device: torch.device) -> int:
    """Bytes: CUDA peak allocated above the resting state; CPU autograd saved-tensor bytes."""
    if device.type == "cuda":
        return cuda_peak_bytes(call, device)
    total = [0]
    with saved_tensor_bytes(model, total):
        call()
    return total[0]


def measure(net: nn.Module, batch: int, device: torch.device, repeats: int, warmup: int) -> dict[str, dict]:
    """Per method, for one call at the mid time t = 500 of 1000: median ``wall`` and ``cpu`` seconds,
    the medians over rounds of their ratios to CFG within a round, and ``memory`` bytes."""
    model = Denoiser(net, VPSchedule(1000), Prediction("eps")).to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *model.data_shape, generator=g).to(device)
    y = torch.randint(0, model.num_classes, (batch,), generator=g).to(device)
    t = torch.tensor(500.0)
    guided = {name: GuidedDenoiser(model, make_guidance(**params), y) for name, params in METHODS.items()}
    calls = {name: torch.no_grad()(partial(call, x, t)) for name, call in guided.items()}
    result = medians(interleaved_times(calls, repeats, warmup, device), reference="cfg")
    for name, call in calls.items():
        result[name]["memory"] = peak_memory(call, model, device)
    return result


def table(rows: list[tuple[str, int, dict]], device: torch.device) -> str:
    memory = ("peak alloc. above resting, MiB" if device.type == "cuda"
              else "autograd saved tensors, MiB")
    lines = [f"| backbone | batch | method | wall ms | wall / CFG | CPU ms | CPU / CFG | {memory} |",
             "|---|---|---|---|---|---|---|---|"]
    for backbone, batch, result in rows:
        for name, r in result.items():
            lines.append(f"| {backbone} | {batch} | {name} | {1e3 * r['wall']:.1f} | {r['wall_ratio']:.2f} | "
                         f"{1e3 * r['cpu']:.1f} | {r['cpu_ratio']:.2f} | {r['memory'] / 2 ** 20:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--batch", type=int, default=4096, help="toy MLP batch")
    parser.add_argument("--image-batch", type=int, default=16, help="DiT batch")
    parser.add_argument("--patch", type=int, default=4, help="DiT patch size (2: 256 tokens, 4: 64)")
    parser.add_argument("--unet-batch", type=int, default=128, help="UNet batch (the digits config's sampling batch)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [(name, batch, measure(net, batch, device, args.repeats, args.warmup))
            for name, net, batch in backbones(args.batch, args.image_batch, args.patch, args.unet_batch)]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"guided denoiser, one call at t = 500/1000, median of {args.repeats} ({where}, torch {torch.__version__})")
    print(table(rows, device))


if __name__ == "__main__":
    main()
