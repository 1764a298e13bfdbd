"""``SamplingCallback``: sample during training with the EMA denoiser and log metrics per guidance setting.

It uses the same sampling path as ``sample.py`` (``lightning_reg.sampling.engine.generate``): class-balanced
labels, per-sample seeded noise, the sample indices split across DDP ranks and gathered back in order.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from tqdm.auto import tqdm

from lightning_reg.diffusion.samplers import get_sampler
from lightning_reg.errors import ConfigError
from lightning_reg.guidance.methods import make_guidance
from lightning_reg.metrics.plots import image_grid, save_figure, scatter_figure
from lightning_reg.metrics.toy import toy_metrics
from lightning_reg.sampling.engine import balanced_labels, gather_by_index, generate, rank_indices, setting_name
from lightning_reg.sampling.writer import to_uint8_nhwc, write_png

DEFAULT_SETTINGS = ({"method": "cfg", "scale": 1.0, "reg": "none"}, {"method": "cfg", "scale": 1.0, "reg": "paper"},
                    {"method": "cfg", "scale": 1.0, "reg": "vjp"})
GRID_IMAGES = 32  # images per setting in the logged grid (image data)


class SamplingCallback(L.Callback):
    """Every ``every_n_val_epochs`` validation runs (sanity check excluded), sample ``num_samples``
    class-balanced points per guidance setting and log, for toy data (a datamodule with a ``distribution``),
    ``sample/<setting>/<metric>`` for each metric of ``metrics.toy.toy_metrics``. A scatter plot (toy data)
    or an image grid is saved to ``<log_dir>/samples/step_<global_step>.png`` and sent to the logger when
    it takes images (TensorBoard's ``add_image``, ``log_image``).

    Args:
        settings: guidance dicts for ``make_guidance(**setting)``; default CFG ``w = 1`` with REG none/paper/vjp.
        sampler, steps, seed, batch_size, sampler_kwargs: as in ``sample.py``.
    """

    def __init__(self, every_n_val_epochs: int = 1, num_samples: int = 1000, settings: list[dict] | None = None,
                 sampler: str = "ddpm", steps: int = 25, seed: int = 0, batch_size: int = 1000,
                 sampler_kwargs: dict | None = None):
        for field, value in (("every_n_val_epochs", every_n_val_epochs), ("num_samples", num_samples),
                             ("steps", steps), ("batch_size", batch_size)):
            if value < 1:
                raise ConfigError(f"SamplingCallback {field} must be a positive integer, got {value}")
        settings = [dict(s) for s in (settings if settings is not None else DEFAULT_SETTINGS)]
        names = [setting_name(s) for s in settings]
        if not settings or len(set(names)) != len(names):
            raise ConfigError(f"SamplingCallback settings must be a non-empty list of distinct guidance dicts, "
                              f"got names {names}")
        get_sampler(sampler, **(sampler_kwargs or {}))
        self.guidances = {name: make_guidance(**s) for name, s in zip(names, settings)}
        self.every_n_val_epochs, self.num_samples = every_n_val_epochs, num_samples
        self.sampler, self.steps, self.seed, self.batch_size = sampler, steps, seed, batch_size
        self.sampler_kwargs = sampler_kwargs
        self.val_runs = 0

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
        samples, labels = self.sample(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        distribution = getattr(trainer.datamodule, "distribution", None)
        path = Path(trainer.log_dir or trainer.default_root_dir) / "samples" / f"step_{trainer.global_step}.png"
        if distribution is not None:
            for name, x in samples.items():
                for metric, value in toy_metrics(x, labels, distribution, seed=self.seed).items():
                    pl_module.log(f"sample/{name}/{metric}", value, rank_zero_only=True)
            fig = scatter_figure({name: (x.numpy(), labels.numpy()) for name, x in samples.items()}, distribution,
                                 title=f"step {trainer.global_step}")
            save_figure(fig, path)
            image = self.figure_array(fig) if self.logger_takes_images(trainer) else None
        else:
            image = np.concatenate([image_grid(to_uint8_nhwc(x[:GRID_IMAGES]), nrow=8) for x in samples.values()])
            path.parent.mkdir(parents=True, exist_ok=True)
            write_png(path, image)
        if image is not None:
            self.log_image(trainer, image)

    def sample(self, trainer: L.Trainer, pl_module) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``({setting: samples (N, ...)}, labels (N,))`` on every rank; rank ``r`` generates indices ``r::W``."""
        denoiser = pl_module.ema_denoiser()
        n, world = self.num_samples, trainer.world_size
        labels = balanced_labels(n, denoiser.num_classes)
        indices = rank_indices(n, trainer.global_rank, world)
        samples = {}
        for name, guidance in tqdm(self.guidances.items(), desc="sampling settings", leave=False,
                                   disable=not trainer.is_global_zero):
            local = generate(denoiser, guidance, labels[indices], indices, sampler=self.sampler, steps=self.steps,
                             seed=self.seed, batch_size=self.batch_size, device=pl_module.device,
                             sampler_kwargs=self.sampler_kwargs, progress=trainer.is_global_zero)
            samples[name] = gather_by_index(local.to(pl_module.device), n, world, pl_module.all_gather).cpu()
        return samples, labels

    @staticmethod
    def logger_takes_images(trainer: L.Trainer) -> bool:
        logger = trainer.logger
        return logger is not None and (hasattr(getattr(logger, "experiment", None), "add_image")
                                       or hasattr(logger, "log_image"))

    @staticmethod
    def figure_array(fig) -> np.ndarray:
        fig.canvas.draw()
        return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()

    def log_image(self, trainer: L.Trainer, image: np.ndarray) -> None:
        """Send a (H, W, 3) uint8 image to loggers that take images (CSVLogger does not)."""
        logger, key = trainer.logger, "sample/grid"
        if hasattr(getattr(logger, "experiment", None), "add_image"):
            logger.experiment.add_image(key, image, trainer.global_step, dataformats="HWC")
        elif hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[image], step=trainer.global_step)
