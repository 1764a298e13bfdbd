"""``sample.py --checkpoint FOLDER --prompts FILE`` on the tiny diffusers components: sample ``i`` takes caption ``i``;
for each family (SD 1.x, SDXL, SD3, Flux; CFG with REG paper) 1 vs 2 DDP processes and an interrupted run give the
same ``samples.npz`` bytes and ``evaluate.py`` writes the run's CLIP score; the prompts are written beside the
samples, and bad input is one line with nothing written."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

from lightning_reg.guidance import make_guidance
from lightning_reg.sampling.cli import main as sample_main
from lightning_reg.sampling.engine import generate
from lightning_reg.sources import ModelSpec, load_model

ROOT = Path(__file__).parents[1]
PROMPTS = ["a seven", "a red dot", "an ox"]  # under the tiny tokenizer's 16 tokens
# 5 samples (captions 0 1 2 0 1) in 3 shards of 2, batches of 2; REG on the conditional UNet or transformer call
ARGS = ["--num_samples", "5", "--shard_size", "2", "--batch_size", "2", "--seed", "4",
        "--guidance", "{method: cfg, scale: 2.0, reg: paper}"]
# each family's sampler: SD 1.x DDIM; SDXL's and SD3's default schedulers through the scheduler adapter; Flux's
# flow_euler over one step (sample.py samples Flux at FluxPipeline's default size: 4096 image tokens, ~2 s a step)
FAMILY_ARGS = {"sd": ["--steps", "3", "--sampler", "ddim", "--sampler_kwargs", "{eta: 0.0}"],
               "sdxl": ["--steps", "3", "--sampler", "diffusers:EulerDiscreteScheduler"],
               "sd3": ["--steps", "3", "--sampler", "diffusers:FlowMatchEulerDiscreteScheduler"],
               "flux": ["--steps", "1", "--sampler", "flow_euler"]}
FAMILIES = ["sd", "sdxl", "sd3", pytest.param("flux", marks=pytest.mark.slow)]  # conftest's family_folder


class Run(NamedTuple):
    """A one-process ``sample.py`` run of a family's tiny pipeline: its arguments but ``--output``
    (``--checkpoint FOLDER --prompts FILE`` first) and its output folder."""

    args: list[str]
    out: Path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "captions.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module", params=FAMILIES)
def reference_run(request, family_folder, prompts_file, tmp_path_factory) -> Run:
    family = request.param
    args = ["--checkpoint", str(family_folder(family)), "--prompts", str(prompts_file), *ARGS, *FAMILY_ARGS[family]]
    out = tmp_path_factory.mktemp(f"ref-{family}") / "out"
    sample_main([*args, "--output", str(out)])
    return Run(args, out)


@pytest.mark.parametrize("reference_run", ["sd"], indirect=True)
def test_prompt_samples_are_the_engine_s_with_caption_i(reference_run, tiny_pipeline, one_thread):
    """samples.npz holds generate() over the captions' embeddings (caption i % 3 for sample i), prompts.txt the
    caption of each sample; meta.json the fingerprint of the pipeline and the prompts."""
    out = reference_run.out
    with np.load(out / "samples.npz") as f:
        samples, labels = f["arr_0"], f["labels"]
    assert samples.dtype == np.uint8 and samples.shape == (5, 16, 16, 3)
    assert labels.tolist() == [0, 1, 2, 0, 1]
    assert (out / "prompts.txt").read_text().splitlines() == [PROMPTS[i] for i in (0, 1, 2, 0, 1)]
    denoiser = load_model(ModelSpec(str(tiny_pipeline)))  # the format detected from model_index.json
    guidance = make_guidance("cfg", scale=2.0, reg="paper")
    expected = generate(denoiser, guidance, denoiser.conditioning.make([PROMPTS[i] for i in (0, 1, 2, 0, 1)]), range(5),
                        sampler="ddim", sampler_kwargs={"eta": 0.0}, steps=3, seed=4, batch_size=5)
    assert np.abs(samples.astype(int) - ((expected.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()).max() <= 1
    run = json.loads((out / "run.json").read_text())
    assert run["labels"] is None and run["negative_prompt"] == ""  # the captions decide the conditions
    assert run["prompts_sha256"] == hashlib.sha256(("\n".join(PROMPTS) + "\n").encode()).hexdigest()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_classes"] == 0 and meta["data_shape"] == [4, 8, 8] and meta["sample_shape"] == [3, 16, 16]
    assert len(meta["checkpoint_sha256"]) == 64
    assert sorted(p.name for p in (out / "images").iterdir())[:2] == ["000000.png", "000001.png"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_prompts_over_two_ddp_processes_equal_one(reference_run, tmp_path):
    """Two gloo processes (captions encoded by the rank that samples them) write the same samples.npz bytes as one,
    for each family."""
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), *reference_run.args, "--output", str(out),
                           "--trainer.devices", "2", "--trainer.accelerator", "cpu"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sha256(out / "samples.npz") == sha256(reference_run.out / "samples.npz")
    assert (out / "prompts.txt").read_bytes() == (reference_run.out / "prompts.txt").read_bytes()
    assert json.loads((out / "meta.json").read_text())["world_size"] == 2


def test_interrupted_prompt_run_resumes_to_the_same_bytes(reference_run, tmp_path, capsys, one_thread):
    """A run stopped after its first shard (--max_shards 1) and run again writes the two missing shards and the
    uninterrupted run's samples.npz bytes, for each family; other captions are another run, refused."""
    out = tmp_path / "resumed"
    args = [*reference_run.args, "--output", str(out)]
    sample_main([*args, "--max_shards", "1"])
    assert sorted(p.name for p in out.iterdir()) == ["run.json", "shard_00000.npz"]
    sample_main(args)
    assert json.loads((out / "meta.json").read_text())["new_shards"] == 2
    assert sha256(out / "samples.npz") == sha256(reference_run.out / "samples.npz")
    capsys.readouterr()
    other = tmp_path / "other.txt"
    other.write_text("a blue square\n")
    with pytest.raises(SystemExit):  # other captions: another run, refused
        sample_main([*args[:3], str(other), *args[4:]])
    assert "prompts_sha256" in capsys.readouterr().err


