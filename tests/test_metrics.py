"""Tests for the metrics: exact toy metrics against closed forms, torchmetrics image metrics offline, figures."""

import math
import os
import urllib.error

import numpy as np
import pytest
import torch
from torch import nn

from lightning_reg.data.digits import load_digit_arrays
from lightning_reg.data.mixtures import GaussianMixture
from lightning_reg.data.toy import ToyDistribution, toy1d_distribution, toy2d_distribution
from lightning_reg.errors import ConfigError
from lightning_reg.metrics import (ImageMetrics, energy_distance, image_grid, image_metrics, mean_log_likelihood,
                                   on_shape_fraction, save_figure, scatter_figure, sliced_wasserstein, toy_metrics)
from lightning_reg.metrics.classifier import DigitClassifier, FeatureNetwork
from lightning_reg.metrics.plots import CAPTION_HEIGHT, caption_row, labelled_grids


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _toy2d_targets(per_class: int = 2000, seed: int = 0):
    distribution = toy2d_distribution()
    labels = torch.arange(2).repeat_interleave(per_class)
    return distribution, distribution.sample(labels, _gen(seed)), labels


# ---------------------------------------------------------------- toy metrics


def test_log_likelihood_at_component_mean_is_gaussian_peak():
    sigma, mean = 0.3, [1.0, -2.0, 0.5]
    distribution = ToyDistribution([GaussianMixture([mean], [sigma])])
    samples = torch.tensor([mean] * 5)
    expected = -0.5 * 3 * math.log(2 * math.pi * sigma ** 2)
    assert mean_log_likelihood(samples, torch.zeros(5), distribution) == pytest.approx(expected, rel=1e-12)


def test_log_likelihood_uses_each_samples_own_class():
    distribution = ToyDistribution([GaussianMixture([[0.0]], [1.0]), GaussianMixture([[5.0]], [1.0])])
    at_own_mean = mean_log_likelihood(torch.tensor([[0.0], [5.0]]), torch.tensor([0, 1]), distribution)
    swapped = mean_log_likelihood(torch.tensor([[0.0], [5.0]]), torch.tensor([1, 0]), distribution)
    assert at_own_mean == pytest.approx(-0.5 * math.log(2 * math.pi))
    assert swapped == pytest.approx(-0.5 * math.log(2 * math.pi) - 12.5)


def test_energy_distance_of_identical_sets_is_zero():
    x = torch.randn(500, 2, generator=_gen(), dtype=torch.float64)
    # unbiased within-set terms: 2 S/N^2 - 2 S/(N(N-1)) = -(2/N) E|X-X'|, E|X-X'| = sqrt(pi) for N(0, I_2)
    assert -4 * math.sqrt(math.pi) / 500 < energy_distance(x, x) < 0


def test_energy_distance_of_unit_gaussians_matches_closed_form():
    g = _gen(1)
    x = torch.randn(3000, 1, generator=g, dtype=torch.float64)
    y = torch.randn(3000, 1, generator=g, dtype=torch.float64) + 1.0
    # X - Y ~ N(-1, 2): folded-normal mean sigma sqrt(2/pi) exp(-mu^2 / 2 sigma^2) + mu erf(mu / (sigma sqrt 2));
    # X - X' ~ N(0, 2): E|X - X'| = 2 / sqrt(pi). Over seeds the estimate has std ~0.024 at N = 3000.
    mu, sigma = 1.0, math.sqrt(2.0)
    cross = sigma * math.sqrt(2 / math.pi) * math.exp(-mu ** 2 / (2 * sigma ** 2)) + mu * math.erf(mu / (sigma * math.sqrt(2)))
    expected = 2 * cross - 2 * (2 / math.sqrt(math.pi))  # = 0.5418
    assert energy_distance(x, y) == pytest.approx(expected, abs=0.08)


def test_sliced_wasserstein_in_1d_is_exact_w2():
    g = _gen(2)
    x = torch.randn(4000, generator=g, dtype=torch.float64)
    # a pure shift moves every quantile by 0.5, whatever the direction's sign
    assert sliced_wasserstein(x, x + 0.5) == pytest.approx(0.5, abs=1e-9)
    # two samples of N(0,1) and N(0.5,1) of unequal sizes: W2 = 0.5 up to MC error
    y = torch.randn(3000, generator=g, dtype=torch.float64) + 0.5
    assert sliced_wasserstein(x, y) == pytest.approx(0.5, abs=0.06)


