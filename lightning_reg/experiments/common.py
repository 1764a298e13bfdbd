"""What the toy experiments share: the command line, the denoiser (exact or a checkpoint), the error
table against the oracle, and writing outputs only once everything is computed."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import IO, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from lightning_reg.data.toy import ToyDistribution  # noqa: E402
from lightning_reg.diffusion.denoiser import Denoiser  # noqa: E402
from lightning_reg.diffusion.schedules import VPSchedule  # noqa: E402
from lightning_reg.distributed import fail  # noqa: E402
from lightning_reg.errors import ConfigError, check_int, check_number  # noqa: E402
from lightning_reg.io.files import atomic_write  # noqa: E402
from lightning_reg.oracle import METHODS, ExactMixtureDenoiser  # noqa: E402

LABELS = {"cfg": "CFG  grad log R_t", "reg_paper": "REG (paper)", "reg_vjp": "REG (vjp)",
          "oracle": "oracle grad log E_t"}
STYLES = {"cfg": dict(color="tab:blue", ls="--"), "reg_paper": dict(color="tab:red", ls="-"),
          "reg_vjp": dict(color="tab:orange", ls=":"), "oracle": dict(color="black", ls="-", lw=2)}


class Renamed(argparse.Action):
    """A flag's old spelling (``--num-timesteps`` for ``--num_timesteps``): stores the value as the new one does,
    with a one-line deprecation warning on stderr."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def renamed(p: argparse.ArgumentParser, new: str, old: str, **kwargs) -> None:
    """Add the flag ``new`` (underscores, as the entry points spell theirs) and its old spelling ``old``, kept
    working (``Renamed``) but left out of ``--help``."""
    action = p.add_argument(new, **kwargs)
    p.add_argument(old, dest=action.dest, type=action.type, action=Renamed, new=new, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each flag's default, except where there is none (``None``, a switch's ``False``)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def parser(description: str, steps: int, rollouts: int, out: str) -> argparse.ArgumentParser:
    """The toy experiments' shared flags; ``--help`` shows each default."""
    p = argparse.ArgumentParser(description=description, formatter_class=DefaultsHelp)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a trained ConditionalDiffusion checkpoint (EMA weights)")
    source.add_argument("--exact", action="store_true", help="the exact mixture denoiser (no network)")
    p.add_argument("--steps", type=int, default=steps, help="DDPM sampling steps, respaced from --num_timesteps")
    renamed(p, "--num_timesteps", "--num-timesteps", type=int, default=1000,
            help="T of the linear-beta (1e-4..0.02) VP schedule: 1000 = the standard schedule respaced to --steps; "
                 "T = --steps = 20 = the authors' 1D toy chain (raw steps, abar_T = 0.82)")
    p.add_argument("--w", type=float, default=1.0, help="guidance weight, eps_c + w (eps_c - eps_u)")
    p.add_argument("--rollouts", type=int, default=rollouts, help="Monte Carlo chains per point for the oracle")
    p.add_argument("--eta", type=float, default=1.0, help="oracle chain: 1 = DDPM ancestral, 0 = deterministic DDIM")
    p.add_argument("--seed", type=int, default=0, help="seed of the oracle chains and the samples")
    renamed(p, "--batch_size", "--batch-size", type=int, default=8192,
            help="oracle chains run at once (bounds memory)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads; 1 is fastest for these small tensors on a shared CPU")
    renamed(p, "--output", "--out", type=Path, default=Path(out), help="output folder")
    return p


