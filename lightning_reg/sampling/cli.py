"""``sample.py``: guided samples from a trained checkpoint, on one process or many (Fabric DDP), resumable.

Every option can come from ``--config sample.yaml`` or a flag (jsonargparse, as in ``train.py``). Bad
input ends in one ``error: ...`` line and exit status 2, before anything is written.

The checkpoint is a ``ConditionalDiffusion`` ``.ckpt`` or, with ``--model DiT-XL/2``, a public DiT ``.pt``
(VP linear 1000, eps prediction, learned sigma); ``--vae`` samples in the VAE's latent space and decodes
at the end. ``meta.json`` records throughput (images/s) and peak memory.
"""

from __future__ import annotations

import resource
import sys
import time
from functools import partial
from argparse import ArgumentError
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import lightning
import numpy as np
import torch
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from tqdm.auto import tqdm

from lightning_reg import distributed
from lightning_reg.cli import fail, parse_error_message
from lightning_reg.data.toy import ToyDistribution, toy1d_distribution, toy2d_distribution
from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.latent import LatentCodec, LatentDenoiser, load_autoencoder
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import VPSchedule
from lightning_reg.errors import ConfigError, one_line
from lightning_reg.guidance.base import Guidance
from lightning_reg.guidance.methods import make_guidance
from lightning_reg.module import load_denoiser
from lightning_reg.sampling import writer
from lightning_reg.models.dit import load_dit_checkpoint
from lightning_reg.sampling.engine import PRECISIONS, balanced_labels, generate, sample_seed, setting_name

DISTRIBUTIONS = {"toy1d": toy1d_distribution, "toy2d": toy2d_distribution,
                 "toy2d_overlap": partial(toy2d_distribution, "overlap")}
GRID_IMAGES = 64


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, exit_on_error=False, default_meta=False)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of the options below")
    p.add_argument("--checkpoint", type=str | None, default=None,
                   help="a ConditionalDiffusion checkpoint (.ckpt), or a public DiT checkpoint (.pt) with --model")
    p.add_argument("--model", type=str | None, default=None,
                   help="a public DiT checkpoint's model, e.g. DiT-XL/2 (VP linear 1000, eps, learned sigma)")
    p.add_argument("--image_size", type=int | None, default=None,
                   help="with --model: the image size the DiT checkpoint serves (256: 32x32 latents)")
    p.add_argument("--vae", type=str | None, default=None,
                   help="sample in this AutoencoderKL's latent space and decode at the end: a local folder or "
                        "a cached hub name (stabilityai/sd-vae-ft-ema); required with --model")
    p.add_argument("--precision", type=str, default="fp32",
                   help="fp32, or bf16 / fp16: autocast (the REG authors' DiT patch: fp16 autocast)")
    p.add_argument("--compile", type=bool, default=False, help="torch.compile the backbone")
    p.add_argument("--ema", type=bool, default=True, help="sample the EMA weights (false: the raw weights)")
    p.add_argument("--guidance", type=dict, default={"method": "cfg", "scale": 1.0, "reg": "none"},
                   help="make_guidance(**guidance), e.g. {method: cfg, scale: 1.0, reg: paper}; autoguidance "
                        "takes reference_checkpoint")
    p.add_argument("--sampler", type=str, default="ddpm", help="ddpm, ddim, edm_heun or flow_euler")
    p.add_argument("--sampler_kwargs", type=dict | None, default=None, help="extra sampler options, e.g. {eta: 0.5}")
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--num_samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="sample i uses the generator seeded by (seed, i)")
    p.add_argument("--batch_size", type=int, default=1000, help="samples per forward (does not change the result)")
    p.add_argument("--shard_size", type=int, default=1000, help="samples per shard file (the unit of resumption)")
    p.add_argument("--labels", type=list[int] | None, default=None,
                   help="classes to sample, cycled: sample i gets labels[i % len(labels)]; default: class-balanced")
    p.add_argument("--distribution", type=str | None, default=None,
                   help="toy1d, toy2d or toy2d_overlap: compute the exact toy metrics and a scatter plot")
    p.add_argument("--output", type=str | None, default=None, help="output folder")
    p.add_argument("--overwrite", type=bool, default=False, help="delete another run's files in --output")
    p.add_argument("--max_shards", type=int | None, default=None,
                   help="stop after generating this many shards (to split a long run; rerun to resume)")
    p.add_argument("--trainer.accelerator", type=str, default="cpu", help="cpu, gpu, cuda, mps or auto")
    p.add_argument("--trainer.devices", type=int, default=1, help="processes (DDP across them when > 1)")
    p.add_argument("--trainer.num_nodes", type=int, default=1,
                   help="machines, each running --trainer.devices processes (torchrun or SLURM; docs/distributed.md)")
    return p


