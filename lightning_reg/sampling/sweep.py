"""``sweep.py``: guidance methods x weight grid x REG modes (x samplers x steps) through ``sample.py``'s path,
one table and one figure.

A sweep's options are ``sample.py``'s plus the grid (``SweepConfig``). The model is loaded once; every
setting is one ``sample.py`` run (``SamplingJob``: deterministic per sample index, sharded, resumable,
DDP) into ``<output>/<setting>/`` (``<output>/<sampler tag>_<setting>/`` with ``--samplers``), evaluated by
the one evaluator of ``metrics.evaluate.build_evaluator`` (toy metrics or image metrics, the reference's
features computed once), which ``meta.json`` records. A setting is finished once its ``row.json`` exists; an
interrupted sweep resumes with the next setting (a partial one from its shards). ``docs/sweeps.md``.

Bad input ends in one ``error: ...`` line and exit status 2, before anything is written: every setting is
checked (``make_guidance``; each ``--samplers`` entry by ``get_sampler``, each sampler chain by its first
setting's job) before the first sample.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import lightning

from lightning_reg.diffusion.samplers import get_sampler
from lightning_reg.diffusion.schedulers import PREFIX as SCHEDULER_PREFIX
from lightning_reg.errors import ConfigError, check_int
from lightning_reg.guidance.guided import make_guidance
from lightning_reg.guidance.reg import REG_MODES
from lightning_reg.io.files import read_json, write_json
from lightning_reg.metrics.evaluate import evaluate_samples, read_samples
from lightning_reg.metrics.fronts import (METRIC_GOALS, chain_labels, default_front, save_fronts, save_step_curves,
                                          summary, write_table)
from lightning_reg.sampling import writer
from lightning_reg.sampling.cli import LoadedModel, SamplingJob, launch
from lightning_reg.sampling.config import (SweepConfig, build_parser as config_parser, parse_config,
                                           without_reference_file)
from lightning_reg.sampling.engine import setting_name

SWEEP_FILE, ROW_FILE, TABLE_FILE, FIGURE_FILE = "sweep.json", "row.json", "sweep.csv", "fronts.png"
STEPS_FIGURE_FILE = "steps.png"  # with --samplers: the front's metrics against the steps
SAMPLER_KEYS = ("name", "sampler", "sampler_kwargs", "steps")  # the keys of a --samplers entry
TAG_CHARACTERS = "A-Za-z0-9_.+-"  # a sampler tag's: no brackets, commas, spaces, slashes or colons in a folder name


def build_parser():
    return config_parser(SweepConfig)


def sweep_settings(methods: list[dict], regs: list[str], convention: str, shared: dict | None = None) -> list[dict]:
    """The guidance dicts of the sweep, method by method, REG mode by mode, weight by weight (``shared``: the
    parameters every setting takes); each one is built once (``make_guidance``) so an unknown parameter or a
    weight below the method's minimum is refused here, before any sampling."""
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
        if "reference_checkpoint" in entry:  # one guiding file per sweep, loaded once with the model
            raise ConfigError(f"{where}: reference_checkpoint is the sweep's guiding file: give it in --guidance "
                              "(every setting shares it)")
        for reg in regs:
            for weight in weights:
                guidance = {"method": method, "scale": weight, "convention": convention, "reg": reg,
                            **(shared or {}), **entry}
                try:
                    make_guidance(**without_reference_file(guidance))
                except ConfigError as err:
                    raise ConfigError(f"{where} weight {weight!r}: {err}") from None
                settings.append(guidance)
    names = [setting_name(s) for s in settings]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"--methods give settings with the same folder name {repeated} (the same setting twice, or "
                          "parameters that differ only in characters a folder name drops: letters, digits and "
                          "_ . + = - are kept)")
    return settings