def test_sliced_wasserstein_unequal_sizes_by_quantiles():
    # {0, 1} vs {0, 0.5, 1}: quantile functions differ by 0.5 on [1/3, 2/3) only -> W2^2 = 0.25 / 3
    assert sliced_wasserstein([[0.0], [1.0]], [[0.0], [0.5], [1.0]]) == pytest.approx(math.sqrt(0.25 / 3))


def test_sliced_wasserstein_in_2d_recovers_shift_length_on_average():
    x = torch.randn(2000, 2, generator=_gen(3), dtype=torch.float64)
    # shifting by (1, 0): W2 along theta is |theta_x|, whose mean over uniform directions is 2/pi
    assert sliced_wasserstein(x, x + torch.tensor([1.0, 0.0]), projections=4096) == pytest.approx(2 / math.pi, abs=0.02)


def test_on_shape_fraction_separates_target_from_noise():
    distribution, x, labels = _toy2d_targets()
    assert on_shape_fraction(x, labels, distribution) > 0.95
    noise = torch.rand(4000, 2, generator=_gen(4), dtype=torch.float64) * 6 - 3
    assert on_shape_fraction(noise, labels, distribution) < 0.2
    # ring samples asked to be the cross mostly miss it
    assert on_shape_fraction(x[labels == 0], torch.ones(2000), distribution) < 0.3


def test_toy_metrics_good_vs_bad_samples():
    distribution, x, labels = _toy2d_targets(seed=5)
    good = toy_metrics(x, labels, distribution)
    bad = toy_metrics(x + 0.2, labels, distribution)
    assert set(good) == {"log_likelihood", "energy_distance", "sliced_wasserstein", "on_shape"}
    assert good["on_shape"] > 0.95 > bad["on_shape"]
    assert good["log_likelihood"] > bad["log_likelihood"] + 1.0
    assert abs(good["energy_distance"]) < 0.01 < bad["energy_distance"]
    assert good["sliced_wasserstein"] < 0.05 < bad["sliced_wasserstein"]
    assert toy_metrics(x, labels, distribution) == good  # seeded target draws


def test_toy_metrics_1d_has_no_on_shape_and_checks_lengths():
    distribution = toy1d_distribution()
    labels = torch.zeros(500, dtype=torch.long)
    metrics = toy_metrics(distribution.sample(labels, _gen(6)).squeeze(1), labels, distribution)
    assert set(metrics) == {"log_likelihood", "energy_distance", "sliced_wasserstein"}
    with pytest.raises(ConfigError, match="one label per sample"):
        toy_metrics(torch.zeros(10, 1), torch.zeros(9), distribution)


# ---------------------------------------------------------------- image metrics


class PooledProjection(nn.Module):
    """Deterministic stand-in for Inception: a fixed random projection of 4x4-pooled pixels."""

    num_features = 8

    def __init__(self, channels: int = 3):
        super().__init__()
        self.register_buffer("weight", torch.randn(channels * 16, self.num_features, generator=_gen(7)))

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(imgs.float() / 255 - 0.5, 4).flatten(1)
        return pooled @ self.weight


class BrightnessClassifier(nn.Module):
    """Confident logits: class = mean brightness bucket (4 classes)."""

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        bucket = (imgs.float().mean((1, 2, 3)) / 64).long().clamp(max=3)
        return 50.0 * nn.functional.one_hot(bucket, 4).float()


def _random_images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8, generator=_gen(seed))


def test_fid_and_kid_with_custom_features():
    real = _random_images(300, 8)
    shifted = (real.int() + 60).clamp(max=255).to(torch.uint8)
    extractor = PooledProjection()
    same = image_metrics(real, real, metrics=("fid",), feature_extractor=extractor)
    fresh = image_metrics(_random_images(300, 12), real, metrics=("fid", "kid"), feature_extractor=extractor)
    other = image_metrics(shifted, real, metrics=("fid", "kid"), feature_extractor=extractor)
    assert set(other) == {"fid", "kid", "kid_std"}
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    # a fresh draw of the same distribution is close; a brightness shift is far on both metrics
    assert fresh["fid"] < 0.05 * other["fid"]
    assert abs(fresh["kid"]) < 0.05 * other["kid"]


