"""One evaluation path for generated images, shared by ``SamplingCallback``, ``evaluate.py`` and ``sweep.py``.

    evaluator = build_image_evaluator(metrics, image_shape, feature_network="classifier.ckpt")
    evaluator.set_real(reference_uint8_nhwc)                 # once: the reference features (FID, KID)
    row = evaluate_samples(samples_uint8_nhwc, labels, evaluator)  # per setting: {"fid": .., "accuracy": ..}

``feature_network``: ``None`` or ``"inception"`` for torchmetrics' Inception-v3 (its weights from
``inception_weights`` or the torch hub cache), a digits-classifier checkpoint path
(``metrics.classifier.load_feature_network``), an already loaded ``FeatureNetwork``, or any module
mapping uint8 NCHW images to features (no accuracy then).
An evaluator is any object with ``names``, ``image_shape``, ``set_real(uint8 NHWC)`` and
``__call__(uint8 NHWC, labels) -> dict[str, float]`` (``metrics.images.ImageMetrics``); an ADM reference
batch evaluator (``metrics.adm``) can follow the same protocol.
"""

from __future__ import annotations

import csv
import inspect
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_reg.distributed import fail
from lightning_reg.errors import ConfigError, check_int, check_names, one_line, parse_error_message
from lightning_reg.io.files import atomic_write, read_json, read_npz_images, to_uint8_nhwc, write_json
from lightning_reg.io.yaml_budget import install_yaml_budget
from lightning_reg.metrics.images import (DEFAULT_IMAGE_METRICS, IMAGE_METRICS, KID_NOTE, ImageMetrics,
                                          inception_weights_file)

INCEPTION = "inception"


def image_metric_names(requested, feature_network, field: str = "metrics") -> tuple[str, ...]:
    """The image metrics to compute: ``requested`` (checked), or by default ``DEFAULT_IMAGE_METRICS`` and
    ``accuracy`` when ``feature_network`` is a classifier checkpoint (``inception`` and modules have no classes).
    The one choice of ``sample.py``, sweeps, ``evaluate.py`` and the sampling callback."""
    if requested is not None:
        return check_names(requested, IMAGE_METRICS + ("clip_score",), field)
    classifier = isinstance(feature_network, (str, os.PathLike)) and str(feature_network) != INCEPTION
    return DEFAULT_IMAGE_METRICS + (("accuracy",) if classifier else ())


def build_image_evaluator(metrics=DEFAULT_IMAGE_METRICS, image_shape: tuple[int, int, int] = (3, 32, 32),
                          feature_network=None, inception_weights: str | None = None,
                          num_classes: int | None = None, device="cpu", reference_cache=None) -> ImageMetrics:
    """``ImageMetrics`` over ``metrics`` (from ``IMAGE_METRICS``: fid, is, kid, accuracy) for images of
    ``image_shape`` (C, H, W). A classifier ``feature_network`` must match ``image_shape`` and, when given,
    ``num_classes`` (the model's classes); ``accuracy`` needs a classifier. ``reference_cache``: a folder for the
    reference's features (``ImageMetrics.real_features``). Bad input: one ConfigError line."""
    from lightning_reg.metrics.classifier import FeatureNetwork, load_feature_network

    network = feature_network
    if isinstance(network, (str, os.PathLike)):
        network = None if str(network) == INCEPTION else load_feature_network(network)
    if isinstance(network, FeatureNetwork):
        network.check_compatible(image_shape, num_classes)
    elif network is not None and not isinstance(network, nn.Module):
        raise ConfigError(f"feature_network must be 'inception', a classifier checkpoint path or a module, "
                          f"got {type(network).__name__}")
    return ImageMetrics(metrics, image_shape, network, device, inception_weights, reference_cache)


