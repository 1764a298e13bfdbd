"""``sweep.py``: guidance methods x weight grid x REG modes through ``sample.py``'s path, one table and one figure.

Every setting is one ``sample.py`` run (``SamplingJob``: deterministic per sample index, sharded, resumable,
DDP) into ``<output>/<setting>/``, evaluated by the one evaluation path (``metrics.toy.toy_metrics`` for toy
data, ``metrics.evaluate.evaluate_samples`` for images). A setting is finished once its ``row.json`` exists;
an interrupted sweep resumes with the next setting (a partial one from its shards). ``docs/sweeps.md``.

Bad input ends in one ``error: ...`` line and exit status 2, before anything is written: every setting is
checked (``make_guidance``) before the first sample.
"""

from __future__ import annotations

import csv
import math
import time
from argparse import ArgumentError
from dataclasses import dataclass
from pathlib import Path

import lightning
import numpy as np
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from lightning_reg.cli import parse_error_message
from lightning_reg.errors import ConfigError, one_line
from lightning_reg.guidance.methods import make_guidance
from lightning_reg.guidance.reg import REG_MODES
from lightning_reg.metrics.fronts import METRIC_GOALS, best_rows, pareto_front
from lightning_reg.sampling import writer
from lightning_reg.sampling.cli import SamplingJob, launch
from lightning_reg.sampling.cli import build_parser as build_sample_parser
from lightning_reg.sampling.engine import setting_name

SWEEP_FILE, ROW_FILE, TABLE_FILE, FIGURE_FILE = "sweep.json", "row.json", "sweep.csv", "fronts.png"
REG_STYLES = {"none": "-", "paper": "--", "vjp": ":", "reuse": "-.", "window": "-.", "graph_free": "--"}
LEAD_COLUMNS = ("setting", "method", "reg", "w", "convention", "weight", "params")
COST_COLUMNS = ("num_samples", "time_per_sample_ms", "peak_memory_mib", "peak_memory_measure")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, exit_on_error=False, default_meta=False)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of the options below")
    p.add_argument("--checkpoint", type=str | None, default=None, help="a ConditionalDiffusion checkpoint (.ckpt)")
    p.add_argument("--ema", type=bool, default=True, help="sample the EMA weights (false: the raw weights)")
    p.add_argument("--methods", type=list[dict], default=[],
                   help="one entry per method: {method: interval, weights: [0.5, 1, 2], t_lo: 100, t_hi: 600}; "
                        "keys other than method and weights are fixed parameters of make_guidance")
    p.add_argument("--reg", type=list[str], default=["none", "paper", "vjp"],
                   help=f"REG modes, from {', '.join(REG_MODES)}")
    p.add_argument("--convention", type=str, default="w",
                   help="the weights' convention: w (eps_c + w d) or w2 (eps_u + w2 d, w2 = w + 1)")
    p.add_argument("--num_samples", type=int, default=2000, help="samples per setting")
    p.add_argument("--sampler", type=str, default="ddpm", help="ddpm, ddim, edm_heun or flow_euler")
    p.add_argument("--sampler_kwargs", type=dict | None, default=None, help="extra sampler options")
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--seed", type=int, default=0, help="sample i of every setting uses the seed (seed, i)")
    p.add_argument("--batch_size", type=int, default=1000, help="samples per forward (does not change the result)")
    p.add_argument("--shard_size", type=int, default=1000, help="samples per shard file (the unit of resumption)")
    p.add_argument("--labels", type=list[int] | None, default=None, help="as in sample.py; default class-balanced")
    p.add_argument("--distribution", type=str | None, default=None,
                   help="toy1d, toy2d or toy2d_overlap: the exact toy metrics")
    p.add_argument("--evaluation", type=dict | None, default=None,
                   help="images: {metrics: [fid, is, accuracy], reference: digits:mnist, num_reference: 10000, "
                        "feature_network: classifier.ckpt, inception_weights: null} (metrics.evaluate)")
    p.add_argument("--front", type=list[str] | None, default=None,
                   help="[x, y] metrics of the figure; default energy_distance vs on_shape (2D toy) or "
                        "log_likelihood (1D toy), fid vs accuracy (or is) for images")
    p.add_argument("--sample_options", type=dict | None, default=None,
                   help="further sample.py options for every setting, e.g. {sampler_kwargs: ..., precision: bf16}")
    p.add_argument("--output", type=str | None, default=None, help="output folder of the sweep")
    p.add_argument("--max_settings", type=int | None, default=None,
                   help="stop after finishing this many new settings (rerun the same command to resume)")
    p.add_argument("--trainer.accelerator", type=str, default="cpu", help="cpu, gpu, cuda, mps or auto")
    p.add_argument("--trainer.devices", type=int, default=1, help="processes (DDP across them when > 1)")
    p.add_argument("--trainer.num_nodes", type=int, default=1,
                   help="machines, each running --trainer.devices processes (torchrun or SLURM; docs/distributed.md)")
    return p