def edited_pipeline(folder: Path, tmp_path: Path, edit: str) -> Path:
    copy = tmp_path / "pipeline"
    shutil.copytree(folder, copy)
    if edit == "no unet":
        shutil.rmtree(copy / "unet")
    elif edit == "video":
        index = json.loads((copy / "model_index.json").read_text())
        (copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableVideoDiffusionPipeline"}))
    elif edit == "sample prediction":
        config = json.loads((copy / "scheduler" / "scheduler_config.json").read_text())
        (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "prediction_type": "sample"}))
    return copy


@pytest.mark.parametrize("prompts, edit, extra, message", [
    ("", None, [], "is empty: give one caption a line"),
    ("a seven\n\na dot\n", None, [], "line(s) 2 are empty"),
    ("a seven\n", "no unet", [], "lacks the component folder(s) ['unet']"),
    ("a seven\n", "video", [], "is a StableVideoDiffusionPipeline pipeline: only ['StableDiffusionPipeline', "
                               "'StableDiffusionXLPipeline', 'StableDiffusion3Pipeline', 'FluxPipeline']"),
    ("a seven\n", "sample prediction", [], "prediction_type 'sample' is not supported"),
    (None, None, [], "is a text-to-image model: give --prompts FILE"),
    ("a seven\n", None, ["--labels", "[1]"], "--labels are class ids"),
    ("a seven\n", None, ["--vae", "x"], "--vae: a diffusers pipeline brings its own VAE"),
])
def test_bad_prompt_input_one_line_and_nothing_written(tiny_pipeline, tmp_path, refused, prompts, edit, extra,
                                                       message):
    folder = edited_pipeline(tiny_pipeline, tmp_path, edit) if edit else tiny_pipeline
    args = ["--checkpoint", str(folder), "--output", str(tmp_path / "out"), "--num_samples", "2", "--steps", "2", *extra]
    if prompts is not None:
        (tmp_path / "p.txt").write_text(prompts)
        args += ["--prompts", str(tmp_path / "p.txt")]
    refused(lambda: sample_main(args), re.escape(message), tmp_path / "out")



