"""The typed options of ``sample.py`` and ``sweep.py``: one dataclass each, validated where they are built.

``SweepConfig`` *is* a ``SampleConfig`` plus the grid (samplers x steps x methods x weights x REG modes), so
every ``sample.py`` option works in a sweep by construction. Both parse from YAML files and flags with
jsonargparse (``parse_config``); every field's help is its line in the class docstring, the command's description
the text above it. The module imports neither torch nor Lightning (the files, the model spec and the prompts are
read where they are needed), so ``sample.py`` and ``sweep.py`` answer ``--help`` and refuse bad arguments at once.

Each field declares what it decides (``field(metadata=...)``, below), and ``fingerprint()`` keeps what decides
a run's results: a resumed ``sample.py`` run or sweep must match its fingerprint, so changing where, how fast
or how much at once it runs is accepted and changing a result is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import re
import sys
from argparse import ArgumentError
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, get_loader

from lightning_reg.distributed import fail
from lightning_reg.errors import ConfigError, check_int, parse_error_message
from lightning_reg.io.yaml_budget import install_yaml_budget

PRECISIONS = ("fp32", "bf16", "fp16")
DISTRIBUTIONS = ("toy1d", "toy2d", "toy2d_overlap")

# What a field decides (its ``metadata``; a field without one decides the samples, so a new option counts
# until it is marked otherwise), and so where ``fingerprint()`` puts it:
METRICS = {"decides": "metrics"}  # the metrics only: in a sweep's fingerprint (its table), not in a run's
CONTENT = {"decides": "content"}  # a file by its contents: fingerprinted as its sha256, never as its path
GRID = {"decides": "grid"}  # a sweep's grid: fingerprinted as the sweep's list of settings (sampling.sweep)
RUN = {"decides": "run"}  # where, how fast, how much at once it runs, how it is shown: never fingerprinted


def without_reference_file(guidance: dict) -> dict:
    """A guidance dict without ``reference_checkpoint``: a file, which ``sample.py`` loads (``LoadedModel``) and
    fingerprints by its sha256 (``reference_sha256``), never by its path; what ``make_guidance`` and the
    fingerprints take."""
    return {k: v for k, v in guidance.items() if k != "reference_checkpoint"}


@dataclass
class Processes:
    """The processes (the ``trainer`` options, as in ``train.py``).

    Args:
        accelerator: cpu, gpu, cuda, mps or auto.
        devices: processes (DDP across them when > 1).
        num_nodes: machines, each running ``devices`` processes (torchrun or SLURM; docs/distributed.md).
    """

    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1


@dataclass
class SampleConfig:
    """Guided samples from a trained checkpoint (``sample.py``, ``docs/sampling.md``), on one process or many
    (DDP), resumable. Every option can come from ``--config sample.yaml`` or a flag; bad input ends in one
    ``error:`` line and exit status 2, before anything is written. The checkpoint is a ConditionalDiffusion
    ``.ckpt``, a public DiT ``.pt`` with ``--model DiT-XL/2``, an EDM2 snapshot with ``--format edm2``, or a
    diffusers pipeline folder with ``--prompts`` (a caption file); ``--vae`` samples in the VAE's latent space
    and decodes at the end. ``meta.json`` records throughput (images/s), peak memory and the metrics of
    ``--distribution`` / ``--evaluation``.

    Args:
        checkpoint: the model: a ConditionalDiffusion checkpoint (.ckpt), a public DiT checkpoint (.pt) with
            --model, an EDM2 snapshot (edm2-*.pkl or its .safetensors) with --format edm2, or a diffusers
            text-to-image pipeline (SD 1.x/2.x; needs --prompts): a local folder (save_pretrained, with
            model_index.json) or a hub name in the local Hugging Face cache, never downloaded.
        format: the checkpoint format (lightning_reg.sources: lightning, dit, edm2, diffusers); null: diffusers
            for a pipeline folder or cached hub name, dit with --model, else lightning.
        model: a public DiT checkpoint's model, e.g. DiT-XL/2 (VP linear 1000, eps, learned sigma).
        image_size: with --model: the image size the DiT checkpoint serves (256: 32x32 latents).
        num_heads: a DiT width outside the paper's sizes: its attention heads (they do not show in the weights).
        vae: sample in this AutoencoderKL's latent space and decode at the end: a local folder or a cached hub
            name (stabilityai/sd-vae-ft-ema); required with --model; EDM2 img512: default stabilityai/sd-vae-ft-mse.
        prompts: a text file, one caption a line: sample i takes caption i (cycled: i % the number of captions).
        negative_prompt: with a pipeline: the reference prompt of guidance (default the empty prompt).
        gradient_checkpointing: with a pipeline: the UNet recomputes its blocks in REG's backward (less memory).
        precision: fp32, or bf16 / fp16: autocast (the REG authors' DiT patch: fp16 autocast).
        compile: torch.compile the backbone.
        ema: sample the EMA weights (false: the raw weights).
        guidance: make_guidance(**guidance), e.g. {method: cfg, scale: 1.0, reg: paper}; autoguidance takes
            reference_checkpoint (EDM2: the guiding file, an unconditional net for CFG or a weaker one).
        sampler: ddpm, ddim, edm_heun, flow_euler, or a diffusers scheduler as diffusers:<SchedulerClass>
            (e.g. diffusers:DPMSolverMultistepScheduler; docs/sampling.md).
        sampler_kwargs: extra sampler options, e.g. {eta: 0.5}, or the scheduler's own, e.g. {use_karras_sigmas: true}.
        steps: sampling steps.
        num_samples: samples to draw.
        seed: sample i uses the generator seeded by (seed, i).
        batch_size: samples per forward (does not change the result).
        shard_size: samples per shard file (the unit of resumption).
        labels: classes to sample, cycled: sample i gets labels[i % len(labels)]; default: class-balanced.
        distribution: toy1d, toy2d or toy2d_overlap: compute the exact toy metrics and a scatter plot.
        evaluation: images: {metrics: [fid, is, accuracy], reference: digits:mnist, num_reference: 10000,
            feature_network: classifier.ckpt, inception_weights: null} (metrics.evaluate), into meta.json;
            reference_kwargs: {classes: [3, 7]} keeps a dataset reference's images of those classes.
        output: output folder.
        overwrite: delete another run's files in --output.
        max_shards: stop after generating this many shards (to split a long run; rerun to resume).
        trainer: the processes.
    """

    checkpoint: str | None = field(default=None, metadata=CONTENT)
    format: str | None = None
    model: str | None = None
    image_size: int | None = None
    num_heads: int | None = None
    vae: str | None = None
    prompts: str | None = field(default=None, metadata=CONTENT)
    negative_prompt: str = ""
    gradient_checkpointing: bool = field(default=False, metadata=RUN)
    precision: str = "fp32"
    compile: bool = field(default=False, metadata=RUN)
    ema: bool = True
    guidance: dict = field(default_factory=lambda: {"method": "cfg", "scale": 1.0, "reg": "none"})
    sampler: str = "ddpm"
    sampler_kwargs: dict | None = None
    steps: int = 25
    num_samples: int = 1000
    seed: int = 0
    batch_size: int = field(default=1000, metadata=RUN)
    shard_size: int = 1000
    labels: list[int] | None = None
    distribution: str | None = field(default=None, metadata=METRICS)
    evaluation: dict | None = field(default=None, metadata=METRICS)
    output: str | None = field(default=None, metadata=RUN)
    overwrite: bool = field(default=False, metadata=RUN)
    max_shards: int | None = field(default=None, metadata=RUN)
    trainer: Processes = field(default_factory=Processes, metadata=RUN)

    kind = "samples"
    fingerprinted = ("samples",)  # what the fields in a fingerprint decide: a run's fingerprint covers its samples

    def __post_init__(self):
        if isinstance(self.trainer, dict):
            self.trainer = Processes(**self.trainer)
        for name in ("steps", "num_samples", "batch_size", "shard_size"):
            check_int(f"--{name}", getattr(self, name))
        check_int("--trainer.devices", self.trainer.devices)
        check_int("--trainer.num_nodes", self.trainer.num_nodes)
        check_int("--max_shards", self.max_shards, optional=True)
        if self.output is None:
            raise ConfigError(f"--output is required: the folder for the {self.kind}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.labels is not None and not self.labels:
            raise ConfigError("--labels must name at least one class (or be null for class-balanced labels)")
        if self.prompts is not None and self.labels is not None:
            raise ConfigError("--labels are class ids; a text-to-image run takes its conditions from --prompts")
        if self.prompts is not None:
            from lightning_reg.data.prompts import read_prompts

            read_prompts(self.prompts)  # a bad file is refused before any model is read
        if self.distribution is not None and self.distribution not in DISTRIBUTIONS:
            raise ConfigError(f"unknown --distribution {self.distribution!r}; choose one of {sorted(DISTRIBUTIONS)} "
                              "or null")
        if self.distribution is not None and self.evaluation is not None:
            raise ConfigError("--evaluation is for images; toy data (--distribution) uses the exact toy metrics")

    @property
    def model_spec(self):
        """What ``sources.load_model`` loads (a ``sources.ModelSpec``)."""
        from lightning_reg.sources import ModelSpec

        return ModelSpec(self.checkpoint, self.format, self.model, self.image_size, self.num_heads, self.vae,
                         self.ema, negative_prompt=self.negative_prompt,
                         gradient_checkpointing=self.gradient_checkpointing)

    def fingerprint(self, checkpoint_sha256: str, reference_sha256: str | None = None) -> dict:
        """What decides the results, which a resumed run must match: the fields whose ``decides`` is in
        ``fingerprinted`` (the guidance without its ``reference_checkpoint`` path), and the files by their
        contents: the model's and the guiding file's sha256 (the loaded model's, ``LoadedModel``) and the
        prompts'."""
        from lightning_reg.io.files import file_sha256

        values = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)
                  if f.metadata.get("decides", "samples") in self.fingerprinted}
        if "guidance" in values:
            values["guidance"] = without_reference_file(values["guidance"])
        return {**values, "checkpoint_sha256": checkpoint_sha256, "reference_sha256": reference_sha256,
                "prompts_sha256": file_sha256(self.prompts) if self.prompts is not None else None}

    def with_setting(self, guidance: dict, output: str, *, sampler: str, steps: int,
                     sampler_kwargs: dict | None) -> SampleConfig:
        """This config as one ``sample.py`` run: ``guidance`` with ``sampler`` over ``steps`` into ``output`` (a
        sweep's setting)."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(SampleConfig)}
        return SampleConfig(**{**own, "guidance": guidance, "sampler": sampler, "steps": steps,
                               "sampler_kwargs": sampler_kwargs, "output": output})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SweepConfig(SampleConfig):
    """Guidance methods x weights x REG modes (x samplers x steps), every setting one ``sample.py`` run
    (``sweep.py``, ``docs/sweeps.md``): every option of ``SampleConfig`` applies to every setting. The model is
    loaded once; each setting is written to ``<output>/<setting>/`` and evaluated by one evaluator, and the sweep
    writes ``sweep.csv`` and ``fronts.png`` and prints the best settings. A setting is finished once its
    ``row.json`` exists: an interrupted sweep resumes with the next one. Bad input ends in one ``error:`` line and
    exit status 2: every setting is checked before the first sample.

    Args:
        guidance: fixed make_guidance parameters of every setting, e.g. {guidance_channels: [0, 1, 2]}; method,
            scale, reg and convention come from the grid.
        num_samples: samples per setting.
        methods: one entry per method: {method: interval, weights: [0.5, 1, 2], t_lo: 100, t_hi: 600}; keys other
            than method and weights are fixed parameters of make_guidance.
        reg: REG modes, from none, paper, vjp, reuse, window, graph_free, graph_free_reuse, adaptive, short
            (guidance/reg.py).
        samplers: the sampler x steps axes: [{sampler: ddim, steps: [20, 50]}, {sampler:
            "diffusers:DPMSolverMultistepScheduler", steps: 10, sampler_kwargs: {use_karras_sigmas: true}, name:
            dpmpp2m_karras}]; steps an int or a list; name (optional) tags the folders, <name><steps>_<setting>,
            default the sampler without diffusers: and Scheduler; null: the one --sampler, --steps,
            --sampler_kwargs (a list replaces them).
        convention: the weights' convention: w (eps_c + w d) or w2 (eps_u + w2 d, w2 = w + 1).
        front: [x, y] metrics of the figure; default energy_distance vs on_shape (2D toy) or log_likelihood
            (1D toy), fid vs accuracy (or is) for images.
        output: output folder of the sweep (a folder per setting inside).
        max_settings: stop after finishing this many new settings (rerun the same command to resume).
    """

    guidance: dict = field(default_factory=dict, metadata=GRID)
    num_samples: int = 2000
    methods: list[dict] = field(default_factory=list, metadata=GRID)
    reg: list[str] = field(default_factory=lambda: ["none", "paper", "vjp"], metadata=GRID)
    samplers: list[dict] | None = field(default=None, metadata=GRID)
    convention: str = field(default="w", metadata=GRID)
    front: list[str] | None = field(default=None, metadata=RUN)  # the figure, drawn again on every invocation
    max_settings: int | None = field(default=None, metadata=RUN)

    kind = "sweep"
    fingerprinted = ("samples", "metrics")  # a sweep's results are its table: every setting's metrics
    chain_fields = ("sampler", "sampler_kwargs", "steps")  # what --samplers sets per setting

    def __post_init__(self):
        super().__post_init__()
        check_int("--max_settings", self.max_settings, optional=True)
        if self.convention not in ("w", "w2"):
            raise ConfigError(f"--convention must be w or w2, got {self.convention!r}")
        clash = sorted(set(self.guidance) & {"method", "scale", "reg", "convention"})
        if clash:
            raise ConfigError(f"--guidance: {clash} are set by the sweep's grid (--methods, --reg, --convention); "
                              "--guidance holds the parameters every setting shares")
        if self.distribution is None and self.evaluation is None:
            raise ConfigError("a sweep needs metrics: --distribution toy1d|toy2d for toy data, --evaluation {...} "
                              "for images")

    def fingerprint(self, checkpoint_sha256: str, reference_sha256: str | None = None) -> dict:
        """``SampleConfig``'s, without ``--sampler``, ``--sampler_kwargs`` and ``--steps`` once ``--samplers``
        replaces them: the grid's (its list of settings) decide then."""
        values = super().fingerprint(checkpoint_sha256, reference_sha256)
        if self.samplers is not None:
            for name in self.chain_fields:
                values.pop(name)
        return values


