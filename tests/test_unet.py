"""The UNet backbone: shapes, class conditioning, per-sample independence, input gradients (REG),
training inside ``ConditionalDiffusion`` and a guided REG call, and its one-line config errors."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_reg.errors import ConfigError
from lightning_reg.guidance import GuidedDenoiser, make_guidance
from lightning_reg.models.unet import UNet
from lightning_reg.module import ConditionalDiffusion

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(num_classes=3, image_size=8, channels=1, base_channels=16, channel_mult=(1, 2), num_heads=2)


def perturbed_unet(**kw) -> UNet:
    """A seeded UNet whose zero-initialised output convolution gets small random weights."""
    torch.manual_seed(0)
    net = UNet(**{**TINY, **kw})
    with torch.no_grad():
        net.out[-1].weight.normal_(0, 0.05)
        net.out[-1].bias.normal_(0, 0.05)
    return net.eval()


@pytest.mark.parametrize("kw", [
    dict(num_classes=10, image_size=16, channels=1, base_channels=16, channel_mult=(1, 2), num_heads=2),
    dict(num_classes=10, image_size=16, channels=1, base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=2,
         attention_resolutions=(8, 4), num_heads=2, dropout=0.1),
    dict(num_classes=4, image_size=32, channels=3, base_channels=16, channel_mult=(1, 2),
         attention_resolutions=(), learn_sigma=True),
    dict(num_classes=4, image_size=32, channels=3, base_channels=8, channel_mult=(1, 1, 2, 2),
         attention_resolutions=(8,), num_heads=1),
], ids=["16px-1ch-attn8", "16px-3levels-attn8+4", "32px-3ch-no-attn", "32px-4levels"])
def test_shapes_attributes_and_zero_output(kw):
    net = UNet(**kw)
    c, s = kw["channels"], kw["image_size"]
    assert net.num_classes == kw["num_classes"] and net.data_shape == (c, s, s)
    assert net.label_embedding.num_embeddings == kw["num_classes"] + 1
    attention = sum(m.__class__.__name__ == "AttentionBlock" for m in net.modules())
    # per attended level: num_res_blocks (encoder) + num_res_blocks + 1 (decoder), + 1 in the middle if lowest
    levels = len(kw["channel_mult"])
    expected = sum(2 * kw.get("num_res_blocks", 1) + 1 + (level == levels - 1)
                   for level in range(levels) if s // 2**level in kw.get("attention_resolutions", (8,)))
    assert attention == expected
    x = torch.randn(3, c, s, s)
    out = net(x, torch.tensor([0.0, 500.5, 999.0]), torch.tensor([0, 1, kw["num_classes"]]))
    assert out.shape == (3, 2 * c if kw.get("learn_sigma") else c, s, s)
    assert torch.count_nonzero(out) == 0  # zero-initialised output convolution


def test_class_sensitivity_and_null_label():
    net = perturbed_unet()
    x = torch.randn(1, 1, 8, 8).expand(4, -1, -1, -1)
    with torch.no_grad():
        out = net(x, torch.full((4,), 300.0), torch.tensor([0, 1, 2, 3]))  # 3 is the null label
    assert torch.isfinite(out).all()
    gaps = [(out[i] - out[j]).abs().max().item() for i in range(4) for j in range(i + 1, 4)]
    assert min(gaps) > 1e-3  # every pair of labels, the null label included, gives a different output
    with pytest.raises(IndexError):
        net(x[:1], torch.tensor([1.0]), torch.tensor([4]))  # beyond the null id


def test_time_sensitivity():
    net = perturbed_unet()
    x = torch.randn(1, 1, 8, 8).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = net(x, torch.tensor([10.0, 900.0]), torch.tensor([1, 1]))
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_per_sample_independence():
    """GroupNorm normalises per sample, so a sample's output does not depend on the rest of the batch."""
    net = perturbed_unet(attention_resolutions=(8, 4))
    x, t, y = torch.randn(5, 1, 8, 8), torch.rand(5) * 1000, torch.tensor([0, 1, 2, 3, 0])
    with torch.no_grad():
        batched = net(x, t, y)
        single = torch.cat([net(x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(5)])
        reordered = net(x.flip(0), t.flip(0), y.flip(0)).flip(0)
    assert batched.abs().max() > 0
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched, reordered, atol=1e-5, rtol=0)


