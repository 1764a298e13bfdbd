"""Hostile third-party folders and weights (``pytest -k hostile``): diffusers pipelines, CLIP folders, VAEs and
the Inception weights, each made hostile by its test from a genuine tiny one and fed through the real entry point
(``conftest.attack``, stdin at end-of-file): code in the folder (a ``.py`` file, an ``auto_map``, a custom
pipeline or library), pickled weights whose loading runs a payload, configs that are not bounded plain JSON,
missing Inception weights offline. Each is refused in one ``error:`` line before anything is written; no
prompt is shown and no payload runs."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PAYLOAD_MARKER, payload_pickle

EDM2_MAIN = Path(__file__).parents[1] / "fixtures" / "edm2_official_tiny_main.pkl"
CODE = "names custom code of the folder, which is never run"
PICKLED = "holds pickled objects other than tensors and plain data"


class Payload:
    """Unpickling it creates ``PAYLOAD_MARKER`` in ``folder`` (``torch.load`` without ``weights_only`` would)."""

    def __init__(self, folder: Path):
        self.marker = str(folder / PAYLOAD_MARKER)

    def __reduce__(self):
        return open, (self.marker, "w")


def payload_weights(path: Path, legacy: bool = False) -> None:
    """Weights at ``path`` whose unpickling runs the payload: a ``torch.save`` zip, or a bare (legacy) pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if legacy:
        path.write_bytes(payload_pickle(path.parents[1]))
    else:
        torch.save({"weight": torch.zeros(2), "payload": Payload(path.parents[1])}, path)


def replace_weights(folder: Path, name: str, legacy: bool = False) -> None:
    """``folder``'s ``.safetensors`` weights replaced by the payload ``name`` (.bin)."""
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    payload_weights(folder / name, legacy)


def edit_json(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.fixture
def pipeline(tiny_pipeline, tmp_path) -> Path:
    """A copy of the genuine tiny Stable Diffusion pipeline folder, to make hostile."""
    return Path(shutil.copytree(tiny_pipeline, tmp_path / "pipe"))


@pytest.fixture
def sample_pipeline(attack, tmp_path):
    """``sample_pipeline(folder)``: ``sample.py --checkpoint folder --prompts ...`` into ``tmp_path/out``."""
    (tmp_path / "prompts.txt").write_text("a seven\n")

    def run(folder: Path):
        return attack("sample", "--checkpoint", folder, "--prompts", tmp_path / "prompts.txt", "--output",
                      tmp_path / "out", "--num_samples", "1", "--steps", "1")

    return run


@pytest.fixture
def clip(clip_folder, tmp_path) -> Path:
    return Path(shutil.copytree(clip_folder, tmp_path / "clip"))


@pytest.fixture
def evaluate_clip(attack, tmp_path):
    """``evaluate_clip(folder)``: ``evaluate.py --clip folder`` on two 16x16 samples and their captions."""
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((2, 16, 16, 3), np.uint8))
    (tmp_path / "prompts.txt").write_text("a seven\na dot\n")

    def run(folder: Path):
        outcome = attack("evaluate", "--samples", tmp_path / "samples.npz", "--clip", folder, "--metrics",
                         "[clip_score]", "--output", tmp_path / "row.json")
        assert "[y/N]" not in outcome.out  # transformers' remote-code prompt
        return outcome

    return run


def test_hostile_payload_weights_run_code_when_unpickled_unsafely(tmp_path):
    """The control: what the loaders must never do to these files would run the payload."""
    payload_weights(tmp_path / "a" / "w.bin")
    torch.load(tmp_path / "a" / "w.bin", weights_only=False)
    assert (tmp_path / PAYLOAD_MARKER).exists()


# ---------------------------------------------------------------- CLIP folders (evaluate.py --clip)


@pytest.mark.parametrize("config, edit", [
    ("processor_config.json", lambda c: {**c, "image_processor": {
        **{k: v for k, v in c["image_processor"].items() if k != "image_processor_type"},
        "auto_map": {"AutoImageProcessor": "someone/evil--processing.EvilProcessor"}}}),
    ("tokenizer_config.json", lambda c: {**c, "auto_map": {"AutoTokenizer": ["tokenization.Evil", None]}}),
    ("config.json", lambda c: {**c, "auto_map": {"AutoModel": "modeling.EvilModel"}}),
    ("preprocessor_config.json", lambda c: {"auto_map": {"AutoImageProcessor": "processing.EvilProcessor"}}),
])
def test_hostile_clip_folder_auto_map_is_refused_without_a_prompt(clip, evaluate_clip, tmp_path, config, edit):
    if not (clip / config).exists():
        (clip / config).write_text("{}")
    edit_json(clip / config, edit)
    evaluate_clip(clip).refused(rf"--clip .*{config}: .*auto_map {CODE}", tmp_path / "row.json")