@pytest.fixture
def random_inception(tmp_path, monkeypatch):
    """torch-fidelity's Inception-v3 with random weights from a stand-in file (the real one is not shipped)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict: None)
    torch.save({}, tmp_path / "inception.pth")
    return tmp_path / "inception.pth"


def image_folder(root: Path, n: int = 4) -> Path:
    """An image-folder tree ``root/test/{a,b}/*.png`` of ``n`` random 16x16 RGB pictures."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        (root / "test" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "test" / "ab"[i % 2] / f"{i}.png")
    return root


def test_evaluate_clip_score_and_fid_against_an_image_folder(clip_folder, random_inception, tmp_path, one_thread):
    """evaluate.py: CLIP score of each sample against its caption, from prompts.txt beside samples.npz or from the
    prompts file indexed by the labels (the same pairs: the same score, as metrics.clip_score computes it), and
    FID against an image folder."""
    from lightning_reg.metrics.clip_score import clip_score
    from lightning_reg.metrics.evaluate import main as evaluate_main

    captions = ["a seven", "a red dot", "two", "cat", "a b c"]  # a positive score on this random CLIP
    images = torch.randint(0, 256, (5, 16, 16, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    expected = clip_score(images, captions, clip_folder)
    assert expected > 0 and expected != pytest.approx(clip_score(images, captions[::-1], clip_folder))
    run = tmp_path / "run"
    run.mkdir()
    np.savez(run / "samples.npz", arr_0=images.numpy(), labels=np.arange(5)[::-1])
    (run / "prompts.txt").write_text("\n".join(captions) + "\n")
    (tmp_path / "file.txt").write_text("\n".join(captions[::-1]) + "\n")  # line labels[i] is caption i
    common = ["--samples", str(run / "samples.npz"), "--clip", str(clip_folder)]
    evaluate_main([*common, "--metrics", "[clip_score]", "--output", str(tmp_path / "clip.json")])
    assert json.loads((tmp_path / "clip.json").read_text())["clip_score"] == pytest.approx(expected, rel=1e-6)
    evaluate_main([*common, "--prompts", str(tmp_path / "file.txt"), "--metrics", "[fid]", "--reference",
                   str(image_folder(tmp_path / "real")), "--reference_kwargs", "{image_key: image}",
                   "--inception_weights", str(random_inception), "--output", str(tmp_path / "row.json")])
    row = json.loads((tmp_path / "row.json").read_text())
    assert row["clip_score"] == pytest.approx(expected, rel=1e-6) and row["num_samples"] == 5
    assert np.isfinite(row["fid"]) and row["fid"] > 0


def test_evaluate_scores_each_family_s_run(reference_run, tiny_clip, tmp_path, capsys, one_thread):
    """evaluate.py on a run's samples.npz (its captions from prompts.txt beside it), for each family: the CLIP score
    of sample i against caption labels[i] as metrics.clip_score computes it, printed and written as one row. (FID
    reads the images alone, whatever made them: the test above; a random Inception takes ~6 s a run here.)"""
    from lightning_reg.metrics.clip_score import clip_score
    from lightning_reg.metrics.evaluate import main as evaluate_main

    clip_folder = tiny_clip(1)  # a positive mean cosine on these runs (seed 0's is negative: the score's clip at 0)
    samples = reference_run.out / "samples.npz"
    with np.load(samples) as f:
        images, labels = torch.from_numpy(f["arr_0"]), f["labels"]
    assert images.float().std(dim=0).mean() > 1  # five different images, not one blank
    captions = [PROMPTS[i] for i in labels]
    expected = clip_score(images, captions, clip_folder)
    assert expected > 0 and expected != pytest.approx(clip_score(images, captions[::-1], clip_folder))
    evaluate_main(["--samples", str(samples), "--clip", str(clip_folder), "--metrics", "[clip_score]", "--output",
                   str(tmp_path / "row.json")])
    row = json.loads((tmp_path / "row.json").read_text())
    assert row["clip_score"] == pytest.approx(expected, rel=1e-6) and row["num_samples"] == 5
    assert f"clip_score={row['clip_score']:.4g}" in capsys.readouterr().out


@pytest.mark.timeout(600)
def test_sweep_over_prompts_writes_fid_and_clip_score_rows(tiny_pipeline, prompts_file, clip_folder,
                                                           random_inception, tmp_path, one_thread):
    """sweep.py over a pipeline and a prompts file (every sample.py option is a sweep option): CFG and REG at
    two weights, each setting's samples.npz and prompts.txt, FID (random Inception) and CLIP score in the table."""
    from lightning_reg.metrics.fronts import read_table
    from lightning_reg.sampling.sweep import main as sweep_main

    real = tmp_path / "real.npz"
    np.savez(real, arr_0=np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    out = tmp_path / "sweep"
    sweep_main(["--checkpoint", str(tiny_pipeline), "--prompts", str(prompts_file), "--output", str(out),
                "--methods", "[{method: cfg, weights: [1, 3]}]", "--reg", "[none, paper]", "--num_samples", "3",
                "--shard_size", "3", "--batch_size", "3", "--steps", "2", "--sampler", "ddim",
                "--evaluation", f"{{metrics: [fid, clip_score], clip: {clip_folder}, reference: {real}, "
                                f"inception_weights: {random_inception}}}"])
    rows = read_table(out / "sweep.csv")
    assert [r["setting"] for r in rows] == ["cfg_w1_none", "cfg_w3_none", "cfg_w1_paper", "cfg_w3_paper"]
    assert all(np.isfinite(float(r["clip_score"])) and float(r["fid"]) > 0 for r in rows)
    for r in rows:
        assert (out / r["setting"] / "prompts.txt").read_text().splitlines() == PROMPTS
    with np.load(out / "cfg_w3_none" / "samples.npz") as none, np.load(out / "cfg_w3_paper" / "samples.npz") as paper:
        assert not np.array_equal(none["arr_0"], paper["arr_0"])  # REG changes the samples
    assert (out / "fronts.png").is_file()
