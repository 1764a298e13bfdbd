"""Latent diffusion: the SD-VAE wrapper (a tiny random ``AutoencoderKL``), loading, and REG that never runs
through the VAE."""

import lightning as L
import pytest
import torch
from helpers import tiny_autoencoder, tiny_latent_dit, train_tiny_dit
from torch.utils.data import DataLoader, TensorDataset

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.data.latent import LatentImages
from lightning_reg.diffusion.latent import LatentCodec, LatentDenoiser
from lightning_reg.io.vae import load_autoencoder
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import VPSchedule
from lightning_reg.errors import ConfigError
from lightning_reg.guidance import make_guidance
from lightning_reg.models.dit import DiT
from lightning_reg.sampling.engine import generate


@pytest.fixture(scope="session")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "tiny-vae"
    tiny_autoencoder().save_pretrained(folder)
    return folder


def test_round_trip_shapes_and_scale(vae_folder, one_thread):
    codec = LatentCodec(load_autoencoder(str(vae_folder)))
    assert codec.scale_factor == 0.18215 and codec.downsample == 8
    assert not any(p.requires_grad for p in codec.parameters())  # frozen
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = codec.encode(x, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 4, 4) == (2, *codec.latent_shape((3, 32, 32)))
    posterior = codec.vae.encode(x).latent_dist
    torch.testing.assert_close(z, posterior.sample(torch.Generator().manual_seed(0)) * 0.18215)
    images = codec.decode(z)
    assert images.shape == x.shape and codec.image_shape((4, 4, 4)) == (3, 32, 32)
    torch.testing.assert_close(images, codec.vae.decode(z / 0.18215).sample)


def test_hub_name_loads_from_the_local_cache_only(vae_folder, hub_cache, one_thread):
    """A hub name resolves in a Hugging Face cache (the layout ``huggingface-cli download`` writes)."""
    vae = load_autoencoder("someone/tiny-vae", cache_dir=hub_cache(vae_folder, "someone/tiny-vae"))
    for got, want in zip(vae.state_dict().values(), load_autoencoder(str(vae_folder)).state_dict().values()):
        assert torch.equal(got, want)


@pytest.mark.parametrize("source, message", [
    ("{tmp}/missing", "does not exist: give a folder written by AutoencoderKL.save_pretrained"),
    ("{tmp}/file.pt", "is a file: give a folder"),
    ("{tmp}", "is not a loadable AutoencoderKL folder"),
    ("stabilityai/sd-vae-ft-ema", "neither a folder nor in the local Hugging Face cache, and nothing is downloaded at "
                                  "run time: run `huggingface-cli download stabilityai/sd-vae-ft-ema`"),
])
def test_bad_vae_one_line(tmp_path, source, message):
    (tmp_path / "file.pt").write_bytes(b"x")
    with pytest.raises(ConfigError) as err:
        load_autoencoder(source.format(tmp=tmp_path), cache_dir=str(tmp_path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_latent_denoiser_refuses_other_channels(vae_folder):
    net = DiT(input_size=4, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    with pytest.raises(ConfigError, match="backbone works on 3 channels but the VAE's latents have 4"):
        LatentDenoiser(net, VPSchedule(), Prediction("eps"), LatentCodec(load_autoencoder(str(vae_folder))))


@pytest.mark.parametrize("reg", ["paper", "vjp"])
def test_reg_through_the_latent_denoiser_never_touches_the_vae(vae_folder, reg, one_thread):
    codec = LatentCodec(load_autoencoder(str(vae_folder)))
    codec.vae.requires_grad_(True)  # even trainable, REG must leave the VAE alone
    denoiser = LatentDenoiser.over(Denoiser(tiny_latent_dit(), VPSchedule(), Prediction("eps")), codec)
    vae_calls, calls_seen_by_chain = [], []
    for part in (codec.vae.encoder, codec.vae.decoder):
        part.register_forward_hook(lambda module, args, out: vae_calls.append(type(module).__name__))
    net_forward = denoiser.net.forward
    denoiser.net.forward = lambda *args: calls_seen_by_chain.append(len(vae_calls)) or net_forward(*args)

    images = generate(denoiser, make_guidance(method="cfg", scale=2.0, reg=reg), [0, 1, 2], [0, 1, 2], steps=3,
                      seed=0, batch_size=3)
    assert images.shape == (3, *denoiser.sample_shape) == (3, 3, 32, 32) and torch.isfinite(images).all()
    assert denoiser.data_shape == (4, 4, 4)  # the chain's latents; sample_shape is what evaluators see
    assert calls_seen_by_chain and set(calls_seen_by_chain) == {0}  # the VAE never ran during the chain
    assert vae_calls == ["Decoder"]  # one decode, after the last step
    assert all(p.grad is None for p in codec.parameters()) and all(p.grad is None for p in denoiser.net.parameters())
    plain = generate(denoiser, make_guidance(method="cfg", scale=2.0), [0, 1, 2], [0, 1, 2], steps=3, seed=0,
                     batch_size=3)
    assert (images - plain).abs().max() > 1e-4  # REG did change the latents


class TinyImages(L.LightningDataModule):
    num_classes, data_shape = 3, (3, 32, 32)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, torch.arange(4) % 3),
                          batch_size=4)


def test_latent_images_encode_batches_on_their_device(vae_folder, one_thread):
    data = LatentImages(TinyImages(), vae=str(vae_folder))
    assert data.data_shape == (4, 4, 4) and data.num_classes == 3
    x, y = next(iter(data.train_dataloader()))
    torch.manual_seed(0)
    z, y_out = data.on_after_batch_transfer((x, y), 0)
    torch.manual_seed(0)
    torch.testing.assert_close(z, data.codec.encode(x))
    assert z.shape == (4, 4, 4, 4) and not z.requires_grad and torch.equal(y_out, y)


def test_train_on_latents_then_sample_decoded_images(vae_folder, tmp_path, one_thread):
    """train.py on ``LatentImages`` (the model sees 4x4x4 latents), then sample.py ``--vae`` (32x32 RGB images)."""
    import numpy as np

    from lightning_reg.data.synthetic_images import make_synthetic_image_dataset
    from lightning_reg.sampling.cli import main as sample_main

    data = make_synthetic_image_dataset(tmp_path / "data", num_classes=3, n_per_class=4, image_size=32)
    ckpt = train_tiny_dit(tmp_path, 4, 4, "--data", "lightning_reg.data.latent.LatentImages",
                          "--data.vae", str(vae_folder), "--data.data", "lightning_reg.data.images.ImageDataModule",
                          "--data.data.name", str(data), "--data.data.image_size", "32", "--data.data.batch_size", "4")
    out = tmp_path / "out"
    sample_main(["--checkpoint", str(ckpt), "--vae", str(vae_folder), "--output", str(out), "--num_samples", "3",
                 "--steps", "2", "--guidance", "{method: cfg, scale: 1.0, reg: paper}"])
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (3, 32, 32, 3)