def test_hostile_clip_folder_with_python_code(clip, evaluate_clip, tmp_path):
    (clip / "processing.py").write_text(f"open({str(tmp_path / PAYLOAD_MARKER)!r}, 'w')\n")
    evaluate_clip(clip).refused(r"--clip .*clip holds Python code \(processing.py\)", tmp_path / "row.json")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy pickle"])
def test_hostile_clip_folder_payload_bin(clip, evaluate_clip, tmp_path, legacy):
    replace_weights(clip, "pytorch_model.bin", legacy)
    problem = "not a torch.save zip archive" if legacy else PICKLED
    evaluate_clip(clip).refused(rf"--clip .*pytorch_model.bin .*{problem}", tmp_path / "row.json")


def test_hostile_clip_folder_huge_config(clip, evaluate_clip, tmp_path):
    (clip / "config.json").write_text(json.dumps({"pad": "x" * (17 << 20)}))
    evaluate_clip(clip).refused(r"config.json is [\d,]+ bytes, more than a config's", tmp_path / "row.json")


# ---------------------------------------------------------------- pipeline folders (sample.py --checkpoint)


@pytest.mark.parametrize("component, weights", [("unet", "diffusion_pytorch_model.bin"),
                                                ("vae", "diffusion_pytorch_model.bin"),
                                                ("text_encoder", "pytorch_model.bin")])
def test_hostile_pipeline_payload_bin(pipeline, sample_pipeline, tmp_path, component, weights):
    replace_weights(pipeline / component, weights)
    sample_pipeline(pipeline).refused(rf"--checkpoint .*{component}/{weights} {PICKLED}", tmp_path / "out")


def test_hostile_pipeline_payload_shard_named_by_an_index(pipeline, sample_pipeline, tmp_path):
    unet = pipeline / "unet"
    replace_weights(unet, "shard-1.pt")
    (unet / "diffusion_pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"x": "shard-1.pt"}}))
    sample_pipeline(pipeline).refused(rf"unet/shard-1.pt {PICKLED}", tmp_path / "out")


def test_hostile_pipeline_shard_index_outside_its_folder(pipeline, sample_pipeline, tmp_path):
    payload_weights(tmp_path / "elsewhere" / "w.bin")
    (pipeline / "unet" / "diffusion_pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"x": "../../elsewhere/w.bin"}}))
    sample_pipeline(pipeline).refused(r"weight_map names '../../elsewhere/w.bin', not a file of its folder",
                                      tmp_path / "out")


def test_hostile_pipeline_safetensors_preferred_over_a_payload_bin(pipeline, sample_pipeline, tmp_path):
    """A genuine folder with a payload ``.bin`` beside its safetensors samples from the safetensors, never
    unpickling the ``.bin`` (diffusers' fallback would print "Defaulting to unsafe serialization")."""
    payload_weights(pipeline / "unet" / "diffusion_pytorch_model.bin")
    outcome = sample_pipeline(pipeline)
    assert outcome.code == 0, outcome.err[-3000:]
    assert "unsafe serialization" not in outcome.err and (tmp_path / "out" / "samples.npz").is_file()
    outcome.no_payload_ran()


@pytest.mark.parametrize("where", ["text_encoder/config.json", "tokenizer/tokenizer_config.json",
                                   "unet/config.json"])
def test_hostile_pipeline_component_auto_map(pipeline, sample_pipeline, tmp_path, where):
    edit_json(pipeline / where, lambda c: {**c, "auto_map": {"AutoModel": "someone/evil--modeling.Evil"}})
    sample_pipeline(pipeline).refused(rf"{where}: auto_map {CODE}", tmp_path / "out")


@pytest.mark.parametrize("where", ["pipeline.py", "unet/modeling.py"])
def test_hostile_pipeline_with_python_code(pipeline, sample_pipeline, tmp_path, where):
    (pipeline / where).write_text(f"open({str(tmp_path / PAYLOAD_MARKER)!r}, 'w')\n")
    sample_pipeline(pipeline).refused(rf"holds Python code \({Path(where).name}\)", tmp_path / "out")


def test_hostile_pipeline_custom_pipeline_class(pipeline, sample_pipeline, tmp_path):
    edit_json(pipeline / "model_index.json", lambda c: {**c, "_class_name": ["pipeline", "EvilPipeline"]})
    sample_pipeline(pipeline).refused(r"_class_name \['pipeline', 'EvilPipeline'\] names a custom pipeline",
                                      tmp_path / "out")


def test_hostile_pipeline_component_from_a_custom_module(pipeline, sample_pipeline, tmp_path):
    edit_json(pipeline / "model_index.json", lambda c: {**c, "unet": ["evil_unet", "EvilUNet"]})
    sample_pipeline(pipeline).refused(r"component 'unet' comes from 'evil_unet', code that is never run",
                                      tmp_path / "out")


@pytest.mark.parametrize("where", ["model_index.json", "unet/config.json", "scheduler/scheduler_config.json"])
@pytest.mark.parametrize("content, problem", [
    ("[]", "holds a list, not a JSON object"),
    (nested(100_000), r"is not valid JSON \(RecursionError"),
    (f'{{"a": {nested(40)}}}', "is nested deeper than 32 levels"),
    ('{"_class_name": "StableDiffusionPipeline",', r"is not valid JSON \(JSONDecodeError"),
    ('{"a": NaN}', "is nan, not a finite number"),
    ("\udcff", r"is not valid JSON \(UnicodeDecodeError"),
], ids=["list", "deep", "nested", "truncated", "nan", "binary"])
def test_hostile_pipeline_config_not_plain_json(pipeline, sample_pipeline, tmp_path, where, content, problem):
    (pipeline / where).write_bytes(content.encode(errors="surrogateescape"))
    sample_pipeline(pipeline).refused(rf"--checkpoint .*{where}.*{problem}", tmp_path / "out")


def test_hostile_pipeline_huge_model_index(pipeline, sample_pipeline, tmp_path):
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                          "pad": list(range(3_000_000))}))
    sample_pipeline(pipeline).refused(r"model_index.json is [\d,]+ bytes, more than a config's", tmp_path / "out")