class CLIPScoreEvaluator:
    """Image metrics (``inner``, or none) plus the CLIP score of each sample against its caption: ``labels`` are
    the captions' indices into ``prompts`` (``sample.py --prompts``; metrics.clip_score, a local CLIP folder)."""

    def __init__(self, inner, prompts, clip: str, image_shape, device="cpu", field: str = "--evaluation.clip"):
        from lightning_reg.metrics.clip_score import clip_loader

        clip_loader(clip, field)  # the folder checked now, loaded when scoring
        self.inner, self.prompts, self.clip, self.device, self.field = inner, list(prompts), clip, device, field
        self.image_shape = tuple(image_shape)
        self.names = (list(inner.names) if inner is not None else []) + ["clip_score"]

    def set_real(self, images, classes=None) -> None:
        """The inner metrics' reference (its ``classes`` unused: these samples' labels index captions)."""
        if self.inner is not None:
            self.inner.set_real(images)

    def __call__(self, images, labels) -> dict[str, float]:
        from lightning_reg.metrics.clip_score import clip_score

        row = self.inner(images, labels) if self.inner is not None else {}
        if labels is None:
            raise ConfigError("CLIP score needs each sample's caption: the samples' labels index the prompts")
        return row | {"clip_score": clip_score(images, [self.prompts[int(i)] for i in labels], self.clip,
                                               device=self.device, field=self.field)}


def build_evaluator(distribution: str | None, evaluation: dict | None, num_classes: int, data_shape, sample_shape,
                    seed: int = 0, prompts: list[str] | None = None):
    """The one evaluator of a model's samples, for ``sample.py``, ``sweep.py`` and ``evaluate_samples``: the exact
    toy metrics for toy data (``distribution``: a ``data.toy.TOY_DISTRIBUTIONS`` name, checked against the model's
    ``num_classes`` and ``data_shape``), image metrics (``evaluation``: ``build_image_evaluator`` options and
    ``reference`` / ``num_reference``, whose features are set once here), or ``None`` when neither is given."""
    from lightning_reg.data.toy import TOY_DISTRIBUTIONS
    from lightning_reg.metrics.toy import ToyEvaluator

    if distribution is not None:
        target = TOY_DISTRIBUTIONS[distribution]()
        if (target.num_classes, (target.dim,)) != (num_classes, tuple(data_shape)):
            raise ConfigError(f"--distribution {distribution} has {target.num_classes} classes in {target.dim}D; the "
                              f"checkpoint has num_classes={num_classes}, data_shape={tuple(data_shape)}")
        return ToyEvaluator(target, seed)
    if evaluation is None:
        return None
    if len(sample_shape) != 3:
        raise ConfigError(f"--evaluation is for images; the model's samples have shape {tuple(sample_shape)} (toy "
                          "data: give --distribution)")
    options = dict(evaluation)
    reference, num_reference = options.pop("reference", None), options.pop("num_reference", None)
    reference_kwargs = options.pop("reference_kwargs", None)
    clip = options.pop("clip", None)
    metrics = list(image_metric_names(options.pop("metrics", None), options.get("feature_network"),
                                      "--evaluation metrics"))
    if ("clip_score" in metrics) != (clip is not None) or ("clip_score" in metrics and prompts is None):
        raise ConfigError("--evaluation: clip_score needs clip (a local CLIP folder) and a text-to-image run "
                          "(--prompts), and clip is only for clip_score")
    image_metrics = [m for m in metrics if m != "clip_score"]
    evaluator = None
    if image_metrics:
        if reference is None:
            raise ConfigError("--evaluation needs a reference: an .npz of images, digits:mnist or a dataset")
        try:
            evaluator = build_image_evaluator(image_metrics, image_shape=tuple(sample_shape), num_classes=num_classes,
                                              **options)
        except TypeError as err:
            raise ConfigError(f"--evaluation: {one_line(err)}") from None
    if clip is not None:
        evaluator = CLIPScoreEvaluator(evaluator, prompts, clip, sample_shape, options.get("device", "cpu"))
    if image_metrics:
        evaluator.set_real(*load_reference(reference, tuple(sample_shape), num_reference, data_kwargs=reference_kwargs,
                                           return_labels=True))
    return evaluator


def evaluate_samples(samples_uint8_nhwc, labels, evaluator) -> dict[str, float]:
    """``evaluator``'s metrics of one set of samples (uint8 NHWC) sampled for ``labels`` (or ``None``)."""
    return evaluator(samples_uint8_nhwc, labels)


