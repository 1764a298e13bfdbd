"""Fine-tuning an EDM2 snapshot with ``ConditionalDiffusion``: EDM's loss under the snapshot's P_mean/P_std with
the learned uncertainty (EDM2 paper eq. 8), forced weight normalisation, and a few real training steps."""

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_reg.diffusion.schedules import EDMSchedule
from lightning_reg.errors import ConfigError
from lightning_reg.models.edm2 import EDM2Precond, load_edm2
from lightning_reg.module import ConditionalDiffusion

MAIN = Path(__file__).parent / "fixtures" / "edm2_official_tiny_main.pkl"
pytestmark = pytest.mark.usefixtures("one_thread")


def test_from_edm2_takes_the_snapshots_loss_and_float32_weights():
    model = ConditionalDiffusion.from_edm2(str(MAIN))
    assert (model.schedule.p_mean, model.schedule.p_std, model.schedule.sigma_data) == (-0.4, 1.0, 0.5)
    assert model.hparams.uncertainty and model.hparams.label_dropout == 0.0 and model.hparams.prediction == "edm"
    stored = load_edm2(MAIN)[1].state_dict
    for name, p in model.net.named_parameters():
        assert p.dtype == torch.float32 and p.requires_grad
        torch.testing.assert_close(p, stored[name].float(), rtol=0, atol=0)


def test_loss_is_edm2s_uncertainty_weighted_denoising_loss():
    """``mse(F) / exp(u) + u`` equals EDM2's ``lambda(sigma) / exp(u) ||D - x0||^2 + u`` with
    ``lambda = (sigma^2 + sd^2) / (sigma sd)^2``, at the same draws of sigma and noise."""
    model = ConditionalDiffusion.from_edm2(str(MAIN)).eval()
    torch.manual_seed(1)
    x0, y = torch.randn(4, 4, 8, 8) * 0.5, torch.tensor([0, 3, 5, 9])
    torch.manual_seed(2)
    loss = model.diffusion_loss(model.net, x0, y)
    torch.manual_seed(2)
    sigma = model.schedule.sample_training_times(4)
    x = x0 + sigma.float().reshape(-1, 1, 1, 1) * torch.randn_like(x0)
    with torch.no_grad():
        d = model.denoiser(x, sigma, y)
        u = model.net.logvar(sigma)
    s = sigma.float().reshape(-1, 1, 1, 1)
    weight = (s ** 2 + 0.25) / (s * 0.5) ** 2
    expected = (weight / u.exp() * (d - x0) ** 2 + u).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=0)
    assert model.net.logvar(sigma).abs().sum() > 0  # the fixture's uncertainty head is not trivial


def fixed_loss(model: ConditionalDiffusion, x0, y) -> float:
    torch.manual_seed(123)
    with torch.no_grad():
        return float(model.diffusion_loss(model.net, x0, y))


@pytest.mark.timeout(300)
def test_a_few_training_steps_lower_the_loss(tmp_path):
    torch.manual_seed(0)
    x0, y = torch.randn(16, 4, 8, 8) * 0.5, torch.arange(16) % 10
    model = ConditionalDiffusion.from_edm2(str(MAIN), lr=3e-3, warmup_steps=1, ema_decay=0.5)
    before = fixed_loss(model, x0, y)
    trainer = L.Trainer(max_steps=25, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(TensorDataset(x0, y), batch_size=16, shuffle=False))
    after = fixed_loss(model, x0, y)
    assert torch.isfinite(torch.tensor([before, after])).all() and after < 0.9 * before, (before, after)  # 1.50 -> 1.19
    # forced weight normalisation: every trained weight row has unit RMS (up to the last step's update)
    w = model.net.unet.enc["8x8_block0"].conv_res0.weight
    torch.testing.assert_close(w.flatten(1).square().mean(1), torch.ones(len(w)), rtol=0.05, atol=0)


def test_init_from_an_edm2_file_and_the_refusals():
    snapshot = load_edm2(MAIN)[1]
    net = EDM2Precond(**snapshot.init_kwargs)
    model = ConditionalDiffusion(net, EDMSchedule(), "edm", label_dropout=0.0, init_from=str(MAIN))
    torch.testing.assert_close(model.net.unet.out_gain, snapshot.state_dict["unet.out_gain"].float())
    with pytest.raises(ConfigError, match="model.label_dropout=0.1: EDM2Precond has no null label"):
        ConditionalDiffusion(EDM2Precond(**snapshot.init_kwargs), EDMSchedule(), "edm", label_dropout=0.1)
    other = EDM2Precond(**{**snapshot.init_kwargs, "model_channels": 8})
    with pytest.raises(ConfigError, match="holds another architecture than model.net"):
        ConditionalDiffusion(other, EDMSchedule(), "edm", label_dropout=0.0, init_from=str(MAIN))
    from lightning_reg.models.mlp import ToyMLP
    with pytest.raises(ConfigError, match="model.uncertainty needs a backbone with a logvar"):
        ConditionalDiffusion(ToyMLP(num_classes=2, dim=2), uncertainty=True)