def test_hostile_pipeline_model_index_with_too_many_values(pipeline, sample_pipeline, tmp_path):
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                          "pad": [0] * 200_000}))
    sample_pipeline(pipeline).refused(r"model_index.json.pad\[\d+\]: holds more than 100,000 values",
                                      tmp_path / "out")


# ---------------------------------------------------------------- VAE folders (sample.py --vae)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy pickle"])
def test_hostile_vae_folder_payload_bin(attack, tiny_pipeline, tmp_path, legacy):
    vae = Path(shutil.copytree(tiny_pipeline / "vae", tmp_path / "vae"))
    replace_weights(vae, "diffusion_pytorch_model.bin", legacy)
    problem = "not a torch.save zip archive" if legacy else PICKLED
    attack("sample", "--format", "edm2", "--checkpoint", EDM2_MAIN, "--vae", vae, "--labels", "[1]", "--output",
           tmp_path / "out", "--num_samples", "1", "--steps", "2").refused(
        rf"--vae .*vae/diffusion_pytorch_model.bin .*{problem}", tmp_path / "out")


# ---------------------------------------------------------------- Inception weights (evaluate.py)


@pytest.fixture
def evaluate_inception(attack, tmp_path):
    """``evaluate_inception(*extra)``: FID on Inception features, the torch hub cache under ``tmp_path``."""
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((2, 16, 16, 3), np.uint8))
    np.savez(tmp_path / "reference.npz", arr_0=np.zeros((2, 16, 16, 3), np.uint8))

    def run(*extra):
        return attack("evaluate", "--samples", tmp_path / "samples.npz", "--reference", tmp_path / "reference.npz",
                      "--output", tmp_path / "row.json", *extra, env={"TORCH_HOME": str(tmp_path / "torch")})

    return run


def test_hostile_missing_inception_weights_name_their_place_and_are_never_downloaded(evaluate_inception, tmp_path):
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    outcome = evaluate_inception()
    outcome.refused(rf"are not at {cached}, and nothing is downloaded at run time: .*--inception_weights",
                    tmp_path / "row.json")
    assert "Downloading" not in outcome.out + outcome.err


@pytest.mark.parametrize("given", [True, False], ids=["--inception_weights", "torch hub cache"])
def test_hostile_inception_weights_payload(evaluate_inception, tmp_path, given):
    weights = (tmp_path / "w" / "inception.pth" if given else
               tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth")
    weights.parent.mkdir(parents=True)
    torch.save({"payload": Payload(tmp_path)}, weights)
    evaluate_inception(*(["--inception_weights", weights] if given else [])).refused(
        rf"inception_weights {weights} {PICKLED}", tmp_path / "row.json")


def test_hostile_reference_feature_cache_payload(attack, tmp_path):
    from helpers import classifier_checkpoint

    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    np.savez(tmp_path / "reference.npz", arr_0=images[::-1])
    classifier_checkpoint(tmp_path / "clf.ckpt")
    args = ["--samples", tmp_path / "samples.npz", "--reference", tmp_path / "reference.npz", "--feature_network",
            tmp_path / "clf.ckpt", "--metrics", "[fid]", "--reference_cache", tmp_path / "cache"]
    first = attack("evaluate", *args)
    assert first.code == 0, first.err[-3000:]
    (cached,) = (tmp_path / "cache").glob("*.pt")
    torch.save({"payload": Payload(tmp_path)}, cached)
    attack("evaluate", *args, "--output", tmp_path / "row.json").refused(rf"reference_cache {cached} {PICKLED}",
                                                                         tmp_path / "row.json")
