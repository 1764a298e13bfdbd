"""REG's cost and memory on today's text-to-image transformers: one guided step of SD3-medium, and per transformer
block for SD3-medium, SD3.5-large and Flux.1, extrapolated to the whole models at 1024 px.

Random weights, batch 1, the CPU. What is measured and what is extrapolated:

1. **SD3-medium, one guided step** (measured): ``SD3Transformer2DModel`` with SD3-medium's config (``SD3_MEDIUM``:
   24 heads x 64 = width 1536, joint attention 4096, caption projection 1536, pooled 2048, 16 latent channels,
   2x2 patches, pos_embed_max_size 192) but ``--sd3-layers`` of its 24 joint blocks (default 2: one ordinary
   block and the last, context-pre-only one), float32, on ``--latent-side`` square latents (default 32: 256 image
   tokens, a 256 px image) with SD3's text length (77 CLIP + 256 T5 = 333 tokens), through the project's
   ``SD3Transformer``, flow schedule (shift 3) and ``GuidedDenoiser`` at step 14 of a 28-step chain: ``cfg`` (two
   no-grad forwards of B, the CPU's layout), ``reg paper``, ``reg paper, ckpt`` (diffusers' gradient checkpointing
   of the conditional branch, as ``load_text_to_image(..., gradient_checkpointing=True)`` switches it on) and
   ``reg graph_free`` (three no-grad forwards of B). The methods run interleaved round after round
   (``common.py``): times and ratios are medians; memory is ``common.memory`` (peak RSS above resting, and the
   bytes the autograd graph saves, weights excluded). ``--sd3-layers 24`` measures the whole transformer.
2. **Per block** (measured, float32, frozen weights): an ordinary SD3-medium joint block at the step's tokens, an
   SD3.5-large joint block (38 heads x 64 = 2432, RMS qk norm), a Flux.1 double-stream ``FluxTransformerBlock`` and
   a single-stream ``FluxSingleTransformerBlock`` (24 heads x 128 = 3072, rotary embedding) at ``--block-tokens``
   (default 128 image + 32 text): ``forward`` (no graph), ``forward + backward`` (with a graph, then the backward
   to both token streams, REG's ``J^T 1``) and ``checkpointed`` (``torch.utils.checkpoint``: the inputs kept, the
   block recomputed in the backward).
3. **Held bytes per block** (measured): what the graph saves (``forward + backward``) or the checkpoint keeps
   (``checkpointed``) at the measured tokens and at twice as many, for float32 weights, bfloat16 weights and
   float32 weights under bfloat16 autocast (``sample.py --precision bf16``). These bytes are affine in the token
   count (attention saves its output and log-sum-exp, no token x token matrix; the two points show it), so
   ``bytes(N) = a + b N`` through the two points is **extrapolated** to 1024 px (SD3: 4096 + 333 tokens, Flux:
   4096 + 512).
4. **Whole models** (extrapolated from 2 and 3). SD3-medium's 24 blocks at the step's tokens: the measured step
   plus ``24 - layers`` ordinary blocks, each adding its measured pass times as the method runs them (``PER_BLOCK``)
   and its held bytes. At 1024 px, per model (SD3-medium 24, SD3.5-large 38, Flux-dev 19 + 38 blocks) and
   precision: weights (parameters counted on the meta device) plus activations, ``the held bytes of every block +
   one block's working set``: REG paper holds every block's graph, checkpointed REG every block's inputs and one
   recomputed block's graph at a time, CFG and graph_free nothing between blocks. A block's working set is its
   measured float32 peak RSS above resting minus its held bytes, scaled linearly with the tokens, halved for
   bfloat16 (an assumption, not measured): a lower bound, as the whole SD3-medium step showed (its peak exceeded
   the extrapolation, its graph did not; benchmarks/README.md). Embedders, output layer and text encoders are not
   counted. Time ratios of whole steps from the blocks are CPU times at the measured tokens (attention's share
   grows with the tokens: not extrapolated).

No GPU was used: GPU times and the CUDA allocator's overheads are not measured here.

    python benchmarks/transformer_cost.py [--sd3-layers 2] [--latent-side 32] [--block-tokens 128 32]
                                          [--repeats 3] [--warmup 1] [--threads N] [--no-step]
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from functools import partial

import torch
from common import interleaved_times, medians, memory, saved_tensor_bytes
from guidance_cost import table
from sd_cost import guided_step
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_reg.diffusion.latent import LatentCodec, LatentDenoiser
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import FlowSchedule
from lightning_reg.guidance import GuidedDenoiser, make_guidance
from lightning_reg.models.stable_diffusion import SD3Transformer, patch_ids, text_denoiser

SD3_MEDIUM = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, pos_embed_max_size=192)  # stable-diffusion-3-medium-diffusers
SD35_LARGE = SD3_MEDIUM | dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm="rms_norm")
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))  # FLUX.1-dev
SD3_TEXT, FLUX_TEXT = 77 + 256, 512  # the pipelines' default text tokens (SD3: CLIP 77 + T5 256; Flux: T5 512)
IMAGE_1024 = (1024 // 8 // 2) ** 2  # image tokens at 1024 px: 128x128 latents in 2x2 patches
SD3_SHIFT, SD3_STEPS = 3.0, 28  # SD3's scheduler shift and the pipeline's default steps
GUIDANCE = dict(method="cfg", scale=7.0, convention="w2")  # StableDiffusion3Pipeline's guidance_scale
METHODS = {  # name: (guidance, gradient checkpointing of the conditional branch)
    "cfg": (GUIDANCE, False),
    "reg paper": (GUIDANCE | dict(reg="paper"), False),
    "reg paper, ckpt": (GUIDANCE | dict(reg="paper"), True),
    "reg graph_free": (GUIDANCE | dict(reg="graph_free"), False),
}
PASSES = ("forward", "forward + backward", "checkpointed")
PER_BLOCK = {  # the passes one guided step runs through each block (the CPU's branch layout: B + B (+ B))
    "cfg": ("forward", "forward"),
    "reg paper": ("forward", "forward + backward"),
    "reg paper, ckpt": ("forward", "checkpointed"),
    "reg graph_free": ("forward", "forward", "forward"),
}
HELD = {"reg paper": "forward + backward", "reg paper, ckpt": "checkpointed"}  # what a step keeps of each block
PRECISIONS = {"fp32": (torch.float32, False, 4), "bf16 weights": (torch.bfloat16, False, 2),
              "fp32 + bf16 autocast": (torch.float32, True, 4)}  # weights' dtype, autocast, bytes per weight
GIB, MIB = 2 ** 30, 2 ** 20


@dataclass(frozen=True)
class BlockSpec:
    """A transformer block: ``kind`` ``joint`` (SD3 ``JointTransformerBlock``), ``double`` or ``single`` (Flux) of
    the model config ``config``, measured at ``tokens`` (image, text); ``model`` has ``count`` of them and
    ``tokens_1024`` at 1024 px."""

    name: str
    kind: str
    config: dict
    model: str
    count: int
    tokens: tuple[int, int]
    tokens_1024: tuple[int, int]

    @property
    def width(self) -> int:
        return self.config["num_attention_heads"] * self.config["attention_head_dim"]

    @property
    def params(self) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in self.build().parameters())

    def build(self) -> nn.Module:
        """The block with random, frozen weights (an ordinary joint block: not the last, context-pre-only one)."""
        from diffusers.models.attention import JointTransformerBlock
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

        heads, head_dim = self.config["num_attention_heads"], self.config["attention_head_dim"]
        torch.manual_seed(0)
        if self.kind == "joint":
            block = JointTransformerBlock(self.width, heads, head_dim, qk_norm=self.config.get("qk_norm"))
        else:
            block = (FluxSingleTransformerBlock if self.kind == "single" else FluxTransformerBlock)(
                self.width, heads, head_dim)
        return block.eval().requires_grad_(False)

    def call(self, block: nn.Module, tokens: tuple[int, int]):
        """``block`` as ``f(h, c, temb)``; Flux's with the rotary embedding of its image ids ``(0, 0, col)`` and
        text ids 0 (``FluxTransformer``'s layout, one row of patches)."""
        if self.kind == "joint":
            return block
        from diffusers.models.transformers.transformer_flux import FluxPosEmbed

        images, text = tokens
        ids = torch.cat([torch.zeros(text, 3), patch_ids(1, images)])
        rope = FluxPosEmbed(10000, list(self.config["axes_dims_rope"]))(ids)
        return partial(block, image_rotary_emb=rope)

    def inputs(self, tokens: tuple[int, int], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Random image and text streams ``(1, tokens, width)`` and time embedding ``(1, width)``."""
        g = torch.Generator().manual_seed(sum(tokens))
        return tuple(torch.randn(1, *shape, generator=g).to(dtype)
                     for shape in ((tokens[0], self.width), (tokens[1], self.width), (self.width,)))


def real_blocks(sd3_tokens: tuple[int, int], block_tokens: tuple[int, int]) -> list[BlockSpec]:
    """SD3-medium's block at ``sd3_tokens`` (the step's), SD3.5-large's and Flux-dev's at ``block_tokens``."""
    sd3_1024, flux_1024 = (IMAGE_1024, SD3_TEXT), (IMAGE_1024, FLUX_TEXT)
    return [BlockSpec("SD3-medium joint", "joint", SD3_MEDIUM, "SD3-medium", 24, sd3_tokens, sd3_1024),
            BlockSpec("SD3.5-large joint", "joint", SD35_LARGE, "SD3.5-large", 38, block_tokens, sd3_1024),
            BlockSpec("Flux double", "double", FLUX_DEV, "Flux-dev", 19, block_tokens, flux_1024),
            BlockSpec("Flux single", "single", FLUX_DEV, "Flux-dev", 38, block_tokens, flux_1024)]


def block_pass(call, h: torch.Tensor, c: torch.Tensor, temb: torch.Tensor, kind: str) -> None:
    """One pass of ``PASSES`` through the block: no-grad forward, or a forward with a graph (``checkpointed``: the
    inputs kept only) and the backward of ``1^T out`` to both token streams."""
    if kind == "forward":
        with torch.no_grad():
            call(h, c, temb)
        return
    h, c = h.detach().requires_grad_(), c.detach().requires_grad_()
    with torch.enable_grad():
        out = checkpoint(call, h, c, temb, use_reentrant=False) if kind == "checkpointed" else call(h, c, temb)
        torch.autograd.grad(out, (h, c), [torch.ones_like(o) for o in out])


def held_bytes(spec: BlockSpec, block: nn.Module, tokens: tuple[int, int], precision: str, kind: str) -> int:
    """The bytes a forward with a graph through ``block`` saves for backward (``forward + backward``) or the
    checkpoint keeps (``checkpointed``), in ``precision`` (``block``'s weights already in its dtype)."""
    dtype, autocast, _ = PRECISIONS[precision]
    h, c, temb = spec.inputs(tokens, dtype)
    h, c, call, total = h.requires_grad_(), c.requires_grad_(), spec.call(block, tokens), [0]
    with saved_tensor_bytes(block, total), torch.enable_grad(), warnings.catch_warnings(), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")  # RMS norm, autocast
        checkpoint(call, h, c, temb, use_reentrant=False) if kind == "checkpointed" else call(h, c, temb)
    return total[0]


def measure_blocks(specs: list[BlockSpec], repeats: int, warmup: int) -> tuple[dict, dict]:
    """Per block: ``{pass: medians and memory}`` (``PASSES`` in float32 at ``spec.tokens``) and ``{(precision,
    pass): (bytes at spec.tokens, bytes at twice the tokens)}`` (``HELD`` passes)."""
    cpu = torch.device("cpu")
    blocks = {spec.name: spec.build() for spec in specs}
    calls = {}
    for spec in specs:
        call, inputs = spec.call(blocks[spec.name], spec.tokens), spec.inputs(spec.tokens, torch.float32)
        calls |= {(spec.name, kind): partial(block_pass, call, *inputs, kind=kind) for kind in PASSES}
    times = interleaved_times(calls, repeats, warmup, cpu)
    passes = {spec.name: medians({kind: times[spec.name, kind] for kind in PASSES}, reference="forward")
              for spec in specs}
    for (name, kind), call in calls.items():
        passes[name][kind].update(memory(call, blocks[name], cpu))
    held = {}
    for spec in specs:
        block, double = blocks.pop(spec.name), tuple(2 * n for n in spec.tokens)
        for precision, (dtype, _, _) in PRECISIONS.items():
            block.to(dtype)
            held[spec.name, precision] = {kind: tuple(held_bytes(spec, block, tokens, precision, kind)
                                                      for tokens in (spec.tokens, double))
                                          for kind in HELD.values()}
    return passes, held


def affine(points: tuple[int, int], n: int, tokens: int) -> float:
    """``a + b tokens`` through ``(n, points[0])`` and ``(2 n, points[1])``."""
    slope = (points[1] - points[0]) / n
    return points[0] + slope * (tokens - n)


def block_table(specs: list[BlockSpec], passes: dict) -> str:
    head = ("| block | params, M | tokens (image + text) | pass | wall ms | CPU ms | CPU / forward | "
            "peak RSS above resting, MiB | autograd saved, MiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for spec in specs:
        for kind, r in passes[spec.name].items():
            lines.append(f"| {spec.name} | {spec.params / 1e6:.0f} | {spec.tokens[0]} + {spec.tokens[1]} | {kind} | "
                         f"{1e3 * r['wall']:.0f} | {1e3 * r['cpu']:.0f} | {r['cpu_ratio']:.2f} | "
                         f"{r['peak'] / MIB:.1f} | {r['saved'] / MIB:.1f} |")
    return "\n".join(lines)


def held_table(specs: list[BlockSpec], held: dict) -> str:
    head = ("| block | precision | held | tokens n | at n, MiB | at 2n, MiB | MiB per 1k tokens | "
            "at 1024 px, MiB (extrapolated) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for spec in specs:
        n, big = sum(spec.tokens), sum(spec.tokens_1024)
        for precision in PRECISIONS:
            for method, kind in HELD.items():
                at_n, at_2n = held[spec.name, precision][kind]
                lines.append(f"| {spec.name} | {precision} | {'graph' if kind != 'checkpointed' else 'inputs'} "
                             f"({method}) | {n} | {at_n / MIB:.1f} | {at_2n / MIB:.1f} | "
                             f"{1e3 * (at_2n - at_n) / n / MIB:.2f} | {affine((at_n, at_2n), n, big) / MIB:.0f} |")
    return "\n".join(lines)


def model_parameters(config: dict, flux: bool) -> int:
    """The whole transformer's parameter count, built on the meta device."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    with torch.device("meta"):
        model = (FluxTransformer2DModel if flux else SD3Transformer2DModel)(**config)
    return sum(p.numel() for p in model.parameters())


def activations(specs: list[BlockSpec], passes: dict, held: dict, precision: str, method: str) -> float:
    """Bytes of one guided step at 1024 px beyond the weights (module docstring, 4): every block's held bytes plus
    the largest working set of one block."""
    total, working = 0.0, 0.0
    for spec in specs:
        n, big = sum(spec.tokens), sum(spec.tokens_1024)

        def extra(kind: str) -> float:  # one block's working set beyond its held bytes, at 1024 px
            r = passes[spec.name][kind]
            return (r["peak"] - r["saved"]) * big / n * (1.0 if precision == "fp32" else 0.5)

        graph = affine(held[spec.name, precision]["forward + backward"], n, big)
        if method in HELD:
            total += spec.count * affine(held[spec.name, precision][HELD[method]], n, big)
        working = max(working, {"reg paper": extra("forward + backward"),
                                "reg paper, ckpt": graph + extra("forward + backward")}.get(method, extra("forward")))
    return total + working


def models_table(specs: list[BlockSpec], passes: dict, held: dict) -> str:
    """Weights + activations per model and precision at 1024 px, batch 1 (GiB), and the step's time ratios from
    the blocks' CPU times."""
    head = ("| model | blocks | params, B | precision | weights, GiB | " + " | ".join(f"{m}, GiB" for m in METHODS)
            + " | " + " | ".join(f"{m} / cfg, CPU" for m in list(METHODS)[1:]) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    models = {}
    for spec in specs:
        models.setdefault(spec.model, []).append(spec)
    configs = {"SD3-medium": (SD3_MEDIUM, False), "SD3.5-large": (SD35_LARGE, False), "Flux-dev": (FLUX_DEV, True)}
    for model, members in models.items():
        params = model_parameters(*configs[model])
        step = {m: sum(s.count * passes[s.name][kind]["cpu"] for s in members for kind in PER_BLOCK[m])
                for m in METHODS}
        ratios = " | ".join(f"{step[m] / step['cfg']:.2f}" for m in list(METHODS)[1:])
        for precision, (_, _, per_weight) in PRECISIONS.items():
            weights = params * per_weight
            totals = " | ".join(f"{(weights + activations(members, passes, held, precision, m)) / GIB:.1f}"
                                for m in METHODS)
            lines.append(f"| {model} | {' + '.join(str(s.count) for s in members)} | {params / 1e9:.2f} | "
                         f"{precision} | {weights / GIB:.1f} | {totals} | {ratios} |")
    return "\n".join(lines)


def sd3_denoiser(layers: int, side: int) -> LatentDenoiser:
    """SD3-medium's transformer with ``layers`` joint blocks (random weights, frozen), on ``side`` x ``side``
    latents, under the flow schedule; a tiny VAE stands in for the codec, which a guided step never runs."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**SD3_MEDIUM | dict(num_layers=layers, sample_size=side))
    vae = AutoencoderKL(block_out_channels=(16,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, norm_num_groups=4)
    null = {"prompt_embeds": torch.randn(SD3_TEXT, SD3_MEDIUM["joint_attention_dim"]),
            "pooled_projections": torch.randn(SD3_MEDIUM["pooled_projection_dim"])}
    return text_denoiser(SD3Transformer(transformer.eval().requires_grad_(False)), FlowSchedule(SD3_SHIFT),
                         Prediction("velocity"), LatentCodec(vae), null).eval()


def measure_step(model: LatentDenoiser, repeats: int, warmup: int) -> dict[str, dict]:
    """Medians and memory of one guided step per ``METHODS`` at step 14 of SD3's 28-step chain, batch 1."""
    cpu, g = torch.device("cpu"), torch.Generator().manual_seed(0)
    x = torch.randn(1, *model.data_shape, generator=g)
    y = {key: torch.randn(1, *shape, generator=g) for key, shape in model.conditioning.shape.items()}
    t, transformer = model.schedule.sampling_times(SD3_STEPS)[SD3_STEPS // 2], model.net.transformer
    steps = {name: partial(guided_step, GuidedDenoiser(model, make_guidance(**guidance), y), transformer,
                           checkpointing, x, t) for name, (guidance, checkpointing) in METHODS.items()}
    result = medians(interleaved_times(steps, repeats, warmup, cpu), reference="cfg")
    for name, step in steps.items():
        result[name].update(memory(step, model, cpu))
    return result


def extrapolate_step(step: dict, passes: dict, blocks: int) -> dict[str, dict]:
    """The step with ``blocks`` more ordinary blocks: their pass times (``PER_BLOCK``) and held bytes added;
    ratios of the sums (not medians of ratios)."""
    out = {}
    for method, r in step.items():
        added = {clock: blocks * sum(passes[kind][clock] for kind in PER_BLOCK[method]) for clock in ("wall", "cpu")}
        keep = blocks * passes[HELD[method]]["saved"] if method in HELD else 0
        out[method] = {clock: r[clock] + added[clock] for clock in added} | {
            "peak": r["peak"] + keep, "saved": r["saved"] + keep}
    for r in out.values():
        r |= {f"{clock}_ratio": r[clock] / out["cfg"][clock] for clock in ("wall", "cpu")}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd3-layers", type=int, default=2, help="SD3-medium joint blocks in the measured step "
                        "(24: the whole transformer, about 15 s a forward on one thread)")
    parser.add_argument("--latent-side", type=int, default=32, help="square latents of the step (32: 256 tokens)")
    parser.add_argument("--block-tokens", type=int, nargs=2, default=[128, 32], metavar=("IMAGE", "TEXT"),
                        help="tokens the SD3.5-large and Flux blocks are measured at")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-step", action="store_true", help="blocks only: skip the SD3-medium step")
    args = parser.parse_args(argv)
    if not 1 <= args.sd3_layers <= SD3_MEDIUM["num_layers"] or args.latent_side < 2 or args.latent_side % 2:
        parser.error(f"--sd3-layers must lie in 1..{SD3_MEDIUM['num_layers']} and --latent-side be even and >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    sd3_tokens = ((args.latent_side // 2) ** 2, SD3_TEXT)
    specs = real_blocks(sd3_tokens, tuple(args.block_tokens))
    where = f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if not args.no_step:
        step = measure_step(sd3_denoiser(args.sd3_layers, args.latent_side), args.repeats, args.warmup)
        print(f"one guided step (w = 7, step 14 of 28), SD3-medium width, {args.latent_side}x{args.latent_side}x16 "
              f"latents ({sd3_tokens[0]} image + {SD3_TEXT} text tokens), batch 1, fp32, random weights, median of "
              f"{args.repeats} ({where})", flush=True)
    passes, held = measure_blocks(specs, args.repeats, args.warmup)
    if not args.no_step:
        rows = [(f"SD3-medium, {args.sd3_layers} of 24 blocks (measured)", 1, step)]
        if args.sd3_layers < SD3_MEDIUM["num_layers"]:
            rows.append(("SD3-medium, 24 blocks (extrapolated)", 1,
                         extrapolate_step(step, passes[specs[0].name], SD3_MEDIUM["num_layers"] - args.sd3_layers)))
        print(table(rows, torch.device("cpu")))
    print(f"\nper block, fp32, batch 1, median of {args.repeats} ({where})")
    print(block_table(specs, passes))
    print("\nheld bytes per block (measured at n and 2n tokens; affine in the tokens, extrapolated to 1024 px)")
    print(held_table(specs, held))
    print("\nwhole transformers at 1024 px, batch 1 (EXTRAPOLATED from the blocks above; CPU measurements, no GPU): "
          "weights + activations in GiB; time ratios from the blocks' CPU times at the measured tokens")
    print(models_table(specs, passes, held))


if __name__ == "__main__":
    main()
