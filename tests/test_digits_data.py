"""Offline digits (prepare step, Digits data module) and ImageDataModule's image sources and bad input."""

import numpy as np
import pytest
import torch

from lightning_reg.data.digits import Digits, prepare_digits, stratified_test_mask
from lightning_reg.data.images import ImageDataModule
from lightning_reg.errors import ConfigError


@pytest.fixture(scope="module")
def sklearn_digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    return root, prepare_digits("sklearn", root)


def test_prepare_writes_rows_labels_and_split(sklearn_digits, capsys):
    import datasets
    from sklearn.datasets import load_digits

    root, path = sklearn_digits
    assert path == root / "digits_sklearn" and sorted(p.name for p in root.iterdir()) == ["digits_sklearn"]
    ds = datasets.load_from_disk(str(path))
    assert set(ds) == {"train", "test"} and (ds["train"].num_rows, ds["test"].num_rows) == (1438, 359)
    assert ds["train"].features["label"].names == [str(c) for c in range(10)]
    counts = np.bincount(ds["test"]["label"], minlength=10)
    assert counts.tolist() == np.round(0.2 * np.bincount(load_digits().target)).astype(int).tolist()
    image = ds["test"][0]["image"]
    assert image.mode == "L" and image.size == (8, 8)
    assert np.asarray(image).max() == 255  # 0..16 scaled to 0..255
    # idempotent: a second call finds the folder and writes nothing
    stamp = (path / "dataset_dict.json").stat().st_mtime_ns
    capsys.readouterr()
    assert prepare_digits("sklearn", root) == path
    assert (path / "dataset_dict.json").stat().st_mtime_ns == stamp and capsys.readouterr().err == ""


def test_prepare_mnist_split_is_stratified_and_deterministic(tmp_path):
    import datasets

    path = prepare_digits("mnist", tmp_path)
    ds = datasets.load_from_disk(str(path))
    assert (ds["train"].num_rows, ds["test"].num_rows) == (4000, 1000)
    assert np.bincount(ds["test"]["label"]).tolist() == [100] * 10
    assert ds["train"][0]["image"].size == (28, 28)
    labels = np.repeat(np.arange(3), 10)
    assert np.array_equal(stratified_test_mask(labels), stratified_test_mask(labels))
    assert stratified_test_mask(labels).reshape(3, 10).sum(1).tolist() == [2, 2, 2]


