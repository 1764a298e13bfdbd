"""The sampling engine (per-sample determinism, sharding across ranks), the output writer, and the
validation-time SamplingCallback."""

import json

import urllib.error

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_reg.callbacks import SamplingCallback
from lightning_reg.cli import TrainCLI
from lightning_reg.data.images import ImageDataModule
from lightning_reg.data.synthetic_images import make_synthetic_image_dataset
from lightning_reg.data.toy import Toy2D, toy2d_distribution
from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import VPSchedule
from lightning_reg.errors import ConfigError
from lightning_reg.guidance import make_guidance
from lightning_reg.models.dit import DiT
from lightning_reg.models.mlp import ToyMLP
from lightning_reg.module import ConditionalDiffusion
from lightning_reg.oracle import ExactMixtureDenoiser
from lightning_reg.sampling.engine import (PerSampleNoise, balanced_labels, gather_by_index, generate, rank_indices,
                                           sample_seed, setting_name)
from lightning_reg.io.files import atomic_write, to_uint8_nhwc
from lightning_reg.sampling import writer


@pytest.fixture(scope="module")
def exact():
    return ExactMixtureDenoiser(toy2d_distribution(), VPSchedule(1000))


@pytest.fixture(scope="module")
def mlp_denoiser():
    torch.manual_seed(0)
    return Denoiser(ToyMLP(num_classes=2, dim=2, hidden=32, blocks=1, x_scale=1.0), VPSchedule(1000),
                    Prediction("eps")).eval()  # x_scale=1: smooth in x, so rounding is not amplified


def run(denoiser, reg, indices, batch_size, steps=6, seed=3):
    indices = torch.as_tensor(indices)
    labels = balanced_labels(100, 2)[indices]
    return generate(denoiser, make_guidance("cfg", scale=1.0, reg=reg), labels, indices, steps=steps, seed=seed,
                    batch_size=batch_size)


# ------------------------------------------------------------------------------------------ engine
def test_sample_seed_is_a_hash_of_seed_and_index():
    assert sample_seed(0, 5) == sample_seed(0, 5)
    # seed * 1_000_003 + i would give these two the same stream
    assert sample_seed(0, 1_000_003) != sample_seed(1, 0)
    assert 0 <= sample_seed(7, 123) < 2 ** 63


def test_per_sample_noise_row_i_is_generator_i():
    noise = PerSampleNoise(seed=4, indices=[9, 2])
    first, second = noise.draw((3,)), noise(torch.zeros(2, 3, dtype=torch.float64))
    g9 = torch.Generator().manual_seed(sample_seed(4, 9))
    g2 = torch.Generator().manual_seed(sample_seed(4, 2))
    assert torch.equal(first, torch.stack([torch.randn(3, generator=g9), torch.randn(3, generator=g2)]))
    assert second.dtype == torch.float64  # the sampler's x dtype; the next draw of each stream
    assert torch.equal(second, torch.stack([torch.randn(3, generator=g9), torch.randn(3, generator=g2)]).double())


def test_balanced_labels_and_rank_indices():
    assert balanced_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert rank_indices(10, 1, 3).tolist() == [1, 4, 7]
    assert rank_indices(10, 0, 3).tolist() == [0, 3, 6, 9]
    with pytest.raises(ConfigError, match="num_classes"):
        balanced_labels(4, 0)


def test_gather_by_index_reassembles_index_order():
    n, world = 10, 3
    rows = torch.arange(n * 2).reshape(n, 2)
    locals_ = [rows[rank_indices(n, r, world)] for r in range(world)]
    padded = []

    def fake_all_gather(t):  # what every rank contributes, stacked as (W, m, ...)
        padded.append(t)
        return torch.stack([torch.cat([loc, t.new_zeros(len(t) - len(loc), 2)]) for loc in locals_])

    assert torch.equal(gather_by_index(locals_[2], n, world, fake_all_gather), rows)
    assert padded[0].shape == (4, 2)  # ceil(10 / 3) rows after padding rank 2's three
    assert gather_by_index(rows, n, 1, fake_all_gather) is rows