Config = TypeVar("Config", bound=SampleConfig)


def build_parser(config_class: type[SampleConfig]) -> ArgumentParser:
    """jsonargparse over ``config_class``'s fields, and ``--config file.yaml``; the description is the class
    docstring's text before its ``Args:``."""
    install_yaml_budget()
    description = inspect.cleandoc(config_class.__doc__).split("\nArgs:")[0]
    p = ArgumentParser(description=description, exit_on_error=False, default_meta=False)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of the options below")
    p.add_class_arguments(config_class, None, as_group=False)
    return p


def config_from(namespace, config_class: type[Config]) -> Config:
    """The parsed ``namespace`` as ``config_class`` (validated by its constructor)."""
    values = namespace.as_dict()
    values.pop("config", None)
    return config_class(**values)


def parse_config(config_class: type[Config], args: list[str] | None = None) -> Config:
    """``args`` (default: the command line) as a validated ``config_class``; bad input ends in one ``error:`` line
    and exit status 2 (``distributed.fail``), an unknown option naming where it was given and the nearest name."""
    args = sys.argv[1:] if args is None else list(args)
    parser = build_parser(config_class)
    try:
        return config_from(parser.parse_args(args), config_class)
    except ArgumentError as err:
        fail(f"{argument_error(err, parser, args)} (run with --help for the accepted options)")
    except ConfigError as err:
        fail(str(err))


