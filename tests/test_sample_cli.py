"""``sample.py``: 1 vs 2 DDP processes, resumption, outputs, and one-line errors that write nothing."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from helpers import TOY_SAMPLE_ARGS as ARGS  # 30 samples in 3 shards of 10 over the session's `checkpoint`
from helpers import train_tiny_dit
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_reg.sampling.cli import main as sample_main
from lightning_reg.sampling.engine import balanced_labels

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def reference_run(checkpoint, tmp_path_factory) -> Path:
    """An uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("ref") / "out"
    sample_main(["--checkpoint", str(checkpoint), "--output", str(out), "--distribution", "toy2d", *ARGS])
    return out


def load(folder: Path):
    with np.load(folder / "samples.npz") as f:
        assert f.files == ["arr_0", "labels"]  # arr_0: what ADM's evaluator reads
        return f["arr_0"], f["labels"]


def test_outputs_of_a_run(reference_run, checkpoint):
    samples, labels = load(reference_run)
    assert samples.dtype == np.float32 and samples.shape == (30, 2) and np.isfinite(samples).all()
    assert labels.tolist() == balanced_labels(30, 2).tolist()
    assert sorted(p.name for p in reference_run.iterdir()) == [
        "meta.json", "run.json", "samples.npz", "samples.png", "shard_00000.npz", "shard_00001.npz",
        "shard_00002.npz"]
    meta = json.loads((reference_run / "meta.json").read_text())
    assert meta["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert meta["world_size"] == 1 and meta["setting"] == "cfg_w1_paper" and meta["config"]["seed"] == 5
    assert 0 < meta["sampling_time_s"] <= meta["wall_time_s"] and meta["new_shards"] == 3
    assert meta["generated_samples"] == 30 and meta["config"]["precision"] == "fp32"
    assert meta["throughput_images_per_s"] == pytest.approx(30 / meta["sampling_time_s"], rel=0.01)
    assert meta["peak_memory_measure"] == "cpu_peak_rss" and meta["peak_memory_bytes"] > 100 * 2 ** 20  # torch alone
    assert meta["versions"] == {"torch": torch.__version__, "lightning": lightning.__version__,
                                "lightning_reg": "0.1.0"}
    assert set(meta["metrics"]) == {"log_likelihood", "energy_distance", "sliced_wasserstein", "on_shape"}
    with np.load(reference_run / "shard_00001.npz") as shard:
        assert shard["indices"].tolist() == list(range(10, 20))
        assert np.array_equal(shard["samples"], samples[10:20])


@pytest.mark.slow
def test_two_ddp_processes_equal_one(reference_run, checkpoint, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--checkpoint", str(checkpoint), "--output",
                           str(out), *ARGS, "--trainer.devices", "2", "--trainer.accelerator", "cpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for got, want in zip(load(out), load(reference_run)):
        assert np.array_equal(got, want)  # bit-identical
    assert json.loads((out / "meta.json").read_text())["world_size"] == 2


def test_interrupted_then_resumed_equals_uninterrupted(reference_run, checkpoint, tmp_path, capsys):
    out = tmp_path / "resumed"
    args = ["--checkpoint", str(checkpoint), "--output", str(out), "--distribution", "toy2d", *ARGS]
    sample_main([*args, "--max_shards", "2"])
    assert "run the same command again to resume" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["run.json", "shard_00000.npz", "shard_00001.npz"]
    before = (out / "shard_00000.npz").stat().st_mtime_ns
    sample_main(args)
    assert (out / "shard_00000.npz").stat().st_mtime_ns == before  # finished shards are not redone
    assert json.loads((out / "meta.json").read_text())["new_shards"] == 1
    for got, want in zip(load(out), load(reference_run)):
        assert np.array_equal(got, want)
    sample_main(args)
    assert "nothing to do" in capsys.readouterr().out


def test_overwrite_replaces_another_run(reference_run, checkpoint, tmp_path):
    out = tmp_path / "over"
    base = ["--checkpoint", str(checkpoint), "--output", str(out), "--num_samples", "6", "--steps", "3"]
    sample_main([*base, "--seed", "0"])
    first = load(out)[0]
    sample_main([*base, "--seed", "1", "--overwrite", "true", "--labels", "[1]"])
    samples, labels = load(out)
    assert labels.tolist() == [1] * 6 and not np.array_equal(samples, first)
    assert json.loads((out / "run.json").read_text())["seed"] == 1


def foreign_checkpoints(checkpoint: Path, folder: Path) -> dict[str, Path]:
    """A checkpoint of another LightningModule, and ours with a weight removed."""
    other = folder / "boring.ckpt"
    torch.save({"state_dict": BoringModel().state_dict(), "hyper_parameters": {},
                "pytorch-lightning_version": lightning.__version__}, other)
    ckpt = torch.load(checkpoint, weights_only=False)
    del ckpt["state_dict"]["net.x_proj.weight"]
    missing = folder / "missing.ckpt"
    torch.save(ckpt, missing)
    return {"other": other, "missing": missing}


@pytest.mark.parametrize("case, args, message", [
    ("other", [], "is not a loadable ConditionalDiffusion checkpoint: .*no 'net'"),
    ("missing", [], r"is not a loadable ConditionalDiffusion checkpoint: .*missing: net\.x_proj\.weight"),
    ("ok", ["--num_samples", "0"], "--num_samples must be a positive integer, got 0"),
    ("ok", ["--labels", "[0, 2]"], r"--labels: label ids must lie in \[0, 1\]"),
    ("ok", ["--guidance", "{method: classifier}"], "unknown guidance method 'classifier'"),
    ("ok", ["--guidance", "{method: cfg, reg: half}"], "unknown REG mode 'half'"),
    ("ok", ["--sampler", "euler"], "unknown sampler 'euler'"),
    ("ok", ["--sampler", "edm_heun"], "sampler 'edm_heun' needs the 'edm' schedule"),
    ("ok", ["--steps", "two"], "steps"),
    ("ok", ["--distribution", "toy1d"], "--distribution toy1d has 1 classes in 1D"),
    ("ok", ["--distribution", "toy3d"], r"choose one of \['toy1d', 'toy2d', 'toy2d_overlap'\] or null"),
    ("ok", ["--precision", "half"], r"--precision must be one of \['fp32', 'bf16', 'fp16'\], got 'half'"),
    ("ok", ["--image_size", "256"], "--image_size is for a public DiT checkpoint: give --model too"),
    ("ok", ["--vae", "./vae/missing"], "--vae ./vae/missing does not exist"),
    ("ok", ["--model", "DiT-XL/2"], "--model DiT-XL/2 samples latents: give --vae"),
])
def test_bad_input_one_line_and_no_output(checkpoint, tmp_path, refused, case, args, message):
    ckpt = foreign_checkpoints(checkpoint, tmp_path)[case] if case != "ok" else checkpoint
    out = tmp_path / "out"
    refused(lambda: sample_main(["--checkpoint", str(ckpt), "--output", str(out), "--num_samples", "4", "--steps",
                                 "2", *args]), message, out)


def test_another_runs_folder_is_refused_and_left_alone(reference_run, checkpoint, capsys):
    files = {p.name: p.stat().st_mtime_ns for p in reference_run.iterdir()}
    with pytest.raises(SystemExit) as exit_info:
        sample_main(["--checkpoint", str(checkpoint), "--output", str(reference_run), *ARGS, "--seed", "6"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "holds another sampling run (arguments differ in ['seed'])" in err and "--overwrite true" in err
    assert {p.name: p.stat().st_mtime_ns for p in reference_run.iterdir()} == files


def test_fingerprint_holds_what_decides_the_samples(tmp_path):
    """One policy (``SampleConfig.fingerprint``, each field marked by what it decides): where, how fast and how
    much at once a run goes, and its metrics, do not count; every option that decides the samples does; the
    files count by their sha256 (the loaded model's, or the prompts'), never by their paths."""
    from lightning_reg.sampling.config import SampleConfig
    from lightning_reg.sampling.writer import fingerprint_changes

    for name, text in (("p.txt", "a seven\n"), ("q.txt", "a seven\n"), ("r.txt", "an ox\n")):
        (tmp_path / name).write_text(text)
    guidance = {"method": "cfg", "scale": 1.0, "reg": "paper", "reference_checkpoint": "guide.ckpt"}
    base = {"checkpoint": "a.ckpt", "output": "out", "guidance": guidance, "prompts": str(tmp_path / "p.txt")}

    fingerprint = SampleConfig(**base).fingerprint("c" * 64, "r" * 64)

    def changes(sha256=("c" * 64, "r" * 64), **change) -> list[str]:
        return fingerprint_changes(fingerprint, SampleConfig(**{**base, **change}).fingerprint(*sha256))

    assert fingerprint["guidance"] == {"method": "cfg", "scale": 1.0, "reg": "paper"}
    assert (fingerprint["checkpoint_sha256"], fingerprint["reference_sha256"]) == ("c" * 64, "r" * 64)
    assert not {"checkpoint", "prompts", "output", "batch_size", "trainer", "evaluation"} & set(fingerprint)
    for same in ({"output": "elsewhere"}, {"overwrite": True}, {"max_shards": 1}, {"batch_size": 7},
                 {"compile": True}, {"gradient_checkpointing": True}, {"trainer": {"devices": 2, "num_nodes": 2}},
                 {"distribution": "toy2d"}, {"checkpoint": "b.ckpt"}, {"prompts": str(tmp_path / "q.txt")},
                 {"guidance": {**guidance, "reference_checkpoint": "moved.ckpt"}}):
        assert changes(**same) == [], same
    for key, value in {"format": "dit", "model": "DiT-S/8", "image_size": 64, "num_heads": 4, "vae": "vae",
                       "negative_prompt": "blurry", "precision": "bf16", "ema": False, "sampler": "ddim",
                       "sampler_kwargs": {"eta": 0.5}, "steps": 3, "num_samples": 7, "seed": 1, "shard_size": 5,
                       "guidance": {**guidance, "scale": 2.0}}.items():
        assert changes(**{key: value}) == [key], key
    assert changes(prompts=str(tmp_path / "r.txt")) == ["prompts_sha256"]
    assert changes(("d" * 64, "r" * 64)) == ["checkpoint_sha256"] and changes(("c" * 64, None)) == ["reference_sha256"]
    assert changes(labels=[1], prompts=None) == ["labels", "prompts_sha256"]
    for field in SampleConfig.__dataclass_fields__.values():
        assert field.metadata.get("decides", "samples") in ("samples", "metrics", "content", "run"), field.name


def test_image_checkpoint_gives_uint8_samples_and_pngs(tmp_path):
    from PIL import Image

    from lightning_reg.data.synthetic_images import make_synthetic_image_dataset
    data = make_synthetic_image_dataset(tmp_path / "data", num_classes=3, n_per_class=4, image_size=8)
    ckpt = train_tiny_dit(tmp_path, 8, 3, "--data", "lightning_reg.data.images.ImageDataModule",
                          "--data.name", str(data), "--data.image_size", "8", "--data.batch_size", "4")
    out = tmp_path / "out"
    sample_main(["--checkpoint", str(ckpt), "--output", str(out), "--num_samples", "5", "--steps", "2"])
    samples, labels = load(out)
    assert samples.dtype == np.uint8 and samples.shape == (5, 8, 8, 3) and labels.tolist() == [0, 1, 2, 0, 1]
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == ["000000.png", "000001.png", "000002.png", "000003.png", "000004.png", "grid.png"]
    assert np.array_equal(np.asarray(Image.open(out / "images" / "000003.png")), samples[3])
    assert np.asarray(Image.open(out / "images" / "grid.png")).shape == (8, 64, 3)  # one row of 8, padded


def test_bf16_autocast_samples_close_to_fp32(reference_run, checkpoint, tmp_path, one_thread):
    out = tmp_path / "bf16"
    sample_main(["--checkpoint", str(checkpoint), "--output", str(out), *ARGS, "--precision", "bf16",
                 "--num_samples", "4", "--shard_size", "4"])
    got, want = load(out)[0], load(reference_run)[0][:4]  # the same batch of samples 0-3
    assert not np.array_equal(got, want) and np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert json.loads((out / "run.json").read_text())["precision"] == "bf16"


@pytest.mark.parametrize("reg", ["paper", "vjp"])
def test_reg_under_bf16_autocast(reg, one_thread):
    """REG's backward pass under autocast: its correction (REG minus CFG) in bf16 matches fp32's to bf16 rounding."""
    from helpers import tiny_latent_dit

    from lightning_reg.diffusion.denoiser import Denoiser
    from lightning_reg.diffusion.predictions import Prediction
    from lightning_reg.diffusion.schedules import VPSchedule
    from lightning_reg.guidance import GuidedDenoiser, make_guidance
    from lightning_reg.sampling.engine import autocast

    model = Denoiser(tiny_latent_dit(), VPSchedule(), Prediction("eps"))
    x, y, t = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2]), 500.0
    rectified = GuidedDenoiser(model, make_guidance(method="cfg", scale=2.0, reg=reg), y)
    plain = GuidedDenoiser(model, make_guidance(method="cfg", scale=2.0), y)
    with torch.no_grad():
        want = rectified(x, t) - plain(x, t)
        with autocast("cpu", "bf16"):
            guided = rectified(x, t)
            got = guided - plain(x, t)
    assert guided.dtype == torch.float32 and torch.isfinite(guided).all() and not torch.equal(got, want)
    assert torch.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.95
    assert (got - want).norm() < 0.4 * want.norm()


def test_compiled_backbone_samples_like_eager(reference_run, checkpoint, tmp_path, monkeypatch, one_thread):
    """``--compile true`` compiles the backbone in place; REG's ``autograd.grad`` runs through it. (Backend
    ``aot_eager`` here: dynamo + AOTAutograd as with inductor, without minutes of C++ compilation.)"""
    compiled = []
    compile_fn = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or compile_fn(
        fn, **{**kw, "backend": "aot_eager"}))
    out = tmp_path / "compiled"
    sample_main(["--checkpoint", str(checkpoint), "--output", str(out), *ARGS, "--compile", "true",
                 "--num_samples", "4", "--shard_size", "4"])
    assert len(compiled) == 1  # the backbone, once
    for got, want in zip(load(out), (a[:4] for a in load(reference_run))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def public_dit(tmp_path_factory):
    """A DiT-S/8 state dict in the public layout (10 classes, 8x8x4 latents: 64x64 images) and a tiny VAE."""
    from helpers import tiny_autoencoder

    from lightning_reg.models.dit import DIT_CONFIGS, DiT

    folder = tmp_path_factory.mktemp("public")
    torch.manual_seed(0)
    net = DiT(input_size=8, in_channels=4, num_classes=10, **DIT_CONFIGS["DiT-S/8"])
    torch.save(net.state_dict(), folder / "DiT-S-8-64x64.pt")
    tiny_autoencoder().save_pretrained(folder / "vae")
    return folder / "DiT-S-8-64x64.pt", folder / "vae"


def test_public_dit_checkpoint_samples_decoded_images(public_dit, tmp_path, one_thread):
    ckpt, vae = public_dit
    out = tmp_path / "out"
    sample_main(["--checkpoint", str(ckpt), "--model", "DiT-S/8", "--image_size", "64", "--vae", str(vae),
                 "--output", str(out), "--num_samples", "3", "--steps", "2", "--guidance",
                 "{method: cfg, scale: 1.5, convention: w2, reg: paper, guidance_channels: [0, 1, 2]}"])
    images, labels = load(out)
    assert images.dtype == np.uint8 and images.shape == (3, 64, 64, 3) and labels.tolist() == [0, 1, 2]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["data_shape"] == [4, 8, 8] and meta["setting"] == "cfg_w2x1.5_paper_guidance_channels0-1-2"
    assert json.loads((out / "run.json").read_text())["model"] == "DiT-S/8"


@pytest.mark.parametrize("args, message", [
    (["--model", "DiT-B/8"], r"DiT checkpoint .* is DiT-S/8 on 8x8 inputs, 10 classes, not DiT-B/8 on 8x8 inputs"),
    (["--model", "DiT-S/8", "--image_size", "32"], r"DiT checkpoint .* on 8x8 inputs, 10 classes, not 32x32 images"),
    ([], r"--checkpoint .*\(a public DiT checkpoint needs --model, e.g. DiT-XL/2\)$"),
])
def test_public_dit_bad_input_one_line(public_dit, tmp_path, refused, args, message):
    ckpt, vae = public_dit
    out = tmp_path / "out"
    refused(lambda: sample_main(["--checkpoint", str(ckpt), "--vae", str(vae), "--output", str(out), *args]), message,
            out)


def test_dit_xl2_config_and_its_variants_parse():
    """``configs/sample_dit_xl2_256.yaml`` parses, and every ``--guidance`` variant in its header builds."""
    import yaml

    from lightning_reg.guidance import make_guidance
    from lightning_reg.sampling.cli import build_parser

    path = ROOT / "configs" / "sample_dit_xl2_256.yaml"
    cfg = build_parser().parse_args(["--config", str(path)])
    assert (cfg.model, cfg.image_size, cfg.steps, cfg.num_samples, cfg.precision) == ("DiT-XL/2", 256, 250, 50000, "bf16")
    variants = [cfg.guidance] + [yaml.safe_load(g) for g in re.findall(r"--guidance '(.*)'", path.read_text())]
    assert len(variants) == 5
    for params in variants:
        for reg in ("none", "paper", "vjp"):
            guidance = make_guidance(**{**params, "reg": reg})
            assert guidance.branches.channels == [0, 1, 2] and guidance.rule.convention == "w2" and guidance.w == 0.5