def read_samples(path) -> tuple[np.ndarray, np.ndarray | None]:
    """``(uint8 NHWC images, labels or None)`` of a ``samples.npz`` (``arr_0`` as sample.py writes and the ADM
    evaluator reads, or ``samples``; labels from ``labels`` or ``arr_1``)."""
    images, labels = read_npz_images(path, "--samples", ("arr_0", "samples"))
    if labels is not None and labels.shape != (len(images),):
        raise ConfigError(f"--samples {path}: labels of shape {labels.shape} for {len(images)} images")
    return images, labels


def loader_images(loader, n: int | None = None, return_labels: bool = False):
    """The first ``n`` (all if ``None``) images of a loader of ``(x in [-1, 1] NCHW, y)`` batches, as uint8 NHWC
    (``return_labels``: ``(images, their y)``)."""
    batches, labels, count = [], [], 0
    for x, y in loader:
        batches.append(x)
        labels.append(torch.as_tensor(y))
        count += len(x)
        if n is not None and count >= n:
            break
    if count < 2:
        raise ConfigError(f"the reference needs at least 2 images, found {count}")
    images = to_uint8_nhwc(torch.cat(batches)[:n])
    return (images, torch.cat(labels)[:n].numpy()) if return_labels else images


def load_reference(reference: str, image_shape: tuple[int, int, int], num_reference: int | None = None,
                   split: str = "test", seed: int = 0, data_kwargs: dict | None = None, return_labels: bool = False):
    """Reference images as uint8 NHWC: an ``.npz`` of images (``arr_0``/``samples``/``images``; (C, H, W) must
    equal ``image_shape``), ``digits:mnist`` / ``digits:sklearn`` (the offline digits), or a dataset folder /
    image-folder tree / hub name (``ImageDataModule(**data_kwargs)``: its split ``split``, resized to the
    samples' size as for training; ``{classes: [3, 7]}`` keeps those classes). At most ``num_reference`` images, a
    seeded random subset for datasets. ``return_labels``: ``(images, their classes)`` (``None`` for an ``.npz``
    without labels), which ``ImageMetrics.set_real`` compares with the samples' labels."""
    from lightning_reg.data.images import ImageDataModule

    if str(reference).endswith(".npz"):
        images, labels = read_npz_images(reference, "--reference", ("arr_0", "samples", "images"))
        if (images.shape[3], *images.shape[1:3]) != tuple(image_shape):
            raise ConfigError(f"--reference {reference} holds (C, H, W) = {(images.shape[3], *images.shape[1:3])} "
                              f"images but the samples are {tuple(image_shape)}; give a reference of the same size")
        labels = None if labels is None else labels[:num_reference]
        return (images[:num_reference], labels) if return_labels else images[:num_reference]
    kwargs = dict(data_kwargs or {})
    name = str(reference)
    if name.startswith("digits:"):
        from lightning_reg.data.digits import prepare_digits
        source, root = name.split(":", 1)[1], kwargs.pop("root", "data")
    unknown = sorted(set(kwargs) - set(inspect.signature(ImageDataModule).parameters))
    if unknown:  # before any data is prepared
        raise ConfigError(f"--reference_kwargs {unknown} are not options of ImageDataModule; see its docstring")
    if name.startswith("digits:"):
        name, kwargs["image_key"] = str(prepare_digits(source=source, root=root)), "image"
    data = ImageDataModule(**{"batch_size": 256, **kwargs, "name": name, "split": split, "val_fraction": 0.0,
                              "random_flip": False, "image_size": image_shape[1], "channels": image_shape[0],
                              "seed": seed, "max_samples": num_reference})
    data.setup("fit")  # the whole (subset of the) split is the "training" set, in a seeded random order
    return loader_images(DataLoader(data.train_set, batch_size=data.batch_size), num_reference, return_labels)


