"""ADM-comparable evaluation (``lightning_reg.metrics.adm``) on hand-made reference batches and a stand-in
feature network (the Inception weights are not on this machine)."""

import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from lightning_reg.errors import ConfigError
from lightning_reg.metrics.adm import (AdmEvaluator, FeatureReadout, FrechetStatistics, InceptionFeatures,
                                       build_adm_evaluator, extract_features, inception_score, load_adm_reference,
                                       precision_recall)
from lightning_reg.metrics.classifier import DigitClassifier, FeatureNetwork


class StandIn(nn.Module):
    """uint8 NCHW -> 12 fixed random projections of the pixels (a deterministic feature network)."""

    def __init__(self, pixels: int = 3 * 8 * 8, dim: int = 12):
        super().__init__()
        self.proj = nn.Linear(pixels, dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(dim, pixels, generator=torch.Generator().manual_seed(0)) / pixels ** 0.5)
            self.proj.bias.zero_()

    def forward(self, images):
        return self.proj(images.flatten(1).float() / 255.0)


def _images(n, seed, size=8, channels=3):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_reads_a_hand_made_adm_reference_batch(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5))
    arrays = dict(arr_0=_images(6, 0), mu=rng.normal(size=5), sigma=a @ a.T, mu_s=rng.normal(size=3), sigma_s=np.eye(3))
    ref = load_adm_reference(_write(tmp_path / "VIRTUAL_tiny_labeled.npz", **arrays))
    assert ref.image_shape == (6, 8, 8, 3)
    np.testing.assert_array_equal(ref.pool.mu, arrays["mu"])
    np.testing.assert_array_equal(ref.pool.sigma, arrays["sigma"])
    np.testing.assert_array_equal(ref.spatial.sigma, np.eye(3))
    np.testing.assert_array_equal(ref.images(), arrays["arr_0"])


@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_frechet_distance_of_gaussians_in_closed_form():
    # 1D: (m1 - m2)^2 + (s1 - s2)^2; ADM's formula with scipy's sqrtm
    p, q = FrechetStatistics(np.array([1.0]), np.array([[4.0]])), FrechetStatistics(np.array([-2.0]), np.array([[1.0]]))
    assert p.frechet_distance(q) == pytest.approx(9.0 + 1.0)
    singular = FrechetStatistics(np.zeros(3), np.diag([1.0, 0.0, 0.0]))
    assert singular.frechet_distance(singular) == pytest.approx(0.0, abs=1e-6)


def test_fid_of_a_reference_against_itself_is_zero(tmp_path, one_thread):
    images = _images(64, 1)
    ref = load_adm_reference(_write(tmp_path / "ref.npz", arr_0=images))
    out = AdmEvaluator(ref, FeatureReadout(StandIn()), metrics=("fid", "precision", "recall"))(images)
    assert out["fid"] == pytest.approx(0.0, abs=1e-6)
    assert out["precision"] == out["recall"] == 1.0