def test_setting_name():
    assert setting_name({"method": "cfg", "scale": 1.0, "reg": "paper"}) == "cfg_w1_paper"
    assert setting_name({"method": "cfg", "scale": 1.5, "reg": "none", "convention": "w2"}) == "cfg_w2x1.5_none"
    assert setting_name({"method": "interval", "scale": 2, "t_lo": 205, "t_hi": 502, "reg": "vjp"}) == \
        "interval_w2_vjp_t_hi502_t_lo205"
    assert setting_name({"method": "conditional"}) == "conditional_w0_none"
    # lists join with "-": a folder name without brackets, commas or spaces
    assert setting_name({"method": "cfg", "scale": 1, "reg": "window", "reg_window": [0, 0.3]}) == \
        "cfg_w1_window_reg_window0-0.3"
    assert setting_name({"method": "cfg", "guidance_channels": [0, 1, 2]}) == "cfg_w1_none_guidance_channels0-1-2"
    # a term's mapping as key and value; a layer regex's characters dropped
    assert setting_name({"method": "cfg", "scale": 7.5, "convention": "w2", "reg": "paper",
                         "pag": {"scale": 3.0, "layers": ["^mid$", "up/0"]}}) == \
        "cfg_w2x7.5_paper_paglayersmid-up0-scale3"
    assert setting_name({"method": "cfg", "pag": {"scale": 3, "layers": ["up.1"]}}) == \
        "cfg_w1_none_paglayersup.1-scale3"
    assert setting_name({"method": "cfg", "scale": 4.5, "convention": "w2", "reg": "paper", "slg": {
        "scale": 2.8, "layers": [7, 8, 9], "start": 0.01, "stop": 0.08}}) == \
        "cfg_w2x4.5_paper_slglayers7-8-9-scale2.8-start0.01-stop0.08"
    # floats as %g, a tuple as a list: exponents keep their sign, nothing else is added
    assert setting_name({"method": "cfg", "scale": 1e-5, "reg": "window", "reg_window": (0.0, 1e-3)}) == \
        "cfg_w1e-05_window_reg_window0-0.001"


@pytest.mark.parametrize("reg", ["none", "paper"])
def test_rows_bit_identical_whatever_the_batch_and_order(exact, reg):
    """Elementwise (exact) denoiser: batch 7 vs 64, and reversed index order, give bit-identical rows."""
    indices = torch.arange(20)
    a = run(exact, reg, indices, batch_size=64)
    b = run(exact, reg, indices, batch_size=7)
    c = run(exact, reg, indices.flip(0), batch_size=5).flip(0)
    assert a.shape == (20, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, run(exact, reg, indices, batch_size=64, seed=4))  # the seed matters


def test_rank_split_equals_single_process(mlp_denoiser):
    """A network's matmuls may round differently per batch size, so here equality is up to float32 rounding."""
    n, world = 23, 3
    full = run(mlp_denoiser, "paper", torch.arange(n), batch_size=64)
    per_rank = [run(mlp_denoiser, "paper", rank_indices(n, r, world), batch_size=4) for r in range(world)]
    gathered = gather_by_index(per_rank[0], n, world, lambda t: torch.stack(
        [torch.cat([p, p.new_zeros(len(t) - len(p), 2)]) for p in per_rank]))
    torch.testing.assert_close(gathered, full, rtol=1e-4, atol=1e-5)


def test_generate_under_inference_mode_with_reg(mlp_denoiser):
    """Lightning validation runs under inference_mode; REG still takes its backward pass there."""
    expected = run(mlp_denoiser, "vjp", range(6), batch_size=6)
    with torch.inference_mode():
        got = run(mlp_denoiser, "vjp", range(6), batch_size=6)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(expected, run(mlp_denoiser, "none", range(6), batch_size=6), atol=1e-4)


def test_generate_bad_input(mlp_denoiser):
    guidance = make_guidance("cfg")
    with pytest.raises(ConfigError, match="one entry per sample"):
        generate(mlp_denoiser, guidance, [0, 1], [0], steps=2, seed=0, batch_size=2)
    with pytest.raises(ConfigError, match="steps must be a positive integer"):
        generate(mlp_denoiser, guidance, [0], [0], steps=0, seed=0, batch_size=2)
    with pytest.raises(ConfigError, match=r"label ids must lie in \[0, 1\]"):
        generate(mlp_denoiser, guidance, [2], [0], steps=2, seed=0, batch_size=2)
    with pytest.raises(ConfigError, match="unknown sampler"):
        generate(mlp_denoiser, guidance, [0], [0], sampler="euler", steps=2, seed=0, batch_size=2)