def sampler_tag(sampler: str) -> str:
    """A sampler's folder tag: ``diffusers:DPMSolverMultistepScheduler`` -> ``DPMSolverMultistep``."""
    return re.sub(f"[^{TAG_CHARACTERS}]", "", sampler.removeprefix(SCHEDULER_PREFIX).removesuffix("Scheduler"))


def sampler_chains(samplers: list[dict] | None, default: dict) -> dict[str | None, dict]:
    """The sampler axis, entry by entry, steps by steps: folder tag (``<name><steps>``) -> ``{sampler, steps,
    sampler_kwargs}``; ``samplers`` null: the config's one chain ``default``, untagged (names as before). Every
    entry is checked here (``get_sampler`` for its sampler and options), before any sampling."""
    if samplers is None:
        return {None: default}
    if not samplers:
        raise ConfigError("--samplers is empty; give e.g. [{sampler: ddim, steps: [20, 50]}], or null for the one "
                          "--sampler and --steps")
    chains, owner = {}, {}
    for i, entry in enumerate(samplers):
        where = f"--samplers[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a mapping like {{sampler: ddim, steps: [20, 50]}}, got {entry!r}")
        unknown = [k for k in entry if k not in SAMPLER_KEYS]
        if unknown:
            near = difflib.get_close_matches(str(unknown[0]), SAMPLER_KEYS, n=1)
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}{f' (did you mean {near[0]!r}?)' if near else ''}"
                              f"; accepted: {list(SAMPLER_KEYS)}")
        sampler, steps, kwargs, name = (entry.get(k) for k in ("sampler", "steps", "sampler_kwargs", "name"))
        if not isinstance(sampler, str):
            raise ConfigError(f"{where} has no 'sampler' (a sampler's name, e.g. ddim): {entry}")
        where = f"{where} ({sampler})"
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ConfigError(f"{where}: sampler_kwargs must be a mapping like {{eta: 0.5}} or null, got {kwargs!r}")
        if name is not None and not (isinstance(name, str) and re.fullmatch(f"[{TAG_CHARACTERS}]+", name)):
            raise ConfigError(f"{where}: name {name!r} tags folders: give letters, digits and _ . + - only")
        if steps is None or steps == []:
            raise ConfigError(f"{where}: no steps; give 'steps' as an int or a non-empty list, e.g. [20, 50]")
        try:
            get_sampler(sampler, **(kwargs or {}))
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        for n in steps if isinstance(steps, list) else [steps]:
            check_int(f"{where} steps", n)
            tag = f"{sampler_tag(sampler) if name is None else name}{n}"
            if tag in chains:
                raise ConfigError(f"--samplers[{owner[tag]}] and {where} both give the folder tag {tag!r}; give "
                                  "them distinct 'name's" if owner[tag] != i else f"{where} gives steps {n} twice")
            chains[tag], owner[tag] = {"sampler": sampler, "steps": n, "sampler_kwargs": kwargs}, i
    return chains


def grid_settings(config: SweepConfig) -> dict[str, dict]:
    """The sweep's settings in table order, samplers x steps x (methods x REG modes x weights): setting name
    (``<tag>_<setting_name(guidance)>`` with ``--samplers``) -> ``{guidance, sampler, steps, sampler_kwargs}``,
    what ``SweepConfig.with_setting`` takes."""
    guidances = sweep_settings(config.methods, config.reg, config.convention, config.guidance)
    default = {name: getattr(config, name) for name in config.chain_fields}
    return {(f"{tag}_{setting_name(g)}" if tag else setting_name(g)): {"guidance": g, **chain}
            for tag, chain in sampler_chains(config.samplers, default).items() for g in guidances}


def chain_cells(setting: dict) -> dict:
    """A setting's sampler chain as its table row holds it: ``sampler``, ``steps``, ``sampler_kwargs`` (one cell)."""
    return {"sampler": setting["sampler"], "steps": setting["steps"],
            "sampler_kwargs": as_cell(setting["sampler_kwargs"] or {})}


