"""How close each cheap REG mode's factor is to the autograd one, and how large REG's correction is, per step.

Along a CFG + REG (paper) DDIM chain of ``--steps`` steps (class-balanced labels, weight ``--w``), at every
step this computes the paper factor ``f = a_t grad_x(1^T x0_c)`` by autograd and CFG's term ``g`` and reports,
per step (medians over the batch of per-sample norms over all non-batch dimensions):

* ``correction``: REG's correction relative to the guidance term, ``||(f - 1) ⊙ g|| / ||g||`` (where REG
  matters; ``window`` keeps the steps where it is large);
* ``graph_free``: the finite-difference factor's error on the correction, ``||(f_fd - f) ⊙ g|| / ||(f - 1) ⊙ g||``
  (0: exact; 1: as wrong as no rectification), in float32 and with the network under bf16 autocast;
* ``reuse eps`` / ``reuse x0``: the same error for the previous step's factor carried to this step in eps-space
  (``1 - s_t r``) or x0-space (``a_t f / a_t'``): what ``reuse 2`` uses on every other step;
* ``graph_free reuse``: the previous step's finite-difference factor carried in eps-space (``graph_free_reuse 2``
  and ``adaptive`` on their carried steps);
* ``short 1`` / ``short 2``: REG ``short`` (``reg_blocks`` 1 / 2): the autograd factor through the network's last
  one or two blocks only (``guidance/reg.py``, ``short_backward``).

Then the schedule ``adaptive`` picks on its own chain (default tolerance and longest interval): the share of the
batch's samples given a fresh factor at each step, and its mean, which sets the mode's cost between CFG's (0) and
``graph_free``'s (1).

    python benchmarks/reg_factor_error.py --checkpoint checkpoints/runs/mnist/version_0/checkpoints/last.ckpt
    python benchmarks/reg_factor_error.py --dit DiT-S/8          # random weights (J is not symmetric there)
                                          [--batch 100] [--steps 20] [--w 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from guidance_cost import denoiser, public_dit

from lightning_reg.diffusion.samplers import ddim
from lightning_reg.guidance import ChainState, GuidanceStep, GuidedDenoiser, make_guidance
from lightning_reg.guidance.reg import finite_difference_factor, paper_factor, reused_factor, short_backward
from lightning_reg.sampling.engine import autocast
from lightning_reg.sources import load_denoiser

COLUMNS = ("correction", "graph_free", "graph_free bf16", "reuse eps", "reuse x0", "graph_free reuse", "short 1",
           "short 2")


def norms(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(v.flatten(1).double(), dim=1)


def errors_along_chain(model, batch: int, steps: int, w: float, seed: int = 0) -> list[dict]:
    """One row per step of ``COLUMNS`` (medians over the batch), along the REG (paper) chain."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, *model.data_shape, generator=g)
    y = torch.arange(batch) % model.num_classes
    guidance, state, rows, previous, previous_fd = make_guidance("cfg", scale=w), ChainState(), [], None, None


    def rectified(x, t):
        nonlocal previous, previous_fd
        state.visit(t)
        step = GuidanceStep(model, x, t, state)
        with torch.no_grad():
            x0_ref = model(x, t, model.conditioning.null(y))
        x0_c, f = paper_factor(guidance.branches.differentiable(model, t, y), x, step.a)
        g_term = guidance.rule.guidance_term(x0_c, x0_ref, w, step)
        correction = norms((f - 1) * g_term)
        row = {"t": float(t), "progress": model.schedule.progress(t), "correction": correction / norms(g_term)}
        with torch.no_grad():
            for name, precision in (("graph_free bf16", "bf16"), ("graph_free", "fp32")):  # fp32's f_fd kept
                with autocast("cpu", precision):
                    f_fd = finite_difference_factor(guidance.branches, model, x, t, y, step)[2].float()
                row[name] = norms((f_fd - f) * g_term) / correction
            for column, carried, space in (("reuse eps", previous, "eps"), ("reuse x0", previous, "x0"),
                                           ("graph_free reuse", previous_fd, "eps")):
                row[column] = (norms((reused_factor(*carried, step.a, step.s, space) - f) * g_term) / correction
                               if carried else torch.full_like(correction, float("nan")))
        for blocks in (1, 2):
            with short_backward(model.net, blocks):
                f_short = paper_factor(guidance.branches.differentiable(model, t, y), x, step.a)[1]
            row[f"short {blocks}"] = norms((f_short - f) * g_term) / correction
        previous, previous_fd = (f, step.a, step.s), (f_fd, step.a, step.s)
        rows.append({k: v if isinstance(v, float) else float(v.median()) for k, v in row.items()})
        return x0_c + f * g_term

    ddim(rectified, noise, model.schedule, steps)
    return rows


def adaptive_shares(model, batch: int, steps: int, w: float, seed: int = 0) -> list[float]:
    """Per step of a CFG + REG ``adaptive`` DDIM chain, the share of samples whose factor was computed afresh (their
    ``left`` reset to ``every - 1``; the others count down)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, *model.data_shape, generator=g)
    guided = GuidedDenoiser(model, make_guidance("cfg", scale=w, reg="adaptive"), torch.arange(batch) % model.num_classes)
    shares = []

    def counted(x, t):
        x0 = guided(x, t)
        cache = guided.state.values["reg_factor"]
        shares.append(float((cache["left"] == cache["every"] - 1).double().mean()))
        return x0

    ddim(counted, noise, model.schedule, steps)
    return shares


def table(rows: list[dict]) -> str:
    lines = ["| step | t | progress | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (3 + len(COLUMNS))]
    for i, r in enumerate(rows):
        lines.append(f"| {i} | {r['t']:.4g} | {r['progress']:.2f} | " + " | ".join(f"{r[c]:.3f}" for c in COLUMNS) + " |")
    lines.append("| median | | | " + " | ".join(
        f"{statistics.median(r[c] for r in rows if r[c] == r[c]):.3f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a trained ConditionalDiffusion checkpoint (EMA weights)")
    source.add_argument("--dit", help="a DIT_CONFIGS name with random weights, e.g. DiT-S/8")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--w", type=float, default=1.0, help="CFG weight, eps_c + w (eps_c - eps_u)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = (load_denoiser(args.checkpoint, ema=True) if args.checkpoint
             else denoiser(public_dit(args.dit), torch.device("cpu")))
    print(f"{args.checkpoint or args.dit + ' (random weights)'}: batch {args.batch}, DDIM {args.steps}, w = {args.w}")
    print(table(errors_along_chain(model, args.batch, args.steps, args.w)))
    shares = adaptive_shares(model, args.batch, args.steps, args.w)
    print(f"adaptive: share of samples given a fresh factor per step: {' '.join(f'{v:.2f}' for v in shares)}; "
          f"mean {statistics.mean(shares):.3f}")


if __name__ == "__main__":
    main()
