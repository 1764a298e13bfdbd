"""``train.py`` (LightningCLI): bad flags and values end in one ``error:`` line, exit code 2, no files;
the shipped configs parse and train."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lightning_reg.cli import main
from lightning_reg.metrics.plots import CAPTION_HEIGHT
from lightning_reg.module import ConditionalDiffusion

REPO = Path(__file__).resolve().parents[1]
SMALL_DATA = ["--data.init_args.num_train", "1024", "--data.init_args.num_val", "128",
              "--data.init_args.batch_size", "64"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory holding a copy of ``configs/``; the configs write relative to it.
    ``sys.argv`` is cleared so ``main(args)`` sees only its own arguments, not pytest's."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    return tmp_path


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def run_train(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """``python train.py fit --config configs/toy2d.yaml ARGS`` as a user runs it, in ``workdir``."""
    return subprocess.run([sys.executable, str(REPO / "train.py"), "fit", "--config", "configs/toy2d.yaml", *args],
                          cwd=workdir, capture_output=True, text=True, timeout=300)


def assert_one_error_line(stderr: str, words: list[str]) -> None:
    """One ``error:`` line holding ``words``; besides it at most Lightning's "Seed set to 0" (no usage wall)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(word in errors[0] for word in words), stderr
    assert len(stderr.strip().splitlines()) <= 2, stderr