def sweep_settings(methods: list[dict], regs: list[str], convention: str) -> list[dict]:
    """The guidance dicts of the sweep, method by method, REG mode by mode, weight by weight; each one is
    built once (``make_guidance``) so an unknown parameter or a weight below the method's minimum is refused
    here, before any sampling."""
    if not methods:
        raise ConfigError("--methods is empty; give e.g. [{method: cfg, weights: [0, 0.5, 1, 2, 4]}]")
    if not regs:
        raise ConfigError(f"--reg is empty; give REG modes from {list(REG_MODES)}")
    unknown = sorted(set(regs) - set(REG_MODES))
    if unknown:
        raise ConfigError(f"--reg: unknown REG modes {unknown}; choose from {list(REG_MODES)}")
    settings = []
    for i, entry in enumerate(methods):
        entry = dict(entry)
        method, weights = entry.pop("method", None), entry.pop("weights", None)
        where = f"--methods[{i}] ({method})"
        if method is None:
            raise ConfigError(f"--methods[{i}] has no 'method' key: {dict(entry)}")
        if not isinstance(weights, list) or not weights:
            raise ConfigError(f"{where}: empty weight grid; give 'weights' as a non-empty list, got {weights!r}")
        clash = sorted(set(entry) & {"scale", "reg", "convention"})
        if clash:
            raise ConfigError(f"{where}: {clash} are set by the sweep (weights, --reg, --convention), not per method")
        for reg in regs:
            for weight in weights:
                guidance = {"method": method, "scale": weight, "convention": convention, "reg": reg, **entry}
                try:
                    make_guidance(**guidance)
                except ConfigError as err:
                    raise ConfigError(f"{where} weight {weight!r}: {err}") from None
                settings.append(guidance)
    names = [setting_name(s) for s in settings]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"--methods give the same setting twice: {repeated}")
    return settings