def test_inception_score_of_confident_uniform_classes_is_class_count():
    # 4 equally frequent brightness levels, each predicted with certainty: IS = exp(H(y)) = 4 (per-split noise)
    levels = torch.tensor([20, 90, 150, 230], dtype=torch.uint8).repeat(500)
    fake = levels[:, None, None, None].expand(-1, 8, 8, 3).contiguous()
    result = image_metrics(fake, fake, metrics=("is",), feature_extractor=BrightnessClassifier())
    assert result["is"] == pytest.approx(4.0, abs=0.1)
    constant = image_metrics(fake[:100] * 0, fake, metrics=("is",), feature_extractor=BrightnessClassifier())
    assert constant["is"] == pytest.approx(1.0, abs=1e-6)


def test_image_metrics_rejects_bad_input():
    images = _random_images(10, 9)
    with pytest.raises(ConfigError, match="unknown"):
        image_metrics(images, images, metrics=("fid", "lpips"), feature_extractor=PooledProjection())
    with pytest.raises(ConfigError, match="uint8"):
        image_metrics(images.float(), images, feature_extractor=PooledProjection())
    with pytest.raises(ConfigError, match="share"):
        image_metrics(images[:, :8], images, feature_extractor=PooledProjection())


def test_missing_inception_weights_raise_config_error(monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
    images = _random_images(4, 10)
    with pytest.raises(ConfigError, match="pt_inception-2015-12-05") as err:
        image_metrics(images, images)
    assert torch.hub.get_dir() in str(err.value)


def _digit_network(num_classes: int = 10) -> "FeatureNetwork":
    """An untrained (seeded) tiny digits classifier on 8x8 grayscale images, frozen."""
    torch.manual_seed(0)
    return FeatureNetwork(DigitClassifier(num_classes, image_size=8, channels=1, widths=(8, 16), num_features=32))


def _sklearn_digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_digit_arrays("sklearn")
    return torch.from_numpy(images[:n, ..., None]), torch.from_numpy(labels[:n])  # uint8 NHWC


def test_fid_on_classifier_features_is_zero_for_identical_sets_and_grows_with_noise(one_thread):
    real, _ = _sklearn_digits(400)
    evaluate = ImageMetrics(["fid", "kid"], (1, 8, 8), _digit_network())
    evaluate.set_real(real)
    assert evaluate(real)["fid"] == pytest.approx(0.0, abs=1e-3)
    noise = torch.randn(real.shape, generator=_gen(13))
    fids = [evaluate((real.float() + s * noise).round().clamp(0, 255).to(torch.uint8))["fid"] for s in (8, 32, 96)]
    assert 0 < fids[0] < fids[1] < fids[2]


def test_accuracy_is_the_share_of_samples_classified_as_their_label(one_thread):
    images, _ = _sklearn_digits(250)  # 3 batches of ImageMetrics
    network = _digit_network()
    with torch.no_grad():
        predicted = network.logits(images.permute(0, 3, 1, 2)).argmax(1)
    labels = predicted.clone()
    labels[::5] = (labels[::5] + 1) % 10  # 50 of 250 labels, spread over the batches, that the classifier does not assign
    evaluate = ImageMetrics(["accuracy", "is"], (1, 8, 8), network)
    assert evaluate(images, predicted)["accuracy"] == 1.0
    result = evaluate(images, labels)
    assert result["accuracy"] == pytest.approx(0.8) and set(result) == {"accuracy", "is", "is_std"}
    with pytest.raises(ConfigError, match="accuracy needs the labels"):
        evaluate(images)
    with pytest.raises(ConfigError, match=r"one label in \[0, 10\) per sample.*values \d+..10"):
        evaluate(images, torch.cat([labels[:-1], torch.tensor([10])]))
    with pytest.raises(ConfigError, match="accuracy needs a classifier"):
        ImageMetrics(["accuracy"], (3, 16, 16), PooledProjection())


def test_inception_from_a_weights_file_takes_grayscale_images(tmp_path, monkeypatch, one_thread):
    """``inception_weights=PATH`` builds torch-fidelity's Inception from that file (random weights here: the
    real file is not shipped) and feeds it 1-channel images repeated to 3 channels."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict: None)
    torch.save({}, tmp_path / "weights.pth")
    images = torch.randint(0, 256, (4, 8, 8, 1), dtype=torch.uint8, generator=_gen(14))
    evaluate = ImageMetrics(["kid", "is"], (1, 8, 8), inception_weights=str(tmp_path / "weights.pth"))
    evaluate.set_real(images)
    result = evaluate(images)
    assert set(result) == {"kid", "kid_std", "is", "is_std"} and all(math.isfinite(v) for v in result.values())
    assert abs(result["kid"]) < 1e-3  # identical sets


def test_missing_inception_weights_file_is_named():
    with pytest.raises(ConfigError, match=r"inception_weights /nowhere/w.pth does not exist.*6726825d"):
        ImageMetrics(["fid"], (3, 16, 16), inception_weights="/nowhere/w.pth")


# ---------------------------------------------------------------- figures


def test_scatter_figures_written_as_png(tmp_path):
    distribution, x, labels = _toy2d_targets(per_class=500)
    fig = scatter_figure({"w=0": (x.numpy(), labels.numpy()), "w=2": (x.numpy() * 1.1, labels.numpy())},
                         distribution, title="toy 2D")
    assert len([ax for ax in fig.axes if ax.axison]) == 2
    save_figure(fig, tmp_path / "sub" / "toy2d.png")

    toy1d = toy1d_distribution()
    labels1 = torch.tensor([0, 1]).repeat(500)  # class 0 and the null label
    fig1 = scatter_figure({"cfg": (toy1d.sample(labels1, _gen(11)).numpy(), labels1.numpy())}, toy1d)
    save_figure(fig1, tmp_path / "toy1d.png")
    for name in ("sub/toy2d.png", "toy1d.png"):
        path = tmp_path / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert sorted(os.listdir(tmp_path)) == ["sub", "toy1d.png"]  # no temp files left behind


def test_scatter_figure_rejects_3d():
    with pytest.raises(ConfigError, match="1D or 2D"):
        scatter_figure({"x": (np.zeros((4, 3)), np.zeros(4))})


def test_save_figure_leaves_no_partial_file(tmp_path):
    class Broken:
        def savefig(self, *args, **kwargs):
            raise RuntimeError("render failed")

    with pytest.raises(RuntimeError):
        save_figure(Broken(), tmp_path / "fig.png")
    assert os.listdir(tmp_path) == []


def test_image_grid_layout():
    images = np.stack([np.full((4, 5, 1), i, np.uint8) for i in range(1, 8)])  # 7 grey images
    grid = image_grid(images, nrow=3)
    assert grid.shape == (3 * 4, 3 * 5, 3) and grid.dtype == np.uint8
    assert grid[0, 0, 0] == 1 and grid[0, 5, 0] == 2 and grid[4, 0, 0] == 4 and grid[8, 0, 0] == 7
    assert (grid[8:, 5:] == 0).all()  # two blank tiles pad the last row


def test_labelled_grids_put_a_caption_row_above_each_grid_in_order():
    grids = {"cfg_w1_none": np.full((4, 40, 3), 10, np.uint8), "cfg_w3_paper": np.full((8, 40, 3), 20, np.uint8)}
    out = labelled_grids(grids)
    assert out.shape == (2 * CAPTION_HEIGHT + 4 + 8, 40, 3) and out.dtype == np.uint8
    first, second = out[:CAPTION_HEIGHT], out[CAPTION_HEIGHT + 4:2 * CAPTION_HEIGHT + 4]
    for caption, name in ((first, "cfg_w1_none"), (second, "cfg_w3_paper")):
        assert (caption < 128).any() and (caption > 128).any()  # a smaller font for 40 pixels, not blank
        np.testing.assert_array_equal(caption, caption_row(name, 40))
    assert (out[CAPTION_HEIGHT:CAPTION_HEIGHT + 4] == 10).all() and (out[-8:] == 20).all()
    assert not np.array_equal(first, second)
    with pytest.raises(ConfigError, match="all of one width"):
        labelled_grids({"a": grids["cfg_w1_none"], "b": np.zeros((4, 16, 3), np.uint8)})
    with pytest.raises(ConfigError, match="at least one"):
        labelled_grids({})


# ---------------------------------------------------------------- one feature pass per evaluation


class CountingNetwork(nn.Module):
    """Wraps a feature network; counts the images each forward sees (both readouts of a ``FeatureNetwork``)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network, self.images = network, []
        for attr in ("num_classes", "image_shape", "num_features"):
            if hasattr(network, attr):
                setattr(self, attr, getattr(network, attr))

    def forward(self, images):
        self.images.append(len(images))
        return self.network(images)


def _per_metric(names, network, real, fake, labels=None, subset_size=None):
    """The metrics as computed before the single pass: one torchmetrics object per metric, each with its
    own copy of the feature readout, each running the network over the images itself."""
    from torchmetrics.classification import MulticlassAccuracy
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    classifier = isinstance(network, FeatureNetwork)
    features = network.features if classifier else network
    logits = network.logits if classifier else network
    real, fake = real.permute(0, 3, 1, 2), fake.permute(0, 3, 1, 2)
    out = {}
    for name in names:
        if name == "accuracy":
            out[name] = MulticlassAccuracy(network.num_classes, average="micro")(logits(fake), labels).item()
            continue
        metric = {"fid": lambda: FrechetInceptionDistance(features, input_img_size=tuple(real.shape[1:])),
                  "kid": lambda: KernelInceptionDistance(features, subset_size=subset_size),
                  "is": lambda: InceptionScore(logits)}[name]()
        for batch in real.split(100) if name != "is" else []:
            metric.update(batch, real=True)
        for batch in fake.split(100):
            metric.update(batch, **({"real": False} if name != "is" else {}))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            value = metric.compute()
        if isinstance(value, tuple):
            out[name], out[f"{name}_std"] = value[0].item(), value[1].item()
        else:
            out[name] = value.item()
    return out


@pytest.mark.parametrize("classifier", [False, True])
def test_one_pass_gives_the_per_metric_numbers_and_runs_the_network_once(classifier, one_thread):
    if classifier:
        images, labels = _sklearn_digits(450)
        network, names, shape = _digit_network(), ["fid", "kid", "is", "accuracy"], (1, 8, 8)
    else:
        images, labels = _random_images(450, 21), None
        network, names, shape = PooledProjection(), ["fid", "kid", "is"], (3, 16, 16)
    real, fake = images[:250], images[250:]
    expected = _per_metric(names, network, real, fake, None if labels is None else labels[250:], subset_size=200)
    counting = CountingNetwork(network) if not classifier else network
    if classifier:  # count the classifier's forwards: both readouts share it
        inner = network.features.classifier
        calls = []
        inner.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    evaluate = ImageMetrics(names, shape, counting)
    evaluate.set_real(real)
    result = evaluate(fake, None if labels is None else labels[250:])
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    seen = calls if classifier else counting.images
    assert seen == [100, 100, 50, 100, 100]  # the reference once, the samples once, in batches of 100


def test_reference_features_are_cached_on_disk_by_content(tmp_path, one_thread):
    real, fake = _random_images(300, 22), _random_images(200, 23)
    network = CountingNetwork(PooledProjection())
    first = ImageMetrics(["fid", "kid"], (3, 16, 16), network, reference_cache=tmp_path)
    first.set_real(real)
    assert len(network.images) == 3 and len(list(tmp_path.glob("*.pt"))) == 1
    expected = first(fake)
    network.images.clear()
    second = ImageMetrics(["fid", "kid"], (3, 16, 16), network, reference_cache=tmp_path)
    second.set_real(real)
    assert network.images == []  # read from the cache
    assert second(fake) == expected
    changed = real.clone()
    changed[0, 0, 0, 0] ^= 1  # other images: another key, computed afresh
    network.images.clear()
    second.set_real(changed)
    assert len(network.images) == 3 and len(list(tmp_path.glob("*.pt"))) == 2
    other_network = PooledProjection()
    other_network.weight.mul_(2)
    ImageMetrics(["fid"], (3, 16, 16), other_network, reference_cache=tmp_path).set_real(real)
    assert len(list(tmp_path.glob("*.pt"))) == 3  # another network: another key
