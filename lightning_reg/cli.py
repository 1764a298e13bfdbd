"""``train.py``: a LightningCLI over ``ConditionalDiffusion`` and any data module, with one-line errors."""

from __future__ import annotations

import logging
import warnings
from argparse import ArgumentError

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lightning_reg import distributed
from lightning_reg.data.images import ImageDataModule
from lightning_reg.distributed import fail
from lightning_reg.errors import ConfigError, parse_error_message
from lightning_reg.io.files import state_dict_mismatch
from lightning_reg.io.yaml_budget import install_yaml_budget
from lightning_reg.module import ConditionalDiffusion, read_checkpoint


class AgreeOnChecks(L.Callback):
    """Processes started together (torchrun, SLURM, several nodes) check ``--ckpt_path`` each, and agree on the
    outcome once the process group has started (``distributed.agree``: every rank exits 2 if any failed)."""

    def __init__(self, error: str | None):
        self.error = error

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            distributed.agree(self.error)


class TrainCLI(LightningCLI):
    check_error: str | None = None  # this rank's failed --ckpt_path check, reported by AgreeOnChecks

    def before_validate(self) -> None:
        self.trainer.callbacks.insert(0, AgreeOnChecks(self.check_error))

    def before_fit(self) -> None:
        self.before_validate()  # the same agreement
        if self.check_error is not None:
            return
        model, data = self.model, self.datamodule
        for field in ("num_classes", "data_shape"):
            want, got = getattr(model.net, field), getattr(data, field, None)
            if got is not None and tuple(want if isinstance(want, tuple) else [want]) != tuple(
                    got if isinstance(got, tuple) else [got]):
                raise ConfigError(f"model.net.{field}={want} but the data has {field}={got}; make them agree")
        if isinstance(data, ImageDataModule):  # decode every image now: the loggers write the run's folder
            data.setup("fit")                  # before Lightning calls setup (it returns at once then)
        path = self.resume_path()
        if path is not None:  # the run's folder is written before Lightning restores the weights
            mismatch = state_dict_mismatch(model.state_dict(), read_checkpoint(path, "--ckpt_path")["state_dict"])
            if mismatch:
                raise ConfigError(f"--ckpt_path {path} holds another architecture than this config's model: "
                                  f"{mismatch}")

    def parse_arguments(self, parser, args) -> None:
        """Parse, then refuse a missing, damaged or unsafe ``--ckpt_path`` file before Lightning reads it
        (a traceback) and before the trainer writes the run's folder."""
        super().parse_arguments(parser, args)
        path = self.resume_path()
        if path is None:
            return
        subcommand = self.config.get("subcommand")
        num_nodes = self.config[subcommand].get("trainer", {}).get("num_nodes", 1) if subcommand else 1
        if distributed.started_together(num_nodes or 1):  # a file one node lacks: every rank must hear of it
            self.check_error = distributed.check(lambda: read_checkpoint(path, "--ckpt_path"))[1]
        else:
            read_checkpoint(path, "--ckpt_path")

    def resume_path(self) -> str | None:
        """The ``--ckpt_path`` file, unless absent or a name Lightning resolves itself (``last``, ...)."""
        subcommand = self.config.get("subcommand")
        path = subcommand and self.config[subcommand].get("ckpt_path")
        return None if not path or str(path) in _LIGHTNING_CKPT_NAMES or str(path).startswith("registry:") else path

    def after_fit(self) -> None:
        trainer = self.trainer
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank
        if trainer.is_global_zero:
            cb = trainer.checkpoint_callback
            ckpt = cb and (cb.last_model_path or cb.best_model_path)
            print(f"\ncheckpoint: {ckpt or '(none saved)'}\nlogs:       {log_dir}")


# ``--ckpt_path`` values that Lightning resolves itself (``last`` starts afresh when there is none).
_LIGHTNING_CKPT_NAMES = ("last", "best", "hpc")

def config_error_behind(err: BaseException) -> ConfigError | None:
    """The ``ConfigError`` that caused ``err`` (jsonargparse wraps errors of nested ``init_args`` classes)."""
    while err is not None and not isinstance(err, ConfigError):
        err = err.__cause__ or err.__context__
    return err


def quiet_lightning() -> None:
    """Drop what Lightning prints that no user of this project can act on: its advertising tip, the seed the
    config set, and a deprecation warning raised by its own code."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.msg).startswith("💡 Tip"))
    logging.getLogger("lightning.fabric.utilities.seed").addFilter(  # the config's own seed, said back
        lambda record: "Seed set to" not in str(record.msg))
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


def main(args=None, model_class: type[L.LightningModule] = ConditionalDiffusion) -> None:
    """Run the CLI over ``model_class`` (also the digits classifier's); bad flags, config keys and values end
    in one ``error: ...`` line and exit code 2."""
    quiet_lightning()
    install_yaml_budget()
    distributed.handle_exit()
    try:
        TrainCLI(model_class, L.LightningDataModule, subclass_mode_data=True, args=args,
                 save_config_kwargs={"overwrite": True}, parser_kwargs={"exit_on_error": False})
    except ArgumentError as err:
        fail(f"{parse_error_message(err)} (run with --help for the accepted options)")
    except Exception as err:
        cause = config_error_behind(err)
        if cause is None:
            raise
        fail(str(cause))


def classifier_main(args=None) -> None:
    """``python train_classifier.py fit --config configs/mnist_classifier.yaml``: this CLI (the model's classes and
    image shape checked against the data, one-line errors) over the digits classifier of the image metrics."""
    from lightning_reg.metrics.classifier import ClassifierTraining

    main(args, model_class=ClassifierTraining)
