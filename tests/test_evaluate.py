"""``evaluate.py``: a samples.npz + reference + feature network -> one JSON/CSV row; bad input -> one line, no file."""

import csv
import json
import re

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers import classifier_checkpoint

from lightning_reg.data.digits import load_digit_arrays
from lightning_reg.data.synthetic_images import make_synthetic_image_dataset
from lightning_reg.metrics.classifier import load_feature_network
from lightning_reg.metrics.evaluate import load_reference, main
from lightning_reg.metrics.images import ImageMetrics


@pytest.fixture
def run_dir(tmp_path, one_thread):
    """``samples.npz`` (60 sklearn digits, 8x8x1, with labels), ``reference.npz`` (100 others), a classifier."""
    images, labels = load_digit_arrays("sklearn")
    np.savez(tmp_path / "samples.npz", samples=images[:60, ..., None], labels=labels[:60])
    np.savez(tmp_path / "reference.npz", arr_0=images[100:200, ..., None])
    classifier_checkpoint(tmp_path / "clf.ckpt")
    return tmp_path


def evaluate(run_dir, *extra):
    main(["--samples", str(run_dir / "samples.npz"), "--reference", str(run_dir / "reference.npz"),
          "--feature_network", str(run_dir / "clf.ckpt"), "--reference_cache", str(run_dir / "cache"), *extra])


def test_writes_a_json_row_and_appends_csv_rows(run_dir):
    """The row holds ``ImageMetrics``' values on the same images and network; its FID is the Frechet distance of the
    classifier's features by hand (scipy's ``sqrtm``), its accuracy the share of argmax logits equal to the labels."""
    evaluate(run_dir, "--metrics", "[fid, kid, is, accuracy]", "--output", str(run_dir / "row.json"))
    row = json.loads((run_dir / "row.json").read_text())
    images, labels = load_digit_arrays("sklearn")
    samples, reference = (torch.from_numpy(images[i:i + n, ..., None]) for i, n in ((0, 60), (100, 100)))
    network = load_feature_network(run_dir / "clf.ckpt")
    metrics = ImageMetrics(["fid", "kid", "is", "accuracy"], (1, 8, 8), network)
    metrics.set_real(reference)
    expected = metrics(samples, torch.from_numpy(labels[:60]))
    assert set(expected) == {"fid", "kid", "kid_std", "is", "is_std", "accuracy"}
    assert {k: row[k] for k in expected} == pytest.approx(expected, rel=1e-4)  # float32 features, other batches
    assert row["num_samples"] == 60 and row["num_reference"] == 100
    with torch.no_grad():
        f_s, f_r = (network.features(x.permute(0, 3, 1, 2)).double().numpy() for x in (samples, reference))
        predicted = network.logits(samples.permute(0, 3, 1, 2)).argmax(1).numpy()
    c_s, c_r = np.cov(f_s, rowvar=False), np.cov(f_r, rowvar=False)
    fid = ((f_s.mean(0) - f_r.mean(0)) ** 2).sum() + np.trace(c_s + c_r - 2 * scipy.linalg.sqrtm(c_s @ c_r).real)
    assert row["fid"] == pytest.approx(fid, rel=1e-4)
    assert row["accuracy"] == pytest.approx(np.mean(predicted == labels[:60]), abs=1e-7)  # float32: 9 of 60

    (run_dir / "meta.json").write_text(json.dumps({"setting": "cfg_w1_paper", "num_classes": 10}))
    for _ in range(2):
        evaluate(run_dir, "--output", str(run_dir / "new" / "rows.csv"))  # default metrics: fid, is, accuracy
    rows = list(csv.DictReader((run_dir / "new" / "rows.csv").open()))
    assert len(rows) == 2 and rows[0] == rows[1] and rows[0]["setting"] == "cfg_w1_paper"
    assert float(rows[0]["fid"]) == pytest.approx(row["fid"], rel=1e-5)
    assert float(rows[0]["accuracy"]) == pytest.approx(row["accuracy"])
    assert len(list((run_dir / "cache").glob("*.pt"))) == 1  # one reference, one network: one cached pass


