"""Fine-tuning: ``--model.init_from`` starts a new run from a checkpoint's EMA weights, also onto more
classes (old label rows kept, the null row moved last), and ``freeze`` keeps chosen parameters fixed."""

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


def toy2d_net(hidden: int = 128, num_classes: int = 2) -> ToyMLP:
    return ToyMLP(num_classes=num_classes, dim=2, hidden=hidden, blocks=3, x_scale=10.0)


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
    with pytest.raises(ConfigError, match=r"holds another architecture than model.net: shapes: x_proj.weight "
                                          r"\(128, 64\) \(needs \(64, 64\)\)"):
        ConditionalDiffusion(toy2d_net(hidden=64), init_from=str(source))
    with pytest.raises(ConfigError, match=r"another architecture .*unexpected: blocks.2.layers"):
        ConditionalDiffusion(ToyMLP(num_classes=2, dim=2, hidden=128, blocks=2), init_from=str(source))
    with pytest.raises(ConfigError, match=r"another architecture .*shapes: y_embed.weight \(3, 128\) "
                                          r"\(needs \(2, 128\)\)"):  # fewer classes than the source: refused
        ConditionalDiffusion(toy2d_net(num_classes=1), init_from=str(source))


def test_init_from_onto_more_classes_keeps_old_rows_and_moves_the_null_row(source):
    old = ConditionalDiffusion.load_from_checkpoint(source).ema.module.state_dict()
    model = ConditionalDiffusion(toy2d_net(num_classes=3), init_from=str(source))
    rows = model.net.label_embedding.weight.detach()
    assert rows.shape == (4, 128) and model.num_classes == 3
    torch.testing.assert_close(rows[:2], old["y_embed.weight"][:2], rtol=0, atol=0)  # classes 0 and 1
    torch.testing.assert_close(rows[3], old["y_embed.weight"][2], rtol=0, atol=0)  # the null row, now last
    torch.testing.assert_close(rows[2], old["y_embed.weight"][2], rtol=0, atol=0)  # class 2 starts unconditional
    assert not torch.equal(rows[0], rows[2])
    for name, value in old.items():  # everything else unchanged, in net and EMA
        if name != "y_embed.weight":
            assert torch.equal(model.net.state_dict()[name], value), name
    assert torch.equal(model.ema.module.label_embedding.weight, rows)
    # the new null id is 3: label dropout uses it
    model.hparams.label_dropout = 0.999
    assert (model.drop_labels(torch.zeros(64, dtype=torch.long)) == 3).float().mean() > 0.9


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_freeze_keeps_frozen_parameters_fixed_while_the_rest_trains(source, one_thread):
    import lightning as L

    torch.manual_seed(0)
    model = ConditionalDiffusion(toy2d_net(num_classes=3), init_from=str(source), freeze=["blocks", "x_proj"],
                                 warmup_steps=0, lr=1e-2)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    data = torch.utils.data.TensorDataset(torch.randn(64, 2), torch.randint(0, 3, (64,)))
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=16))
    after = model.net.state_dict()
    frozen = [k for k in before if k.startswith(("blocks", "x_proj"))]
    assert len(frozen) == 3 * 6 + 2
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(torch.equal(before[k], model.ema.module.state_dict()[k]) for k in frozen)
    changed = [k for k in before if k not in frozen and not torch.equal(before[k], after[k])]
    assert "y_embed.weight" in changed and "out.1.weight" in changed
    assert [g["params"] for g in trainer.optimizers[0].param_groups][0] == [
        p for p in model.net.parameters() if p.requires_grad]


def test_freeze_refuses_names_that_match_nothing():
    with pytest.raises(ConfigError, match=r"model.freeze \['encoder'\] match no parameter .*'blocks'"):
        ConditionalDiffusion(toy2d_net(), freeze=["blocks", "encoder"])
    with pytest.raises(ConfigError, match=r"\['block'\] match no parameter"):  # whole names, not letters
        ConditionalDiffusion(toy2d_net(), freeze=["block"])
    model = ConditionalDiffusion(toy2d_net(), freeze=["blocks.1", "out.1.bias"])
    assert sorted(n for n, p in model.net.named_parameters() if not p.requires_grad) == [
        "blocks.1.layers.0.bias", "blocks.1.layers.0.weight", "blocks.1.layers.1.bias", "blocks.1.layers.1.weight",
        "blocks.1.layers.3.bias", "blocks.1.layers.3.weight", "out.1.bias"]
