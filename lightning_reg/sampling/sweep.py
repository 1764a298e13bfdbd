"""``sweep.py``: guidance methods x weight grid x REG modes through ``sample.py``'s path, one table and one figure.

A sweep's options are ``sample.py``'s plus the grid (``SweepConfig``). The model is loaded once; every
setting is one ``sample.py`` run (``SamplingJob``: deterministic per sample index, sharded, resumable,
DDP) into ``<output>/<setting>/``, evaluated by the one evaluator of ``metrics.evaluate.build_evaluator``
(toy metrics or image metrics, the reference's features computed once), which ``meta.json`` records. A
setting is finished once its ``row.json`` exists; an interrupted sweep resumes with the next setting (a
partial one from its shards). ``docs/sweeps.md``.

Bad input ends in one ``error: ...`` line and exit status 2, before anything is written: every setting is
checked (``make_guidance``) before the first sample.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import lightning

from lightning_reg.errors import ConfigError
from lightning_reg.guidance.guided import make_guidance
from lightning_reg.guidance.reg import REG_MODES
from lightning_reg.io.files import read_json, write_json
from lightning_reg.metrics.evaluate import evaluate_samples, read_samples
from lightning_reg.metrics.fronts import METRIC_GOALS, default_front, save_fronts, summary, write_table
from lightning_reg.sampling import writer
from lightning_reg.sampling.cli import LoadedModel, SamplingJob, launch
from lightning_reg.sampling.config import SweepConfig, build_parser as config_parser, without_reference_file
from lightning_reg.sampling.engine import setting_name

SWEEP_FILE, ROW_FILE, TABLE_FILE, FIGURE_FILE = "sweep.json", "row.json", "sweep.csv", "fronts.png"


def build_parser():
    return config_parser(SweepConfig, __doc__)


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
    changed = writer.fingerprint_changes(read_json(folder / SWEEP_FILE), fingerprint)
    if changed:
        raise ConfigError(f"--output {folder} holds another sweep (arguments differ in {changed}); choose another "
                          "folder")


@dataclass
class Sweep:
    """One ``sweep.py`` run: the model loaded once, the settings, and the one evaluator every setting uses."""

    config: SweepConfig
    model: LoadedModel
    settings: dict[str, dict]  # setting name -> guidance dict, in table order
    first_job: SamplingJob
    output: Path
    fingerprint: dict
    front: list[str]

    @classmethod
    def from_config(cls, config: SweepConfig) -> "Sweep":
        settings = {setting_name(s): s for s in sweep_settings(config.methods, config.reg, config.convention,
                                                                  config.guidance)}
        output = Path(config.output)
        model = LoadedModel.load(config)
        fingerprint = {**config.fingerprint(model.checkpoint_sha256, model.reference_sha256),
                       "settings": [without_reference_file(s) for s in settings.values()]}  # the grid (GRID fields)
        check_sweep_output(output, fingerprint)
        name, guidance = next(iter(settings.items()))
        first_job = SamplingJob.build(config.with_setting(guidance, str(output / name)), model)
        metric_names = tuple(first_job.evaluator.names)
        front = config.front if config.front is not None else default_front(metric_names)
        if len(front) != 2 or not set(front) <= set(metric_names) or not set(front) <= set(METRIC_GOALS):
            raise ConfigError(f"--front must name two of the computed metrics {list(metric_names)}, got {front}")
        return cls(config, model, settings, first_job, output, fingerprint, front)

    def job(self, name: str) -> SamplingJob:
        """Setting ``name``'s run, on the sweep's model and evaluator (nothing is read again)."""
        if name == next(iter(self.settings)):
            return self.first_job
        return SamplingJob.build(self.config.with_setting(self.settings[name], str(self.output / name)), self.model,
                                 self.first_job.evaluator)

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
        for i, name in enumerate(todo):
            if rank == 0:
                print(f"[{i + 1}/{len(todo)}] {name}")
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
        """A table row: the setting, every metric (``meta.json``'s, written by the evaluator; a run finished
        without them is evaluated from its ``samples.npz``), and from ``meta.json`` the time per sample (sampling
        time over the samples the finishing invocation generated) and peak memory (``peak_memory_measure``: the
        GPU's peak allocated memory, or the CPU process's peak resident set, an upper bound)."""
        meta = read_json(job.output / writer.META_FILE)
        metrics = meta.get("metrics") or evaluate_samples(*read_samples(job.output / writer.SAMPLES_FILE),
                                                          job.evaluator)
        guidance = self.settings[name]
        params = {k: v for k, v in guidance.items() if k not in ("method", "scale", "convention", "reg")}
        w = make_guidance(**without_reference_file(guidance)).w
        return {"setting": name, "method": guidance["method"], "reg": guidance["reg"],
                "w": w, "convention": guidance["convention"], "weight": guidance["scale"],
                "params": " ".join(f"{k}={v}" for k, v in sorted(params.items())), **metrics,
                "num_samples": self.config.num_samples,
                "time_per_sample_ms": (1e3 * meta["sampling_time_s"] / meta["generated_samples"]
                                       if meta["generated_samples"] else math.nan),
                "peak_memory_mib": round(meta["peak_memory_bytes"] / 2 ** 20, 1),
                "peak_memory_measure": meta["peak_memory_measure"]}

    def finish(self) -> None:
        """``sweep.csv`` and ``fronts.png`` of the finished settings, and the summary of the best rows."""
        rows = [read_json(self.output / n / ROW_FILE) for n in self.settings if (self.output / n / ROW_FILE).is_file()]
        write_table(self.output / TABLE_FILE, rows)
        title = (f"{Path(self.config.checkpoint).name}: {self.config.num_samples} samples per setting, "
                 f"{self.config.sampler} {self.config.steps} steps")
        save_fronts(self.output / FIGURE_FILE, rows, *self.front, title=title)
        print(f"{len(rows)} of {len(self.settings)} settings in {self.output / TABLE_FILE} and "
              f"{self.output / FIGURE_FILE}\n{summary(rows, *self.front)}")


def main(args: list[str] | None = None) -> None:
    """Parse and validate every setting (nothing is written for bad input), launch the processes and sweep."""
    sweep, fabric = launch(args, build_parser, SweepConfig, Sweep.from_config)
    sweep.run(fabric)