def test_gradient_wrt_x_is_finite_and_per_sample():
    net = perturbed_unet()
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    out = net(x, torch.tensor([10.0, 500.0, 990.0]), torch.tensor([0, 2, 3]))
    out[1].square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[1].abs().sum() > 0
    assert x.grad[[0, 2]].abs().max() == 0  # sample 1's output depends on sample 1's input only


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_learned_sigma_goes_through_the_shared_path():
    """``learn_sigma``: the Denoiser returns x-shaped estimates and, asked, the variance of every row; the
    loss adds the VLB term and stays finite (the UNet used to take ``out_channels``, which no path split)."""
    torch.manual_seed(0)
    module = ConditionalDiffusion(UNet(**TINY, learn_sigma=True))
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    assert module.denoiser(x, torch.tensor(500.0), y).shape == x.shape
    x0, v = module.denoiser(x, torch.tensor(500.0), y, variance=True)
    assert x0.shape == v.shape == x.shape and not v.requires_grad
    assert torch.isfinite(module.diffusion_loss(module.net, x, y))


def test_trains_inside_conditional_diffusion():
    """Class-dependent 8x8 images (a bright row per class): 60 AdamW steps lower the fixed-noise loss."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (512,), generator=g)
    x0 = torch.full((512, 1, 8, 8), -1.0)
    x0[torch.arange(512), 0, 2 * y + 1] = 1.0
    x0 += 0.05 * torch.randn(x0.shape, generator=g)
    torch.manual_seed(0)
    module = ConditionalDiffusion(UNet(**TINY), lr=3e-3, warmup_steps=5)

    def fixed_loss() -> float:
        torch.manual_seed(1234)
        with torch.no_grad():
            return module.diffusion_loss(module.net, x0[:256], y[:256]).item()

    before = fixed_loss()
    trainer = L.Trainer(max_steps=60, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, DataLoader(TensorDataset(x0, y), batch_size=64, shuffle=True))
    after = fixed_loss()
    assert trainer.global_step == 60 and module.ema.n_averaged.item() == 60
    assert after < 0.5 * before, (before, after)


def test_reg_runs_on_the_unet():
    """CFG + REG (paper) takes the input gradient through the UNet: finite, and not plain CFG."""
    model = ConditionalDiffusion(perturbed_unet()).denoiser.eval()
    x, y, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0]), torch.tensor(500.0)
    with torch.no_grad():
        cfg = GuidedDenoiser(model, make_guidance("cfg", scale=1.0), y)(x, t)
        reg = GuidedDenoiser(model, make_guidance("cfg", scale=1.0, reg="paper"), y)(x, t)
    assert reg.shape == cfg.shape == x.shape
    assert torch.isfinite(reg).all()
    assert (reg - cfg).abs().max() > 1e-6


@pytest.mark.parametrize("kw, message", [
    (dict(image_size=12, channel_mult=(1, 2, 2, 2)), r"image_size=12 must be divisible by .* = 8"),
    (dict(base_channels=12), r"channels \[12\] .* not divisible by norm_groups=8"),
    (dict(base_channels=4, channel_mult=(2, 4)), r"channels \[4\] .* not divisible by norm_groups=8"),
    (dict(attention_resolutions=(16,)), r"attention_resolutions \[16\] are not among the resolutions \[8, 4\]"),
    (dict(num_heads=3), r"num_heads=3 must be >= 1 and divide the channels \[16\]"),
    (dict(num_res_blocks=0), "num_res_blocks must be >= 1"),
    (dict(channel_mult=()), "must be positive and non-empty"),
    (dict(dropout=1.0), r"dropout must lie in \[0, 1\)"),
    (dict(num_classes=0), "num_classes must be >= 1"),
])
def test_impossible_settings_raise_one_line(kw, message):
    with pytest.raises(ConfigError, match=message) as err:
        UNet(**{**TINY, **kw})
    assert "\n" not in str(err.value)