def check_sweep_output(folder: Path, fingerprint: dict) -> None:
    """Refuse a folder holding another sweep (a different ``sweep.json``) or a ``sample.py`` run; creates nothing."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output {folder} is a file; give a folder")
    if (folder / writer.RUN_FILE).is_file():
        raise ConfigError(f"--output {folder} holds a sample.py run; give the sweep its own folder")
    if not (folder / SWEEP_FILE).is_file():
        return
    changed = writer.fingerprint_changes(writer.read_json(folder / SWEEP_FILE), fingerprint)
    if changed:
        raise ConfigError(f"--output {folder} holds another sweep (arguments differ in {changed}); choose another "
                          "folder")


def default_front(metric_names: tuple[str, ...]) -> list[str]:
    """The figure's ``[x, y]``: a distance to the target against a measure of guidance's effect."""
    x = "energy_distance" if "energy_distance" in metric_names else "fid"
    y = next((m for m in ("on_shape", "accuracy", "is", "log_likelihood") if m in metric_names), None)
    return [x, y]


@dataclass
class Sweep:
    """Validated arguments of one ``sweep.py`` run; ``job`` builds each setting's ``SamplingJob`` when due."""

    config: dict
    settings: dict[str, dict]  # setting name -> guidance dict, in table order
    first_job: SamplingJob
    output: Path
    fingerprint: dict
    front: list[str]
    evaluator: object | None  # image data: the metrics.evaluate evaluator with its reference features

    @classmethod
    def from_config(cls, cfg: Namespace) -> "Sweep":
        config = cfg.as_dict()
        config.pop("config", None)
        if cfg.max_settings is not None and cfg.max_settings < 1:
            raise ConfigError(f"--max_settings must be a positive integer or null, got {cfg.max_settings}")
        if cfg.output is None:
            raise ConfigError("--output is required: the folder of the sweep")
        if cfg.convention not in ("w", "w2"):
            raise ConfigError(f"--convention must be w or w2, got {cfg.convention!r}")
        settings = {setting_name(s): s for s in sweep_settings(cfg.methods, cfg.reg, cfg.convention)}
        output = Path(cfg.output)
        fingerprint = {key: config[key] for key in ("ema", "sampler", "sampler_kwargs", "steps", "num_samples",
                                                    "seed", "shard_size", "labels", "distribution", "evaluation",
                                                    "sample_options")}
        fingerprint["settings"] = list(settings.values())
        if cfg.checkpoint is not None and Path(cfg.checkpoint).is_file():  # else the sampling job says what is wrong
            fingerprint["checkpoint_sha256"] = writer.file_sha256(cfg.checkpoint)
            check_sweep_output(output, fingerprint)
        name, guidance = next(iter(settings.items()))
        first_job = SamplingJob.from_config(sample_config(config, guidance, output / name))
        denoiser = first_job.denoiser
        if first_job.distribution is not None:
            from lightning_reg.metrics.toy import toy_metric_names
            metric_names, evaluator = toy_metric_names(first_job.distribution), None
            if cfg.evaluation is not None:
                raise ConfigError("--evaluation is for images; toy data (--distribution) uses the exact toy metrics")
        elif cfg.evaluation is not None and len(denoiser.sample_shape) == 3:
            evaluator = build_evaluator(cfg.evaluation, denoiser)
            metric_names = tuple(evaluator.names)
        else:
            raise ConfigError("a sweep needs metrics: --distribution toy1d|toy2d for toy data, --evaluation {...} "
                              "for images")
        front = cfg.front if cfg.front is not None else default_front(metric_names)
        if len(front) != 2 or not set(front) <= set(metric_names) or not set(front) <= set(METRIC_GOALS):
            raise ConfigError(f"--front must name two of the computed metrics {list(metric_names)}, got {front}")
        return cls(config, settings, first_job, output, fingerprint, front, evaluator)

    def job(self, name: str) -> SamplingJob:
        if name == next(iter(self.settings)):
            return self.first_job
        return SamplingJob.from_config(sample_config(self.config, self.settings[name], self.output / name))

    def run(self, fabric: lightning.Fabric) -> None:
        """Run the unfinished settings in table order (at most ``max_settings``), then write the table, the
        figure and the summary from every finished setting's ``row.json``."""
        rank = fabric.global_rank
        if rank == 0:
            self.output.mkdir(parents=True, exist_ok=True)
            writer.write_json(self.output / SWEEP_FILE, self.fingerprint)
        fabric.barrier()
        unfinished = fabric.broadcast([n for n in self.settings if not (self.output / n / ROW_FILE).is_file()])
        todo = unfinished[:self.config["max_settings"]]
        for i, name in enumerate(todo):
            if rank == 0:
                print(f"[{i + 1}/{len(todo)}] {name}")
            job = self.job(name)
            job.run(fabric, time.time())
            if rank == 0:
                writer.write_json(job.output / ROW_FILE, self.row(name, job))
            fabric.barrier()
        if rank == 0:
            if len(todo) < len(unfinished):
                print(f"stopped after {len(todo)} of {len(unfinished)} unfinished settings (--max_settings); "
                      "run the same command again to resume")
            self.finish()

    def row(self, name: str, job: SamplingJob) -> dict:
        """A table row: the setting, every metric, and from ``meta.json`` the time per sample (sampling time over
        the samples the finishing invocation generated) and peak memory (``peak_memory_measure``: the GPU's
        peak allocated memory, or the CPU process's peak resident set, an upper bound)."""
        meta = writer.read_json(job.output / writer.META_FILE)
        if self.evaluator is None:
            metrics = meta["metrics"]
        else:
            from lightning_reg.metrics.evaluate import evaluate_samples, read_samples
            metrics = evaluate_samples(*read_samples(job.output / writer.SAMPLES_FILE), self.evaluator)
        guidance = self.settings[name]
        params = {k: v for k, v in guidance.items() if k not in ("method", "scale", "convention", "reg")}
        return {"setting": name, "method": guidance["method"], "reg": guidance["reg"],
                "w": make_guidance(**guidance).w, "convention": guidance["convention"], "weight": guidance["scale"],
                "params": " ".join(f"{k}={v}" for k, v in sorted(params.items())), **metrics,
                "num_samples": self.config["num_samples"],
                "time_per_sample_ms": (1e3 * meta["sampling_time_s"] / meta["generated_samples"]
                                       if meta["generated_samples"] else math.nan),
                "peak_memory_mib": round(meta["peak_memory_bytes"] / 2 ** 20, 1),
                "peak_memory_measure": meta["peak_memory_measure"]}

    def finish(self) -> None:
        """``sweep.csv`` and ``fronts.png`` of the finished settings, and the summary of the best rows."""
        rows = [writer.read_json(self.output / n / ROW_FILE) for n in self.settings
                if (self.output / n / ROW_FILE).is_file()]
        write_table(self.output / TABLE_FILE, rows)
        title = (f"{Path(self.config['checkpoint']).name}: {self.config['num_samples']} samples per setting, "
                 f"{self.config['sampler']} {self.config['steps']} steps")
        save_fronts(self.output / FIGURE_FILE, rows, *self.front, title=title)
        print(f"{len(rows)} of {len(self.settings)} settings in {self.output / TABLE_FILE} and "
              f"{self.output / FIGURE_FILE}\n{summary(rows, *self.front)}")


