"""A checkpoint of every shipped training config rebuilds through the allow-list (``module_from_checkpoint``) into
the same model: the same backbone class, schedule, prediction and every weight (docs/security.md)."""

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from lightning_reg.module import CHECKPOINT_CLASSES, ConditionalDiffusion, module_from_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CPU = ["--trainer.logger", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision",
       "32"]


@pytest.mark.parametrize("configs", [["toy1d"], ["toy2d"], ["mnist"], ["mnist", "mnist_guide"], ["mnist_gpu"],
                                     ["mnist", "edm2_digits"], ["dit_cifar10"]], ids="+".join)
def test_every_training_config_rebuilds_from_its_checkpoint(configs, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    args = [a for name in configs for a in ("--config", f"configs/{name}.yaml")] + CPU
    model = LightningCLI(ConditionalDiffusion, L.LightningDataModule, subclass_mode_data=True, run=False,
                         args=args).model
    with torch.no_grad():  # every weight matters (output layers start at zero)
        for value in filter(torch.is_floating_point, model.state_dict().values()):
            value.add_(torch.randn_like(value))
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    assert checkpoint["hyper_parameters"]["net"]["class_path"] in CHECKPOINT_CLASSES["net"]
    rebuilt = module_from_checkpoint(checkpoint, "x.ckpt", "--checkpoint")
    assert type(rebuilt.net) is type(model.net) and rebuilt.schedule == model.schedule
    assert rebuilt.denoiser.prediction.kind == model.denoiser.prediction.kind
    assert rebuilt.hparams.label_dropout == model.hparams.label_dropout
    expected, got = model.state_dict(), rebuilt.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