def test_prepare_refuses_a_foreign_folder_and_unknown_source(tmp_path):
    (tmp_path / "digits_sklearn").mkdir()
    (tmp_path / "digits_sklearn" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists but is not a prepared digits dataset"):
        prepare_digits("sklearn", tmp_path)
    with pytest.raises(ConfigError, match="source='emnist'"):
        prepare_digits("emnist", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits_sklearn"]  # no temporary folder left


def test_digits_module_trains_on_train_validates_on_test(sklearn_digits, one_thread):
    root, _ = sklearn_digits
    dm = Digits(source="sklearn", root=str(root), image_size=16, batch_size=8)
    assert dm.num_classes == 10 and dm.data_shape == (1, 16, 16)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (1438, 359)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 16, 16) and x.min() >= -1 and x.max() <= 1 and y.dtype == torch.long
    subset = Digits(source="sklearn", root=str(root), classes=[0, 1, 2, 3, 4])
    subset.setup()
    assert subset.num_classes == 5
    labels = subset.val_set.labels.tolist()
    assert set(labels) == {0, 1, 2, 3, 4} and len(labels) == 180


def test_digits_prepares_on_first_use(tmp_path):
    dm = Digits(source="sklearn", root=str(tmp_path / "fresh"))
    assert dm.num_classes == 10  # read before prepare_data (as train.py's check does)
    assert (tmp_path / "fresh" / "digits_sklearn" / "dataset_dict.json").is_file()


def test_val_split_and_val_fraction_are_exclusive(sklearn_digits):
    with pytest.raises(ConfigError, match="not both"):
        ImageDataModule(name="x", val_split="test", val_fraction=0.1)
    with pytest.raises(ConfigError, match="is the training split"):
        ImageDataModule(name="x", val_split="train")
    root, path = sklearn_digits
    with pytest.raises(ConfigError, match=r"split='valid' not in .*available splits: \['train', 'test'\]"):
        ImageDataModule(name=str(path), image_key="image", val_split="valid").setup()


def write_image_tree(root, broken: bool = False):
    """Two class folders of images of mixed sizes and modes (RGBA PNG, L PNG, palette GIF, CMYK JPEG)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (12, 20, 4), dtype=np.uint8), "RGBA").save(root / cls / "a.png")
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), "L").save(root / cls / "b.png")
        Image.fromarray(rng.integers(0, 255, (30, 10, 3), dtype=np.uint8)).convert("P").save(root / cls / "c.gif")
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).convert("CMYK").save(root / cls / "d.jpg")
    if broken:
        (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut off here")
    return root


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_loads_mixed_sizes_and_modes_with_folder_labels(tmp_path, channels, one_thread):
    tree = write_image_tree(tmp_path / "tree")
    dm = ImageDataModule(name=str(tree), image_key="image", image_size=8, channels=channels, val_fraction=0.25,
                         cache_dir=str(tmp_path / "cache"), batch_size=8)
    assert dm.num_classes == 2
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (6, 2)
    features = dm.train_set.hf.features["label"]
    assert features.names == ["cat", "dog"]
    paths = [dm.train_set.hf[r]["image"]["path"] for r in dm.train_set.indices]
    labels = [int(dm.train_set[i][1]) for i in range(len(dm.train_set))]
    assert labels == [features.names.index(p.split("/")[-2]) for p in paths]
    x = torch.stack([dm.train_set[i][0] for i in range(6)])
    assert x.shape == (6, channels, 8, 8) and x.min() >= -1 and x.max() <= 1 and x.std() > 0.1


def test_corrupt_image_is_named_at_setup_or_at_first_decode(tmp_path):
    tree = write_image_tree(tmp_path / "tree", broken=True)
    kwargs = dict(name=str(tree), image_key="image", image_size=8, val_fraction=0.25, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match=r"cannot decode the image .*dog/broken.png \(row \d+ of split 'train'"):
        ImageDataModule(**kwargs).setup()
    lazy = ImageDataModule(**kwargs, verify_images=False)
    lazy.setup()  # no check: the broken file fails with the same message when first loaded
    rows = [lazy.train_set.hf[r]["image"]["path"].endswith("broken.png") for r in lazy.train_set.indices]
    data = lazy.train_set if any(rows) else lazy.val_set
    broken = next(i for i, r in enumerate(data.indices) if data.hf[r]["image"]["path"].endswith("broken.png"))
    with pytest.raises(ConfigError, match="cannot decode the image .*broken.png"):
        data[broken]


def test_bad_image_data_in_a_training_run_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """``train.py fit`` on an image tree with a corrupt file, and on a dataset without the label column."""
    import datasets
    from PIL import Image

    from lightning_reg.cli import main

    tree = write_image_tree(tmp_path / "tree", broken=True)
    datasets.Dataset.from_dict({"image": [Image.new("L", (8, 8))] * 4}).save_to_disk(str(tmp_path / "unlabeled"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    common = ["fit", "--model.net", "lightning_reg.models.unet.UNet", "--model.net.num_classes", "2",
              "--model.net.image_size", "8", "--model.net.base_channels", "8", "--model.net.attention_resolutions",
              "[]", "--data", "lightning_reg.data.images.ImageDataModule", "--data.image_key", "image",
              "--data.image_size", "8", "--data.channels", "1", "--data.cache_dir", str(tmp_path / "cache"),
              "--trainer.max_steps", "1", "--trainer.accelerator", "cpu", "--seed_everything", "0"]
    for name, words in ((tree, "cannot decode the image"), (tmp_path / "unlabeled", "label_key='label' is not a column")):
        with pytest.raises(SystemExit) as exit_info:
            main([*common, "--data.name", str(name)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and [line for line in err.splitlines() if line.startswith("error:")] == [
            next(line for line in err.splitlines() if words in line)], err
        assert list(work.iterdir()) == []


def test_hub_name_loads_both_splits_through_load_dataset(monkeypatch, tmp_path):
    """A hub name (``ylecun/mnist``: columns image/label) goes to ``datasets.load_dataset(name, split=,
    cache_dir=)`` once per split; here it answers from memory, as a cached download would."""
    import datasets
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    calls = []

    def load_dataset(name, split, cache_dir):
        calls.append((name, split, cache_dir))
        n = {"train": 20, "test": 10}[split]
        return datasets.Dataset.from_dict({"image": [Image.new("L", (28, 28), color=i) for i in range(n)],
                                           "label": [i % 10 for i in range(n)]}, features=features)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    dm = ImageDataModule(name="ylecun/mnist", image_key="image", channels=1, image_size=16, val_split="test",
                         cache_dir=str(tmp_path))
    assert dm.num_classes == 10
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (20, 10)
    assert calls == [("ylecun/mnist", "train", str(tmp_path)), ("ylecun/mnist", "test", str(tmp_path))]
    assert dm.val_set[3][0].shape == (1, 16, 16)


def test_in_memory_images_equal_decoded_ones(sklearn_digits):
    root, _ = sklearn_digits
    cached = Digits(source="sklearn", root=str(root), image_size=12, max_samples=40)
    decoded = Digits(source="sklearn", root=str(root), image_size=12, max_samples=40, in_memory=False)
    cached.setup()
    decoded.setup()
    assert cached.train_set.cache.shape == (40, 1, 12, 12) and cached.train_set.cache.dtype == torch.uint8
    assert decoded.train_set.cache is None
    for i in (0, 17, 39):
        assert torch.equal(cached.train_set[i][0], decoded.train_set[i][0])
        assert cached.train_set[i][1] == decoded.train_set[i][1]
