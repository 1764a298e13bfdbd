"""Sampling cost of DiT-XL/2 (``--model``) at 256x256 (32x32x4 latents): conditional, CFG, CFG+REG (paper), CFG+REG (vjp).

The public architecture (``DIT_CONFIGS["DiT-XL/2"]``, learned sigma, 1,000 classes) with random weights
(cost does not depend on them; the zero-initialised adaLN and output layers get N(0, 0.02) weights so the
backward pass does real work). One sampling step is one ``GuidedDenoiser`` call (guidance on channels
0-2, as the public sampler) at the mid time t = 500 of 1000 under ``no_grad``, as the samplers run it;
the four methods are timed back to back in every round (``benchmarks/common.py``), medians over rounds.
Throughput: images per second of one step (batch / step time); a 250-step image takes 250 steps.

Memory, per method, over one call (a separate pass after the timing):
* CUDA: ``torch.cuda.max_memory_allocated`` above the resting state (weights excluded);
* CPU: the process's resident set size above the resting state at its peak, read from
  ``/proc/self/statm`` every millisecond by a thread (glibc is told to mmap every block >= 64 KiB, so a
  freed tensor leaves the resident set at once), and the bytes the autograd graph saves (REG's extra
  memory, exact). Linux only.

    python benchmarks/dit_xl_sampling.py [--device cpu|cuda] [--model DiT-XL/2] [--batch 4] [--precision fp32|bf16]
                                         [--repeats 3] [--warmup 1] [--threads N] [--compile]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import threading
import time

import torch
from common import cuda_peak_bytes, interleaved_times, medians
from guidance_cost import METHODS, saved_tensor_bytes

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import VPSchedule
from lightning_reg.guidance import GuidedDenoiser, make_guidance
from lightning_reg.models.dit import DIT_CONFIGS, DiT
from lightning_reg.sampling.engine import autocast

PAGE = os.sysconf("SC_PAGE_SIZE")
M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)


def return_freed_memory() -> None:
    """glibc: give the pages of free heap memory back (``malloc_trim``) and serve every later block >= 64 KiB
    by its own mmap, so that freeing a tensor lowers the resident set size at once."""
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def rss_peak_above_resting(call, interval: float = 1e-3) -> int:
    """Peak resident set size during ``call()`` minus the size before it (polled every ``interval`` s)."""
    resting, peak, done = resident_bytes(), [0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(interval)

    watcher = threading.Thread(target=poll)
    watcher.start()
    try:
        call()
    finally:
        done.set()
        watcher.join()
    return max(peak[0], resident_bytes()) - resting


def memory(call, model: torch.nn.Module, device: torch.device) -> dict[str, int]:
    if device.type == "cuda":
        return {"peak": cuda_peak_bytes(call, device)}
    return_freed_memory()  # else pages a previous call left in malloc's free lists hide this call's peak
    peak = rss_peak_above_resting(call)
    saved = [0]
    with saved_tensor_bytes(model, saved):
        call()
    return {"peak": peak, "saved": saved[0]}


def public_dit(name: str, device: torch.device) -> Denoiser:
    """``name`` (``DIT_CONFIGS``) on 32x32x4 latents, random weights, as a VP linear-1000 eps denoiser."""
    torch.manual_seed(0)
    net = DiT(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True, **DIT_CONFIGS[name])
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return Denoiser(net, VPSchedule(1000, "linear"), Prediction("eps")).to(device).eval()


def measure(model: Denoiser, batch: int, device: torch.device, precision: str, repeats: int,
            warmup: int) -> dict[str, dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *model.data_shape, generator=g).to(device)
    y = torch.randint(0, model.num_classes, (batch,), generator=g).to(device)
    t = torch.tensor(500.0)
    guided = {name: GuidedDenoiser(model, make_guidance(**params, guidance_channels=[0, 1, 2]), y)
              for name, params in METHODS.items()}

    def step(name):
        with torch.no_grad(), autocast(device, precision):
            return guided[name](x, t)

    result = medians(interleaved_times({name: lambda n=name: step(n) for name in guided}, repeats, warmup, device),
                     "cfg")
    for name in guided:
        result[name].update(memory(lambda: step(name), model, device))
    return result


def table(result: dict[str, dict], batch: int, device: torch.device) -> str:
    cpu = device.type == "cpu"
    head = ("| method | step wall s | images/s per step | wall / CFG | step CPU s | CPU / CFG | "
            + ("peak RSS above resting, MiB | peak / CFG | autograd saved, MiB |" if cpu
               else "peak alloc. above resting, MiB | peak / CFG |"))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in result.items():
        peak_ratio = f"{r['peak'] / result['cfg']['peak']:.2f}" if result["cfg"]["peak"] >= 2 ** 20 else "-"
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
    model = public_dit(args.model, device)
    if args.compile:
        model.net.compile()
    result = measure(model, args.batch, device, args.precision, args.repeats, args.warmup)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model}, 32x32x4 latents (256x256 images), batch {args.batch}, {args.precision}"
          f"{', compiled' if args.compile else ''}: one step at t = 500/1000, median of {args.repeats} "
          f"({where}, torch {torch.__version__})")
    print(table(result, args.batch, device))


if __name__ == "__main__":
    main()
