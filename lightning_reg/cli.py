"""``train.py``: a LightningCLI over ``ConditionalDiffusion`` and any data module, with one-line errors."""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lightning_reg.errors import ConfigError
from lightning_reg.module import ConditionalDiffusion


class TrainCLI(LightningCLI):
    def before_fit(self) -> None:
        model, data = self.model, self.datamodule
        for field in ("num_classes", "data_shape"):
            want, got = getattr(model.net, field), getattr(data, field, None)
            if got is not None and tuple(want if isinstance(want, tuple) else [want]) != tuple(
                    got if isinstance(got, tuple) else [got]):
                raise ConfigError(f"model.net.{field}={want} but the data has {field}={got}; make them agree")

    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.is_global_zero:
            cb = trainer.checkpoint_callback
            ckpt = cb and (cb.last_model_path or cb.best_model_path)
            print(f"\ncheckpoint: {ckpt or '(none saved)'}\nlogs:       {trainer.log_dir}")


def main(args=None) -> None:
    try:
        TrainCLI(ConditionalDiffusion, L.LightningDataModule, subclass_mode_data=True, args=args,
                 save_config_kwargs={"overwrite": True})
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
