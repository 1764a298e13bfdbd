"""The typed options of ``sample.py`` and ``sweep.py``: one dataclass each, validated where they are built.

``SweepConfig`` *is* a ``SampleConfig`` plus the grid (methods x weights x REG modes), so every ``sample.py``
option works in a sweep by construction. Both parse from YAML files and flags with jsonargparse
(``parse_config``); every field's help is its line in the class docstring.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TypeVar

from jsonargparse import ActionConfigFile, ArgumentParser

from lightning_reg.data.prompts import read_prompts
from lightning_reg.errors import ConfigError
from lightning_reg.io.yaml_budget import install_yaml_budget
from lightning_reg.sources import ModelSpec

PRECISIONS = ("fp32", "bf16", "fp16")
DISTRIBUTIONS = ("toy1d", "toy2d", "toy2d_overlap")


@dataclass
class Trainer:
    """The processes.

    Args:
        accelerator: cpu, gpu, cuda, mps or auto.
        devices: processes (DDP across them when > 1).
        num_nodes: machines, each running ``devices`` processes (torchrun or SLURM; docs/distributed.md).
    """

    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1


def _positive(name: str, value, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"--{name} must be a positive integer{' or null' if optional else ''}, got {value}")


@dataclass
class SampleConfig:
    """Guided samples from a trained checkpoint (``sample.py``, ``docs/sampling.md``).

    Args:
        checkpoint: the model's file: a ConditionalDiffusion checkpoint (.ckpt), a public DiT checkpoint (.pt)
            with --model, an EDM2 snapshot (edm2-*.pkl or its .safetensors) with --format edm2 (or a diffusers
            pipeline folder, as --pipeline).
        format: the checkpoint format (lightning_reg.sources: lightning, dit, edm2, diffusers); null: diffusers
            for a pipeline folder, dit with --model, else lightning.
        model: a public DiT checkpoint's model, e.g. DiT-XL/2 (VP linear 1000, eps, learned sigma).
        image_size: with --model: the image size the DiT checkpoint serves (256: 32x32 latents).
        num_heads: a DiT width outside the paper's sizes: its attention heads (they do not show in the weights).
        vae: sample in this AutoencoderKL's latent space and decode at the end: a local folder or a cached hub
            name (stabilityai/sd-vae-ft-ema); required with --model; EDM2 img512: default stabilityai/sd-vae-ft-mse.
        pipeline: a diffusers text-to-image pipeline (SD 1.x/2.x): a local folder (save_pretrained, with
            model_index.json) or a hub name in the local Hugging Face cache; never downloaded. Needs --prompts.
        prompts: a text file, one caption a line: sample i takes caption i (cycled: i % the number of captions).
        negative_prompt: with --pipeline: the reference prompt of guidance (default the empty prompt).
        gradient_checkpointing: with --pipeline: the UNet recomputes its blocks in REG's backward (less memory).
        precision: fp32, or bf16 / fp16: autocast (the REG authors' DiT patch: fp16 autocast).
        compile: torch.compile the backbone.
        ema: sample the EMA weights (false: the raw weights).
        guidance: make_guidance(**guidance), e.g. {method: cfg, scale: 1.0, reg: paper}; autoguidance takes
            reference_checkpoint (EDM2: the guiding file, an unconditional net for CFG or a weaker one).
        sampler: ddpm, ddim, edm_heun or flow_euler.
        sampler_kwargs: extra sampler options, e.g. {eta: 0.5}.
        steps: sampling steps.
        num_samples: samples to draw.
        seed: sample i uses the generator seeded by (seed, i).
        batch_size: samples per forward (does not change the result).
        shard_size: samples per shard file (the unit of resumption).
        labels: classes to sample, cycled: sample i gets labels[i % len(labels)]; default: class-balanced.
        distribution: toy1d, toy2d or toy2d_overlap: compute the exact toy metrics and a scatter plot.
        evaluation: images: {metrics: [fid, is, accuracy], reference: digits:mnist, num_reference: 10000,
            feature_network: classifier.ckpt, inception_weights: null} (metrics.evaluate), into meta.json.
        output: output folder.
        overwrite: delete another run's files in --output.
        max_shards: stop after generating this many shards (to split a long run; rerun to resume).
        trainer: the processes.
    """

    checkpoint: str | None = None
    format: str | None = None
    model: str | None = None
    image_size: int | None = None
    num_heads: int | None = None
    vae: str | None = None
    pipeline: str | None = None
    prompts: str | None = None
    negative_prompt: str = ""
    gradient_checkpointing: bool = False
    precision: str = "fp32"
    compile: bool = False
    ema: bool = True
    guidance: dict = field(default_factory=lambda: {"method": "cfg", "scale": 1.0, "reg": "none"})
    sampler: str = "ddpm"
    sampler_kwargs: dict | None = None
    steps: int = 25
    num_samples: int = 1000
    seed: int = 0
    batch_size: int = 1000
    shard_size: int = 1000
    labels: list[int] | None = None
    distribution: str | None = None
    evaluation: dict | None = None
    output: str | None = None
    overwrite: bool = False
    max_shards: int | None = None
    trainer: Trainer = field(default_factory=Trainer)

    def __post_init__(self):
        if isinstance(self.trainer, dict):
            self.trainer = Trainer(**self.trainer)
        for name in ("steps", "num_samples", "batch_size", "shard_size"):
            _positive(name, getattr(self, name))
        _positive("trainer.devices", self.trainer.devices)
        _positive("trainer.num_nodes", self.trainer.num_nodes)
        _positive("max_shards", self.max_shards, optional=True)
        if self.output is None:
            raise ConfigError(f"--output is required: the folder for the {self.kind}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.labels is not None and not self.labels:
            raise ConfigError("--labels must name at least one class (or be null for class-balanced labels)")
        if self.pipeline is not None and (self.checkpoint is not None or self.format not in (None, "diffusers")):
            raise ConfigError("--pipeline is the model: leave --checkpoint and --format unset with it")
        if self.prompts is not None and self.labels is not None:
            raise ConfigError("--labels are class ids; a text-to-image run takes its conditions from --prompts")
        if self.prompts is not None:
            read_prompts(self.prompts)  # a bad file is refused before any model is read
        if self.distribution is not None and self.distribution not in DISTRIBUTIONS:
            raise ConfigError(f"unknown --distribution {self.distribution!r}; choose one of {sorted(DISTRIBUTIONS)} "
                              "or null")
        if self.distribution is not None and self.evaluation is not None:
            raise ConfigError("--evaluation is for images; toy data (--distribution) uses the exact toy metrics")

    kind = "samples"

    @property
    def model_spec(self) -> ModelSpec:
        """What ``sources.load_model`` loads."""
        text = {"negative_prompt": self.negative_prompt, "gradient_checkpointing": self.gradient_checkpointing}
        if self.pipeline is not None:
            return ModelSpec(self.pipeline, "diffusers", field="--pipeline", vae=self.vae, **text)
        return ModelSpec(self.checkpoint, self.format, self.model, self.image_size, self.num_heads, self.vae,
                         self.ema, **text)

    @property
    def model_path(self) -> str | None:
        """The model's file or folder (``--checkpoint``, or ``--pipeline``)."""
        return self.pipeline if self.pipeline is not None else self.checkpoint

    def with_setting(self, guidance: dict, output: str) -> SampleConfig:
        """This config as one ``sample.py`` run: ``guidance`` into ``output`` (a sweep's setting)."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(SampleConfig)}
        return SampleConfig(**{**own, "guidance": guidance, "output": output})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SweepConfig(SampleConfig):
    """Guidance methods x weights x REG modes, every setting one ``sample.py`` run (``sweep.py``,
    ``docs/sweeps.md``): every option of ``SampleConfig`` applies to every setting.

    Args:
        guidance: fixed make_guidance parameters of every setting, e.g. {guidance_channels: [0, 1, 2]}; method,
            scale, reg and convention come from the grid.
        num_samples: samples per setting.
        methods: one entry per method: {method: interval, weights: [0.5, 1, 2], t_lo: 100, t_hi: 600}; keys other
            than method and weights are fixed parameters of make_guidance.
        reg: REG modes, from none, paper, vjp, reuse, window, graph_free (guidance/reg.py).
        convention: the weights' convention: w (eps_c + w d) or w2 (eps_u + w2 d, w2 = w + 1).
        front: [x, y] metrics of the figure; default energy_distance vs on_shape (2D toy) or log_likelihood
            (1D toy), fid vs accuracy (or is) for images.
        output: output folder of the sweep (a folder per setting inside).
        max_settings: stop after finishing this many new settings (rerun the same command to resume).
        sample_options: removed; every sample.py option is now a top-level option of the sweep.
    """

    guidance: dict = field(default_factory=dict)
    num_samples: int = 2000
    methods: list[dict] = field(default_factory=list)
    reg: list[str] = field(default_factory=lambda: ["none", "paper", "vjp"])
    convention: str = "w"
    front: list[str] | None = None
    max_settings: int | None = None
    sample_options: dict | None = None

    kind = "sweep"

    def __post_init__(self):
        if self.sample_options is not None:  # the option of earlier versions: name the keys that replace it
            keys = sorted(self.sample_options)
            example = ", ".join(f"{k}: {self.sample_options[k]}" for k in keys)
            raise ConfigError(f"--sample_options: {keys} are set by the sweep's own options now (every sample.py "
                              f"option is a sweep option): write them at the top level instead ({example})")
        super().__post_init__()
        _positive("max_settings", self.max_settings, optional=True)
        if self.convention not in ("w", "w2"):
            raise ConfigError(f"--convention must be w or w2, got {self.convention!r}")
        clash = sorted(set(self.guidance) & {"method", "scale", "reg", "convention"})
        if clash:
            raise ConfigError(f"--guidance: {clash} are set by the sweep's grid (--methods, --reg, --convention); "
                              "--guidance holds the parameters every setting shares")
        if self.distribution is None and self.evaluation is None:
            raise ConfigError("a sweep needs metrics: --distribution toy1d|toy2d for toy data, --evaluation {...} "
                              "for images")


Config = TypeVar("Config", bound=SampleConfig)


def build_parser(config_class: type[SampleConfig], description: str) -> ArgumentParser:
    """jsonargparse over ``config_class``'s fields, and ``--config file.yaml``."""
    install_yaml_budget()
    p = ArgumentParser(description=description, exit_on_error=False, default_meta=False)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of the options below")
    p.add_class_arguments(config_class, None, as_group=False)
    return p


def config_from(namespace, config_class: type[Config]) -> Config:
    """The parsed ``namespace`` as ``config_class`` (validated by its constructor)."""
    values = namespace.as_dict()
    values.pop("config", None)
    return config_class(**values)