# jsonargparse's words for a key no option takes (from a config file), for flags no option takes, and for a bad value
_UNKNOWN_KEY = re.compile(r"Option '(?P<key>[^']+)' is not accepted|"
                          r"Group '(?P<group>[^']+)' does not accept option '(?P<option>[^']+)'")
_UNKNOWN_FLAGS = re.compile(r"unrecognized arguments: (?P<flags>.*)")
_BAD_VALUE = re.compile(r'^Parser key "(?P<key>[^"]+)"')


def argument_error(err: ArgumentError, parser: ArgumentParser, args: list[str]) -> str:
    """jsonargparse's error as one line (``parse_error_message``), with the accepted name nearest to an unknown
    option or flag, and the ``--config`` file that gave an unknown option or a bad value."""
    message = parse_error_message(err)
    options = [action.dest for action in parser._actions if action.dest not in ("help", "config")]
    flags = _UNKNOWN_FLAGS.search(message)
    if flags:
        first = next((word for word in flags["flags"].split() if word.startswith("--")), "")
        near = difflib.get_close_matches(first.split("=")[0], [f"--{o}" for o in options], n=1)
        return message + (f" (did you mean {near[0]}?)" if near else "")
    unknown, bad = _UNKNOWN_KEY.search(message), _BAD_VALUE.search(message)
    if unknown:
        key = unknown["key"] or f"{unknown['group']}.{unknown['option']}"
        near = difflib.get_close_matches(key, options, n=1)
        message = f"unknown option {key!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
    elif bad and not any(arg == f"--{bad['key']}" or arg.startswith(f"--{bad['key']}=") for arg in args):
        key = bad["key"]
    else:
        return message
    files = [path for path in config_files(args) if holds_key(path, key)]
    return f"--config {files[0]}: {message}" if files else message


def config_files(args: list[str]) -> list[str]:
    """The ``--config`` files of ``args``, in order (``--config FILE`` or ``--config=FILE``)."""
    files = []
    for previous, arg in zip([None, *args], args):
        if previous == "--config" or arg.startswith("--config="):
            files.append(arg.removeprefix("--config="))
    return files


def holds_key(path: str, key: str) -> bool:
    """Whether the YAML file ``path`` (already read once by the parser) sets ``key`` (dotted: nested mappings)."""
    try:
        data = get_loader("yaml")(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError):
        return False
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True