def prepare(args: argparse.Namespace) -> None:
    """Check the shared flags, then set the thread count and the seed."""
    for field in ("steps", "num_timesteps", "rollouts", "batch_size", "threads"):
        check_int(f"--{field}", getattr(args, field))
    check_number("--w", args.w, minimum=0)
    if args.steps > args.num_timesteps:
        raise ConfigError(f"--steps {args.steps} exceeds --num_timesteps {args.num_timesteps}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


def load_denoiser(args: argparse.Namespace, distribution: ToyDistribution) -> Denoiser:
    """The exact mixture denoiser (float64, linear-beta VP over ``--num_timesteps``) or a checkpoint's EMA
    denoiser (whose schedule must have ``--num_timesteps`` steps)."""
    if args.exact:
        return ExactMixtureDenoiser(distribution, VPSchedule(args.num_timesteps))
    from lightning_reg.sources import load_denoiser as load_checkpoint_denoiser
    denoiser = load_checkpoint_denoiser(args.checkpoint, ema=True, field="--checkpoint")
    if (denoiser.num_classes, denoiser.data_shape) != (distribution.num_classes, (distribution.dim,)):
        raise ConfigError(f"--checkpoint has num_classes={denoiser.num_classes}, data_shape={denoiser.data_shape}; "
                          f"this experiment needs {distribution.num_classes} classes of dimension {distribution.dim}")
    if not isinstance(denoiser.schedule, VPSchedule):
        raise ConfigError(f"--checkpoint uses the {denoiser.schedule.name!r} schedule; the toy experiments need 'vp'")
    if denoiser.schedule.num_timesteps != args.num_timesteps:
        raise ConfigError(f"--checkpoint was trained with num_timesteps={denoiser.schedule.num_timesteps}; "
                          f"pass --num_timesteps {denoiser.schedule.num_timesteps}")
    return denoiser


def dtype_of(denoiser: Denoiser) -> torch.dtype:
    return torch.float64 if isinstance(denoiser, ExactMixtureDenoiser) else torch.float32


def error_table(times: Tensor, grads: dict[str, Tensor]) -> list[dict]:
    """Mean over the grid of ``||estimate - oracle||`` (absolute error in 1D) per method and step, then the
    mean and the median over all steps and points (the median resists the oracle's heavy-tailed outliers)."""
    errors = {m: (grads[m] - grads["oracle"]).norm(dim=-1) for m in METHODS}
    rows = [{"step": i, "t": int(t), **{m: float(errors[m][i].mean()) for m in METHODS}} for i, t in enumerate(times)]
    rows.append({"step": "all", "t": "", **{m: float(errors[m].mean()) for m in METHODS}})
    rows.append({"step": "median", "t": "", **{m: float(errors[m].median()) for m in METHODS}})
    return rows


def print_table(rows: list[dict]) -> None:
    """``error_table``'s rows under a caption saying what the numbers are."""
    print("error to the oracle grad_x log E_t, ||estimate - oracle|| (|.| in 1D), mean over the grid per sampling "
          "step\n(step 0 = the noisiest, t = its time index; all / median: over every step and grid point)")
    print(f"{'step':>6} {'t':>5} " + " ".join(f"{m:>11}" for m in METHODS))
    for r in rows:
        print(f"{r['step']:>6} {r['t']:>5} " + " ".join(f"{r[m]:11.4g}" for m in METHODS))
    worse = [r["step"] for r in rows if isinstance(r["step"], int) and r["reg_paper"] >= r["cfg"]]
    print(f"steps where REG (paper) is not closer to the oracle than CFG: {worse or 'none'}")


def write_outputs(out: Path, rows: list[dict], figures: dict[str, plt.Figure], estimates: dict,
                  tables: dict[str, list[dict]] | None = None) -> None:
    """Write ``errors.csv`` (``rows``), ``<name>.csv`` for each of ``tables``, ``estimates.pt`` (times and every
    method's estimates) and the figures, each file atomically, after all computing is done."""
    atomic_write(out / "estimates.pt", lambda f: torch.save(estimates, f))

    def csv_writer(table: list[dict]) -> Callable[[IO[str]], None]:
        def write(f: IO[str]) -> None:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
        return write

    tables = {"errors": rows, **(tables or {})}
    for name, table in tables.items():
        atomic_write(out / f"{name}.csv", csv_writer(table), binary=False)
    for name, fig in figures.items():
        atomic_write(out / f"{name}.png", lambda f: fig.savefig(f, dpi=110, bbox_inches="tight", format="png"))
        plt.close(fig)
    print(f"wrote {', '.join(f'{n}.csv' for n in tables)}, estimates.pt, {', '.join(f'{n}.png' for n in figures)} "
          f"in {out}")


def main_guard(main: Callable[[list[str] | None], None]) -> None:
    """Run ``main``; bad input prints one line and exits with status 2."""
    try:
        main(None)
    except ConfigError as err:
        fail(str(err))
