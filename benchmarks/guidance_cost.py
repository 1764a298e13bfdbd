"""Cost of one guided sampling step: CFG in both branch layouts, REG paper, vjp and each cheaper REG mode.

Per backbone (the toy MLP on 2D points, the digits UNet of ``configs/mnist.yaml``, optionally DiT-XL/2 with
random weights) and per batch size, this times one ``GuidedDenoiser`` step under ``torch.no_grad()`` (as
the samplers run it) at the mid time of a 20-step DDIM chain:

* ``cfg (2B)`` / ``cfg (B+B)``: CFG with ``branch_layout`` ``batched`` / ``split``;
* ``reg paper``, ``reg vjp``: the autograd forms;
* ``reuse k``: a chain of k steps (one autograd factor, k - 1 reused), timed together and divided by k;
* ``graph_free (3B)`` / ``graph_free (B+B+B)``: the finite-difference factor in either layout;
* ``graph_free_reuse k``: a chain of k steps (one finite-difference factor, k - 1 carried), divided by k;
* ``adaptive``: the whole 20-step chain at one ``x`` (its intervals follow the factor's drift there), divided by 20;
  its cost on real chains is the sampling time of the digits sweep (docs/guidance.md);
* ``short 1`` / ``short 2``: the paper factor with the backward through the last one or two blocks only;
* ``window``: not timed, derived per step as ``share * paper + (1 - share) * cfg`` with the share of the 20
  DDIM steps inside the default ``reg_window``.

Medians of ``--repeats`` rounds after warm-up, all methods interleaved in every round; ratios are to the CFG
layout the library picks on this device (``branch_layout: auto``), the median over rounds of the ratio within
a round (``common.py``). Memory per step: ``common.memory`` (CUDA peak allocated; CPU peak resident set above
resting, and the autograd graph's saved bytes), over the whole k-step chain for ``reuse``.

    python benchmarks/guidance_cost.py [--device cpu|cuda] [--mlp-batches 2000 8192] [--unet-batches 125 250 500]
                                       [--dit-batches 4] [--precision fp32|bf16] [--repeats 5] [--warmup 1]
                                       [--threads N] [--methods 'cfg (2B)' 'cfg (B+B)' 'reg paper' ...]
"""

from __future__ import annotations

import argparse

import torch
from common import interleaved_times, medians, memory

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import VPSchedule
from lightning_reg.guidance import GuidedDenoiser, make_guidance
from lightning_reg.guidance.reg import DEFAULT_WINDOW
from lightning_reg.models.dit import DIT_CONFIGS, DiT
from lightning_reg.models.mlp import ToyMLP
from lightning_reg.models.unet import UNet
from lightning_reg.sampling.engine import autocast

CHAIN_STEPS = 20  # the digits and DiT configs' DDIM steps: where the step time and window share are read
# name -> (guidance parameters, chain steps per timed call)
METHODS = {
    "conditional": (dict(method="conditional"), 1),
    "cfg (2B)": (dict(method="cfg", scale=1.0, branch_layout="batched"), 1),
    "cfg (B+B)": (dict(method="cfg", scale=1.0, branch_layout="split"), 1),
    "reg paper": (dict(method="cfg", scale=1.0, reg="paper"), 1),
    "reg vjp": (dict(method="cfg", scale=1.0, reg="vjp"), 1),
    "reuse 2": (dict(method="cfg", scale=1.0, reg="reuse", reg_every=2), 2),
    "reuse 4": (dict(method="cfg", scale=1.0, reg="reuse", reg_every=4), 4),
    "graph_free (3B)": (dict(method="cfg", scale=1.0, reg="graph_free", branch_layout="batched"), 1),
    "graph_free (B+B+B)": (dict(method="cfg", scale=1.0, reg="graph_free", branch_layout="split"), 1),
    **{f"graph_free_reuse {k}": (dict(method="cfg", scale=1.0, reg="graph_free_reuse", reg_every=k), k)
       for k in range(2, 9)},
    "adaptive": (dict(method="cfg", scale=1.0, reg="adaptive"), CHAIN_STEPS),
    "short 1": (dict(method="cfg", scale=1.0, reg="short", reg_blocks=1), 1),
    "short 2": (dict(method="cfg", scale=1.0, reg="short", reg_blocks=2), 1),
}


def unet() -> UNet:
    """``configs/mnist.yaml``'s UNet (no attention)."""
    return UNet(num_classes=10, image_size=16, channels=1, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=())


def public_dit(name: str = "DiT-XL/2") -> DiT:
    """A public DiT architecture (``DIT_CONFIGS``) on 32x32x4 latents (256x256 images), learned sigma, 1,000 classes."""
    return DiT(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True, **DIT_CONFIGS[name])


def denoiser(net: torch.nn.Module, device: torch.device) -> Denoiser:
    """``net`` as a VP linear-1000 eps denoiser; zero-initialised layers (DiT's adaLN and output, the UNet's last
    convolution) get N(0, 0.02) weights so the backward pass does real work."""
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return Denoiser(net, VPSchedule(1000), Prediction("eps")).to(device).eval()


