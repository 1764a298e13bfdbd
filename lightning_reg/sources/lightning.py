"""The ``lightning`` source: a ``ConditionalDiffusion`` checkpoint of ``train.py`` (schedule and prediction in its
hyperparameters, ``module.read_checkpoint``). It takes no option of its own (``ModelSpec.ema`` is common); a file
it cannot read that another source recognises by its name gets that source's ``hint``."""

from __future__ import annotations

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.errors import ConfigError
from lightning_reg.module import CHECKPOINT_WHAT, module_from_checkpoint, read_checkpoint
from lightning_reg.sources.base import ModelSource, ModelSpec, by_priority, register_source


@register_source
class LightningSource(ModelSource):
    """A ``ConditionalDiffusion`` checkpoint of ``train.py`` (schedule and prediction in its hyperparameters)."""

    name, what = "lightning", CHECKPOINT_WHAT
    priority = 30  # after diffusers: a pipeline folder is not a checkpoint

    def claims(self, spec: ModelSpec) -> bool:
        return spec.model is None

    def read(self, spec: ModelSpec) -> dict:
        try:
            return read_checkpoint(spec.checkpoint, spec.field)
        except ConfigError as err:
            hint = None if spec.format is not None else next(
                (h for source in by_priority() if source is not self and (h := source.hint(spec))), None)
            if hint is not None:
                raise ConfigError(f"{err} ({hint})") from None
            raise

    def denoiser(self, spec: ModelSpec, contents: dict) -> Denoiser:
        model = module_from_checkpoint(contents, spec.checkpoint, spec.field)
        return model.ema_denoiser() if spec.ema else model.denoiser
