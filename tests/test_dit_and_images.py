"""Tests for the DiT backbone and the Hugging Face image data module (CPU, offline)."""

import pytest
import torch

from lightning_reg.data.images import ImageDataModule
from lightning_reg.errors import ConfigError
from lightning_reg.data.synthetic_images import make_synthetic_image_dataset
from lightning_reg.models.dit import DiT


def _perturbed_dit(**kw) -> DiT:
    """A DiT whose zero-initialised adaLN/output layers are randomised so outputs are non-trivial."""
    torch.manual_seed(0)
    model = DiT(**kw)
    layers = [b.adaLN_modulation[-1] for b in model.blocks]
    layers += [model.final_layer.adaLN_modulation[-1], model.final_layer.linear]
    with torch.no_grad():
        for layer in layers:
            layer.weight.normal_(0, 0.05)
            layer.bias.normal_(0, 0.05)
    return model.eval()


SMALL = dict(input_size=16, patch_size=4, in_channels=3, hidden_size=32, num_heads=2, learn_sigma=False)


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_classes=10, input_size=32, in_channels=3, patch_size=4, hidden_size=64, depth=2, num_heads=4,
             learn_sigma=False),
        dict(num_classes=3, input_size=16, in_channels=1, patch_size=2, hidden_size=48, depth=1, num_heads=3),
    ],
)
def test_dit_shapes_and_attributes(kw):
    model = DiT(**kw)
    c, s = kw["in_channels"], kw["input_size"]
    assert model.num_classes == kw["num_classes"]
    assert model.data_shape == (c, s, s)
    assert model.label_embedding.num_embeddings == kw["num_classes"] + 1
    x = torch.randn(3, c, s, s)
    t = torch.tensor([0.0, 500.0, 999.0])
    y = torch.tensor([0, 1, kw["num_classes"]])  # includes the null label
    out = model(x, t, y)
    assert out.shape == (3, 2 * c if kw.get("learn_sigma", True) else c, s, s)  # learned sigma: 2C channels
    assert torch.count_nonzero(out) == 0  # zero-initialised final layer (adaLN-Zero)


def test_dit_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="input_size=10 must be divisible by patch_size=4"):
        DiT(**dict(SMALL, input_size=10))
    with pytest.raises(ConfigError, match="hidden_size=30 must be divisible by 4 and by num_heads=2"):
        DiT(**dict(SMALL, hidden_size=30))


def test_dit_null_label_and_negative_times():
    model = _perturbed_dit(num_classes=5, depth=2, **SMALL)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([-3.5, 0.25])
    null = torch.full((2,), 5, dtype=torch.long)
    out_null = model(x, t, null)
    out_cond = model(x, t, torch.tensor([1, 2]))
    assert torch.isfinite(out_null).all()
    assert not torch.allclose(out_null, out_cond)  # the null label is a distinct condition
    with pytest.raises(IndexError):
        model(x, t, torch.tensor([6, 0]))  # beyond the null id


def test_dit_per_sample_independence():
    model = _perturbed_dit(num_classes=4, depth=2, **SMALL)
    x = torch.randn(5, 3, 16, 16)
    t = torch.rand(5) * 1000
    y = torch.tensor([0, 1, 2, 3, 4])
    with torch.no_grad():
        batched = model(x, t, y)
        single = torch.cat([model(x[i : i + 1], t[i : i + 1], y[i : i + 1]) for i in range(5)])
    assert batched.abs().max() > 0
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


def test_dit_gradient_wrt_x():
    model = _perturbed_dit(num_classes=4, depth=1, **SMALL)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    model(x, torch.tensor([10.0, 20.0]), torch.tensor([0, 4])).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_image_datamodule_on_synthetic(tmp_path):
    path = make_synthetic_image_dataset(tmp_path / "synth", num_classes=4, n_per_class=8, image_size=16)
    dm = ImageDataModule(name=path, image_size=8, batch_size=6, val_fraction=0.25, seed=1)
    assert dm.num_classes == 4
    assert dm.data_shape == (3, 8, 8)
    dm.setup("fit")
    assert len(dm.train_set) == 24 and len(dm.val_set) == 8
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (6, 3, 8, 8) and x.dtype == torch.float32
    assert y.shape == (6,) and y.dtype == torch.long
    assert x.min() >= -1 and x.max() <= 1 and x.min() < 0 < x.max()
    assert ((y >= 0) & (y < 4)).all()

    # deterministic split; max_samples and grayscale
    dm2 = ImageDataModule(name=path, image_size=8, val_fraction=0.25, seed=1)
    dm2.setup()
    assert dm2.val_set.indices == dm.val_set.indices
    gray = ImageDataModule(name=path, image_size=12, channels=1, batch_size=4, max_samples=10)
    assert gray.data_shape == (1, 12, 12)
    gray.setup()
    assert len(gray.train_set) + len(gray.val_set) == 10
    xg, _ = next(iter(gray.val_dataloader()))
    assert xg.shape[1:] == (1, 12, 12)


def test_image_datamodule_bad_key_lists_columns(tmp_path):
    path = make_synthetic_image_dataset(tmp_path / "synth", num_classes=2, n_per_class=2, image_size=8)
    with pytest.raises(ConfigError, match=r"image_key='image'.*available columns: \['img', 'label'\]"):
        ImageDataModule(name=path, image_key="image").setup()
    with pytest.raises(ConfigError, match="label_key='labels'"):
        ImageDataModule(name=path, label_key="labels").setup()


def test_image_datamodule_negative_labels(tmp_path):
    import datasets
    from PIL import Image

    ds = datasets.Dataset.from_dict(
        {"img": [Image.new("RGB", (8, 8))] * 2, "label": [0, -1]},
        features=datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")}),
    )
    ds.save_to_disk(str(tmp_path / "neg"))
    with pytest.raises(ConfigError, match="negative labels"):
        ImageDataModule(name=str(tmp_path / "neg")).setup()


def test_image_datamodule_offline_hub_name(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The libraries read the variable at import time, so also patch the cached flags (no network retries).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    dm = ImageDataModule(name="no-such-user-xyz/no-such-dataset", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="pre-downloaded into cache_dir"):
        dm.setup()


def test_image_datamodule_random_flip_only_on_training_images(tmp_path):
    path = make_synthetic_image_dataset(tmp_path / "synth", num_classes=4, n_per_class=2, image_size=8)
    plain = ImageDataModule(name=path, image_size=8, val_fraction=0.25, seed=1)
    flip = ImageDataModule(name=path, image_size=8, val_fraction=0.25, seed=1, random_flip=True)
    plain.setup()
    flip.setup()
    torch.manual_seed(0)
    for i in range(len(plain.val_set)):
        assert torch.equal(flip.val_set[i][0], plain.val_set[i][0])
    draws = [flip.train_set[0][0] for _ in range(20)]
    original, mirrored = plain.train_set[0][0], plain.train_set[0][0].flip(-1)
    assert not torch.equal(original, mirrored)
    assert all(torch.equal(x, original) or torch.equal(x, mirrored) for x in draws)
    assert any(torch.equal(x, original) for x in draws) and any(torch.equal(x, mirrored) for x in draws)


@pytest.mark.parametrize("kwargs, words", [
    (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
    (dict(channels=4), "channels must be 1"),
    (dict(val_fraction=1.0), "val_fraction"),
    (dict(max_samples=1), "max_samples must be an integer >= 2"),
])
def test_image_datamodule_bad_settings(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        ImageDataModule(**kwargs)
