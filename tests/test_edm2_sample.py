"""``sample.py`` and ``sweep.py`` on EDM2 snapshots (the official layout's tiny fixtures): the guiding file as
the reference condition (CFG: the unconditional net; autoguidance: the weaker net), the SD-VAE decode through
the snapshot's per-channel scale/bias, pixel networks, and one-line errors that write nothing."""

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_reg.diffusion.latent import ChannelLatentCodec
from lightning_reg.diffusion.samplers import edm_heun
from lightning_reg.guidance import GuidedDenoiser, make_guidance
from lightning_reg.io.files import to_uint8_nhwc
from lightning_reg.io.vae import load_autoencoder
from lightning_reg.io.edm2 import save_edm2_safetensors
from lightning_reg.models.edm2 import EDM2Denoiser, EDM2Precond, load_edm2
from lightning_reg.sampling.cli import main as sample_main
from lightning_reg.sampling.engine import PerSampleNoise

FIXTURES = Path(__file__).parent / "fixtures"
MAIN, GUIDE, UNCOND = (FIXTURES / f"edm2_official_tiny_{n}.pkl" for n in ("main", "guide", "uncond"))
PAIRS = {"cfg": UNCOND, "autoguidance": GUIDE}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> Path:
    from helpers import tiny_autoencoder

    folder = tmp_path_factory.mktemp("vae") / "tiny-vae"
    tiny_autoencoder().save_pretrained(folder)
    return folder


def guidance(reference: Path, reg: str, scale: float = 2.0) -> dict:
    return {"method": "cfg", "scale": scale, "convention": "w2", "reg": reg, "reference_checkpoint": str(reference)}


def run(checkpoint: Path, out: Path, params: dict, *args: str) -> None:
    sample_main(["--format", "edm2", "--checkpoint", str(checkpoint), "--guidance", json.dumps(params),
                 "--sampler", "edm_heun", "--steps", "4", "--num_samples", "3", "--batch_size", "3",
                 "--shard_size", "3", "--labels", "[7, 2, 9]", "--seed", "3", "--output", str(out), *args])


def direct_samples(main: EDM2Precond, reference: Path, reg: str, codec=None) -> np.ndarray:
    """Our guided Heun by hand: the pair as docs/edm2.md builds it, the per-sample noise of ``sample.py``."""
    ref_net = load_edm2(reference)[0]
    model, ref = EDM2Denoiser(main, codec=codec), EDM2Denoiser(ref_net)  # CFG's unconditional net or a weaker one
    noise = PerSampleNoise(3, [0, 1, 2])
    guided = GuidedDenoiser(model, make_guidance("cfg", scale=2.0, convention="w2", reg=reg, reference=ref),
                            torch.tensor([7, 2, 9]))
    x0 = edm_heun(guided, noise.draw(model.data_shape), model.schedule, 4, noise_sampler=noise)
    return to_uint8_nhwc(model.decode(x0))


@pytest.mark.parametrize("reg", ["none", "paper", "vjp"])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_sample_py_equals_our_guided_heun(pair, reg, vae, tmp_path):
    out = tmp_path / "out"
    run(MAIN, out, guidance(PAIRS[pair], reg), "--vae", str(vae))
    with np.load(out / "samples.npz") as f:
        samples, labels = f["arr_0"], f["labels"]
    main, snapshot = load_edm2(MAIN)
    codec = ChannelLatentCodec(load_autoencoder(str(vae)), snapshot.latent_scale, snapshot.latent_bias)
    np.testing.assert_array_equal(samples, direct_samples(main, PAIRS[pair], reg, codec))
    assert samples.shape == (3, 64, 64, 3) and labels.tolist() == [7, 2, 9]  # 8x8x4 latents, VAE x8
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png", "000002.png", "grid.png"]
    meta = json.loads((out / "meta.json").read_text())
    source = meta["source"]
    assert source["class_name"] == "Precond" and source["init_kwargs"]["model_channels"] == 16
    assert source["encoder"] == "StabilityVAEEncoder" and len(source["latent_scale"]) == 4
    assert source["reference"]["kind"] == {"cfg": "cfg_unconditional", "autoguidance": "autoguidance"}[pair]
    assert source["reference"]["init_kwargs"]["label_dim"] == (0 if pair == "cfg" else 10)
    assert re.fullmatch("[0-9a-f]{64}", meta["reference_sha256"]) and meta["data_shape"] == [4, 8, 8]