# ------------------------------------------------------------------------------------------ writer
def test_shard_ranges_and_uint8_conversion():
    assert writer.shard_ranges(25, 10) == [range(0, 10), range(10, 20), range(20, 25)]
    images = torch.tensor([-1.0, -0.5, 0.0, 1.0, 1.2, -3.0]).reshape(1, 3, 2, 1)  # (N, C, H, W)
    out = to_uint8_nhwc(images)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 1, 3)
    # channel c, row h = images[0, c, h, 0]: round((x + 1) * 127.5) clipped; 63.75 -> 64, 127.5 -> 128
    assert out[0, :, 0, :].T.tolist() == [[0, 64], [128, 255], [255, 0]]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def broken(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(tmp_path / "x.npz", broken)
    assert list(tmp_path.iterdir()) == []
    writer.write_shard(tmp_path, 3, torch.arange(2), torch.ones(2, 2), torch.zeros(2, dtype=torch.long))
    assert [p.name for p in tmp_path.iterdir()] == ["shard_00003.npz"]


def test_output_folder_fingerprint(tmp_path):
    out, shape = tmp_path / "run", (2,)
    fp = {"seed": 0, "steps": 25, "num_samples": 4, "shard_size": 2}
    other = {**fp, "seed": 1}
    writer.check_output(out, fp, False, shape)
    assert not out.exists()  # checking creates nothing
    writer.prepare_output(out, fp, False, shape)
    writer.write_shard(out, 0, torch.arange(2), torch.ones(2, 2), torch.zeros(2, dtype=torch.long))
    (out / "notes.txt").write_text("mine")
    writer.check_output(out, dict(fp), False, shape)  # a restart of the same run is fine
    with pytest.raises(ConfigError, match=r"shard_00000.npz is not a sampling shard \(it holds 2 samples of shape "
                                          r"\(2,\); this run's shard 0 holds 2 of shape \(3,\)\); delete it"):
        writer.check_output(out, fp, False, (3,))
    with pytest.raises(ConfigError, match=r"arguments differ in \['seed'\].*--overwrite"):
        writer.check_output(out, other, False, shape)
    writer.prepare_output(out, other, True, shape)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "run.json"]  # only the run's files go
    assert json.loads((out / "run.json").read_text()) == other
    (out / "run.json").unlink()
    writer.write_shard(out, 0, torch.arange(2), torch.ones(2, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ConfigError, match="has no run.json"):
        writer.check_output(out, fp, False, shape)


def test_links_among_a_runs_files_are_refused_before_anything_is_deleted(tmp_path):
    out, elsewhere, shape = tmp_path / "run", tmp_path / "elsewhere", (2,)
    fp = {"seed": 0, "num_samples": 2, "shard_size": 2}
    writer.prepare_output(out, fp, False, shape)
    elsewhere.mkdir()
    (elsewhere / "000000.png").write_text("theirs")
    (out / "images").symlink_to(elsewhere)
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=r"images is a link to .*elsewhere; a run never writes"):
            writer.prepare_output(out, fp, overwrite, shape)
    assert sorted(p.name for p in out.iterdir()) == ["images", "run.json"]
    assert [p.read_text() for p in elsewhere.iterdir()] == ["theirs"]
    linked = tmp_path / "linked"
    linked.symlink_to(out)  # --output itself a link: the user's choice, followed
    (out / "images").unlink()
    writer.prepare_output(linked, fp, True, shape)
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]


