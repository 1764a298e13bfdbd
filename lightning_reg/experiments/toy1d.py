"""The paper's 1D evidence (Figures 1 and 5): CFG's ``grad log R_t``, REG and the optimal ``grad log E_t``.

``python -m lightning_reg.experiments.toy1d --exact`` (or ``--checkpoint PATH``): on a grid of x in
[-1, 2] and at every one of the 20 DDPM steps, each method's estimate of ``grad_x log E_t``
(docs/theory.md §1-2, §4) is compared with the Monte Carlo oracle. The 20 steps are the 1000-step linear
schedule respaced (default) or, with ``--num_timesteps 20``, 20 raw steps of the betas 1e-4..0.02 as in
the authors' toy code (``abar_T = 0.82``). Writes ``values.png`` (estimates over
x at six steps), ``abs_error.png`` (|estimate - oracle| over x and step) and ``errors.csv``.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from matplotlib.colors import LogNorm
from matplotlib.ticker import MaxNLocator

from lightning_reg.data.toy import toy1d_distribution
from lightning_reg.errors import check_int
from lightning_reg.experiments.common import (LABELS, STYLES, dtype_of, error_table, load_denoiser, main_guard,
                                              parser, prepare, print_table, write_outputs)
from lightning_reg.oracle import METHODS, density_ratio_log_reward, guidance_gradients


def values_figure(x, times, grads, steps_shown):
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True)
    for ax, i in zip(axes.flat, steps_shown):
        for m in (*METHODS, "oracle"):
            ax.plot(x, grads[m][i, :, 0], label=LABELS[m], **STYLES[m])
        ax.set_title(f"step {i} (t = {int(times[i])})")
        ax.axhline(0, color="grey", lw=0.5)
    for ax in axes[-1]:
        ax.set_xlabel("x_t")
    for ax in axes[:, 0]:
        ax.set_ylabel("estimate of grad_x log E_t")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("1D toy: guidance gradient of CFG, REG and the oracle over x_t")
    fig.tight_layout()
    return fig


def error_figure(x, times, grads):
    fig, axes = plt.subplots(1, len(METHODS), figsize=(5 * len(METHODS), 4.5), sharey=True)
    errors = {m: (grads[m] - grads["oracle"]).abs()[..., 0] for m in METHODS}
    top = max(float(e.max()) for e in errors.values())
    norm = LogNorm(vmin=max(top * 1e-5, 1e-12), vmax=top)
    for ax, m in zip(axes, METHODS):
        im = ax.imshow(errors[m].clamp(min=norm.vmin), aspect="auto", norm=norm, cmap="magma", origin="upper",
                       extent=(float(x[0]), float(x[-1]), len(times) - 0.5, -0.5))
        ax.set_title(f"|{LABELS[m]} - oracle|")
        ax.set_xlabel("x_t")
    axes[0].set_ylabel("sampling step (0 = noisiest)")
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))  # shared by every panel
    fig.colorbar(im, ax=axes, label="absolute error")
    fig.suptitle("1D toy: absolute error to the oracle over x_t and sampling step")
    return fig


def main(argv: list[str] | None = None) -> None:
    p = parser("1D toy: CFG and REG against the optimal guidance oracle", steps=20, rollouts=100,
               out="outputs/toy1d")
    p.add_argument("--grid", type=int, default=200, help="points on x in [-1, 2]")
    args = p.parse_args(argv)
    prepare(args)
    check_int("--grid", args.grid, minimum=2)
    distribution = toy1d_distribution()
    denoiser = load_denoiser(args, distribution)
    x = torch.linspace(-1.0, 2.0, args.grid, dtype=dtype_of(denoiser))[:, None]
    y = torch.zeros(args.grid, dtype=torch.long)
    times, grads = guidance_gradients(denoiser, x, y, args.w, density_ratio_log_reward(distribution, args.w),
                                      args.steps, rollouts=args.rollouts, eta=args.eta,
                                      generator=torch.Generator().manual_seed(args.seed), batch_size=args.batch_size)
    rows = error_table(times, grads)
    print_table(rows)
    s = args.steps
    shown = sorted({min(max(i, 0), s - 1) for i in (s // 4, s // 2, 3 * s // 4, s - 3, s - 2, s - 1)})
    write_outputs(args.output, rows, {"values": values_figure(x[:, 0], times, grads, shown),
                                   "abs_error": error_figure(x[:, 0], times, grads)},
                  {"x": x, "times": times, **grads})


if __name__ == "__main__":
    main_guard(main)