def sample_config(config: dict, guidance: dict, output: Path) -> Namespace:
    """``sample.py``'s parsed arguments for one setting (``sample_options`` on top), validated by its parser."""
    keys = ("checkpoint", "ema", "sampler", "sampler_kwargs", "steps", "num_samples", "seed", "batch_size",
            "shard_size", "labels", "distribution")
    extra = config["sample_options"] or {}
    clash = sorted(set(extra) & {*keys, "guidance", "output", "overwrite", "max_shards", "trainer", "config"})
    if clash:
        raise ConfigError(f"--sample_options: {clash} are set by the sweep's own options")
    options = {**{k: config[k] for k in keys}, "guidance": guidance, "output": str(output),
               "trainer": config["trainer"],
               **extra}
    try:
        return build_sample_parser().parse_object(options)
    except ArgumentError as err:
        raise ConfigError(f"--sample_options: {parse_error_message(err)}") from None


def build_evaluator(evaluation: dict, denoiser):
    """The image evaluator of ``metrics.evaluate`` with the reference's features set (once per sweep)."""
    from lightning_reg.metrics.evaluate import build_image_evaluator, load_reference
    options = dict(evaluation)
    reference, num_reference = options.pop("reference", None), options.pop("num_reference", None)
    if reference is None:
        raise ConfigError("--evaluation needs a reference: an .npz of images, digits:mnist or a dataset")
    try:
        evaluator = build_image_evaluator(image_shape=tuple(denoiser.sample_shape), num_classes=denoiser.num_classes,
                                          **options)
    except TypeError as err:
        raise ConfigError(f"--evaluation: {one_line(err)}") from None
    evaluator.set_real(load_reference(reference, tuple(denoiser.sample_shape), num_reference))
    return evaluator


def write_table(path: Path, rows: list[dict]) -> None:
    """``rows`` as CSV (floats with full precision): the setting's columns, the metrics, then the cost columns."""
    seen = list(dict.fromkeys(c for row in rows for c in row))
    columns = ([c for c in LEAD_COLUMNS if c in seen] + [c for c in seen if c not in LEAD_COLUMNS + COST_COLUMNS]
               + [c for c in COST_COLUMNS if c in seen])

    def write(f):
        out = csv.DictWriter(f, fieldnames=columns)
        out.writeheader()
        out.writerows(rows)

    writer.atomic_write(path, write, binary=False)


