"""Cost of EDM2 guidance and of reading the official snapshots safely (docs/edm2.md).

Guidance: the img512 networks of the EDM2 presets (64x64x4 latents, the real constructor arguments, random
float16 weights with every gain 1) on the CPU at ``--batch`` (1): one guided denoiser call ``D(x, sigma)``
at sigma 1 (a Heun step makes two) for CFG (reference: the unconditional XS net), autoguidance (reference:
XS for S, M for XXL, as the presets) and each with REG paper / vjp, interleaved round by round
(``common.py``); time as a ratio to CFG; memory: the peak resident set above the resting state during one
call of each, in a separate process (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``; see
``peak_rss_above_resting``), so the weights are excluded.

Reader: a random XXL-size network written in the official snapshot layout by ``write_snapshot`` (a
stand-in ``torch_utils.persistence`` / ``dnnlib.util`` registered for the writer only; no shipped weights),
then read in a fresh process: ``read_edm2_pickle`` alone, ``load_edm2`` (reader + network), and
``load_edm2`` of its ``convert_edm2`` safetensors file, each with wall time and peak resident set.

    python benchmarks/edm2_cost.py [--sizes s xxl] [--batch 1] [--repeats 2] [--warmup 1] [--threads 1]
                                   [--reader-size xxl] [--no-reader] [--no-memory] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from common import interleaved_times, medians
from torch import nn

from lightning_reg.guidance import GuidedDenoiser, make_guidance
from lightning_reg.models.edm2 import EDM2Denoiser, EDM2Precond, edm2_img512_config

# the presets' guiding networks (EDM2 and autoguidance papers): CFG guides with the unconditional XS net
AUTOGUIDE = {"xs": "xs", "s": "xs", "m": "xs", "l": "xs", "xl": "s", "xxl": "m"}
METHODS = ("cfg", "cfg+reg(paper)", "cfg+reg(vjp)", "autoguidance", "autoguidance+reg(paper)",
           "autoguidance+reg(vjp)")


def random_net(size: str, label_dim: int = 1000) -> EDM2Precond:
    """An img512 EDM2 network with random float16 weights (as the snapshots store them), gains 1."""
    with torch.device("meta"):
        net = EDM2Precond(**dict(edm2_img512_config(size), label_dim=label_dim)).half()
    net = net.to_empty(device="cpu")
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith("gain"):
                tensor.fill_(1.0)
            elif name.endswith("phases"):
                tensor.uniform_(0, 2 * math.pi)
            else:
                tensor.normal_(0, 2 * math.pi if name.endswith("freqs") else 1.0)
    return net.eval().requires_grad_(False)


def peak_rss_above_resting(call) -> int:
    """Bytes of resident memory ``call`` adds at its peak (Linux: ``VmHWM`` after a reset, minus ``VmRSS``).

    Measured in a child process (``_child``) with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 1 MiB, so every
    tensor above that is its own mapping, returned to the system when freed: the resident set then follows
    the live tensors instead of the allocator's cache, and the peak of one call is not hidden by memory an
    earlier call freed. (Timing runs in the parent with the default allocator: the page faults of that
    setting would inflate the calls that allocate more.)"""
    def status(field: str) -> int:
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
        return int(line.split()[1]) * 1024

    Path("/proc/self/clear_refs").write_text("5")
    resting = status("VmRSS")
    call()
    return status("VmHWM") - resting


def guided_calls(size: str, batch: int) -> tuple[dict, dict]:
    """One guided denoiser call per method on random img512 networks, and their parameter counts."""
    torch.manual_seed(0)
    main, uncond, guide = random_net(size), random_net("xs", label_dim=0), random_net(AUTOGUIDE[size])
    x, y, sigma = torch.randn(batch, 4, 64, 64), torch.randint(0, 1000, (batch,)), torch.tensor(1.0)
    calls = {}
    for name in METHODS:
        pair, _, reg = name.partition("+reg(")
        reg = reg.rstrip(")") or "none"
        if pair == "cfg":
            denoiser, guidance = EDM2Denoiser(main), make_guidance(
                "cfg", scale=2.0, convention="w2", reg=reg, reference=EDM2Denoiser(uncond))
        else:
            denoiser, guidance = EDM2Denoiser(main), make_guidance(
                "autoguidance", scale=2.0, convention="w2", reg=reg, reference=EDM2Denoiser(guide))
        calls[name] = lambda guided=GuidedDenoiser(denoiser, guidance, y): guided(x, sigma)
    params = {k: sum(p.numel() for p in n.parameters()) for k, n in (("main", main), ("guide", guide))}
    return calls, params


def peak_memory(size: str, batch: int) -> dict[str, int]:
    """``peak_rss_above_resting`` of one call per method, in a fresh process with the mmap threshold fixed."""
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import torch; "
            f"from edm2_cost import guided_calls, peak_rss_above_resting; torch.set_num_threads(1); "
            f"calls, _ = guided_calls({size!r}, {batch}); torch.set_grad_enabled(False); "
            f"print(json.dumps({{k: peak_rss_above_resting(c) for k, c in calls.items()}}))")
    return json.loads(_child(code))


def guidance_rows(size: str, batch: int, repeats: int, warmup: int, memory: bool = True) -> list[dict]:
    calls, params = guided_calls(size, batch)
    with torch.no_grad():
        stats = medians(interleaved_times(calls, repeats, warmup, torch.device("cpu")), "cfg")
    del calls
    try:
        memory = peak_memory(size, batch) if memory else dict.fromkeys(METHODS)
    except subprocess.CalledProcessError as err:  # e.g. killed for memory: keep the timings
        print(f"memory of {size}: the measuring process failed ({err.returncode}): {err.stderr[-300:]}")
        memory = dict.fromkeys(METHODS)
    return [dict(size=size, guide=AUTOGUIDE[size], params=params, method=name, memory=memory[name], **stats[name])
            for name in METHODS]


def _child(code: str) -> str:
    """Run ``code`` in a fresh interpreter with glibc's mmap threshold fixed (``peak_rss_above_resting``)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2 ** 20))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout


