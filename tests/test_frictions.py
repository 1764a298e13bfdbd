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

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from helpers import classifier_checkpoint
from torch import nn

from lightning_reg.data.digits import load_digit_arrays
from lightning_reg.errors import ConfigError
from lightning_reg.experiments import cheap_reg, toy1d, toy2d
from lightning_reg.experiments.common import error_table, parser, prepare, print_table
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


# the toy experiments: defaults in --help, one flag style, tables that say what they hold, readable figures

def test_toy_experiments_help_shows_defaults_and_the_entry_points_flag_style(capsys):
    for main, default in ((toy1d.main, "(default: outputs/toy1d)"), (toy2d.main, "(default: outputs/toy2d)"),
                          (cheap_reg.main, "(default: outputs/cheap_reg)")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert exit_info.value.code == 0 and f"--output OUTPUT output folder {default}" in text
        assert "--num_timesteps NUM_TIMESTEPS" in text and "(default: 1000)" in text and "--batch_size" in text
        assert "--num-timesteps" not in text and "--out " not in text and "(default: None)" not in text
    with pytest.raises(SystemExit):
        toy2d.main(["--help"])
    assert "--paper_t PAPER_T the step shown" in " ".join(capsys.readouterr().out.split())


def test_old_experiment_flag_spellings_work_with_one_deprecation_line(capsys):
    p = parser("toy", steps=5, rollouts=2, out="outputs/x")
    old = p.parse_args(["--exact", "--num-timesteps", "20", "--out", "o", "--batch-size", "7"])
    assert capsys.readouterr().err.splitlines() == [
        "warning: --num-timesteps is deprecated; use --num_timesteps", "warning: --out is deprecated; use --output",
        "warning: --batch-size is deprecated; use --batch_size"]
    new = p.parse_args(["--exact", "--num_timesteps", "20", "--output", "o", "--batch_size", "7"])
    assert vars(old) == vars(new) and (new.num_timesteps, new.output, new.batch_size) == (20, Path("o"), 7)
    assert capsys.readouterr().err == ""
    assert p.parse_args(["--exact"]).output == Path("outputs/x")  # the hidden old spelling keeps the default
    with pytest.raises(ConfigError, match="--steps 25 exceeds --num_timesteps 20"):
        prepare(p.parse_args(["--exact", "--steps", "25", "--num_timesteps", "20"]))


def test_the_per_step_error_table_says_what_its_numbers_are(capsys):
    """Two steps, two grid points: CFG off the oracle by (3, 4) and (0, 1), REG by 0.5 in x: the table holds the
    mean of ||estimate - oracle|| over the grid per step, then the mean and median over everything."""
    oracle = torch.zeros(2, 2, 2)
    cfg = oracle + torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    reg = oracle + torch.tensor([0.5, 0.0])
    print_table(error_table(torch.tensor([999, 500]), {"oracle": oracle, "cfg": cfg, "reg_paper": reg,
                                                       "reg_vjp": reg}))
    assert capsys.readouterr().out.splitlines() == [
        "error to the oracle grad_x log E_t, ||estimate - oracle|| (|.| in 1D), mean over the grid per sampling step",
        "(step 0 = the noisiest, t = its time index; all / median: over every step and grid point)",
        "  step     t         cfg   reg_paper     reg_vjp",
        "     0   999           3         0.5         0.5",
        "     1   500           3         0.5         0.5",
        "   all                 3         0.5         0.5",
        "median                 1         0.5         0.5",
        "steps where REG (paper) is not closer to the oracle than CFG: none"]


def test_error_figures_tick_whole_steps():
    times, x = torch.arange(19, -1, -1), torch.linspace(-1.0, 2.0, 6)  # 20 steps: the default ticks are 2.5 apart
    grads = {m: torch.rand(20, 6, 1, generator=torch.Generator().manual_seed(i))
             for i, m in enumerate(("oracle", "cfg", "reg_paper", "reg_vjp"))}
    steps = toy1d.error_figure(x, times, grads).axes[0].get_yticks()
    assert len(steps) >= 3 and all(float(s).is_integer() for s in steps)
    rows = [{"step": i, "cfg": 1.0 + i, "reg_paper": 1.0, "reg_vjp": 2.0} for i in range(5)]
    steps = toy2d.error_figure(rows).axes[0].get_xticks()
    assert len(steps) >= 3 and all(float(s).is_integer() for s in steps)
    plt.close("all")


def test_fields_arrows_point_along_the_field_with_length_and_colour_the_log_magnitude():
    """A grid of 4 points; the oracle's field 1e-7 long (Monte Carlo noise), CFG's 0.1, REG's 1e-4: one log scale
    of 6 decades from -1 down to -7, arrows 0.8 grid spacings long at the top, 0.2 at the bottom, 0.5 half way."""
    x = toy2d.grid(2, torch.float64)  # spacing 3
    direction = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, -1.0], [-0.8, 0.6]], dtype=torch.float64)[None]
    grads = {"oracle": 1e-7 * direction, "cfg": 0.1 * direction.flip(1), "reg_paper": 1e-4 * direction,
             "reg_vjp": 1e-4 * direction}
    fig = toy2d.fields_figure(x, grads, 0, 500, 9, torch.ones(8, 8))
    lengths = {"oracle": 0.2 * 3, "cfg": 0.8 * 3, "reg_paper": 0.5 * 3, "reg_vjp": 0.5 * 3}
    for ax, (m, g) in zip(fig.axes, grads.items()):
        q = ax.collections[0]
        arrows = torch.tensor(np.stack([q.U, q.V], 1))
        assert arrows.norm(dim=1) / q.scale == pytest.approx([lengths[m]] * 4)  # in data units: grid spacings
        assert arrows / arrows.norm(dim=1, keepdim=True) == pytest.approx(g[0] / g[0].norm(dim=1, keepdim=True))
        assert list(q.get_array()) == pytest.approx(g[0].norm(dim=1).log10().tolist())
        assert q.norm.vmin == pytest.approx(-7) and q.norm.vmax == pytest.approx(-1)
    assert fig.axes[0].get_title() == "oracle grad log E_t\nmedian |g| = 1e-07"
    # CFG: the oracle's arrows with x and y swapped, 16, 90, 90 and 164 deg off (torch's median: the lower middle)
    assert fig.axes[1].get_title() == "CFG  grad log R_t\nmedian |g| = 0.1, 90 deg to the oracle"
    assert fig.axes[2].get_title() == "REG (paper)\nmedian |g| = 0.0001, 0 deg to the oracle"
    assert "colour and length: log10 |gradient|" in fig.get_suptitle()
    assert fig.axes[-1].get_ylabel() == "log10 |gradient| (arrow colour and length)"
    plt.close(fig)