def window_share(steps: int = CHAIN_STEPS) -> float:
    """The share of a ``steps``-step DDIM chain's steps whose progress lies in the default ``reg_window``."""
    schedule = VPSchedule(1000)
    progress = [schedule.progress(t) for t in schedule.sampling_times(steps)[:-1]]
    return sum(DEFAULT_WINDOW[0] <= p <= DEFAULT_WINDOW[1] for p in progress) / len(progress)


def cfg_reference(device: torch.device) -> str:
    """The CFG row ratios refer to: the layout ``branch_layout: auto`` picks on ``device``."""
    return "cfg (B+B)" if device.type == "cpu" else "cfg (2B)"


def measure(model: Denoiser, batch: int, device: torch.device, repeats: int, warmup: int, precision: str = "fp32",
            methods: tuple[str, ...] = tuple(METHODS), **guidance) -> dict[str, dict]:
    """Per method of ``methods`` (names of ``METHODS``): median ``wall`` and ``cpu`` seconds per chain step, their
    ratios to the device's CFG layout, and ``memory`` (``common.memory``); plus the derived ``window`` row."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *model.data_shape, generator=g).to(device)
    y = torch.randint(0, model.num_classes, (batch,), generator=g).to(device)
    times = model.schedule.sampling_times(CHAIN_STEPS)

    def run(params: dict, steps: int):
        chain = GuidedDenoiser(model, make_guidance(**params, **guidance), y)  # a fresh chain: reuse recomputes
        start = min(CHAIN_STEPS // 2, CHAIN_STEPS - steps)  # from the mid time, or earlier for a long chain
        with torch.no_grad(), autocast(device, precision):
            for t in times[start:start + steps]:
                chain(x, t)

    chosen = {name: METHODS[name] for name in methods}
    calls = {name: (lambda p=params, k=steps: run(p, k)) for name, (params, steps) in chosen.items()}
    timed = interleaved_times(calls, repeats, warmup, device)
    for name, (_, steps) in chosen.items():
        timed[name] = {clock: [v / steps for v in seconds] for clock, seconds in timed[name].items()}
    reference = cfg_reference(device)
    result = medians(timed, reference)
    for name, call in calls.items():
        result[name].update(memory(call, model, device))
    share, paper, cfg = window_share(), result["reg paper"], result[reference]
    result[f"window {list(DEFAULT_WINDOW)} (derived)"] = {
        key: share * paper[key] + (1 - share) * cfg[key] for key in ("wall", "cpu", "wall_ratio", "cpu_ratio")
    } | {"peak": paper["peak"], **({"saved": paper["saved"]} if "saved" in paper else {})}
    return result


def table(rows: list[tuple[str, int, dict]], device: torch.device) -> str:
    cpu = device.type == "cpu"
    head = ("| backbone | batch | method | wall ms | wall / CFG | CPU ms | CPU / CFG | "
            + ("peak RSS above resting, MiB | autograd saved, MiB |" if cpu else "peak alloc. above resting, MiB |"))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for backbone, batch, result in rows:
        for name, r in result.items():
            line = (f"| {backbone} | {batch} | {name} | {1e3 * r['wall']:.1f} | {r['wall_ratio']:.2f} | "
                    f"{1e3 * r['cpu']:.1f} | {r['cpu_ratio']:.2f} | {r['peak'] / 2 ** 20:.1f} |")
            lines.append(line + (f" {r['saved'] / 2 ** 20:.1f} |" if cpu else ""))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--mlp-batches", type=int, nargs="*", default=[2000, 8192], help="toy MLP batches")
    parser.add_argument("--unet-batches", type=int, nargs="*", default=[125, 250, 500],
                        help="digits UNet batches (configs/mnist.yaml samples in batches of 500)")
    parser.add_argument("--dit-batches", type=int, nargs="*", default=[],
                        help="DiT-XL/2 batches (random weights; about 3 s per image forward on one CPU thread)")
    parser.add_argument("--precision", default="fp32", help="fp32 or bf16 (autocast, as sample.py)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), metavar="NAME",
                        help=f"rows to time (the CFG reference and 'reg paper' always): {', '.join(map(repr, METHODS))}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    methods = tuple(name for name in METHODS
                    if name in args.methods or name in ("reg paper", cfg_reference(torch.device(args.device))))
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbones = [("toy MLP, 2D", lambda: ToyMLP(num_classes=2, dim=2), args.mlp_batches, {}),
                 ("digits UNet 16x16, b32 (1,2)", unet, args.unet_batches, {}),
                 ("DiT-XL/2, 32x32x4", public_dit, args.dit_batches, {"guidance_channels": [0, 1, 2]})]
    rows = []
    for name, build, batches, guidance in backbones:
        if batches:
            model = denoiser(build(), device)
            for batch in batches:
                rows.append((name, batch, measure(model, batch, device, args.repeats, args.warmup, args.precision,
                                                  methods, **guidance)))
                print(f"measured {name} at batch {batch}", flush=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"one guided step of a {CHAIN_STEPS}-step DDIM chain at its mid time, {args.precision}, median of "
          f"{args.repeats} ({where}, torch {torch.__version__}); window share {window_share():.2f}")
    print(table(rows, device))


if __name__ == "__main__":
    main()
