"""A new user's first hour (#28): ``--help`` before the heavy imports, messages that name the file, the near
name and what a path is relative to, ``evaluate.py`` that never reaches for the network, warnings and notes on
FID/KID, progress that counts the whole job, and ``wall_time_s`` from the start of the process."""

import io
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import classifier_checkpoint
from torch import nn

from lightning_reg.data.digits import load_digit_arrays
from lightning_reg.metrics.evaluate import load_reference
from lightning_reg.metrics.evaluate import main as evaluate_main
from lightning_reg.metrics.images import ImageMetrics
from lightning_reg.sampling.cli import main as sample_main
from lightning_reg.sampling.config import SampleConfig, parse_config
from lightning_reg.sampling.sweep import main as sweep_main

ROOT = Path(__file__).parents[1]
HEAVY = re.compile(r"\|\s+(torch|lightning|torchmetrics|diffusers|transformers)(\.|$)", re.M)  # -X importtime rows
TINY = ["--num_samples", "4", "--shard_size", "4", "--batch_size", "4", "--steps", "2", "--seed", "1"]


def python(*args, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", ["sample.py", "sweep.py"])
def test_help_imports_neither_torch_nor_lightning_nor_diffusers(script):
    done = python("-X", "importtime", str(ROOT / script), "--help")
    assert done.returncode == 0 and done.stdout.startswith(f"usage: {script}") and "--num_samples" in done.stdout
    assert "import time:" in done.stderr and not HEAVY.findall(done.stderr), HEAVY.findall(done.stderr)[:3]


def test_a_config_key_typo_names_the_file_and_the_near_name(tmp_path, refused):
    config = tmp_path / "f.yaml"
    config.write_text("checkpoint: x.ckpt\nnum_sample: 10\noutput: out\n")
    done = python("-X", "importtime", str(ROOT / "sample.py"), "--config", "f.yaml", cwd=tmp_path)
    errors = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert done.returncode == 2 and errors == [
        "error: --config f.yaml: unknown option 'num_sample' (did you mean 'num_samples'?) (run with --help for the "
        "accepted options)"]
    assert not HEAVY.findall(done.stderr)  # refused before torch is imported

    nested = tmp_path / "g.yaml"
    nested.write_text("trainer: {devicez: 2}\n")
    refused(lambda: parse_config(SampleConfig, ["--config", str(config), f"--config={nested}"]),
            rf"^error: --config {re.escape(str(nested))}: unknown option 'trainer.devicez' \(did you mean "
            r"'trainer.devices'\?\)", tmp_path / "out")
    refused(lambda: parse_config(SampleConfig, ["--num_sampels", "10"]),
            r"^error: unrecognized arguments: --num_sampels 10 \(did you mean --num_samples\?\)", tmp_path / "out")
    bad = tmp_path / "h.yaml"
    bad.write_text("steps: x\n")
    refused(lambda: parse_config(SampleConfig, ["--config", str(bad)]),
            rf"^error: --config {re.escape(str(bad))}: Parser key \"steps\": Expected a <class 'int'>",
            tmp_path / "out")


def test_a_missing_relative_path_says_it_is_relative_to_the_working_directory(tmp_path, monkeypatch, refused):
    (tmp_path / "configs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    config = tmp_path / "configs" / "run.yaml"
    config.write_text("checkpoint: runs/x.ckpt\noutput: out\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    refused(lambda: sample_main(["--config", str(config)]),
            rf"^error: --checkpoint runs/x.ckpt does not exist \(relative to the working directory "
            rf"{re.escape(str(tmp_path / 'elsewhere'))}\)$", tmp_path / "elsewhere" / "out")
    refused(lambda: sample_main(["--checkpoint", str(tmp_path / "x.ckpt"), "--output", "out"]),
            rf"^error: --checkpoint {re.escape(str(tmp_path / 'x.ckpt'))} does not exist$", "out")  # absolute: no note


def test_evaluate_without_a_feature_network_names_the_flags_and_downloads_nothing(tmp_path, monkeypatch, refused,
                                                                                 capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "samples.npz", samples=np.zeros((4, 8, 8, 1), np.uint8), labels=np.arange(4))
    out = tmp_path / "row.json"
    refused(lambda: evaluate_main(["--samples", "samples.npz", "--reference", "digits:mnist", "--output", str(out)]),
            r"^error: the Inception weights .* are not at .*torch_home/hub/checkpoints/weights-inception-2015-12-"
            r"05-6726825d.pth, and nothing is downloaded at run time: copy .* to that path, or give its path as "
            r"--inception_weights FILE, or use the digits classifier as --feature_network FILE$", out)
    refused(lambda: evaluate_main(["--samples", "samples.npz", "--inception_weights", "w.pth", "--output", str(out)]),
            rf"^error: --inception_weights w.pth does not exist \(relative to the working directory "
            rf"{re.escape(str(tmp_path))}\); it must be torch-fidelity's", out)
    captured = capsys.readouterr()
    assert "Downloading" not in captured.out + captured.err
    assert not (tmp_path / "torch_home").exists() and not (tmp_path / "data").exists()  # no digits prepared either


class Pixels(nn.Module):
    """uint8 NCHW images -> their pixels as features: a feature network with no weights."""

    def forward(self, images):
        return images.flatten(1).float()


def test_fid_warns_once_of_a_reference_holding_other_classes():
    real, fake = (torch.randint(0, 256, (n, 4, 4, 1), dtype=torch.uint8) for n in (40, 20))
    metrics = ImageMetrics(["fid"], (1, 4, 4), Pixels())
    metrics.set_real(real, classes=np.arange(40) % 10)
    with pytest.warns(UserWarning, match=r"^FID/KID compare different class mixtures: the reference holds classes "
                                         r"\[0, 1, 2, 4, 5, 6, 8, 9\] the samples were not drawn for \(samples: "
                                         r"classes \[3, 7\]\); give a reference of the sampled classes only \(a "
                                         r"dataset reference: reference_kwargs \{classes: \[3, 7\]\}"):
        metrics(fake, torch.tensor([3, 7] * 10))
    with pytest.warns(UserWarning, match=r"the reference holds classes \[0\] .* and lacks the samples' \[10\]"):
        metrics(fake, torch.tensor(list(range(1, 11)) * 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics(fake, torch.arange(20) % 10)  # the reference's classes: no warning
        metrics.set_real(real)  # classes not known: nothing to compare
        metrics(fake, torch.tensor([3, 7] * 10))


def test_evaluate_reads_the_reference_classes_warns_and_notes_kid(tmp_path, capsys, one_thread):
    images, labels = load_digit_arrays("sklearn")
    np.savez(tmp_path / "samples.npz", samples=images[:40, ..., None], labels=np.array([3, 7] * 20))
    np.savez(tmp_path / "reference.npz", arr_0=images[100:200, ..., None], labels=labels[100:200])
    classifier_checkpoint(tmp_path / "clf.ckpt")
    reference, classes = load_reference(str(tmp_path / "reference.npz"), (1, 8, 8), 50, return_labels=True)
    assert reference.shape == (50, 8, 8, 1) and classes.tolist() == labels[100:150].tolist()
    with pytest.warns(UserWarning, match=r"the reference holds classes \[0, 1, 2, 4, 5, 6, 8, 9\] the samples were "
                                         r"not drawn for"):
        evaluate_main(["--samples", str(tmp_path / "samples.npz"), "--reference", str(tmp_path / "reference.npz"),
                       "--feature_network", str(tmp_path / "clf.ckpt"), "--metrics", "[fid, kid]",
                       "--reference_cache", "null"])
    out = capsys.readouterr().out.splitlines()
    assert re.match(r"samples=.*, fid=[\d.]+, kid=-?[\d.e-]+, kid_std=[\d.e-]+$", out[0]), out
    assert out[1] == ("note: kid is the unbiased estimate of the squared MMD between the two feature sets (cubic "
                      "polynomial kernel, mean over subsets; kid_std their spread), reported x1, not x1000: unbiased, "
                      "so it is near 0 and can be negative when the sets are close")


def test_a_resumed_sweep_counts_the_whole_sweep(checkpoint, tmp_path, capsys, one_thread):
    args = ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "sweep"), "--distribution", "toy2d",
            "--methods", "[{method: cfg, weights: [0.5, 2]}]", "--reg", "[none, paper]", *TINY]
    sweep_main([*args, "--max_settings", "2"])
    first = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    sweep_main(args)
    second = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert first == ["[1/4] cfg_w0.5_none", "[2/4] cfg_w2_none"]
    assert second == ["[3/4] cfg_w0.5_paper", "[4/4] cfg_w2_paper"]


class Terminal(io.StringIO):
    """A standard error that says it is a terminal, as tqdm asks before drawing a bar (``disable=None``)."""

    def isatty(self) -> bool:
        return True


def test_shard_bars_only_on_a_terminal_and_never_empty(checkpoint, tmp_path, monkeypatch, capsys, one_thread):
    args = ["--checkpoint", str(checkpoint), "--distribution", "toy2d", *TINY]
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    sample_main([*args, "--output", str(tmp_path / "run")])
    assert "cfg_w1_none shards: 100%" in terminal.getvalue()
    terminal.truncate(0)
    capsys.readouterr()
    sample_main([*args, "--output", str(tmp_path / "run")])  # finished: nothing to do, and no empty bar
    assert "shards" not in terminal.getvalue() and "0it" not in terminal.getvalue()
    assert capsys.readouterr().out == f"{tmp_path / 'run'} already holds this run's 4 samples (complete); nothing to " \
                                      "do\n"
    monkeypatch.undo()  # pytest's captured standard error: not a terminal, so no bars at all
    sample_main([*args, "--output", str(tmp_path / "logged")])
    assert "shards" not in capsys.readouterr().err


def test_wall_time_counts_the_start_up(checkpoint, tmp_path):
    """``wall_time_s`` covers what ``sample.py`` imports after its first line: at least the import of the sampling
    CLI, measured by ``-X importtime`` in the same process (before, the clock started after the imports)."""
    out = tmp_path / "run"
    done = python("-X", "importtime", str(ROOT / "sample.py"), "--checkpoint", str(checkpoint), "--output", str(out),
                  *TINY)
    assert done.returncode == 0, done.stderr[-2000:]
    (import_us,) = [int(line.split("|")[1]) for line in done.stderr.splitlines()
                    if line.split("|")[-1].strip() == "lightning_reg.sampling.cli"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["wall_time_s"] >= import_us / 1e6 + meta["sampling_time_s"] > 1.0  # torch and Lightning: > 1 s