@pytest.mark.parametrize("problem, args, message", [
    ("missing samples", ["--samples", "nowhere.npz"], "--samples nowhere.npz does not exist"),
    ("reference of another size", ["--reference", "{small}"], r"holds \(C, H, W\) = \(1, 4, 4\) images but the samples"),
    ("network for another image size", ["--feature_network", "{net16}"], r"trained on \(C, H, W\) = \(1, 16, 16\)"),
    ("network for another class count", ["--feature_network", "{net4}"], "has 4 classes but the samples have 10"),
    ("labels beyond the classes", ["--samples", "{wrong_labels}", "--feature_network", "{net4}",
                                   "--metrics", "[accuracy]"], r"one label in \[0, 4\) per sample"),
    ("bad output suffix", ["--output", "{out_txt}"], "must end in .json or .csv"),
    ("unknown metric", ["--metrics", "[fid, lpips]"], r"unknown \['lpips'\]"),
    ("corrupt meta.json", ["--samples", "{wrong_meta}"], "meta.json .*meta.json is not a JSON object \\(JSONDecodeError"),
    ("corrupt reference", ["--reference", "{corrupt}"], r"--reference .*corrupt.npz is not a readable .npz"),
    ("reference options that do not fit", ["--reference", "digits:sklearn", "--reference_kwargs", "{{bogus: 1, root: {root}}}"],
     r"--reference_kwargs \['bogus'\] are not options of ImageDataModule"),
])
def test_bad_input_is_one_line_and_writes_nothing(run_dir, capsys, problem, args, message):
    np.savez(run_dir / "small.npz", arr_0=np.zeros((10, 4, 4, 1), np.uint8))
    classifier_checkpoint(run_dir / "net16.ckpt", image_size=16)
    classifier_checkpoint(run_dir / "net4.ckpt", num_classes=4)
    (run_dir / "wrong").mkdir()
    np.savez(run_dir / "wrong" / "samples.npz", samples=np.zeros((6, 8, 8, 1), np.uint8), labels=np.arange(6))
    (run_dir / "bad_meta").mkdir()
    np.savez(run_dir / "bad_meta" / "samples.npz", samples=np.zeros((6, 8, 8, 1), np.uint8))
    (run_dir / "bad_meta" / "meta.json").write_text("{truncated")
    (run_dir / "corrupt.npz").write_bytes(b"PK\x03\x04 not a zip")
    (run_dir / "meta.json").write_text(json.dumps({"num_classes": 10}))  # as sample.py writes it
    paths = {"small": run_dir / "small.npz", "net16": run_dir / "net16.ckpt", "net4": run_dir / "net4.ckpt",
             "wrong_labels": run_dir / "wrong" / "samples.npz", "wrong_meta": run_dir / "bad_meta" / "samples.npz",
             "out_txt": run_dir / "out.txt", "root": run_dir,
             "corrupt": run_dir / "corrupt.npz"}
    args = [a.format(**paths) for a in args]
    with pytest.raises(SystemExit) as exit_:
        evaluate(run_dir, *(args if "--output" in args else [*args, "--output", str(run_dir / "out.json")]))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    assert not (run_dir / "out.json").exists() and not (run_dir / "out.txt").exists()


def test_reference_from_a_dataset_folder_is_resized_to_the_samples(tmp_path, one_thread):
    folder = make_synthetic_image_dataset(tmp_path / "data", num_classes=2, n_per_class=8, image_size=16)
    images = load_reference(folder, (3, 8, 8), num_reference=10, split="train")
    assert images.shape == (10, 8, 8, 3) and images.dtype == np.uint8
    again = load_reference(folder, (3, 8, 8), num_reference=10, split="train")
    np.testing.assert_array_equal(images, again)  # a seeded subset
    assert torch.as_tensor(images).float().std() > 10  # real pictures, not blank
