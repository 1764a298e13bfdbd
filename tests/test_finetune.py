"""Fine-tuning: ``--model.init_from`` starts a new run from a checkpoint's EMA weights."""

import shutil
from pathlib import Path

import pytest
import torch

from lightning_reg.cli import main
from lightning_reg.errors import ConfigError
from lightning_reg.models.mlp import ToyMLP
from lightning_reg.module import ConditionalDiffusion

REPO = Path(__file__).parents[1]


def fit(root: Path, name: str, steps: int, *extra: str) -> Path:
    """A short toy2d run through the CLI; returns its last checkpoint."""
    main(["fit", "--config", str(REPO / "configs/toy2d.yaml"), "--trainer.max_steps", str(steps),
          "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
          "--trainer.logger.init_args.name", name, "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", "--data.init_args.num_train", "1024",
          "--data.init_args.num_val", "128", "--data.init_args.batch_size", "128", *extra])
    return root / name / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("runs"), "source", 10)


def toy2d_net(hidden: int = 128) -> ToyMLP:
    return ToyMLP(num_classes=2, dim=2, hidden=hidden, blocks=3, x_scale=10.0)


def test_init_from_copies_the_source_ema_weights_into_net_and_ema(source):
    source_ema = ConditionalDiffusion.load_from_checkpoint(source).ema.module.state_dict()
    model = ConditionalDiffusion(toy2d_net(), init_from=str(source))
    for name, value in source_ema.items():
        assert torch.equal(model.net.state_dict()[name], value), name
        assert torch.equal(model.ema.module.state_dict()[name], value), name
    assert "init_from" not in model.hparams


def test_fine_tuned_run_stands_alone(source, tmp_path):
    copy = tmp_path / "copy.ckpt"
    shutil.copy(source, copy)
    tuned = fit(tmp_path, "tuned", 5, "--model.init_from", str(copy))
    copy.unlink()  # the fine-tuned checkpoint must not need its source any more
    model = ConditionalDiffusion.load_from_checkpoint(tuned)
    assert torch.load(tuned, weights_only=False)["global_step"] == 5
    assert model.num_classes == 2


def test_init_from_refuses_a_missing_file_and_another_backbone(source, tmp_path):
    with pytest.raises(ConfigError, match="model.init_from .* does not exist"):
        ConditionalDiffusion(toy2d_net(), init_from=str(tmp_path / "nope.ckpt"))
    with pytest.raises(ConfigError, match="another backbone"):
        ConditionalDiffusion(toy2d_net(hidden=64), init_from=str(source))
