"""``SamplingCallback``: sample during training with the EMA denoiser and log metrics per guidance setting.

It uses the same sampling path as ``sample.py`` (``lightning_reg.sampling.engine.generate``): class-balanced
labels, per-sample seeded noise, the sample indices split across DDP ranks and gathered back in order.
Metrics: the exact toy metrics (``metrics.toy``) for toy data; for images FID / IS / KID / class accuracy through
the one image evaluation path of ``evaluate.py`` and the sweep (``metrics.evaluate``).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_reg.diffusion.samplers import get_sampler
from lightning_reg.errors import ConfigError, check_int, check_names
from lightning_reg.guidance.guided import make_guidance
from lightning_reg.io.files import to_uint8_nhwc
from lightning_reg.metrics.evaluate import build_image_evaluator, evaluate_samples, image_metric_names, loader_images
from lightning_reg.metrics.images import IMAGE_METRICS, ImageMetrics
from lightning_reg.metrics.plots import image_grid, labelled_grids, save_figure, scatter_figure
from lightning_reg.metrics.toy import TOY_METRICS, ToyEvaluator
from lightning_reg.sampling.engine import (gather_by_index, generate, rank_indices, sample_conditions, sample_keys,
                                           setting_name)
from lightning_reg.sampling.writer import write_png

DEFAULT_SETTINGS = ({"method": "cfg", "scale": 1.0, "reg": "none"}, {"method": "cfg", "scale": 1.0, "reg": "paper"},
                    {"method": "cfg", "scale": 1.0, "reg": "vjp"})
GRID_IMAGES = 32  # images per setting in the logged grid (image data)


def metrics_table(results: dict[str, dict[str, float]]) -> str:
    """``{setting: {metric: value}}`` as aligned text, a row per setting."""
    columns = list(dict.fromkeys(metric for metrics in results.values() for metric in metrics))
    width = max(len(name) for name in results)
    rows = [f"{'setting':<{width}}  " + "  ".join(f"{c:>{max(len(c), 10)}}" for c in columns)]
    for name, metrics in results.items():
        rows.append(f"{name:<{width}}  " + "  ".join(f"{metrics.get(c, float('nan')):>{max(len(c), 10)}.4g}"
                                                     for c in columns))
    return "\n".join(rows)


class SamplingCallback(L.Callback):
    """Every ``every_n_val_epochs`` validation runs (sanity check excluded), sample ``num_samples``
    class-balanced points per guidance setting and log ``<name>/<setting>/<metric>`` for each of ``metrics``.
    A scatter plot (toy data) or an image grid (a block of rows per setting) is saved to
    ``<log_dir>/<name>s/step_<global_step>.png``; loggers that take images (TensorBoard's ``add_image``,
    ``log_image``) get it as ``<name>/grid`` (toy data) or one grid per setting, ``<name>/<setting>/grid``.

    Under DDP (one process or many, one node or many; ``docs/distributed.md``) every call that talks to the
    process group runs on every rank, in the same order: ``trainer.log_dir`` (a broadcast), the all-gather
    of the samples (rank ``r`` generates indices ``r::W``), the broadcast of rank 0's metrics and their
    ``self.log(sync_dist=True)`` (every rank logs the same values, so a ``ModelCheckpoint`` or
    ``EarlyStopping`` monitoring them agrees across ranks). Rank 0 alone computes the metrics, whose
    torchmetrics objects are built with ``sync_on_compute=False`` so ``compute()`` never waits for the other
    ranks, and writes the figures and files; nothing it does alone talks to the process group.

    Args:
        name: the prefix of the logged keys and of the figure folder (default ``sample``: ``sample/...``,
            ``samples/``); give each callback its own when a run holds several (e.g. a small ``watch`` one at
            every validation and a large ``sample`` one at the end).
        settings: guidance dicts for ``make_guidance(**setting)``; default CFG ``w = 1`` with REG none/paper/vjp.
        sampler, steps, seed, batch_size, sampler_kwargs: as in ``sample.py``.
        metrics: toy data (a datamodule with a ``distribution``): names from ``metrics.toy.TOY_METRICS``,
            default all that apply; images: from ``fid``, ``is``, ``kid``, ``accuracy``, default ``[fid, is]``
            (and ``accuracy`` with a classifier ``feature_network``), against the first ``num_samples``
            validation images (features computed once), on rank 0. ``[]``: none.
        feature_network: image metrics only: a digits-classifier checkpoint (``metrics.classifier``; its
            features for FID/KID, logits for IS and accuracy) or ``inception`` (the default: torchmetrics'
            Inception-v3, whose weights must be in the torch hub cache or at ``inception_weights``).
        feature_extractor: in place of ``feature_network``, a module mapping uint8 NCHW images to features
            (IS: logits), for use from Python.
        save_samples: also save the gathered samples of each setting (and their labels) as
            ``<log_dir>/<name>s/step_<global_step>.npz``, one array per setting name.
        prompts: a text-to-image model's captions: sample ``i`` takes ``prompts[i % len(prompts)]`` (in place
            of class-balanced labels).
    """

    def __init__(self, name: str = "sample", every_n_val_epochs: int = 1, num_samples: int = 1000, settings: list[dict] | None = None,
                 sampler: str = "ddpm", steps: int = 25, seed: int = 0, batch_size: int = 1000,
                 sampler_kwargs: dict | None = None, metrics: list[str] | None = None,
                 feature_network: str | None = None, inception_weights: str | None = None,
                 feature_extractor: nn.Module | None = None, save_samples: bool = False,
                 prompts: list[str] | None = None):
        for field, value in (("every_n_val_epochs", every_n_val_epochs), ("num_samples", num_samples),
                             ("steps", steps), ("batch_size", batch_size)):
            check_int(f"SamplingCallback {field}", value)
        settings = [dict(s) for s in (settings if settings is not None else DEFAULT_SETTINGS)]
        names = [setting_name(s) for s in settings]
        if not settings or len(set(names)) != len(names):
            raise ConfigError(f"SamplingCallback settings must be a non-empty list of distinct guidance dicts, "
                              f"got names {names}")
        get_sampler(sampler, **(sampler_kwargs or {}))
        self.guidances = {name: make_guidance(**s) for name, s in zip(names, settings)}
        if not name or not name.replace("_", "").isalnum():
            raise ConfigError(f"SamplingCallback name must be a non-empty word (letters, digits, _), got {name!r}")
        self.name, self.every_n_val_epochs, self.num_samples = name, every_n_val_epochs, num_samples
        self.sampler, self.steps, self.seed, self.batch_size = sampler, steps, seed, batch_size
        self.sampler_kwargs = sampler_kwargs
        self.requested_metrics = None if metrics is None else check_names(
            metrics, TOY_METRICS + IMAGE_METRICS, "SamplingCallback metrics")
        self.metrics: tuple[str, ...] = ()  # resolved against the data in setup
        if feature_network is not None and feature_extractor is not None:
            raise ConfigError("SamplingCallback takes feature_network (a path) or feature_extractor (a module), not both")
        self.feature_network = feature_network if feature_network is not None else feature_extractor
        self.inception_weights = inception_weights
        self.save_samples = save_samples
        self.image_metrics: ImageMetrics | None = None  # image data: built in setup, on rank 0
        self.toy_evaluator: ToyEvaluator | None = None  # toy data: built in setup
        if prompts is not None and (not prompts or not all(isinstance(p, str) and p.strip() for p in prompts)):
            raise ConfigError(f"SamplingCallback prompts must be a non-empty list of captions, got {prompts!r}")
        self.prompts = prompts
        self.val_runs = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve ``metrics`` for the data and build the image metrics (loading Inception) before training."""
        distribution = getattr(trainer.datamodule, "distribution", None)
        data_shape, requested = pl_module.denoiser.sample_shape, self.requested_metrics  # images, also for latents
        if distribution is not None:  # the toy evaluator of sample.py and the sweep
            self.toy_evaluator = ToyEvaluator(distribution, self.seed, requested)
            self.metrics = self.toy_evaluator.names
        elif len(data_shape) == 3:
            self.metrics = image_metric_names(requested, self.feature_network, "SamplingCallback metrics (image data)")
        elif requested:
            raise ConfigError(f"SamplingCallback metrics {list(requested)} need toy data with a known distribution "
                              "(a datamodule such as Toy1D or Toy2D) or images")
        if self.metrics and distribution is None and trainer.is_global_zero and self.image_metrics is None:
            if trainer.datamodule is None:
                raise ConfigError("SamplingCallback image metrics take their real images from the datamodule's "
                                  "val_dataloader(); fit with a datamodule or set metrics: []")
            self.image_metrics = build_image_evaluator(self.metrics, data_shape, self.feature_network,
                                                       self.inception_weights, pl_module.denoiser.num_classes)

    @property
    def state_key(self) -> str:
        """Unique per ``name``, so each of several callbacks in a run resumes its own count."""
        return self._generate_state_key(name=self.name)

    def state_dict(self) -> dict:
        return {"val_runs": self.val_runs}

    def load_state_dict(self, state_dict: dict) -> None:
        self.val_runs = state_dict["val_runs"]

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.val_runs += 1
        if self.val_runs % self.every_n_val_epochs:
            return
        # Every rank, in this order: trainer.log_dir (a broadcast), the gather of the samples, the broadcast of
        # the metrics and their logging (see the class docstring).
        folder = Path(trainer.log_dir or trainer.default_root_dir) / f"{self.name}s"
        samples, labels = self.sample(trainer, pl_module)
        results = None
        if trainer.is_global_zero:
            results = {name: self.evaluate(trainer, pl_module, x, labels) for name, x in samples.items()}
        results = trainer.strategy.broadcast(results, src=0)
        for name, metrics in results.items():
            for metric, value in metrics.items():
                pl_module.log(f"{self.name}/{name}/{metric}", value, sync_dist=True)  # equal on every rank
        if trainer.is_global_zero:
            self.write_outputs(trainer, folder, samples, labels, results)

    def write_outputs(self, trainer: L.Trainer, folder: Path, samples: dict[str, torch.Tensor], labels: torch.Tensor,
                      results: dict[str, dict[str, float]]) -> None:
        """Rank 0: the metrics table, the figure (and ``save_samples``' arrays) under ``folder``, and the images
        for loggers that take them."""
        step, distribution = trainer.global_step, getattr(trainer.datamodule, "distribution", None)
        path = folder / f"step_{step}.png"
        if any(results.values()):
            tqdm.write(f"\nstep {step}: {self.num_samples} samples per setting, {self.sampler} "
                       f"{self.steps} steps\n{metrics_table(results)}")
        if self.save_samples:
            folder.mkdir(parents=True, exist_ok=True)
            np.savez(folder / f"step_{step}.npz", labels=labels.numpy(),
                     **{name: x.numpy() for name, x in samples.items()})
        if distribution is not None:
            fig = scatter_figure({name: (x.numpy(), labels.numpy()) for name, x in samples.items()}, distribution,
                                 title=f"step {step}")
            save_figure(fig, path)
            image = self.figure_array(fig) if self.logger_takes_images(trainer) else None
            if image is not None:
                self.log_image(trainer, f"{self.name}/grid", image)
        else:
            grids = {name: image_grid(to_uint8_nhwc(x[:GRID_IMAGES]), nrow=8) for name, x in samples.items()}
            write_png(path, labelled_grids(grids))  # each setting's grid under a caption naming it
            if self.logger_takes_images(trainer):
                for name, grid in grids.items():
                    self.log_image(trainer, f"{self.name}/{name}/grid", grid)

    def sample(self, trainer: L.Trainer, pl_module) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``({setting: samples (N, ...)}, labels (N,))`` on every rank; rank ``r`` generates indices ``r::W``."""
        denoiser = pl_module.ema_denoiser()
        n, world = self.num_samples, trainer.world_size
        indices = rank_indices(n, trainer.global_rank, world)
        labels = sample_keys(n, denoiser, prompts=self.prompts)  # classes, or caption lines with prompts
        conditions = sample_conditions(denoiser, labels[indices], self.prompts)
        samples = {}
        for name, guidance in tqdm(self.guidances.items(), desc="sampling settings", leave=False,
                                   disable=None if trainer.is_global_zero else True):  # None: not in a log file
            local = generate(denoiser, guidance, conditions, indices, sampler=self.sampler, steps=self.steps,
                             seed=self.seed, batch_size=self.batch_size, device=pl_module.device,
                             sampler_kwargs=self.sampler_kwargs, progress=trainer.is_global_zero)
            samples[name] = gather_by_index(local.to(pl_module.device), n, world, pl_module.all_gather).cpu()
        return samples, labels

    def evaluate(self, trainer: L.Trainer, pl_module, samples: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """``metrics`` of one setting's samples: exact toy metrics, or image metrics against validation images."""
        if self.toy_evaluator is not None:
            return self.toy_evaluator(samples, labels)
        if self.image_metrics is None:
            return {}
        self.image_metrics.to(pl_module.device)
        if self.image_metrics.num_real is None:  # the FID/KID reference: the first num_samples validation images
            self.image_metrics.set_real(loader_images(trainer.datamodule.val_dataloader(), self.num_samples))
        return evaluate_samples(to_uint8_nhwc(samples), labels, self.image_metrics)

    @staticmethod
    def logger_takes_images(trainer: L.Trainer) -> bool:
        logger = trainer.logger
        return logger is not None and (hasattr(getattr(logger, "experiment", None), "add_image")
                                       or hasattr(logger, "log_image"))

    @staticmethod
    def figure_array(fig) -> np.ndarray:
        fig.canvas.draw()
        return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()

    @staticmethod
    def log_image(trainer: L.Trainer, key: str, image: np.ndarray) -> None:
        """Send a (H, W, 3) uint8 image to loggers that take images (CSVLogger does not)."""
        logger = trainer.logger
        if hasattr(getattr(logger, "experiment", None), "add_image"):
            logger.experiment.add_image(key, image, trainer.global_step, dataformats="HWC")
        elif hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[image], step=trainer.global_step)