@dataclass
class SamplingJob:
    """Validated arguments of one ``sample.py`` run."""

    config: dict
    denoiser: Denoiser
    guidance: Guidance
    labels: torch.Tensor
    output: Path
    fingerprint: dict
    distribution: ToyDistribution | None

    @classmethod
    def from_config(cls, cfg: Namespace) -> "SamplingJob":
        config = cfg.as_dict()
        config.pop("config", None)
        for field in ("steps", "num_samples", "batch_size", "shard_size", "trainer.devices"):
            value = cfg[field]
            if value < 1:
                raise ConfigError(f"--{field} must be a positive integer, got {value}")
        if cfg.max_shards is not None and cfg.max_shards < 1:
            raise ConfigError(f"--max_shards must be a positive integer or null, got {cfg.max_shards}")
        if cfg.output is None:
            raise ConfigError("--output is required: the folder for the samples")
        if cfg.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {list(PRECISIONS)}, got {cfg.precision!r}")
        denoiser = cls.load_model(cfg)
        params = dict(cfg.guidance)
        ref_path = params.get("reference_checkpoint")
        if ref_path is not None:
            params["reference"] = load_denoiser(ref_path, cfg.ema, "--guidance.reference_checkpoint")
        guidance = make_guidance(**params)
        guidance.bind(denoiser)
        labels = cls.make_labels(cfg, denoiser)
        distribution = cls.make_distribution(cfg.distribution, denoiser)
        # One one-step sample catches what only the chain sees (sampler vs schedule, sampler options).
        try:
            generate(denoiser, guidance, labels[:1], [0], sampler=cfg.sampler, steps=1, seed=cfg.seed, batch_size=1,
                     sampler_kwargs=cfg.sampler_kwargs, precision=cfg.precision)
        except TypeError as err:
            raise ConfigError(f"--sampler_kwargs {cfg.sampler_kwargs} do not fit sampler {cfg.sampler!r}: {err}") from None
        fingerprint = {
            "checkpoint_sha256": writer.file_sha256(cfg.checkpoint), "ema": cfg.ema, "model": cfg.model,
            "vae": cfg.vae, "precision": cfg.precision,
            "guidance": {k: v for k, v in cfg.guidance.items() if k != "reference_checkpoint"},
            "reference_sha256": writer.file_sha256(ref_path) if ref_path is not None else None,
            "sampler": cfg.sampler, "sampler_kwargs": cfg.sampler_kwargs, "steps": cfg.steps, "seed": cfg.seed,
            "num_samples": cfg.num_samples, "shard_size": cfg.shard_size, "labels": cfg.labels or "balanced"}
        writer.check_output(cfg.output, fingerprint, cfg.overwrite)
        return cls(config, denoiser, guidance, labels, Path(cfg.output), fingerprint, distribution)

    @staticmethod
    def load_model(cfg: Namespace) -> Denoiser:
        """The checkpoint's denoiser (a public DiT with ``--model``), over ``--vae``'s latents if given."""
        if cfg.model is not None:
            if cfg.checkpoint is None:
                raise ConfigError(f"--checkpoint is required: the public {cfg.model} .pt file")
            if cfg.vae is None:
                raise ConfigError(f"--model {cfg.model} samples latents: give --vae (the Stable Diffusion VAE, "
                                  "e.g. stabilityai/sd-vae-ft-ema or a local folder)")
            net = load_dit_checkpoint(cfg.checkpoint, cfg.model, cfg.image_size)
            denoiser = Denoiser(net, VPSchedule(1000, "linear"), Prediction("eps"))
        elif cfg.image_size is not None:
            raise ConfigError("--image_size is for a public DiT checkpoint: give --model too (e.g. DiT-XL/2)")
        else:
            try:
                denoiser = load_denoiser(cfg.checkpoint, cfg.ema)
            except ConfigError as err:
                hint = " (a public DiT checkpoint needs --model, e.g. DiT-XL/2)" if str(cfg.checkpoint).endswith(
                    ".pt") else ""
                raise ConfigError(f"{err}{hint}") from None
        if cfg.vae is None:
            return denoiser
        latent = LatentDenoiser.over(denoiser, LatentCodec(load_autoencoder(cfg.vae)))
        if cfg.image_size is not None and latent.image_shape[1] != cfg.image_size:
            raise ConfigError(f"--image_size {cfg.image_size}: the model's {denoiser.data_shape[1]}x"
                              f"{denoiser.data_shape[2]} latents decode to {latent.image_shape[1]}x"
                              f"{latent.image_shape[2]} images with this VAE")
        return latent.eval()

    @staticmethod
    def make_labels(cfg: Namespace, denoiser: Denoiser) -> torch.Tensor:
        if cfg.labels is None:
            return balanced_labels(cfg.num_samples, denoiser.num_classes)
        if not cfg.labels:
            raise ConfigError("--labels must name at least one class (or be null for class-balanced labels)")
        classes = torch.tensor(cfg.labels)
        try:
            denoiser.check_labels(classes)
        except ConfigError as err:
            raise ConfigError(f"--labels: {err}") from None
        return classes[torch.arange(cfg.num_samples) % len(classes)]

    @staticmethod
    def make_distribution(name: str | None, denoiser: Denoiser) -> ToyDistribution | None:
        if name is None:
            return None
        if name not in DISTRIBUTIONS:
            raise ConfigError(f"unknown --distribution {name!r}; choose one of {sorted(DISTRIBUTIONS)} or null")
        distribution = DISTRIBUTIONS[name]()
        if (distribution.num_classes, (distribution.dim,)) != (denoiser.num_classes, denoiser.data_shape):
            raise ConfigError(f"--distribution {name} has {distribution.num_classes} classes in {distribution.dim}D; "
                              f"the checkpoint has num_classes={denoiser.num_classes}, data_shape={denoiser.data_shape}")
        return distribution

    def run(self, fabric: lightning.Fabric, start: float) -> None:
        """Shard ``k`` goes to rank ``k % W`` (finished shards skipped); rank 0 then writes the final files."""
        cfg, rank, world = self.config, fabric.global_rank, fabric.world_size
        ranges = writer.shard_ranges(cfg["num_samples"], cfg["shard_size"])
        if rank == 0:
            writer.prepare_output(self.output, self.fingerprint, cfg["overwrite"])
        fabric.barrier()
        missing = fabric.broadcast([k for k in range(len(ranges)) if not writer.shard_path(self.output, k).is_file()])
        todo = missing[:cfg["max_shards"]]
        for module in (self.denoiser, getattr(self.guidance, "reference", None)):
            if module is not None:
                module.to(fabric.device)
                if cfg["compile"]:
                    module.net.compile()
        reset_peak_memory(fabric.device)
        sampling_start = time.time()
        mine = todo[rank::world]
        for k in tqdm(mine, desc=f"{setting_name(cfg['guidance'])} shards", disable=rank != 0):
            indices = torch.tensor(ranges[k])
            samples = generate(self.denoiser, self.guidance, self.labels[indices], indices, sampler=cfg["sampler"],
                               steps=cfg["steps"], seed=cfg["seed"], batch_size=cfg["batch_size"],
                               device=fabric.device, sampler_kwargs=cfg["sampler_kwargs"], precision=cfg["precision"])
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
                print(f"{self.output} already holds this run's samples; nothing to do")
            else:
                self.finish(len(ranges), world, time.time() - start, sampling_s, len(todo),
                            {"generated_samples": generated, "throughput_images_per_s": round(generated / sampling_s, 4),
                             "peak_memory_bytes": peak, "peak_memory_measure": measure})
        fabric.barrier()

    def finish(self, num_shards: int, world_size: int, wall_s: float, sampling_s: float, new_shards: int,
               cost: dict) -> None:
        """``samples.npz``, images (image data), metrics and plot (toy data) and ``meta.json``.

        ``wall_s``: this invocation so far (start-up and checkpoint loading included); ``sampling_s``: the
        shards it generated, across all processes; ``cost``: throughput and peak memory (``peak_memory``)."""
        samples, labels = writer.read_shards(self.output, num_shards)
        cfg = self.config
        if len(self.denoiser.sample_shape) == 3:
            from lightning_reg.metrics.plots import image_grid
            images = writer.to_uint8_nhwc(samples)
            writer.write_samples(self.output, images, labels)
            writer.write_images(self.output, images, image_grid(images[:GRID_IMAGES], nrow=8))
        else:
            writer.write_samples(self.output, samples.astype(np.float32), labels)
        metrics = self.toy_outputs(samples, labels) if self.distribution is not None else None
        setting = setting_name(cfg["guidance"])
        meta = {
            "checkpoint": str(cfg["checkpoint"]), "checkpoint_sha256": self.fingerprint["checkpoint_sha256"],
            "config": cfg, "setting": setting, "seed": cfg["seed"],
            "sample_seed": "sample i: torch.Generator seeded by sha256(f'{seed}:{i}')[:8] (little-endian, 63 bits)",
            "first_sample_seed": sample_seed(cfg["seed"], 0),
            "versions": {"torch": torch.__version__, "lightning": lightning.__version__,
                         "lightning_reg": version("lightning-reg")},
            "wall_time_s": round(wall_s, 3), "sampling_time_s": round(sampling_s, 3), "new_shards": new_shards,
            "world_size": world_size, **cost,
            "num_classes": self.denoiser.num_classes, "data_shape": list(self.denoiser.data_shape),
            "sample_shape": list(self.denoiser.sample_shape),
            "metrics": metrics}
        writer.write_json(self.output / writer.META_FILE, meta)
        print(f"wrote {len(samples)} samples ({setting}) to {self.output / writer.SAMPLES_FILE}: sampling "
              f"{sampling_s:.1f} s ({new_shards} new shards), {wall_s:.1f} s in all, on {world_size} process(es)")
        print(f"throughput {cost['throughput_images_per_s']:.4g} images/s; peak memory "
              f"{cost['peak_memory_bytes'] / 2 ** 20:.1f} MiB ({cost['peak_memory_measure']}, largest process)")
        if metrics:
            print("metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def toy_outputs(self, samples: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Exact toy metrics (``metrics.toy.toy_metrics``) and ``samples.png``."""
        from lightning_reg.metrics.plots import save_figure, scatter_figure
        from lightning_reg.metrics.toy import toy_metrics
        metrics = toy_metrics(samples, labels, self.distribution, seed=self.config["seed"])
        name = setting_name(self.config["guidance"])
        save_figure(scatter_figure({name: (samples, labels)}, self.distribution), self.output / "samples.png")
        return metrics


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


def launch(args: list[str] | None, build_parser, build_job):
    """Parse ``args`` and ``build_job(cfg)`` (bad input: one ``error:`` line, exit 2, nothing written), then start
    the processes of ``--trainer.devices`` x ``--trainer.num_nodes``; returns ``(job, fabric)``. Shared by
    ``sample.py`` and ``sweep.py``. A process that starts alone (the first of a one-node run) checks before
    starting the others; processes started together (torchrun, SLURM, several nodes) check, then agree
    (``lightning_reg.distributed``)."""
    try:
        cfg = build_parser().parse_args(args)
        for field in ("trainer.devices", "trainer.num_nodes"):
            if cfg[field] < 1:
                raise ConfigError(f"--{field} must be a positive integer, got {cfg[field]}")
        fabric = make_fabric(cfg["trainer.accelerator"], cfg["trainer.devices"], cfg["trainer.num_nodes"])
        together = fabric.world_size > 1 and distributed.started_together(cfg["trainer.num_nodes"])
        job, error = distributed.check(lambda: build_job(cfg)) if together else (build_job(cfg), None)
    except ArgumentError as err:
        fail(f"{parse_error_message(err)} (run with --help for the accepted options)")
    except ConfigError as err:
        fail(str(err))
    fabric.launch()
    if fabric.world_size > 1:
        distributed.agree(error)
        distributed.handle_exit()
    return job, fabric


def main(args: list[str] | None = None) -> None:
    """Parse, validate (nothing is written for bad input), launch the processes and sample."""
    start = time.time()
    job, fabric = launch(args, build_parser, SamplingJob.from_config)
    job.run(fabric, start)