def as_cell(params: dict) -> str:
    """Parameters as one table cell: ``k=v`` by key, space-separated."""
    return " ".join(f"{k}={v}" for k, v in sorted(params.items()))


def check_sweep_output(folder: Path, fingerprint: dict) -> None:
    """Refuse a folder holding another sweep (a different ``sweep.json``) or a ``sample.py`` run; creates nothing."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output {folder} is a file; give a folder")
    if (folder / writer.RUN_FILE).is_file():
        raise ConfigError(f"--output {folder} holds a sample.py run; give the sweep its own folder")
    if not (folder / SWEEP_FILE).is_file():
        return
    changed = writer.fingerprint_changes(read_json(folder / SWEEP_FILE), fingerprint)
    if changed:
        raise ConfigError(f"--output {folder} holds another sweep (arguments differ in {changed}); choose another "
                          "folder")


@dataclass
class Sweep:
    """One ``sweep.py`` run: the model loaded once, the settings, and the one evaluator every setting uses."""

    config: SweepConfig
    model: LoadedModel
    settings: dict[str, dict]  # setting name -> {guidance, sampler, steps, sampler_kwargs}, in table order
    jobs: dict[str, SamplingJob]  # built up front: each sampler chain's first setting, the first one's evaluator
    output: Path
    fingerprint: dict
    front: list[str]

    @classmethod
    def from_config(cls, config: SweepConfig) -> "Sweep":
        settings = grid_settings(config)
        output = Path(config.output)
        model = LoadedModel.load(config)
        # the grid (GRID fields); without --samplers every setting's chain is the fingerprint's own sampler, steps
        # and sampler_kwargs, and the list keeps the guidance alone (so older sweeps resume)
        grid = [without_reference_file(s["guidance"]) if config.samplers is None
                else {**s, "guidance": without_reference_file(s["guidance"])} for s in settings.values()]
        fingerprint = {**config.fingerprint(model.checkpoint_sha256, model.reference_sha256), "settings": grid}
        check_sweep_output(output, fingerprint)
        first = next(iter(settings))
        jobs = {first: SamplingJob.build(config.with_setting(output=str(output / first), **settings[first]), model)}
        metric_names = tuple(jobs[first].evaluator.names)
        front = config.front if config.front is not None else default_front(metric_names)
        if len(front) != 2 or not set(front) <= set(metric_names) or not set(front) <= set(METRIC_GOALS):
            raise ConfigError(f"--front must name two of the computed metrics {list(metric_names)}, got {front}")
        sweep = cls(config, model, settings, jobs, output, fingerprint, front)
        chains = {}  # each distinct chain's first setting: its job's check chain (SamplingJob.build) fits it
        for name, setting in settings.items():
            chains.setdefault(json.dumps([setting[k] for k in config.chain_fields], sort_keys=True), name)
        for name in chains.values():
            jobs[name] = sweep.job(name)
        return sweep

    def job(self, name: str) -> SamplingJob:
        """Setting ``name``'s run, on the sweep's model and evaluator (nothing is read again)."""
        if name in self.jobs:
            return self.jobs[name]
        return SamplingJob.build(self.config.with_setting(output=str(self.output / name), **self.settings[name]),
                                 self.model, next(iter(self.jobs.values())).evaluator)

    def run(self, fabric: lightning.Fabric) -> None:
        """Run the unfinished settings in table order (at most ``max_settings``), then write the table, the
        figure and the summary from every finished setting's ``row.json``."""
        rank = fabric.global_rank
        if rank == 0:
            self.output.mkdir(parents=True, exist_ok=True)
            write_json(self.output / SWEEP_FILE, self.fingerprint)
        fabric.barrier()
        unfinished = fabric.broadcast([n for n in self.settings if not (self.output / n / ROW_FILE).is_file()])
        todo = unfinished[:self.config.max_settings]
        finished = len(self.settings) - len(unfinished)  # by earlier invocations: the count is the whole sweep's
        for i, name in enumerate(todo):
            if rank == 0:
                print(f"[{finished + i + 1}/{len(self.settings)}] {name}")
            job = self.job(name)
            job.run(fabric, time.time())
            if rank == 0:
                write_json(job.output / ROW_FILE, self.row(name, job))
            fabric.barrier()
        if rank == 0:
            if len(todo) < len(unfinished):
                print(f"stopped after {len(todo)} of {len(unfinished)} unfinished settings (--max_settings); "
                      "run the same command again to resume")
            self.finish()

    def row(self, name: str, job: SamplingJob) -> dict:
        """A table row: the setting (its guidance, sampler and steps), every metric (``meta.json``'s, written by
        the evaluator; a run finished without them is evaluated from its ``samples.npz``), and from ``meta.json``
        the time per sample (sampling time over the samples the finishing invocation generated) and peak memory
        (``peak_memory_measure``: the GPU's peak allocated memory, or the CPU process's peak resident set, an
        upper bound)."""
        meta = read_json(job.output / writer.META_FILE)
        metrics = meta.get("metrics") or evaluate_samples(*read_samples(job.output / writer.SAMPLES_FILE),
                                                          job.evaluator)
        setting = self.settings[name]
        guidance = setting["guidance"]
        params = {k: v for k, v in guidance.items() if k not in ("method", "scale", "convention", "reg")}
        w = make_guidance(**without_reference_file(guidance)).w
        return {"setting": name, "method": guidance["method"], "reg": guidance["reg"],
                "w": w, "convention": guidance["convention"], "weight": guidance["scale"], "params": as_cell(params),
                **chain_cells(setting), **metrics,
                "num_samples": self.config.num_samples,
                "time_per_sample_ms": (1e3 * meta["sampling_time_s"] / meta["generated_samples"]
                                       if meta["generated_samples"] else math.nan),
                "peak_memory_mib": round(meta["peak_memory_bytes"] / 2 ** 20, 1),
                "peak_memory_measure": meta["peak_memory_measure"]}

    def finish(self) -> None:
        """``sweep.csv`` and ``fronts.png`` of the finished settings, and the summary of the best rows."""
        finished = [n for n in self.settings if (self.output / n / ROW_FILE).is_file()]
        # a row written before the chain columns takes its chain from the grid
        rows = [chain_cells(self.settings[n]) | read_json(self.output / n / ROW_FILE) for n in finished]
        write_table(self.output / TABLE_FILE, rows)
        keys = dict.fromkeys(tuple(chain_cells(s).values()) for s in self.settings.values())  # the grid's chains
        chains = list(chain_labels(list(keys)).values())
        title = f"{self.output.name}: {self.config.num_samples} samples per setting"  # the run, by its folder
        title += (f", {chains[0]} steps" if len(chains) == 1
                  else "\n" + textwrap.fill(f"samplers: {', '.join(chains)}", 90))  # the figure's width
        save_fronts(self.output / FIGURE_FILE, rows, *self.front, title=title)
        figures = [self.output / FIGURE_FILE]
        if self.config.samplers is not None and rows:
            figures.append(self.output / STEPS_FIGURE_FILE)
            save_step_curves(figures[-1], rows, self.front, title=title.split("\n")[0])
        print(f"{len(rows)} of {len(self.settings)} settings in {self.output / TABLE_FILE} and "
              f"{' and '.join(map(str, figures))}\n{summary(rows, *self.front)}")


def run(config: SweepConfig) -> None:
    """Validate every setting (nothing is written for bad input), launch the processes and sweep."""
    sweep, fabric = launch(config, Sweep.from_config)
    sweep.run(fabric)


def main(args: list[str] | None = None) -> None:
    """``sweep.py`` in this process: parse ``args`` (``parse_config``), then ``run``."""
    run(parse_config(SweepConfig, args))