# ------------------------------------------------------------------------------------- snapshot writer
class _Persistent(nn.Module):
    """Pickles as the official ``_reconstruct_persistent_obj(meta)`` call, with a canary as ``module_src``."""

    def __init__(self, class_name: str, state: dict):
        super().__init__()
        self.meta = dict(type="class", version=6, class_name=class_name, state=state,
                         module_src="raise RuntimeError('benchmark snapshot: pickled source was executed')\n")

    def __reduce__(self):
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (self.meta,)


def _snapshot_of(module: nn.Module, init_kwargs: dict | None = None):
    """The official pickled form of ``module``: ``ModuleDict`` stays a torch container, the rest persistent."""
    children = {k: _snapshot_of(c) for k, c in module._modules.items()}
    if isinstance(module, nn.ModuleDict):
        return nn.ModuleDict(children)
    state = dict(training=False, _parameters=dict(module._parameters), _buffers=dict(module._buffers),
                 _modules=children, _init_kwargs=init_kwargs or {})
    return _Persistent(type(module).__name__.replace("EDM2Precond", "Precond"), state)


def write_snapshot(net: EDM2Precond, init_kwargs: dict, path: Path) -> None:
    """Write ``net`` as an official ``edm2-*.pkl`` would be (EasyDict with ema / encoder / loss_fn)."""
    persistence, util = types.ModuleType("torch_utils.persistence"), types.ModuleType("dnnlib.util")
    persistence._reconstruct_persistent_obj = lambda meta: None
    persistence._reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    persistence._reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    util.EasyDict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    added = {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
             "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}
    sys.modules.update(added)
    try:
        scale = np.float32(0.5) / np.array([4.17, 4.62, 3.71, 3.28], dtype=np.float32)
        encoder = _Persistent("StabilityVAEEncoder", dict(_init_kwargs={"vae_name": "stabilityai/sd-vae-ft-mse"},
                                                          scale=scale, bias=-np.array([5.81, 3.25, 0.12, -2.15],
                                                                                      dtype=np.float32) * scale))
        loss = _Persistent("EDM2Loss", dict(_init_kwargs=dict(P_mean=-0.4, P_std=1.0, sigma_data=0.5)))
        data = util.EasyDict(ema=_snapshot_of(net, init_kwargs), encoder=encoder, loss_fn=loss,
                             dataset_kwargs={})
        with path.open("wb") as f:
            pickle.dump(data, f, protocol=4)
    finally:
        for name in added:
            sys.modules.pop(name)


READERS = {
    "read_edm2_pickle": "from lightning_reg.io.edm2_pickle import read_edm2_pickle as f",
    "load_edm2 (pkl)": "from lightning_reg.models.edm2 import load_edm2 as f",
    "load_edm2 (safetensors)": "from lightning_reg.models.edm2 import load_edm2 as f",
}


def reader_rows(size: str, workdir: Path) -> list[dict]:
    torch.manual_seed(0)
    net, kwargs = random_net(size), edm2_img512_config(size)
    pkl = workdir / f"edm2-img512-{size}-random.pkl"
    write_snapshot(net, kwargs, pkl)
    del net
    from lightning_reg.sources.edm2 import convert_edm2

    safetensors = convert_edm2(pkl)
    rows = []
    for name, imp in READERS.items():
        path = safetensors if "safetensors" in name else pkl
        code = (f"import sys, time, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); {imp}; "
                f"from edm2_cost import peak_rss_above_resting; out = {{}}; "
                f"out['bytes'] = peak_rss_above_resting(lambda: out.update(t0=time.perf_counter(), "
                f"r=f({str(path)!r}), t1=time.perf_counter())); print(json.dumps(dict(seconds=out['t1'] - "
                f"out['t0'], peak=out['bytes'])))")
        rows.append(dict(reader=name, file=path.name, file_bytes=path.stat().st_size, **json.loads(_child(code))))
    return rows


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2 ** 30:.2f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=["s", "xxl"], help="img512 sizes; none: the reader only")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reader-size", default="xxl")
    parser.add_argument("--no-reader", action="store_true")
    parser.add_argument("--no-memory", action="store_true", help="time the guided calls only")
    parser.add_argument("--workdir", type=Path, default=None, help="where the reader's random snapshot is written")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, 64x64x4 latents")
    print("| net | guide (autog.) | method | wall s | wall / CFG | CPU s | CPU / CFG | peak RSS above resting, GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for r in guidance_rows(size, args.batch, args.repeats, args.warmup, not args.no_memory):
            print(f"| {size.upper()} ({r['params']['main'] / 1e6:.0f}M) | {r['guide'].upper()} "
                  f"({r['params']['guide'] / 1e6:.0f}M) | {r['method']} | {r['wall']:.2f} | {r['wall_ratio']:.2f} | "
                  f"{r['cpu']:.2f} | {r['cpu_ratio']:.2f} | {gib(r['memory'])} |", flush=True)
    if args.no_reader:
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        print(f"\n| reader ({args.reader_size.upper()}, random weights) | file | file GiB | wall s "
              "| peak RSS above resting, GiB |")
        print("|---|---|---|---|---|")
        for r in reader_rows(args.reader_size, Path(tmp)):
            print(f"| {r['reader']} | {r['file']} | {r['file_bytes'] / 2 ** 30:.2f} | {r['seconds']:.1f} | "
                  f"{gib(r['peak'])} |", flush=True)


if __name__ == "__main__":
    main()
