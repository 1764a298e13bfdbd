"""SamplingCallback on images with the digits-classifier feature network: every metric per setting, and an
image grid per setting in TensorBoard."""

from io import BytesIO

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from helpers import classifier_checkpoint

from lightning_reg.callbacks import SamplingCallback
from lightning_reg.data.images import ImageDataModule
from lightning_reg.data.synthetic_images import make_synthetic_image_dataset
from lightning_reg.diffusion.schedules import VPSchedule
from lightning_reg.errors import ConfigError
from lightning_reg.metrics.evaluate import image_metric_names
from lightning_reg.metrics.plots import CAPTION_HEIGHT, caption_row
from lightning_reg.models.unet import UNet
from lightning_reg.module import ConditionalDiffusion

SETTINGS = [{"method": "cfg", "scale": 1.0, "reg": "none"}, {"method": "cfg", "scale": 1.0, "reg": "paper"}]


def fit(tmp_path, callback: SamplingCallback) -> L.Trainer:
    """4 steps of a tiny UNet on 2-class 8x8 RGB patterns, validating (and sampling) at steps 2 and 4."""
    L.seed_everything(0)
    data = ImageDataModule(name=make_synthetic_image_dataset(tmp_path / "data", num_classes=2, n_per_class=8,
                                                             image_size=8),
                           image_size=8, batch_size=8, val_fraction=0.5)
    net = UNet(num_classes=2, image_size=8, channels=3, base_channels=8, channel_mult=(1,), attention_resolutions=())
    trainer = L.Trainer(max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1,
                        accelerator="cpu", callbacks=[callback], logger=TensorBoardLogger(tmp_path, name="tb"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(ConditionalDiffusion(net, VPSchedule(1000), lr=1e-3, warmup_steps=1), data)
    return trainer


def test_callback_logs_every_metric_and_a_grid_per_setting(tmp_path, one_thread):
    network = classifier_checkpoint(tmp_path / "clf.ckpt", image_size=8, channels=3, num_classes=2)
    callback = SamplingCallback(num_samples=8, steps=2, batch_size=8, settings=SETTINGS,
                                metrics=["fid", "is", "kid", "accuracy"], feature_network=str(network))
    trainer = fit(tmp_path, callback)
    settings = ("cfg_w1_none", "cfg_w1_paper")
    keys = {f"sample/{s}/{m}" for s in settings for m in ("fid", "is", "is_std", "kid", "kid_std", "accuracy")}
    assert keys <= set(trainer.callback_metrics)
    assert all(torch.isfinite(trainer.callback_metrics[k]) for k in keys)
    for s in settings:
        assert 0 <= float(trainer.callback_metrics[f"sample/{s}/accuracy"]) <= 1
        assert float(trainer.callback_metrics[f"sample/{s}/fid"]) > 0

    events = EventAccumulator(trainer.log_dir, size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert {f"sample/{s}/grid" for s in settings} <= set(tags["images"])
    assert [e.step for e in events.Images("sample/cfg_w1_paper/grid")] == [2, 4]
    grid = events.Images("sample/cfg_w1_none/grid")[0]
    assert (grid.height, grid.width) == (8, 8 * 8)  # 8 samples of 8x8 in one row of 8
    assert keys <= set(tags["scalars"])
    assert sorted(p.name for p in (tmp_path / "tb" / "version_0" / "samples").iterdir()) == ["step_2.png", "step_4.png"]

    # samples/step_4.png: each setting's grid (one row of 8) under a caption row naming it, in setting order
    png = np.asarray(Image.open(tmp_path / "tb" / "version_0" / "samples" / "step_4.png"))
    block = CAPTION_HEIGHT + 8
    assert png.shape == (len(settings) * block, 8 * 8, 3)  # the 2 stacked grids (16 rows) + a caption row each
    for i, s in enumerate(settings):
        caption, images = png[i * block:i * block + CAPTION_HEIGHT], png[i * block + CAPTION_HEIGHT:(i + 1) * block]
        assert (caption < 100).sum() > 20 and (caption > 200).any()  # dark text on a light row: not blank
        np.testing.assert_array_equal(caption, caption_row(s, 8 * 8))
        logged = Image.open(BytesIO(events.Images(f"sample/{s}/grid")[-1].encoded_image_string)).convert("RGB")
        np.testing.assert_array_equal(images, np.asarray(logged))  # this setting's grid at step 4
    assert not np.array_equal(png[:CAPTION_HEIGHT], png[block:block + CAPTION_HEIGHT])  # the names differ


def test_callback_refuses_a_feature_network_for_other_classes_before_training(tmp_path):
    network = classifier_checkpoint(tmp_path / "clf.ckpt", image_size=8, channels=3, num_classes=2)
    assert image_metric_names(None, str(network)) == ("fid", "is", "accuracy")  # a classifier adds accuracy
    assert image_metric_names(None, "inception") == ("fid", "is")
    other = classifier_checkpoint(tmp_path / "clf10.ckpt", image_size=8, channels=3, num_classes=10)
    with pytest.raises(ConfigError, match="has 10 classes but the samples have 2"):
        fit(tmp_path, SamplingCallback(num_samples=8, steps=2, batch_size=8, feature_network=str(other)))
    with pytest.raises(ConfigError, match="not both"):
        SamplingCallback(feature_network=str(network), feature_extractor=torch.nn.Identity())
