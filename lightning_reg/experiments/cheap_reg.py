"""The cheaper REG modes against the optimal guidance oracle ``grad_x log E_t`` on the toy tasks.

At every sampling step of the ``--steps``-step chain, on the toy's grid of points (2D: ``--grid`` x ``--grid``
over [-1.5, 1.5]^2, label 0; 1D: ``--grid`` points on [-1, 2], label 0), each mode's estimate of
``grad_x log E_t`` (read off the library's guided denoiser as ``-(eps_bar - eps_c) / s_t``) is compared with the
Monte Carlo oracle (``lightning_reg.oracle``). Every mode keeps one chain over the steps at the fixed points,
so ``reuse`` carries the factor of its last autograd step to the next ones and ``window`` switches by progress,
as in sampling. Printed: the mean and median over steps and points of ``||estimate - oracle||``, per mode.

    python -m lightning_reg.experiments.cheap_reg --task toy2d --checkpoint checkpoints/runs/toy2d/version_0/checkpoints/last.ckpt
    python -m lightning_reg.experiments.cheap_reg --task toy1d --exact
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from lightning_reg.data.toy import toy1d_distribution, toy2d_distribution
from lightning_reg.diffusion.predictions import eps_from_x0
from lightning_reg.experiments.common import dtype_of, load_denoiser, main_guard, parser, prepare
from lightning_reg.experiments.toy2d import grid
from lightning_reg.guidance import GuidedDenoiser, make_guidance
from lightning_reg.oracle import density_ratio_log_reward, grad_log_expected_reward

MODES = {"cfg": dict(reg="none"), "reg paper": dict(reg="paper"), "reg vjp": dict(reg="vjp"),
         "reuse 2": dict(reg="reuse", reg_every=2), "reuse 4": dict(reg="reuse", reg_every=4),
         "window": dict(reg="window"), "graph_free": dict(reg="graph_free")}


def mode_errors(denoiser, x, y, w: float, log_reward, steps: int, rollouts: int, eta: float, seed: int,
                batch_size: int) -> dict[str, torch.Tensor]:
    """Per mode, ``||estimate - oracle||`` of shape (steps, points)."""
    chains = {m: GuidedDenoiser(denoiser, make_guidance("cfg", scale=w, **params), y) for m, params in MODES.items()}
    generator = torch.Generator().manual_seed(seed)
    errors = {m: [] for m in MODES}
    for t in tqdm(denoiser.schedule.sampling_times(steps)[:-1], desc="oracle per step"):
        a, s = denoiser.coefficients(t, x)
        oracle = grad_log_expected_reward(denoiser, x, t, y, log_reward, steps, rollouts=rollouts, eta=eta,
                                          generator=generator, batch_size=batch_size)
        with torch.no_grad():
            eps_c = eps_from_x0(denoiser(x, t, y), x, a, s)
            for m, chain in chains.items():
                estimate = -(eps_from_x0(chain(x, t), x, a, s) - eps_c) / s
                errors[m].append((estimate - oracle).norm(dim=-1))
    return {m: torch.stack(e) for m, e in errors.items()}


def main(argv: list[str] | None = None) -> None:
    p = parser("toy tasks: the cheaper REG modes against the optimal guidance oracle", steps=25, rollouts=64,
               out="outputs/cheap_reg")
    p.add_argument("--task", choices=["toy1d", "toy2d"], default="toy2d", help="which toy's grid and model")
    p.add_argument("--grid", type=int, default=15, help="2D: points per axis; 1D: points")
    args = p.parse_args(argv)
    prepare(args)
    distribution = toy2d_distribution() if args.task == "toy2d" else toy1d_distribution()
    denoiser = load_denoiser(args, distribution)
    dtype = dtype_of(denoiser)
    x = grid(args.grid, dtype) if args.task == "toy2d" else torch.linspace(-1.0, 2.0, args.grid, dtype=dtype)[:, None]
    y = torch.zeros(len(x), dtype=torch.long)
    errors = mode_errors(denoiser, x, y, args.w, density_ratio_log_reward(distribution, args.w), args.steps,
                         args.rollouts, args.eta, args.seed, args.batch_size)
    print(f"{args.task}, {args.checkpoint or 'exact denoiser'}: w = {args.w}, {args.steps} steps, {len(x)} points, "
          f"{args.rollouts} rollouts")
    print("||estimate - oracle grad_x log E_t|| over the sampling steps and the grid points, per REG mode:")
    print("| mode | mean error to oracle | median | mean, first half of the steps | mean, second half |")
    print("|---|---|---|---|---|")
    half = args.steps // 2
    for m, e in errors.items():
        print(f"| {m} | {e.mean():.4g} | {e.median():.4g} | {e[:half].mean():.4g} | {e[half:].mean():.4g} |")


if __name__ == "__main__":
    main_guard(main)