def test_channel_codec_inverts_the_snapshot_affine_map(vae):
    """``final = raw * scale + bias`` per channel; decoding reads ``raw = (final - bias) / scale``."""
    scale, bias = np.array([0.5, 2.0, 1.0, 4.0]), np.array([0.1, -0.2, 0.0, 1.0])
    codec = ChannelLatentCodec(load_autoencoder(str(vae)), scale, bias)
    z = torch.randn(2, 4, 8, 8)
    raw = (z - torch.tensor(bias).float().reshape(1, 4, 1, 1)) / torch.tensor(scale).float().reshape(1, 4, 1, 1)
    torch.testing.assert_close(codec.decode(z), codec.vae.decode(raw).sample * 2 - 1)


def random_snapshot(folder: Path, name: str, encoder: str = "StabilityVAEEncoder", **kwargs) -> Path:
    """A random tiny network in the fixtures' layout: the uncond net's constructor arguments with those of
    ``kwargs`` that are arguments, its other fields (encoder, latent scale/bias) with the rest."""
    snapshot = load_edm2(UNCOND)[1]
    fields = {k: kwargs.pop(k) for k in list(kwargs) if hasattr(snapshot, k)}
    init = {**snapshot.init_kwargs, **kwargs}
    torch.manual_seed(0)
    state = {k: v.half() for k, v in EDM2Precond(**init).state_dict().items()}
    return save_edm2_safetensors(dataclasses.replace(snapshot, init_kwargs=init, state_dict=state, encoder=encoder,
                                                     **fields), folder / f"{name}.safetensors")


def test_pixel_network_decodes_as_pixels(tmp_path):
    """A ``StandardRGBEncoder`` (img64) snapshot samples pixels: uint8 of ``x * 127.5 + 128``, no VAE."""
    pixels = {"encoder": "StandardRGBEncoder", "encoder_kwargs": {}, "latent_scale": None, "latent_bias": None}
    main = random_snapshot(tmp_path, "main_rgb", img_channels=3, label_dim=10, model_channels=16, **pixels)
    guide = random_snapshot(tmp_path, "guide_rgb", img_channels=3, label_dim=10, **pixels)
    out = tmp_path / "out"
    run(main, out, guidance(guide, "paper"))
    with np.load(out / "samples.npz") as f:
        samples = f["arr_0"]
    np.testing.assert_array_equal(samples, direct_samples(load_edm2(main)[0], guide, "paper"))
    assert samples.shape == (3, 8, 8, 3) and json.loads((out / "meta.json").read_text())["source"]["encoder"] == \
        "StandardRGBEncoder"


def bad_files(folder: Path) -> dict[str, Path]:
    from lightning_reg.models.dit import DiT

    truncated = folder / "truncated.pkl"
    truncated.write_bytes(MAIN.read_bytes()[:-200])
    torch.manual_seed(0)
    dit = folder / "DiT.pt"
    torch.save(DiT(input_size=8, in_channels=4, num_classes=10, hidden_size=32, depth=1, num_heads=2,
                   patch_size=2).state_dict(), dit)
    return {"truncated": truncated, "dit": dit,
            "uncond16": random_snapshot(folder, "uncond16", img_resolution=16),
            "guide16": random_snapshot(folder, "guide16", img_resolution=16, label_dim=10),
            "uncond3": random_snapshot(folder, "uncond3", img_channels=3),
            "guide3": random_snapshot(folder, "guide3", img_channels=3, label_dim=10)}