# Both ways a bad config fails: jsonargparse refuses a key while parsing, and a constructor raises
# ConfigError while jsonargparse instantiates a nested class (which it wraps in its own ValueError).
@pytest.mark.parametrize("args, words", [
    (["--model.not_a_key", "1"], ["--model.not_a_key"]),
    (["--model.schedule.init_args.betas", "bogus"], ["betas", "'bogus'", "'scaled_linear' or 'cosine'"]),
], ids=["unknown-key", "nested-config-error"])
def test_train_script_fails_with_one_line_no_traceback_no_files(workdir, args, words):
    before = files_under(workdir)
    result = run_train(workdir, *args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr and "usage:" not in result.stderr
    assert_one_error_line(result.stderr, words)
    assert files_under(workdir) == before


@pytest.mark.parametrize("args, yaml_text, words", [
    (["--config", "bad.yaml"], "model:\n  not_a_key: 1\n", ["model.not_a_key"]),
    (["--config", "bad.yaml"], "model:\n  schedule:\n    init_args: {betaz: 1}\n", ["model.schedule", "betaz"]),
    (["--model.lr", "fast"], None, ["model.lr", "fast"]),
    (["--model.label_dropout", "1.5"], None, ["label_dropout", "[0, 1)", "1.5"]),
    (["--data.init_args.batch_size", "0"], None, ["batch_size", "positive"]),
    (["--model.net.init_args.num_classes", "3"], None, ["model.net.num_classes=3", "data has num_classes=2"]),
], ids=["yaml-unknown-key", "yaml-nested-unknown-key", "bad-type", "model-value", "data-value", "model-vs-data"])
def test_bad_config_exits_2_with_one_error_line_and_no_files(workdir, capsys, args, yaml_text, words):
    if yaml_text is not None:
        (workdir / "bad.yaml").write_text(yaml_text)
    before = files_under(workdir)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/toy2d.yaml", *SMALL_DATA, *args])
    assert exit_info.value.code == 2
    assert_one_error_line(capsys.readouterr().err, words)
    assert files_under(workdir) == before


def test_print_config_shows_the_merged_config(workdir, capsys):
    before = files_under(workdir)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/toy2d.yaml", "--model.lr", "0.01", "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["lr"] == 0.01 and config["model"]["label_dropout"] == 0.1
    assert config["model"]["net"]["class_path"] == "lightning_reg.models.mlp.ToyMLP"
    assert config["data"]["class_path"] == "lightning_reg.data.toy.Toy2D"
    assert files_under(workdir) == before


@pytest.mark.parametrize("configs, expect", [
    (["mnist"], {"net": "lightning_reg.models.unet.UNet", "classes": 10, "steps": 2400, "callbacks": 3}),
    (["mnist_gpu"], {"net": "lightning_reg.models.unet.UNet", "classes": 10, "steps": 100000, "callbacks": 3}),
    (["mnist", "finetune_digits04"], {"classes": 5, "steps": 1200, "callbacks": 1, "data_classes": [0, 1, 2, 3, 4]}),
    (["mnist", "finetune_digits09"], {"classes": 10, "steps": 1200, "callbacks": 1,
                                      "init_from": "checkpoints/runs/digits04/version_0/checkpoints/last.ckpt"}),
    (["mnist", "mnist_guide"], {"classes": 10, "steps": 600, "callbacks": 1, "net_args": {"base_channels": 16}}),
    (["mnist", "edm2_digits"], {"net": "lightning_reg.models.edm2.EDM2Precond", "classes": 10, "steps": 1200,
                                "callbacks": 2, "model": {"prediction": "edm", "label_dropout": 0.0,
                                                          "uncertainty": True}}),
])
def test_image_configs_parse(workdir, capsys, configs, expect):
    """The digits configs (and the fine-tuning overlays on top of ``mnist.yaml``) parse against the classes they
    name; nothing is written."""
    before = files_under(workdir)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *(arg for name in configs for arg in ("--config", f"configs/{name}.yaml")), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    net = config["model"]["net"]
    assert net["init_args"].get("num_classes", net["init_args"].get("label_dim")) == expect["classes"]
    assert net["class_path"] == expect.get("net", "lightning_reg.models.unet.UNet")
    assert {k: net["init_args"][k] for k in expect.get("net_args", {})} == expect.get("net_args", {})
    assert {k: config["model"][k] for k in expect.get("model", {})} == expect.get("model", {})
    assert config["trainer"]["max_steps"] == expect["steps"]
    assert len(config["trainer"]["callbacks"]) == expect["callbacks"]
    assert config["data"]["init_args"].get("classes") == expect.get("data_classes")
    assert config["model"]["init_from"] == expect.get("init_from")
    assert files_under(workdir) == before


@pytest.mark.parametrize("name, steps", [("toy2d", 20), ("toy1d", 5)])
def test_short_fit_writes_a_loadable_checkpoint(workdir, capsys, one_thread, name, steps):
    out_dir = workdir / "runs"
    main(["fit", "--config", f"configs/{name}.yaml", "--trainer.max_steps", str(steps),
          "--trainer.default_root_dir", str(out_dir), "--trainer.logger.init_args.save_dir", str(out_dir),
          "--trainer.log_every_n_steps", "5", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", *SMALL_DATA])
    stdout = capsys.readouterr().out
    checkpoint = out_dir / name / "version_0" / "checkpoints" / "last.ckpt"
    assert f"checkpoint: {checkpoint}" in stdout
    assert checkpoint.is_file() and (out_dir / name / "version_0" / "config.yaml").is_file()
    assert "train/loss" in (out_dir / name / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert not (workdir / "checkpoints").exists() and not (workdir / "lightning_logs").exists()
    assert torch.load(checkpoint, weights_only=False)["global_step"] == steps
    model = ConditionalDiffusion.load_from_checkpoint(checkpoint)
    assert model.num_classes == {"toy2d": 2, "toy1d": 1}[name]


def test_image_config_trains_and_samples_on_a_local_dataset(workdir, capsys):
    """``configs/dit_cifar10.yaml`` as a user runs it offline: only the dataset folder, the model size and the
    run length shrink; image sampling (DDPM + REG) runs at the validation and writes a grid."""
    from lightning_reg.data.synthetic_images import make_synthetic_image_dataset

    config = yaml.safe_load((workdir / "configs" / "dit_cifar10.yaml").read_text())
    config["data"]["init_args"].update(name=make_synthetic_image_dataset(workdir / "cifar_like", num_classes=10,
                                                                         n_per_class=4, image_size=32),
                                       batch_size=8, num_workers=0, val_fraction=0.25)
    config["model"]["net"]["init_args"].update(hidden_size=32, depth=1, num_heads=2, patch_size=8)
    config["trainer"].update(accelerator="cpu", devices=1, max_steps=2, val_check_interval=2, limit_val_batches=1,
                             enable_progress_bar=False, enable_model_summary=False)
    checkpointing, sampling = config["trainer"]["callbacks"]
    sampling["init_args"].update(every_n_val_epochs=1, num_samples=4, steps=2, batch_size=4, metrics=[])
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", "tiny.yaml"])
    run = workdir / "checkpoints" / "runs" / "dit_cifar10" / "version_0"
    assert f"checkpoint: {Path('checkpoints/runs/dit_cifar10/version_0/checkpoints/last.ckpt')}" in (
        capsys.readouterr().out)
    model = ConditionalDiffusion.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert model.hparams.label_dropout == 0.1 and model.denoiser.data_shape == (3, 32, 32)
    grid = run / "samples" / "step_2.png"
    from PIL import Image
    # one row of 8 per setting (none, paper), each under its caption row
    assert np.asarray(Image.open(grid)).shape == (2 * (CAPTION_HEIGHT + 32), 8 * 32, 3)


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    """A real toy2d checkpoint (2 steps) and what a user may pass instead: a missing file, its first 100 bytes,
    a torch.save'd object whose unpickling runs code, a plain pickle, and the checkpoint of a wider model
    without its hyperparameters (so Lightning cannot rebuild the matching model from them)."""
    import os
    import pickle

    root = tmp_path_factory.mktemp("ckpts")
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    main(["fit", "--config", str(REPO / "configs" / "toy2d.yaml"), "--trainer.max_steps", "2",
          "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
          "--model.net.init_args.hidden", "16", *SMALL_DATA])
    torch.set_num_threads(prev)
    real = root / "toy2d" / "version_0" / "checkpoints" / "last.ckpt"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {root / 'code_ran'}",)

    (root / "truncated.ckpt").write_bytes(real.read_bytes()[:100])
    torch.save({"state_dict": {}, "payload": RunsCode()}, root / "unsafe.ckpt")
    (root / "plain.pkl").write_bytes(pickle.dumps({"payload": RunsCode()}))
    other = torch.load(real, weights_only=True)
    other.pop("hyper_parameters")
    torch.save(other, root / "other_arch.ckpt")
    return root


@pytest.mark.parametrize("name, words", [
    ("missing.ckpt", ["missing.ckpt does not exist"]),
    ("truncated.ckpt", ["truncated.ckpt is not a PyTorch checkpoint", "truncated"]),
    ("unsafe.ckpt", ["unsafe.ckpt holds pickled objects", "could run code", "GLOBAL posix.system"]),
    ("plain.pkl", ["plain.pkl is not a PyTorch checkpoint"]),
    ("other_arch.ckpt", ["other_arch.ckpt holds another architecture", "x_proj.weight (16, 64) (needs (128, 64))"]),
])
def test_bad_ckpt_path_exits_2_with_one_line_and_writes_nothing(workdir, capsys, bad_checkpoints, name, words):
    before = files_under(workdir)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/toy2d.yaml", "--ckpt_path", str(bad_checkpoints / name), *SMALL_DATA])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert_one_error_line(err, [f"--ckpt_path {bad_checkpoints / name}", *words])
    assert files_under(workdir) == before and not (bad_checkpoints / "code_ran").exists()


@pytest.mark.parametrize("name, words", [
    ("missing.ckpt", ["does not exist"]),
    ("truncated.ckpt", ["is not a PyTorch checkpoint"]),
    ("unsafe.ckpt", ["holds pickled objects", "could run code"]),
])
def test_bad_experiment_checkpoint_exits_2_with_one_line_and_writes_nothing(workdir, capsys, monkeypatch,
                                                                             bad_checkpoints, name, words):
    from lightning_reg.experiments import toy1d
    from lightning_reg.experiments.common import main_guard

    before = files_under(workdir)
    monkeypatch.setattr(sys, "argv", ["toy1d", "--checkpoint", str(bad_checkpoints / name), "--out", "out"])
    with pytest.raises(SystemExit) as exit_info:
        main_guard(toy1d.main)
    assert exit_info.value.code == 2
    assert_one_error_line(capsys.readouterr().err, [f"--checkpoint {bad_checkpoints / name}", *words])
    assert files_under(workdir) == before and not (bad_checkpoints / "code_ran").exists()


@pytest.mark.slow  # a fresh interpreter: ~20 s on the shared CPU; the in-process tests above cover the logic
def test_bad_ckpt_path_from_the_command_line_is_one_line(workdir, bad_checkpoints):
    """The report as a user saw it: ``python train.py fit ... --ckpt_path <first 100 bytes>``."""
    before = files_under(workdir)
    result = run_train(workdir, "--ckpt_path", str(bad_checkpoints / "truncated.ckpt"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert_one_error_line(result.stderr, ["truncated.ckpt is not a PyTorch checkpoint"])
    assert files_under(workdir) == before


@pytest.mark.timeout(300)
def test_edm2_digits_overlay_trains_and_previews_unguided(workdir, capsys, one_thread):
    """``configs/edm2_digits.yaml`` on top of ``mnist.yaml`` through train.py: an EDM2 network on digits (the
    sklearn ones here) with EDM's loss and the learned uncertainty, its preview sampled unguided with Heun and
    read by a classifier; the checkpoint is an EDM2 network under EDM's schedule."""
    from lightning_reg.data.digits import prepare_digits
    from lightning_reg.diffusion.schedules import EDMSchedule
    from lightning_reg.models.edm2 import EDM2Precond
    from helpers import classifier_checkpoint

    prepare_digits("sklearn", workdir / "data")
    clf = classifier_checkpoint(workdir / "clf.ckpt", image_size=16, channels=1, num_classes=10)
    short = {"trainer": {"max_steps": 4, "val_check_interval": 2, "limit_val_batches": 1, "log_every_n_steps": 1,
                         "enable_progress_bar": False, "enable_model_summary": False,
                         "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                        "init_args": {"save_last": True}},
                                       {"class_path": "lightning_reg.callbacks.SamplingCallback",
                                        "init_args": {"name": "preview", "num_samples": 10, "batch_size": 10,
                                                      "sampler": "edm_heun", "steps": 2, "metrics": ["accuracy"],
                                                      "settings": [{"method": "cfg", "scale": 0.0, "reg": "none"}],
                                                      "feature_network": str(clf)}}],
                         "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                    "init_args": {"save_dir": "runs", "name": "edm2_digits"}}},
             "data": {"init_args": {"source": "sklearn", "batch_size": 8}}}
    (workdir / "short.yaml").write_text(yaml.safe_dump(short))
    main(["fit", "--config", "configs/mnist.yaml", "--config", "configs/edm2_digits.yaml", "--config", "short.yaml"])
    log_dir = workdir / "runs" / "edm2_digits" / "version_0"
    logged = (log_dir / "metrics.csv").read_text()
    assert "preview/cfg_w0_none/accuracy" in logged.splitlines()[0] and "train/loss" in logged
    model = ConditionalDiffusion.load_from_checkpoint(log_dir / "checkpoints" / "last.ckpt")
    assert isinstance(model.net, EDM2Precond) and isinstance(model.schedule, EDMSchedule)
    assert (model.schedule.p_mean, model.schedule.p_std) == (-0.8, 1.6) and model.hparams.uncertainty
    assert model.net.data_shape == (1, 16, 16) and model.num_classes == 10
