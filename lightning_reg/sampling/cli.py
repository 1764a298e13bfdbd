"""``sample.py``: guided samples from a trained checkpoint, on one process or many (Fabric DDP), resumable.

Every option (``SampleConfig``) can come from ``--config sample.yaml`` or a flag (jsonargparse, as in
``train.py``). Bad input ends in one ``error: ...`` line and exit status 2, before anything is written.

The checkpoint is read by its source (``lightning_reg.sources``: a ``ConditionalDiffusion`` ``.ckpt``, or with
``--model DiT-XL/2`` a public DiT ``.pt``, ``--format edm2`` an EDM2 snapshot, or a diffusers pipeline folder with
``--prompts``, a caption file);
``--vae`` samples in the VAE's latent space and decodes at the end.
``meta.json`` records throughput (images/s), peak memory and the metrics of ``--distribution`` / ``--evaluation``.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import lightning
import numpy as np
import torch
from tqdm.auto import tqdm

from lightning_reg import distributed
from lightning_reg.data.prompts import read_prompts
from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.samplers import SAMPLERS
from lightning_reg.distributed import fail
from lightning_reg.errors import ConfigError, one_line
from lightning_reg.guidance.guided import Guidance, make_guidance
from lightning_reg.io.files import file_sha256, to_uint8_nhwc, tree_sha256, write_json
from lightning_reg.io.plain import plain_data
from lightning_reg.metrics.evaluate import build_evaluator, read_samples
from lightning_reg.metrics.images import KID_NOTE
from lightning_reg.metrics.plots import image_grid, save_figure, scatter_figure
from lightning_reg.metrics.toy import ToyEvaluator
from lightning_reg.sampling import writer
from lightning_reg.sampling.config import (SampleConfig, build_parser as config_parser, parse_config,
                                           without_reference_file)
from lightning_reg.sampling.engine import generate, sample_conditions, sample_keys, sample_seed, setting_name
from lightning_reg.sources import load_models

GRID_IMAGES = 64


def build_parser():
    return config_parser(SampleConfig)


@dataclass
class LoadedModel:
    """A model and its guiding file read once (each source reads its file once), with the files' sha256 for
    fingerprints and what the source records of them (``source_meta``)."""

    denoiser: Denoiser
    checkpoint_sha256: str
    reference: Denoiser | None = None
    reference_sha256: str | None = None
    source_meta: dict | None = None

    @classmethod
    def load(cls, config: SampleConfig) -> "LoadedModel":
        ref_path = config.guidance.get("reference_checkpoint")
        loaded = load_models(config.model_spec, ref_path)
        return cls(loaded.denoiser, tree_sha256(loaded.location), loaded.reference,
                   file_sha256(ref_path) if ref_path is not None else None, loaded.meta)


@dataclass
class SamplingJob:
    """One ``sample.py`` run, built from a validated ``SampleConfig`` and a loaded model."""

    config: SampleConfig
    denoiser: Denoiser
    guidance: Guidance
    labels: torch.Tensor  # per sample: its class, or its caption's line (0-based) with --prompts
    output: Path
    fingerprint: dict
    evaluator: object | None  # metrics.evaluate.build_evaluator: toy metrics, image metrics or None
    prompts: list[str] | None = None  # the captions of --prompts
    record: dict | None = None  # what meta.json records that is known before sampling (``meta_record``)

    @classmethod
    def build(cls, config: SampleConfig, model: LoadedModel, evaluator=None) -> "SamplingJob":
        """Guidance, labels and evaluator for ``config`` (``evaluator``: one already built, as a sweep shares);
        one one-step sample to catch what only the chain sees; the output folder checked."""
        denoiser = model.denoiser
        params = without_reference_file(config.guidance)  # the guiding file, loaded once: model.reference
        if model.reference is not None:
            params["reference"] = model.reference
        guidance = make_guidance(**params)
        guidance.bind(denoiser)
        prompts = read_prompts(config.prompts) if config.prompts is not None else None
        labels = sample_keys(config.num_samples, denoiser, config.labels, prompts)
        if evaluator is None:
            evaluator = build_evaluator(config.distribution, config.evaluation, denoiser.num_classes,
                                        denoiser.data_shape, denoiser.sample_shape, config.seed, prompts)
        job = cls(config, denoiser, guidance, labels, Path(config.output), {}, evaluator, prompts,
                  cls.meta_record(config, model))
        # a built-in sampler is checked on one step; a diffusers scheduler on the run's steps (some take no fewer)
        check_steps = 1 if config.sampler in SAMPLERS else config.steps
        try:  # sampler vs schedule, sampler options
            generate(denoiser, guidance, job.conditions(torch.tensor([0])), [0], sampler=config.sampler,
                     steps=check_steps, seed=config.seed, batch_size=1, sampler_kwargs=config.sampler_kwargs,
                     precision=config.precision)
        except TypeError as err:
            raise ConfigError(f"--sampler_kwargs {config.sampler_kwargs} do not fit sampler {config.sampler!r}: "
                              f"{err}") from None
        fingerprint = config.fingerprint(model.checkpoint_sha256, model.reference_sha256)  # SampleConfig's policy
        writer.check_output(config.output, fingerprint, config.overwrite, denoiser.sample_shape)
        job.fingerprint = fingerprint
        return job

    @staticmethod
    def meta_record(config: SampleConfig, model: LoadedModel) -> dict:
        """What ``meta.json`` records that is known before sampling (the files and what their source records of
        them, the config, the shapes), checked as plain data of bounded size (``plain_data``): a value read from
        a file that cannot be written is one line before the first sample, not a failure after the last."""
        denoiser = model.denoiser
        return plain_data({
            "checkpoint": str(config.checkpoint), "checkpoint_sha256": model.checkpoint_sha256,
            "reference_sha256": model.reference_sha256, "source": model.source_meta,
            "config": config.as_dict(), "setting": setting_name(config.guidance), "seed": config.seed,
            "sample_seed": "sample i: torch.Generator seeded by sha256(f'{seed}:{i}')[:8] (little-endian, 63 bits)",
            "first_sample_seed": sample_seed(config.seed, 0),
            "versions": {"torch": torch.__version__, "lightning": lightning.__version__,
                         "lightning_reg": version("lightning-reg")},
            "num_classes": denoiser.num_classes, "data_shape": list(denoiser.data_shape),
            "sample_shape": list(denoiser.sample_shape)}, "meta.json")

    def conditions(self, indices: torch.Tensor):
        """The conditions of samples ``indices`` (``engine.sample_conditions``)."""
        return sample_conditions(self.denoiser, self.labels[indices], self.prompts)

    def run(self, fabric: lightning.Fabric, start: float) -> None:
        """Shard ``k`` goes to rank ``k % W`` (finished shards skipped); rank 0 then writes the final files."""
        cfg, rank, world = self.config, fabric.global_rank, fabric.world_size
        ranges = writer.shard_ranges(cfg.num_samples, cfg.shard_size)
        if rank == 0:
            writer.prepare_output(self.output, self.fingerprint, cfg.overwrite, self.denoiser.sample_shape)
        fabric.barrier()
        missing = fabric.broadcast([k for k in range(len(ranges)) if not writer.shard_path(self.output, k).is_file()])
        todo = missing[:cfg.max_shards]
        for module in (self.denoiser, getattr(self.guidance, "reference", None)):
            if module is not None:
                module.to(fabric.device)
                if cfg.compile:
                    module.net.compile()
        reset_peak_memory(fabric.device)
        sampling_start = time.time()
        mine = todo[rank::world]
        bar = rank == 0 and bool(mine)  # no empty bar for a finished run; tqdm's None: none off a terminal
        for k in tqdm(mine, desc=f"{setting_name(cfg.guidance)} shards", disable=None if bar else True):
            indices = torch.tensor(ranges[k])
            samples = generate(self.denoiser, self.guidance, self.conditions(indices), indices, sampler=cfg.sampler,
                               steps=cfg.steps, seed=cfg.seed, batch_size=cfg.batch_size, device=fabric.device,
                               sampler_kwargs=cfg.sampler_kwargs, precision=cfg.precision)
            writer.write_shard(self.output, k, indices, samples, self.labels[indices])
        fabric.barrier()
        sampling_s = time.time() - sampling_start
        peak, measure = peak_memory(fabric.device)
        peak = int(fabric.all_gather(torch.tensor(peak, dtype=torch.float64)).max())  # the largest rank
        generated = sum(len(ranges[k]) for k in todo)
        if rank == 0:
            if len(todo) < len(missing):
                print(f"stopped after {len(todo)} of {len(missing)} missing shards (--max_shards); "
                      "run the same command again to resume")
            elif not todo and (self.output / writer.META_FILE).is_file():
                print(f"{self.output} already holds this run's {cfg.num_samples} samples (complete); nothing to do")
            else:
                self.finish(len(ranges), world, time.time() - start, sampling_s, len(todo),
                            {"generated_samples": generated, "throughput_images_per_s": round(generated / sampling_s, 4),
                             "peak_memory_bytes": peak, "peak_memory_measure": measure})
        fabric.barrier()

    def finish(self, num_shards: int, world_size: int, wall_s: float, sampling_s: float, new_shards: int,
               cost: dict) -> None:
        """``samples.npz``, images (image data) or a scatter plot (toy data), the evaluator's metrics and ``meta.json``.

        ``wall_s``: this invocation so far (start-up and checkpoint loading included); ``sampling_s``: the
        shards it generated, across all processes; ``cost``: throughput and peak memory (``peak_memory``)."""
        samples, labels = writer.read_shards(self.output, num_shards)
        cfg = self.config
        setting = setting_name(cfg.guidance)
        images = len(self.denoiser.sample_shape) == 3
        if images:
            samples = to_uint8_nhwc(samples)
            writer.write_images(self.output, samples, image_grid(samples[:GRID_IMAGES], nrow=8))
        else:
            samples = samples.astype(np.float32)
        writer.write_samples(self.output, samples, labels)
        if self.prompts is not None:
            writer.write_prompts(self.output, [self.prompts[int(i)] for i in labels])
        if isinstance(self.evaluator, ToyEvaluator):
            save_figure(scatter_figure({setting: (samples, labels)}, self.evaluator.distribution),
                        self.output / "samples.png")
        if images and self.evaluator is not None:
            # the images as written: evaluate.py on samples.npz then agrees to the last bit (the float32 feature
            # network's rounding depends on the buffer it reads, not only on the values)
            samples, labels = read_samples(self.output / writer.SAMPLES_FILE)
        metrics = None if self.evaluator is None else self.evaluator(samples, labels)
        notes = {"kid": KID_NOTE} if metrics and "kid" in metrics else None
        meta = {**self.record, "wall_time_s": round(wall_s, 3), "sampling_time_s": round(sampling_s, 3),
                "new_shards": new_shards, "world_size": world_size, **cost, "metrics": metrics, "metric_notes": notes}
        write_json(self.output / writer.META_FILE, meta)
        print(f"wrote {len(samples)} samples ({setting}) to {self.output / writer.SAMPLES_FILE}: sampling "
              f"{sampling_s:.1f} s ({new_shards} new shards), {wall_s:.1f} s in all, on {world_size} process(es)")
        print(f"throughput {cost['throughput_images_per_s']:.4g} images/s; peak memory "
              f"{cost['peak_memory_bytes'] / 2 ** 20:.1f} MiB ({cost['peak_memory_measure']}, largest process)")
        if metrics:
            print("metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        for note in (notes or {}).values():
            print(f"note: {note}")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Bytes and what they measure: on CUDA ``torch.cuda.max_memory_allocated`` since sampling began (tensors
    on the device: weights, activations, REG's graph); elsewhere the process's peak resident set size
    (``resource.getrusage``: all of the process over its life, Python and libraries included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "cpu_peak_rss"  # bytes on macOS, KiB on Linux


def make_fabric(accelerator: str, devices: int, num_nodes: int = 1) -> lightning.Fabric:
    try:
        return lightning.Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                                strategy="ddp" if devices * num_nodes > 1 else "auto")
    except Exception as err:  # noqa: BLE001 - Lightning raises several types for an unusable accelerator
        raise ConfigError(f"--trainer.accelerator {accelerator} with --trainer.devices {devices} and "
                          f"--trainer.num_nodes {num_nodes} is unusable here: {one_line(err, None)}") from None


def launch(config: SampleConfig, build_job):
    """``build_job(config)`` for a parsed ``config`` (``config.parse_config``; bad input: one ``error:`` line, exit
    2, nothing written), then start the processes of ``trainer.devices`` x ``trainer.num_nodes``; returns
    ``(job, fabric)``. Shared by ``sample.py`` and ``sweep.py``. A process that starts alone (the first of a
    one-node run) checks before starting the others; processes started together (torchrun, SLURM, several
    nodes) check, then agree (``lightning_reg.distributed``)."""
    try:
        trainer = config.trainer
        fabric = make_fabric(trainer.accelerator, trainer.devices, trainer.num_nodes)
        together = fabric.world_size > 1 and distributed.started_together(trainer.num_nodes)
        job, error = distributed.check(lambda: build_job(config)) if together else (build_job(config), None)
    except ConfigError as err:
        fail(str(err))
    fabric.launch()
    if fabric.world_size > 1:
        distributed.agree(error)
        distributed.handle_exit()
    return job, fabric


def build_job(config: SampleConfig) -> SamplingJob:
    return SamplingJob.build(config, LoadedModel.load(config))


def run(config: SampleConfig, started: float) -> None:
    """Validate (nothing is written for bad input), launch the processes and sample; ``started``: when this
    invocation began (``meta.json``'s ``wall_time_s`` counts from it)."""
    job, fabric = launch(config, build_job)
    job.run(fabric, started)


def main(args: list[str] | None = None) -> None:
    """``sample.py`` in this process: parse ``args`` (``parse_config``), then ``run`` (the time counted from now)."""
    started = time.time()
    run(parse_config(SampleConfig, args), started)