def read_table(path) -> list[dict]:
    """``sweep.csv`` back as rows of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def save_fronts(path: Path, rows: list[dict], x: str, y: str, title: str = "") -> None:
    """One panel per method (shared axes): a curve per REG mode over the weight grid in ``(x, y)``, line style
    by REG mode, each curve's best-``x`` point starred and labelled with its ``w``; the Pareto front of all
    rows in grey behind."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    from lightning_reg.metrics.plots import save_figure
    goals = {x: METRIC_GOALS[x], y: METRIC_GOALS[y]}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cols = min(len(methods), 3) or 1
    nrows = max(1, math.ceil(len(methods) / cols))
    fig = Figure(figsize=(max(4.6 * cols, 8.0), 3.9 * nrows), layout="constrained")  # room for the title
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False, sharex=True, sharey=True).ravel()
    front = sorted((rows[i] for i in pareto_front(rows, goals)), key=lambda r: float(r[x]))
    best = best_rows(rows, ("method", "reg"), x, goals[x])
    values = np.array([float(r[x]) for r in rows]) if rows else np.ones(1)
    for ax, method in zip(axes, methods):
        ax.plot([float(r[x]) for r in front], [float(r[y]) for r in front], color="0.75", lw=5, alpha=0.6,
                zorder=0, label="Pareto front (all)")
        for reg, style in REG_STYLES.items():
            curve = sorted((r for r in rows if r["method"] == method and r["reg"] == reg), key=lambda r: float(r["w"]))
            if not curve:
                continue
            colour = f"C{list(REG_STYLES).index(reg)}"
            ax.plot([float(r[x]) for r in curve], [float(r[y]) for r in curve], style, marker="o", ms=3.5,
                    color=colour, label=f"REG {reg}")
            top = best.get((method, reg))
            if top is not None:
                ax.plot(float(top[x]), float(top[y]), "*", ms=14, color=colour, mec="k", mew=0.8, zorder=3)
                ax.annotate(f"w={float(top['w']):g}", (float(top[x]), float(top[y])), textcoords="offset points",
                            xytext=(6, -12 - 9 * list(REG_STYLES).index(reg)), fontsize=7, color=colour)
        ax.set_title(method)
        ax.grid(alpha=0.3)
    if values.size and values.min() > 0 and values.max() / values.min() > 20:
        axes[0].set_xscale("log")
        axes[0].xaxis.set_minor_formatter(FuncFormatter(_minor_log_label))  # 2 and 5 of each decade only
    for ax in axes[len(methods):]:
        ax.set_axis_off()
    for ax in axes[(nrows - 1) * cols:]:
        ax.set_xlabel(f"{x} ({'lower' if goals[x] == 'min' else 'higher'} is better)")
    for ax in axes[::cols]:
        ax.set_ylabel(f"{y} ({'lower' if goals[y] == 'min' else 'higher'} is better)")
    axes[0].legend(fontsize="small", loc="best")
    fig.suptitle("\n".join(filter(None, [title, f"a curve per REG mode over the weights; ★ best {x} per curve"])))
    save_figure(fig, path)


def _minor_log_label(value: float, _) -> str:
    """Label a minor log tick only at 2 and 5 times a power of ten."""
    mantissa = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if any(math.isclose(mantissa, m) for m in (2, 5)) else ""


def summary(rows: list[dict], x: str, y: str) -> str:
    """Per method and REG mode, the best-``x`` row: its weight (w convention), ``x``, ``y`` and time per sample."""
    best = best_rows(rows, ("method", "reg"), x, METRIC_GOALS[x])
    lines = [f"{'method':<14}{'reg':<7}{'best w':>8}{x:>18}{y:>16}{'ms/sample':>11}"]
    for (method, reg), row in best.items():
        lines.append(f"{method:<14}{reg:<7}{float(row['w']):>8g}{float(row[x]):>18.4g}{float(row[y]):>16.4g}"
                     f"{float(row['time_per_sample_ms']):>11.3g}")
    return "\n".join(lines)


def main(args: list[str] | None = None) -> None:
    """Parse and validate every setting (nothing is written for bad input), launch the processes and sweep."""
    sweep, fabric = launch(args, build_parser, Sweep.from_config)
    sweep.run(fabric)