def test_fid_from_stored_statistics_equals_fid_from_features(tmp_path, one_thread):
    real, fake = _images(200, 2), (_images(150, 3) // 2)  # darker samples: a clearly non-zero FID
    network = FeatureReadout(StandIn())
    stats = FrechetStatistics.of(extract_features(network, real)["pool"].numpy())
    path = _write(tmp_path / "ref.npz", arr_0=real, mu=stats.mu, sigma=stats.sigma)
    from_images = AdmEvaluator(load_adm_reference(path), network, metrics=("fid",))(fake)["fid"]
    from_stats = AdmEvaluator(load_adm_reference(path), network, metrics=("fid",), use_stored_statistics=True)(fake)
    torchmetrics_fid = FrechetInceptionDistance(feature=StandIn(), input_img_size=(3, 8, 8), sync_on_compute=False)
    torchmetrics_fid.update(torch.from_numpy(real).permute(0, 3, 1, 2), real=True)
    torchmetrics_fid.update(torch.from_numpy(fake).permute(0, 3, 1, 2), real=False)
    assert from_images > 0.1
    assert from_stats["fid"] == pytest.approx(from_images, rel=1e-9)
    assert from_images == pytest.approx(float(torchmetrics_fid.compute()), rel=1e-4)


def test_works_with_the_digits_classifier(tmp_path, one_thread):
    torch.manual_seed(0)
    network = FeatureNetwork(DigitClassifier(num_classes=10, image_size=16, channels=1))
    real = _images(40, 4, size=16, channels=1)
    ref = load_adm_reference(_write(tmp_path / "digits.npz", arr_0=real))
    out = AdmEvaluator(ref, FeatureReadout(network), metrics=("fid", "is", "precision"))(real)
    assert out["fid"] == pytest.approx(0.0, abs=1e-5)
    assert 1.0 <= out["is"] <= 10.0 and out["precision"] == 1.0


def test_precision_recall_on_hand_made_points():
    # reference 0..9 on a line: interior radius^2 = 2^2 (3rd neighbour at distance 2)
    reference = torch.arange(10.0)[:, None]
    samples = torch.tensor([[0.0], [1.0], [2.0], [3.0], [50.0]])
    precision, recall = precision_recall(reference, samples, k=3)
    assert precision == pytest.approx(4 / 5)  # 50 is 41 from the nearest reference point (radius 3)
    assert recall == 1.0  # the outlier's ball (radius 49) covers every reference point, as in ADM
    precision, recall = precision_recall(reference, samples[:4] + 20, k=3)
    assert (precision, recall) == (0.0, 0.0)
    with pytest.raises(ConfigError, match="more than 3 points"):
        precision_recall(reference, samples[:3])


def test_inception_score_extremes():
    assert inception_score(torch.zeros(100, 7), splits=10)[0] == pytest.approx(1.0)
    confident = torch.eye(5).repeat(20, 1) * 50.0  # each split sees every class once per 5 rows, sure of each
    mean, std = inception_score(confident, splits=10)
    assert mean == pytest.approx(5.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)


def test_reference_without_statistics_is_one_line(tmp_path):
    ref = load_adm_reference(_write(tmp_path / "bare.npz", arr_0=_images(8, 5)))
    with pytest.raises(ConfigError, match=r"has no statistics mu/sigma for fid") as err:
        AdmEvaluator(ref, FeatureReadout(StandIn()), metrics=("fid",), use_stored_statistics=True)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="neither images 'arr_0' nor statistics"):
        load_adm_reference(_write(tmp_path / "empty.npz", labels=np.zeros(3)))
    with pytest.raises(ConfigError, match="does not exist"):
        load_adm_reference(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("not an npz")
    with pytest.raises(ConfigError, match="not a readable .npz"):
        load_adm_reference(tmp_path / "text.npz")


def test_sample_and_reference_sizes_that_differ_are_one_line(tmp_path, one_thread):
    ref = load_adm_reference(_write(tmp_path / "ref.npz", arr_0=_images(8, 6)))
    evaluator = AdmEvaluator(ref, FeatureReadout(StandIn()), metrics=("fid",))
    with pytest.raises(ConfigError, match=r"samples are \(C, H, W\) = \(3, 16, 16\) but the reference images are "
                                          r"\(3, 8, 8\)"):
        evaluator(_images(8, 7, size=16))
    with pytest.raises(ConfigError, match="sfid needs Inception"):
        AdmEvaluator(ref, FeatureReadout(StandIn()), metrics=("sfid",))
    with pytest.raises(ConfigError, match="unknown"):
        AdmEvaluator(ref, FeatureReadout(StandIn()), metrics=("fid", "kid"))


def test_inception_features_need_local_weights(tmp_path):
    with pytest.raises(ConfigError, match="hub/weights-inception-2015-12-05-6726825d.pth does not exist"):
        build_adm_evaluator(_write(tmp_path / "ref.npz", arr_0=_images(4, 8)),
                            inception_weights=tmp_path / "hub" / "weights-inception-2015-12-05-6726825d.pth")


def test_inception_features_shapes_with_random_weights(tmp_path, monkeypatch, one_thread):
    """The pool / spatial (mixed_6/conv, 7 channels, 17 x 17) / logits readouts, without the real weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict: None)
    weights = tmp_path / "weights.pth"
    torch.save({}, weights)
    features = extract_features(InceptionFeatures(weights), _images(2, 9, size=32))
    assert {k: tuple(v.shape) for k, v in features.items()} == {"pool": (2, 2048), "spatial": (2, 17 * 17 * 7),
                                                              "logits": (2, 1008)}
    assert (features["spatial"] >= 0).all()  # after the block's ReLU


def test_evaluate_cli_adm_branch_with_the_digits_classifier(tmp_path, capsys, one_thread):
    """``evaluate.py --adm``: the one evaluation path, offline, with a digits classifier as the feature network."""
    import json

    from helpers import classifier_checkpoint

    from lightning_reg.data.digits import load_digit_arrays
    from lightning_reg.metrics.evaluate import main

    images, _ = load_digit_arrays("sklearn")
    np.savez(tmp_path / "samples.npz", samples=images[:60, ..., None])
    np.savez(tmp_path / "ref.npz", arr_0=images[100:200, ..., None])
    np.savez(tmp_path / "ref16.npz", arr_0=np.zeros((10, 16, 16, 1), np.uint8))
    classifier_checkpoint(tmp_path / "clf.ckpt")
    common = ["--samples", str(tmp_path / "samples.npz"), "--feature_network", str(tmp_path / "clf.ckpt"), "--adm",
              "true"]
    main([*common, "--reference", str(tmp_path / "ref.npz"), "--output", str(tmp_path / "row.json")])
    row = json.loads((tmp_path / "row.json").read_text())
    assert {"fid", "is", "is_std", "precision", "recall"} <= set(row) and "sfid" not in row
    assert row["fid"] > 0 and 0 < row["precision"] <= 1 and 0 < row["recall"] <= 1
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*common, "--reference", str(tmp_path / "ref16.npz"), "--output", str(tmp_path / "bad.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "(1, 16, 16)" in err[0], err
    assert not (tmp_path / "bad.json").exists()