@pytest.mark.parametrize("main, reference, message", [
    ("truncated", "guide", r"--checkpoint: .*truncated\.pkl"),
    ("dit", "guide", r"--checkpoint: .*DiT\.pt .*(torch|zip)"),
    ("uncond", "guide", r"--checkpoint .*uncond\.pkl: the main EDM2 network is unconditional"),
    ("main", "truncated", r"--guidance\.reference_checkpoint: .*truncated\.pkl"),
    ("main", "dit", r"--guidance\.reference_checkpoint: .*DiT\.pt"),
    ("main", "uncond16", r"uncond16\.safetensors: .*reference has num_classes=0, data_shape=\(4, 16, 16\)"),
    ("main", "uncond3", r"uncond3\.safetensors: .*reference has num_classes=0, data_shape=\(3, 8, 8\)"),
    ("main", "guide16", r"reference has num_classes=10, data_shape=\(4, 16, 16\); the model has .*\(4, 8, 8\)"),
    ("main", "guide3", r"reference has num_classes=10, data_shape=\(3, 8, 8\); the model has .*\(4, 8, 8\)"),
])
def test_bad_input_one_line_and_nothing_written(main, reference, message, vae, tmp_path, refused):
    files = {"main": MAIN, "guide": GUIDE, "uncond": UNCOND, **bad_files(tmp_path)}
    out = tmp_path / "out"
    refused(lambda: run(files[main], out, guidance(files[reference], "paper"), "--vae", str(vae)), message, out)


def test_sweep_of_an_edm2_pair_reads_each_file_once_and_equals_sample_py(vae, tmp_path, monkeypatch):
    """``sweep.py`` over the CFG pair (the guiding file in the shared ``--guidance``), REG none / paper / vjp at
    EDM2's ``g`` (w2) 1 and 2, image metrics on a classifier: each snapshot is read once for all settings, and a
    setting's samples are those of the same ``sample.py`` run."""
    import lightning_reg.io.edm2 as edm2
    from lightning_reg.metrics.fronts import read_table
    from lightning_reg.sampling.sweep import main as sweep_main
    from helpers import classifier_checkpoint

    clf = classifier_checkpoint(tmp_path / "clf.ckpt", image_size=64, channels=3, num_classes=10)
    np.savez(tmp_path / "ref.npz", arr_0=np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8))
    reads = []
    read = edm2.read_edm2_pickle
    monkeypatch.setattr(edm2, "read_edm2_pickle", lambda p: (reads.append(Path(p).name), read(p))[1])
    out = tmp_path / "sweep"
    sweep_main(["--format", "edm2", "--checkpoint", str(MAIN), "--vae", str(vae),
                "--guidance", f"{{reference_checkpoint: {UNCOND}}}", "--sampler", "edm_heun", "--steps", "4",
                "--methods", "[{method: cfg, weights: [1, 2]}]", "--convention", "w2", "--reg", "[none, paper, vjp]",
                "--num_samples", "3", "--shard_size", "3", "--batch_size", "3", "--labels", "[7, 2, 9]",
                "--seed", "3", "--evaluation", f"{{metrics: [kid, accuracy], reference: {tmp_path / 'ref.npz'}, "
                                               f"feature_network: {clf}}}", "--front", "[kid, accuracy]",
                "--output", str(out)])
    rows = read_table(out / "sweep.csv")
    assert [r["setting"] for r in rows] == [f"cfg_w2x{g}_{reg}" for reg in ("none", "paper", "vjp") for g in (1, 2)]
    assert [float(r["w"]) for r in rows] == [0.0, 1.0] * 3 and all(0 <= float(r["accuracy"]) <= 1 for r in rows)
    assert sorted(reads) == [MAIN.name, UNCOND.name]
    fingerprint = json.loads((out / "sweep.json").read_text())  # the guiding file by its sha256, not its path
    assert fingerprint["reference_sha256"] == hashlib.sha256(UNCOND.read_bytes()).hexdigest()
    assert str(UNCOND) not in json.dumps(fingerprint)
    run(MAIN, tmp_path / "single", guidance(UNCOND, "vjp"), "--vae", str(vae))
    with np.load(out / "cfg_w2x2_vjp" / "samples.npz") as swept, np.load(tmp_path / "single" / "samples.npz") as one:
        np.testing.assert_array_equal(swept["arr_0"], one["arr_0"])