def write_row(path, row: dict) -> None:
    """``row`` as ``path``: a JSON object (``.json``, replaced) or a CSV line (``.csv``, appended; header once)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        write_json(path, row)
    elif path.suffix == ".csv":
        rows = []
        if path.is_file():
            with path.open() as f:
                rows = list(csv.DictReader(f))
        columns = list(dict.fromkeys([c for r in rows for c in r] + list(row)))

        def write(f):
            out = csv.DictWriter(f, fieldnames=columns)
            out.writeheader()
            out.writerows(rows + [row])

        atomic_write(path, write, binary=False)
    else:
        raise ConfigError(f"--output {path} must end in .json or .csv")


def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    install_yaml_budget()
    p = ArgumentParser(description="Image metrics of a samples.npz against reference images: one JSON/CSV row.",
                       exit_on_error=False, default_meta=False)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of the options below")
    p.add_argument("--samples", type=str | None, default=None,
                   help="samples.npz: uint8 NHWC images under 'arr_0' (sample.py, ADM) or 'samples', 'labels'")
    p.add_argument("--reference", type=str | None, default=None,
                   help="reference images: an .npz (arr_0), digits:mnist / digits:sklearn, a dataset folder "
                        "written by save_to_disk or a hub name (resized to the samples' size)")
    p.add_argument("--reference_split", type=str, default="test", help="the dataset split of --reference")
    p.add_argument("--reference_kwargs", type=dict | None, default=None,
                   help="more ImageDataModule options for a dataset --reference, e.g. {image_key: image}")
    p.add_argument("--num_reference", type=int | None, default=None,
                   help="reference images to use (a seeded random subset of a dataset); default: all")
    p.add_argument("--feature_network", type=str, default=INCEPTION,
                   help="a digits-classifier checkpoint (python train_classifier.py fit) or "
                        "'inception' (torchmetrics' Inception-v3)")
    p.add_argument("--adm", type=bool, default=False,
                   help="--reference is an ADM reference batch (VIRTUAL_imagenet256_labeled.npz): ADM's metrics "
                        "fid, sfid, is, precision, recall against its stored Inception statistics (metrics.adm)")
    p.add_argument("--inception_weights", type=str | None, default=None,
                   help="Inception weights file; default: the torch hub cache")
    p.add_argument("--metrics", type=list[str] | None, default=None,
                   help=f"from {list(IMAGE_METRICS)}; default {list(DEFAULT_IMAGE_METRICS)} and accuracy with a "
                        "classifier")
    p.add_argument("--clip", type=str | None, default=None,
                   help="a local CLIP folder (CLIPModel + CLIPProcessor save_pretrained, e.g. a copy of "
                        "openai/clip-vit-base-patch16): add clip_score against each sample's caption")
    p.add_argument("--prompts", type=str | None, default=None,
                   help="with --clip: sample.py's --prompts file (sample i's caption: line labels[i], or line i "
                        "without labels); default: prompts.txt beside --samples (one caption per sample)")
    p.add_argument("--reference_cache", type=str | None, default="data/feature_cache",
                   help="folder of cached reference features, keyed by the sha256 of the network and the "
                        "reference images (null: no cache)")
    p.add_argument("--seed", type=int, default=0, help="of the reference subset")
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--output", type=str | None, default=None,
                   help="result.json (written) or results.csv (a row appended); default: print only")
    return p


def read_meta(path: Path) -> dict:
    """``sample.py``'s ``meta.json`` beside the samples (setting name, ``num_classes``), or ``{}`` if absent."""
    return read_json(path, "--samples' meta.json") if os.path.lexists(path) else {}