# ---------------------------------------------------------------------------------------- callback
def tiny_fit(tmp_path, callback, max_steps=40, images=False):
    """40 steps (validation every 20) of a small, smooth (x_scale=1) ToyMLP with a fast EMA; with ``images``,
    4 steps (validation every 2) of a tiny DiT on 8x8 synthetic images (2 classes, 8 validation images)."""
    L.seed_everything(0)
    if images:
        net = DiT(num_classes=2, input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                  learn_sigma=False)
        data = ImageDataModule(name=make_synthetic_image_dataset(tmp_path / "images", num_classes=2, n_per_class=16,
                                                                 image_size=8),
                               image_size=8, batch_size=8, val_fraction=0.25)
        max_steps, every = 4, 2
    else:
        net = ToyMLP(num_classes=2, dim=2, hidden=32, blocks=1, x_scale=1.0)
        data, every = Toy2D(num_train=2048, num_val=128, batch_size=128), 20
    model = ConditionalDiffusion(net, VPSchedule(1000), lr=5e-3, warmup_steps=5, ema_decay=0.5)
    trainer = L.Trainer(max_steps=max_steps, val_check_interval=every, check_val_every_n_epoch=None,
                        limit_val_batches=1, accelerator="cpu", devices=1,
                        callbacks=callback if isinstance(callback, list) else [callback],
                        logger=CSVLogger(tmp_path, name="toy"), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    return trainer


def test_callback_logs_one_metric_per_setting(tmp_path):
    trainer = tiny_fit(tmp_path, SamplingCallback(num_samples=64, steps=8, batch_size=32))
    settings = ["cfg_w1_none", "cfg_w1_paper", "cfg_w1_vjp"]
    metrics = ["log_likelihood", "energy_distance", "sliced_wasserstein", "on_shape"]
    keys = {f"sample/{s}/{m}" for s in settings for m in metrics}
    assert keys <= set(trainer.callback_metrics)
    assert all(torch.isfinite(trainer.callback_metrics[k]) for k in keys)
    assert 0 <= float(trainer.callback_metrics["sample/cfg_w1_paper/on_shape"]) <= 1
    log_dir = tmp_path / "toy" / "version_0"
    header = (log_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert keys <= set(header)
    assert sorted(p.name for p in (log_dir / "samples").iterdir()) == ["step_20.png", "step_40.png"]


def test_two_callbacks_log_and_save_apart(tmp_path):
    """A small ``preview`` callback at every validation beside the default one at every 2nd: own keys, own
    figure folders and own resumable counts in the checkpoint."""
    one = [{"method": "cfg", "scale": 1.0, "reg": "none"}]
    preview = SamplingCallback(name="preview", num_samples=8, steps=2, settings=one, metrics=["on_shape"])
    final = SamplingCallback(every_n_val_epochs=2, num_samples=16, steps=2, settings=one, metrics=["on_shape"])
    trainer = tiny_fit(tmp_path, [preview, final])
    assert {"preview/cfg_w1_none/on_shape", "sample/cfg_w1_none/on_shape"} <= set(trainer.callback_metrics)
    log_dir = tmp_path / "toy" / "version_0"
    assert sorted(p.name for p in (log_dir / "previews").iterdir()) == ["step_20.png", "step_40.png"]
    assert [p.name for p in (log_dir / "samples").iterdir()] == ["step_40.png"]
    states = trainer._checkpoint_connector.dump_checkpoint()["callbacks"]
    assert {k: v["val_runs"] for k, v in states.items() if k.startswith("SamplingCallback")} == {
        "SamplingCallback{'name': 'preview'}": 2, "SamplingCallback{'name': 'sample'}": 2}
    with pytest.raises(ConfigError, match="name must be a non-empty word"):
        SamplingCallback(name="a/b")


def test_callback_every_n_val_epochs_and_bad_settings(tmp_path):
    tiny_fit(tmp_path, SamplingCallback(every_n_val_epochs=2, num_samples=8, steps=2,
                                        settings=[{"method": "cfg", "scale": 1.0, "reg": "none"}]))
    assert [p.name for p in (tmp_path / "toy" / "version_0" / "samples").iterdir()] == ["step_40.png"]
    with pytest.raises(ConfigError, match="distinct"):
        SamplingCallback(settings=[{"method": "cfg"}, {"method": "cfg", "scale": 1.0}])
    with pytest.raises(ConfigError, match="unknown guidance method"):
        SamplingCallback(settings=[{"method": "classifier"}])
    with pytest.raises(ConfigError, match="every_n_val_epochs"):
        SamplingCallback(every_n_val_epochs=0)


class PooledPixels(nn.Module):
    """Stand-in for Inception (no weights to fetch): 4x4-pooled pixels of uint8 NCHW images, 48 features.
    ``batch_sizes`` records every call."""

    def __init__(self):
        super().__init__()
        self.batch_sizes = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(len(images))
        return nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)


def test_callback_image_metrics_per_setting_with_real_features_once(tmp_path):
    settings = [{"method": "cfg", "scale": 1.0, "reg": "none"}, {"method": "cfg", "scale": 1.0, "reg": "paper"}]
    features = PooledPixels()
    callback = SamplingCallback(num_samples=8, steps=2, batch_size=8, settings=settings,
                                metrics=["fid", "is", "kid"], feature_extractor=features)
    trainer = tiny_fit(tmp_path, callback, images=True)
    keys = {f"sample/{s}/{m}" for s in ("cfg_w1_none", "cfg_w1_paper")
            for m in ("fid", "is", "is_std", "kid", "kid_std")}
    assert keys <= set(trainer.callback_metrics)
    assert all(torch.isfinite(trainer.callback_metrics[k]) for k in keys)
    assert float(trainer.callback_metrics["sample/cfg_w1_paper/fid"]) > 0
    # one feature pass per image set: the 8 validation images once (for FID and KID), the 8 samples of each
    # of 2 validations x 2 settings once (for all three metrics); the one-image width probe at construction aside
    assert features.batch_sizes.count(8) == 1 + 2 * 2
    assert int(callback.image_metrics.metrics["fid"].real_features_num_samples) == 8
    log_dir = tmp_path / "toy" / "version_0"
    assert sorted(p.name for p in (log_dir / "samples").iterdir()) == ["step_2.png", "step_4.png"]


def test_callback_metrics_are_checked_against_the_data_before_training(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"SamplingCallback metrics: unknown \['lpips'\]"):
        SamplingCallback(metrics=["fid", "lpips"])
    with pytest.raises(ConfigError, match=r"metrics of 2D toy data: unknown \['fid'\]"):
        tiny_fit(tmp_path, SamplingCallback(metrics=["fid"]))
    with pytest.raises(ConfigError, match="image data.*unknown.*on_shape"):
        tiny_fit(tmp_path, SamplingCallback(metrics=["on_shape"]), images=True)

    import torch_fidelity.feature_extractor_inceptionv3 as inception

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
    steps = []

    class Steps(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            steps.append(trainer.global_step)

    with pytest.raises(ConfigError, match="pt_inception-2015-12-05"):  # default metrics [fid, is] on Inception
        L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, callbacks=[SamplingCallback(), Steps()]).fit(
            ConditionalDiffusion(DiT(num_classes=2, input_size=8, in_channels=3, hidden_size=32, depth=1, num_heads=2,
                                                 patch_size=2, learn_sigma=False)),
            ImageDataModule(name=make_synthetic_image_dataset(tmp_path / "img", num_classes=2, n_per_class=4,
                                                              image_size=8), image_size=8, batch_size=4))
    assert steps == []  # refused before the first training step


@pytest.mark.parametrize("config", ["configs/toy2d.yaml", "configs/toy1d.yaml"])
def test_toy_configs_attach_the_callback(config):
    cli = TrainCLI(ConditionalDiffusion, L.LightningDataModule, subclass_mode_data=True, run=False,
                   args=["--config", config, "--trainer.logger", "false"])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, SamplingCallback)]
    assert set(callback.guidances) == {"cfg_w1_none", "cfg_w1_paper", "cfg_w1_vjp"}


def test_metrics_table_rows_per_setting():
    from lightning_reg.callbacks import metrics_table
    table = metrics_table({"cfg_w1_none": {"fid": 12.3456, "is": 3.0}, "cfg_w1_paper": {"fid": 10.0}})
    header, first, second = table.splitlines()
    assert header.split() == ["setting", "fid", "is"]
    assert first.split() == ["cfg_w1_none", "12.35", "3"]
    assert second.split() == ["cfg_w1_paper", "10", "nan"]
    assert len({len(header), len(first), len(second)}) == 1  # aligned