CONFIGS = Path(__file__).parents[1] / "configs"
PRESETS = {  # preset: (main file, guiding file, EDM2's g, CFG with an unconditional net)
    "img512_s_guid_fid": ("edm2-img512-s-2147483-0.025.pkl", "edm2-img512-xs-uncond-2147483-0.025.pkl", 1.40, True),
    "img512_s_autog_fid": ("edm2-img512-s-2147483-0.070.pkl", "edm2-img512-xs-0134217-0.125.pkl", 2.10, False),
    "img512_xxl_autog_fid": ("edm2-img512-xxl-0939524-0.075.pkl", "edm2-img512-m-0268435-0.155.pkl", 2.05, False),
    "img64_s_autog_fid": ("edm2-img64-s-1073741-0.045.pkl", "edm2-img64-xs-0134217-0.110.pkl", 1.70, False),
}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_shipped_edm2_configs_parse_and_name_the_paper_rows(preset):
    """Each row's sample config (and every ``--guidance`` variant in its header) and its sweep config: format
    edm2, the preset's files, EDM2's g in the w2 convention, REG none / paper / vjp, 32 Heun steps."""
    import yaml

    from lightning_reg.sampling.cli import build_parser as sample_parser
    from lightning_reg.sampling.sweep import build_parser as sweep_parser

    main, guide, g, uncond = PRESETS[preset]
    path = CONFIGS / f"sample_edm2_{preset}.yaml"
    cfg = sample_parser().parse_args(["--config", str(path)])
    assert (cfg.format, Path(cfg.checkpoint).name, cfg.sampler, cfg.steps) == ("edm2", main, "edm_heun", 32)
    assert (cfg.vae == "stabilityai/sd-vae-ft-mse") == preset.startswith("img512")
    variants = [cfg.guidance] + [yaml.safe_load(v) for v in re.findall(r"--guidance '(.*)'", path.read_text())]
    assert {v["reg"] for v in variants} == {"none", "paper", "vjp"}
    for v in variants:
        assert Path(v.pop("reference_checkpoint")).name == guide and v["scale"] == pytest.approx(g)
        make_guidance(**v)
    assert [v["convention"] for v in variants].count("w") == 1  # the REG authors' reading, documented
    sweep = sweep_parser().parse_args(["--config", str(CONFIGS / f"sweep_edm2_{preset}.yaml")])
    assert (sweep.format, Path(sweep.checkpoint).name, sweep.convention, list(sweep.reg), list(sweep.front)) == (
        "edm2", main, "w2", ["none", "paper", "vjp"], ["fid", "is"])
    assert Path(sweep.guidance["reference_checkpoint"]).name == guide
    assert [m["method"] for m in sweep.methods] == (["cfg", "interval"] if uncond else ["cfg"])
    assert all(1.0 in m["weights"] and g in m["weights"] for m in sweep.methods)
    assert "w2" in path.read_text() and "REG authors' EDM2 patch" in path.read_text()


@pytest.mark.parametrize("script", ["sample", "sweep"])
def test_an_edm2_config_with_its_files_missing_is_one_line(script, tmp_path, capsys):
    from lightning_reg.sampling.sweep import main as sweep_main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        {"sample": sample_main, "sweep": sweep_main}[script](
            ["--config", str(CONFIGS / f"{script}_edm2_img512_s_guid_fid.yaml"), "--trainer.accelerator", "cpu",
             "--output", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --checkpoint") and "\n" not in err and "edm2-img512-s-2147483-0.025.pkl" in err, err
    assert not out.exists()


def test_an_edm2_file_without_its_format_names_the_flag(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        sample_main(["--checkpoint", str(MAIN), "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.endswith("(an EDM2 snapshot needs --format edm2)") and "\n" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("reg", ["none", "paper", "vjp"])
def test_bf16_autocast_keeps_the_stored_weights_and_stays_close(reg):
    """``--precision bf16``: the float16 weights are not cast, the chain stays float32, and the samples stay
    within 3% (relative to the largest) of float32's (measured: about 1%)."""
    from lightning_reg.sampling.engine import generate

    main, uncond = load_edm2(MAIN)[0], load_edm2(UNCOND)[0]
    model = EDM2Denoiser(main)
    g = make_guidance("cfg", scale=2.0, convention="w2", reg=reg, reference=EDM2Denoiser(uncond))
    runs = {p: generate(model, g, [1, 2, 3], [0, 1, 2], sampler="edm_heun", steps=8, seed=0, batch_size=3,
                        precision=p) for p in ("fp32", "bf16")}
    assert runs["bf16"].dtype == torch.float32 and {p.dtype for p in model.parameters()} == {torch.float16}
    assert float((runs["bf16"] - runs["fp32"]).abs().max() / runs["fp32"].abs().max()) < 0.03