def run(cfg) -> dict:
    """Validate everything (nothing written on bad input), compute the metrics and return the row. With CLIP score
    (``--clip`` or ``clip_score`` in ``--metrics``) the image metrics sit beside it (``CLIPScoreEvaluator``), each
    sample scored against its caption (``sample_captions``)."""
    if cfg.samples is None:
        raise ConfigError("--samples is required: a samples.npz written by sample.py (or an ADM-style npz)")
    if cfg.output is not None and Path(cfg.output).suffix not in (".json", ".csv"):
        raise ConfigError(f"--output {cfg.output} must end in .json or .csv")
    check_int("--num_reference", cfg.num_reference, minimum=2, optional=True)
    metrics = list(image_metric_names(cfg.metrics, cfg.feature_network, "--metrics"))
    images, labels = read_samples(cfg.samples)
    image_shape = (images.shape[3], images.shape[1], images.shape[2])
    meta = read_meta(Path(cfg.samples).with_name("meta.json"))
    if cfg.feature_network == INCEPTION and not cfg.adm and set(metrics) - {"clip_score"}:
        inception_weights_file(cfg.inception_weights, "--inception_weights")  # the error names the flag
    clip = cfg.clip is not None or "clip_score" in metrics
    if clip:
        if cfg.clip is None:
            raise ConfigError("clip_score needs --clip: a local CLIP folder")
        if cfg.adm:
            raise ConfigError("--clip is for text-to-image samples, not an ADM reference batch (--adm)")
        captions, labels = sample_captions(cfg, labels, len(images))  # the labels now index the captions
        metrics = [m for m in metrics if m != "clip_score"]
    evaluator = None
    if cfg.adm:  # metrics.adm: the reference batch's own statistics and images
        from lightning_reg.metrics.adm import build_adm_evaluator
        evaluator = build_adm_evaluator(cfg.reference, cfg.metrics, cfg.feature_network, cfg.inception_weights,
                                        cfg.device)
    elif metrics or not clip:
        evaluator = build_image_evaluator(metrics, image_shape, cfg.feature_network, cfg.inception_weights,
                                          None if clip else meta.get("num_classes"), cfg.device,
                                          None if clip else cfg.reference_cache)
    if clip:
        evaluator = CLIPScoreEvaluator(evaluator, captions, cfg.clip, image_shape, cfg.device, "--clip")
    reference = None
    if not cfg.adm and {"fid", "kid"} & set(metrics):
        if cfg.reference is None:
            raise ConfigError("--reference is required for fid and kid: the real images to compare with")
        reference, classes = load_reference(cfg.reference, image_shape, cfg.num_reference, cfg.reference_split,
                                            cfg.seed, cfg.reference_kwargs, return_labels=True)
        evaluator.set_real(reference, classes)
    if clip:
        row = {"samples": str(cfg.samples), "num_samples": len(images), "reference": cfg.reference, "clip": cfg.clip}
    else:
        row = {"samples": str(cfg.samples), "setting": meta.get("setting"), "num_samples": len(images),
               "reference": cfg.reference, "num_reference": None if reference is None else len(reference),
               "feature_network": cfg.feature_network}
    return row | evaluate_samples(images, labels, evaluator)


def sample_captions(cfg, labels, n: int) -> tuple[list[str], np.ndarray]:
    """``(captions, index of each sample's caption)`` for CLIP score: ``--prompts`` indexed by the labels (or in
    order), else ``prompts.txt`` beside ``--samples`` (sample.py writes one caption per sample)."""
    from lightning_reg.data.prompts import read_prompts

    if cfg.prompts is None:
        path = Path(cfg.samples).with_name("prompts.txt")
        if not path.is_file():
            raise ConfigError(f"--clip needs the samples' captions: no prompts.txt beside --samples {cfg.samples}; "
                              "give --prompts (the file sample.py sampled from)")
        captions, index = read_prompts(path, "prompts.txt"), np.arange(n)
    else:
        captions = read_prompts(cfg.prompts)
        index = labels if labels is not None else np.arange(n)
    if len(index) != n or index.max() >= len(captions):
        raise ConfigError(f"{cfg.prompts or 'prompts.txt'} has {len(captions)} captions, too few for the {n} samples")
    return captions, index


def main(args: list[str] | None = None) -> None:
    """``python evaluate.py --samples run/samples.npz --reference digits:mnist --feature_network clf.ckpt``."""
    from argparse import ArgumentError

    try:
        cfg = build_parser().parse_args(args)
        row = run(cfg)
    except ArgumentError as err:
        fail(f"{parse_error_message(err)} (run with --help for the accepted options)")
    except ConfigError as err:
        fail(str(err))
    print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if "kid" in row:
        print(f"note: {KID_NOTE}")
    if cfg.output is not None:
        write_row(cfg.output, row)
        print(f"wrote {cfg.output}")


__all__ = ["CLIPScoreEvaluator", "IMAGE_METRICS", "INCEPTION", "build_evaluator", "build_image_evaluator", "evaluate_samples", "load_reference",
           "loader_images", "main", "read_samples", "run", "write_row"]
