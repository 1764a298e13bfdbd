"""The digits classifier (the offline feature network): it learns, its checkpoint round-trips, bad files are refused."""

import lightning as L
import numpy as np
import pytest
import torch
from helpers import TINY_CLASSIFIER as TINY, classifier_checkpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_reg.data.digits import load_digit_arrays
from lightning_reg.errors import ConfigError
from lightning_reg.cli import classifier_main as main
from lightning_reg.metrics.classifier import ClassifierTraining, FeatureNetwork, load_feature_network
from lightning_reg.metrics.evaluate import build_image_evaluator

def digits_batch(n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` scikit-learn 8x8 digits as uint8 (N, 1, 8, 8) and their labels."""
    images, labels = load_digit_arrays("sklearn")
    return torch.from_numpy(images[:n, None]), torch.from_numpy(labels[:n])


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_classifier_fits_its_training_batch_and_checkpoint_round_trips(tmp_path, one_thread):
    images, labels = digits_batch()
    x = images.float() / 127.5 - 1
    L.seed_everything(0)
    module = ClassifierTraining(10, 8, 1, **TINY, lr=1e-2, max_shift=0, dropout=0.0)
    trainer = L.Trainer(max_steps=60, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, DataLoader(TensorDataset(x, labels), batch_size=128))
    trainer.save_checkpoint(tmp_path / "clf.ckpt")

    network = load_feature_network(tmp_path / "clf.ckpt")  # weights_only load of a real Lightning checkpoint
    assert network.image_shape == (1, 8, 8) and network.num_classes == 10
    assert not network.training and not any(p.requires_grad for p in network.parameters())
    network.train()
    assert not network.training  # never leaves eval mode
    with torch.no_grad():
        features, logits = network.features(images), network.logits(images)
        assert features.shape == (128, 32) and logits.shape == (128, 10)
        torch.testing.assert_close(logits, module.net.eval()(x)[1])  # uint8 -> [-1, 1] as in training
    accuracy = build_image_evaluator(["accuracy"], (1, 8, 8), network)(images.permute(0, 2, 3, 1), labels)
    assert accuracy["accuracy"] > 0.9  # 60 steps on one batch of 128; chance is 0.1


def test_load_feature_network_refuses_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_feature_network(tmp_path / "missing.ckpt")
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(ConfigError, match="not a digits-classifier checkpoint.*KeyError"):
        load_feature_network(tmp_path / "other.ckpt")
    good = classifier_checkpoint(tmp_path / "clf.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    with pytest.raises(ConfigError, match="not a digits-classifier checkpoint"):
        load_feature_network(tmp_path / "truncated.ckpt")
    torch.save({"feature_network": np.dtype("float32"), "state_dict": {}}, tmp_path / "pickled.ckpt")
    with pytest.raises(ConfigError, match="not a digits-classifier checkpoint.*Unpickl"):  # weights_only
        load_feature_network(tmp_path / "pickled.ckpt")


def test_feature_network_for_other_images_or_classes_is_refused(tmp_path):
    path = classifier_checkpoint(tmp_path / "clf.ckpt", image_size=8, channels=1, num_classes=10)
    assert isinstance(load_feature_network(path), FeatureNetwork)
    with pytest.raises(ConfigError, match=r"trained on \(C, H, W\) = \(1, 8, 8\) images, not \(1, 16, 16\)"):
        build_image_evaluator(["fid"], (1, 16, 16), path)
    with pytest.raises(ConfigError, match=r"not \(3, 8, 8\)"):
        build_image_evaluator(["fid"], (3, 8, 8), path)
    with pytest.raises(ConfigError, match="has 10 classes but the samples have 4"):
        build_image_evaluator(["accuracy"], (1, 8, 8), path, num_classes=4)


@pytest.mark.parametrize("args, message", [
    (["--model.image_size", "10"], "error: image_size=10 must be divisible by 2^len(widths) = 4"),
    (["--model.image_size", "8"], "error: model.net.data_shape=(1, 8, 8) but the data has data_shape=(1, 16, 16)"),
])
def test_classifier_cli_errors_are_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--data", "lightning_reg.data.digits.Digits", "--data.source", "sklearn",
              "--data.root", str(tmp_path), "--trainer.logger", "false", "--trainer.default_root_dir",
              str(tmp_path / "runs"), *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()  # (preparing the digits prints a progress line first)
    assert err[-1].startswith(message) and sum(line.startswith("error") for line in err) == 1
    assert not (tmp_path / "runs").exists()


def test_mnist_classifier_config_parses():
    from lightning.pytorch.cli import LightningCLI
    cli = LightningCLI(ClassifierTraining, L.LightningDataModule, subclass_mode_data=True, run=False,
                       args=["--config", "configs/mnist_classifier.yaml", "--trainer.logger", "false"])
    assert cli.model.net.arch == {"num_classes": 10, "image_size": 16, "channels": 1, "widths": [16, 32],
                                  "num_features": 128}
    assert cli.datamodule.data_shape == (1, 16, 16) and type(cli.datamodule).__name__ == "Digits"
