"""Shared fixtures: a tiny ToyMLP-backed ``ConditionalDiffusion`` that trains in seconds on a CPU, the trained
toy checkpoint of sample.py's and sweep.py's tests, tiny text-to-image components. Plain helpers shared by
several modules are in ``helpers.py``."""

import re
from pathlib import Path

import pytest
import torch
from helpers import (TRAIN_CONFIG, local_t5_tokenizer, make_flux_components, make_sd3_components,
                     make_sdxl_components)

from lightning_reg.diffusion.schedules import VPSchedule
from lightning_reg.models.mlp import ToyMLP
from lightning_reg.module import ConditionalDiffusion


@pytest.fixture
def tiny_module():
    """``tiny_module(**kwargs)``: a seeded 2-class, 2-D model (hidden 32, 1 block, VP T=1000) with overrides."""

    def make(num_classes: int = 2, dim: int = 2, seed: int = 0, **kwargs) -> ConditionalDiffusion:
        torch.manual_seed(seed)
        net = ToyMLP(num_classes=num_classes, dim=dim, hidden=32, blocks=1)
        return ConditionalDiffusion(net, kwargs.pop("schedule", VPSchedule()), **kwargs)

    return make


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: its tensors are small, and on a busy 2-core machine two
    OpenMP threads make each tiny op ~100x slower. Restores the previous setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A ToyMLP trained 50 steps (``helpers.TRAIN_CONFIG``) through train.py's CLI (so the checkpoint rebuilds
    the backbone), on one intra-op thread (see ``one_thread``): the tiny toy checkpoint of sample.py's,
    sweep.py's and the multi-process tests."""
    from lightning_reg.cli import main as train_main

    folder = tmp_path_factory.mktemp("train")
    config = folder / "tiny.yaml"
    config.write_text(TRAIN_CONFIG)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_main(["fit", "--config", str(config), "--trainer.default_root_dir", str(folder)])
    finally:
        torch.set_num_threads(previous)
    (ckpt,) = folder.glob("checkpoints/*.ckpt")
    return ckpt


@pytest.fixture(scope="session")
def clip_tokenizer():
    """A CLIP tokenizer over a small local vocabulary (lower-case letters, digits and punctuation, each also
    as a word end ``</w>``, one merge), nothing downloaded: ``<|startoftext|>`` 0, ``<|endoftext|>`` 1 (also
    pad), 139 ids in all; ``model_max_length`` 16."""
    import string

    from transformers import CLIPTokenizer

    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in (*chars, *(c + "</w>" for c in chars), "an"):
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[("a", "n")], model_max_length=16)


@pytest.fixture
def hub_cache(tmp_path):
    """``hub_cache(folder, "owner/name")``: a Hugging Face cache under ``tmp_path`` (the layout
    ``huggingface-cli download`` writes) holding ``folder`` as the one snapshot of that hub name; returns the
    cache folder."""
    import shutil

    def make(folder, name: str):
        revision = "0" * 40
        repo = tmp_path / f"models--{name.replace('/', '--')}"
        shutil.copytree(folder, repo / "snapshots" / revision)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision)
        return str(tmp_path)

    return make


@pytest.fixture(scope="session")
def tiny_components():
    """``tiny_components(tokenizer, prediction_type="epsilon", seed=0)``: random tiny Stable Diffusion components
    built from configs, as diffusers' own pipeline tests build them (nothing downloaded)."""
    return make_tiny_components


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, clip_tokenizer):
    """A ``StableDiffusionPipeline`` folder (``save_pretrained``) of the epsilon tiny components."""
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("pipeline") / "tiny-sd"
    StableDiffusionPipeline(**make_tiny_components(clip_tokenizer), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def clip_folder(tiny_clip):
    """A random CLIP (width 8, 2 layers, 16x16 images in 8x8 patches) with its processor, saved locally: seed 0."""
    return tiny_clip(0)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory, clip_tokenizer):
    """``tiny_clip(seed)``: ``clip_folder``'s random CLIP drawn from another seed, saved once a seed."""
    folders = {}

    def folder(seed: int) -> Path:
        if seed not in folders:
            folders[seed] = save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", clip_tokenizer, seed)
        return folders[seed]

    return folder


def save_tiny_clip(folder: Path, tokenizer, seed: int) -> Path:
    """``clip_folder``'s random CLIP of ``seed`` and its processor, saved in ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2,
                         vocab_size=1000, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2,
                           image_size=16, patch_size=8),
        projection_dim=8)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                                 crop_size={"height": 16, "width": 16}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def family_folder(tmp_path_factory, clip_tokenizer, tiny_pipeline):
    """``family_folder(family)``: the saved tiny pipeline folder of a text-to-image family, built once a session
    from ``helpers``' builders (nothing downloaded): ``sd`` (``tiny_pipeline``), ``sdxl`` (epsilon,
    ``force_zeros_for_empty_prompt``), ``sd3`` (with T5) or ``flux`` (dev: the distilled guidance input)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline

    builders = {"sdxl": lambda: StableDiffusionXLPipeline(**make_sdxl_components(clip_tokenizer),
                                                          force_zeros_for_empty_prompt=True, add_watermarker=False),
                "sd3": lambda: StableDiffusion3Pipeline(**make_sd3_components(clip_tokenizer, local_t5_tokenizer())),
                "flux": lambda: FluxPipeline(**make_flux_components(clip_tokenizer, local_t5_tokenizer(), "dev"))}
    folders = {"sd": tiny_pipeline}

    def folder(family: str) -> Path:
        if family not in folders:
            folders[family] = tmp_path_factory.mktemp(family) / f"tiny-{family}"
            builders[family]().save_pretrained(folders[family])
        return folders[family]

    return folder


def make_tiny_components(tokenizer, prediction_type: str = "epsilon", seed: int = 0) -> dict:
    """SD-like components: a 2-level UNet with cross attention on 8x8x4 latents, a 2-level VAE (16x16 images),
    a 2-layer CLIP text encoder of width 8, and SD's DDIM scheduler config (scaled-linear betas, steps_offset 1,
    set_alpha_to_one false)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=2)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=2)
    text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=8,
                                                intermediate_size=16, num_attention_heads=2, num_hidden_layers=2,
                                                vocab_size=1000, max_position_embeddings=16))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                scheduler=scheduler)


@pytest.fixture
def refused(capsys):
    """``refused(call, pattern, output)``: ``call()`` exits with code 2 and one ``error:`` line matching the regex
    ``pattern`` (no traceback), and left ``output`` unwritten: the CLIs' rule for bad input."""
    def check(call, pattern: str, output) -> str:
        with pytest.raises(SystemExit) as exit_info:
            call()
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
        assert re.search(pattern, err), err
        assert not Path(output).exists()
        return err
    return check
