"""The paper's 2D evidence (Figure 2): samples with and without REG, and ``grad log E_t`` vs ``grad log R_t``.

``python -m lightning_reg.experiments.toy2d --exact [--task ring_cross|overlap] [--label 0|1]``: two
classes (``ring_cross``: a ring and a cross, which do not overlap; ``overlap``: two blob pairs sharing a
central region, so ``R_0`` varies where the samples land), 25 respaced DDPM steps. On a grid over [-1.5, 1.5]^2, at every step, CFG's ``grad log R_t``, REG (paper
and vjp forms) and the Monte Carlo oracle ``grad log E_t`` (docs/theory.md §1-2, §4). Writes
``samples.png`` (the guided target ``p(x|y) R_0`` and samples of CFG, REG-paper, REG-vjp),
``fields.png`` (arrow fields at the paper's t = 9), ``reg_correction.png`` (|REG - CFG| there),
``error_per_step.png``, ``errors.csv`` and ``sample_metrics.csv`` (each method's samples against draws of
the guided target: energy distance, sliced Wasserstein, share on the class's shape).

The paper's ``t`` counts the denoising steps still to come after the current one (``steps - 1`` at
the first step, 0 at the last); ``--paper_t 9`` is our step index ``steps - 1 - 9``.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.colors import Normalize
from matplotlib.ticker import MaxNLocator
import torch
from einops import rearrange

from lightning_reg.data.toy import TOY2D_TASKS, toy2d_distribution
from lightning_reg.diffusion.samplers import get_sampler
from lightning_reg.errors import ConfigError, check_int
from lightning_reg.experiments.common import (LABELS, STYLES, dtype_of, error_table, load_denoiser, main_guard,
                                              parser, prepare, print_table, renamed, write_outputs)
from lightning_reg.guidance import GuidedDenoiser, make_guidance
from lightning_reg.metrics.toy import energy_distance, on_shape_fraction, sliced_wasserstein
from lightning_reg.oracle import METHODS, density_ratio_log_reward, guidance_gradients, sample_guided_target

LIMIT = 1.5
DECADES = 6  # of log10 |gradient| on the fields' colour and length scale
MIN_ARROW = 0.25  # the shortest arrow, a share of the longest
REG_FORMS = {"cfg": "none", "reg_paper": "paper", "reg_vjp": "vjp"}


def grid(n: int, dtype) -> torch.Tensor:
    """``n x n`` points over ``[-LIMIT, LIMIT]^2``, row-major in (y, x) so ``rearrange`` gives images."""
    u = torch.linspace(-LIMIT, LIMIT, n, dtype=dtype)
    gy, gx = torch.meshgrid(u, u, indexing="ij")
    return torch.stack([gx.flatten(), gy.flatten()], 1)


def target_density(log_target, n):
    """The guided target ``p(x0|y) R_0`` on the ``n x n`` grid, normalised, as an image."""
    return rearrange(log_target.softmax(0), "(h w) -> h w", h=n)


def samples_figure(density, samples, label, w):
    fig, axes = plt.subplots(1, 1 + len(samples), figsize=(4.2 * (1 + len(samples)), 4.6), sharex=True, sharey=True,
                             layout="constrained")
    extent = (-LIMIT, LIMIT, -LIMIT, LIMIT)
    axes[0].imshow(density, origin="lower", extent=extent, cmap="viridis")
    axes[0].set_title(f"target p(x0|y={label}) R_0(x0)")
    for ax, (m, x) in zip(axes[1:], samples.items()):
        ax.contour(density, levels=4, origin="lower", extent=extent, colors="lightgrey", linewidths=0.7)
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4, color=STYLES[m]["color"])
        ax.set_title(f"DDPM samples: {'CFG' if m == 'cfg' else 'CFG + ' + LABELS[m]}, w = {w:g}")
    for ax in axes:
        ax.set_xlim(-LIMIT, LIMIT)
        ax.set_ylim(-LIMIT, LIMIT)
        ax.set_aspect("equal")
    fig.suptitle("2D toy: guided target and DDPM samples with and without REG")
    return fig


def median_angle(g, oracle) -> float:
    """Median angle in degrees between ``g``'s arrows and the oracle's over the grid."""
    cos = torch.nn.functional.cosine_similarity(g, oracle, dim=1).clamp(-1, 1)
    return float(cos.acos().rad2deg().median())


def arrow_lengths(logs: torch.Tensor, norm) -> torch.Tensor:
    """Arrow length in grid spacings: ``MIN_ARROW`` at the colour scale's bottom (``norm.vmin``) up to 0.8 at its
    top, linear in ``log10 |gradient|``: a weak field draws short arrows, whatever its direction."""
    return 0.8 * (MIN_ARROW + (1 - MIN_ARROW) * ((logs - norm.vmin) / (norm.vmax - norm.vmin)).clamp(0, 1))


def fields_figure(x, grads, i, t, paper_t, density):
    """Arrows pointing along each field, their length and colour both ``log10 |gradient|`` on one scale for all
    panels (``arrow_lengths``, at most ``DECADES`` decades), over the contours of the guided target ``density``
    (where the samples should land); each panel titled with its median magnitude and its median angle to the
    oracle."""
    fig, axes = plt.subplots(1, 4, figsize=(18, 5), sharex=True, sharey=True, layout="constrained")
    fields = {m: grads[m][i] for m in ("oracle", *METHODS)}
    logs = {m: (g.norm(dim=1) + 1e-300).log10() for m, g in fields.items()}
    top = max(float(v.max()) for v in logs.values())
    norm = Normalize(max(min(float(v.min()) for v in logs.values()), top - DECADES), top)
    spacing = float(x[:, 0].unique().diff().min())
    for ax, (m, g) in zip(axes, fields.items()):
        arrows = g / g.norm(dim=1, keepdim=True).clamp(min=1e-300) * arrow_lengths(logs[m], norm)[:, None]
        q = ax.quiver(x[:, 0], x[:, 1], arrows[:, 0], arrows[:, 1], logs[m].clamp(min=norm.vmin), cmap="viridis",
                      norm=norm, angles="xy", pivot="mid", scale_units="xy", scale=1 / spacing, width=0.006)
        ax.contour(density, levels=4, origin="lower", extent=(-LIMIT, LIMIT, -LIMIT, LIMIT), colors="grey",
                   linewidths=0.8)
        angle = "" if m == "oracle" else f", {median_angle(g, fields['oracle']):.0f} deg to the oracle"
        ax.set_title(f"{LABELS[m]}\nmedian |g| = {float(g.norm(dim=1).median()):.2g}{angle}", fontsize=10)
        ax.set_aspect("equal")
    fig.colorbar(q, ax=axes, shrink=0.85, label="log10 |gradient| (arrow colour and length)")
    fig.suptitle(f"2D toy: guidance fields at step {i} (t = {int(t)}; paper's t = {paper_t})\narrows along each "
                 f"field; colour and length: log10 |gradient| (shortest: {norm.vmin:.1f} or less)")
    return fig


def correction_figure(grads, n, i, t):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharey=True)
    extent = (-LIMIT, LIMIT, -LIMIT, LIMIT)
    for ax, m in zip(axes, ("reg_paper", "reg_vjp")):
        magnitude = rearrange((grads[m][i] - grads["cfg"][i]).norm(dim=1), "(h w) -> h w", h=n)
        im = ax.imshow(magnitude, origin="lower", extent=extent, cmap="magma")
        fig.colorbar(im, ax=ax, shrink=0.85)
        ax.set_title(f"|{LABELS[m]} - CFG|")
    fig.suptitle(f"2D toy: magnitude of the REG correction at step {i} (t = {int(t)})")
    fig.tight_layout()
    return fig


def error_figure(rows):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    per_step = [r for r in rows if isinstance(r["step"], int)]
    for m in METHODS:
        ax.plot([r["step"] for r in per_step], [r[m] for r in per_step], marker="o", ms=3, label=LABELS[m], **STYLES[m])
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("sampling step (0 = noisiest)")
    ax.set_ylabel("mean |estimate - oracle| over the grid")
    ax.legend()
    ax.set_title("2D toy: error to the oracle grad log E_t per step")
    fig.tight_layout()
    return fig


def sample_metrics(samples: dict[str, torch.Tensor], target: torch.Tensor, distribution, label: int) -> list[dict]:
    """Per method: distances of its samples to draws of the guided target ``p(x0|y) R_0`` (lower is
    closer) and the share of samples on the class's shape (``metrics.toy``)."""
    rows = [{"method": m, "energy_distance": energy_distance(x, target),
             "sliced_wasserstein": sliced_wasserstein(x, target),
             "on_shape": on_shape_fraction(x, torch.full((len(x),), label), distribution)} for m, x in samples.items()]
    print("each method's samples against draws of the guided target p(x0|y) R_0: energy distance and sliced "
          "Wasserstein-2 (lower is closer), share of samples on the class's shape")
    print(f"{'samples':>10} {'energy_dist':>12} {'sliced_W2':>10} {'on_shape':>9}")
    for r in rows:
        print(f"{r['method']:>10} {r['energy_distance']:12.4g} {r['sliced_wasserstein']:10.4g} {r['on_shape']:9.4f}")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = parser("2D toy: CFG and REG against the optimal guidance oracle", steps=25, rollouts=64,
               out="outputs/toy2d")
    p.add_argument("--grid", type=int, default=15, help="points per axis over [-1.5, 1.5]^2")
    p.add_argument("--task", choices=sorted(TOY2D_TASKS), default="ring_cross",
                   help="ring_cross: disjoint shapes; overlap: two classes sharing a region")
    p.add_argument("--label", type=int, default=0, help="class: 0 = ring / left, 1 = cross / right")
    renamed(p, "--paper_t", "--paper-t", type=int, default=9,
            help="the step shown in fields/reg_correction (paper's t)")
    p.add_argument("--samples", type=int, default=10000, help="samples per method (and target draws)")
    args = p.parse_args(argv)
    prepare(args)
    distribution = toy2d_distribution(args.task)
    check_int("--grid", args.grid, minimum=2)
    check_int("--samples", args.samples)
    if args.label not in range(distribution.num_classes):
        names = TOY2D_TASKS[args.task][0]
        raise ConfigError(f"--label must be 0 ({names[0]}) or 1 ({names[1]}) for --task {args.task}, got {args.label}")
    if not 0 <= args.paper_t < args.steps:
        raise ConfigError(f"--paper_t must lie in [0, {args.steps - 1}] for --steps {args.steps}, got {args.paper_t}")
    denoiser = load_denoiser(args, distribution)
    dtype = dtype_of(denoiser)
    x, log_reward = grid(args.grid, dtype), density_ratio_log_reward(distribution, args.w)
    y = torch.full((len(x),), args.label, dtype=torch.long)
    times, grads = guidance_gradients(denoiser, x, y, args.w, log_reward, args.steps, rollouts=args.rollouts,
                                      eta=args.eta, generator=torch.Generator().manual_seed(args.seed),
                                      batch_size=args.batch_size)
    rows = error_table(times, grads)
    print_table(rows)

    labels = torch.full((args.samples,), args.label, dtype=torch.long)
    noise = torch.randn(args.samples, 2, dtype=dtype, generator=torch.Generator().manual_seed(args.seed + 1))
    sampler = get_sampler("ddpm")
    samples = {}
    for m, reg in REG_FORMS.items():
        torch.manual_seed(args.seed + 2)  # the same stochastic-step noise for every method
        guided = GuidedDenoiser(denoiser, make_guidance("cfg", scale=args.w, reg=reg), labels)
        samples[m] = sampler(guided, noise, denoiser.schedule, args.steps, progress=True)
    target = sample_guided_target(distribution, args.label, log_reward, args.samples,
                                  generator=torch.Generator().manual_seed(args.seed + 3))
    metrics = sample_metrics(samples, target, distribution, args.label)
    fine = grid(200, torch.float64)
    log_target = distribution.log_prob(fine, torch.full((len(fine),), args.label)) + log_reward(
        fine, torch.full((len(fine),), args.label))

    i, density = args.steps - 1 - args.paper_t, target_density(log_target, 200)
    write_outputs(args.output, rows, {
        "samples": samples_figure(density, samples, args.label, args.w),
        "fields": fields_figure(x, grads, i, times[i], args.paper_t, density),
        "reg_correction": correction_figure(grads, args.grid, i, times[i]),
        "error_per_step": error_figure(rows),
    }, {"x": x, "times": times, **grads}, tables={"sample_metrics": metrics})


if __name__ == "__main__":
    main_guard(main)
