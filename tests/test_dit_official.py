"""The public DiT layout: strict loading of a public-architecture state dict, its outputs, the checkpoint
loader's errors, learned-sigma guidance as the DiT/REG authors do it, the DDPM sampler's learned variance
against the public ``p_sample`` on respaced betas, and the learned-variance training term."""

import math
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_reg.diffusion.denoiser import Denoiser, learned_variance_vlb
from lightning_reg.diffusion.predictions import Prediction, eps_from_x0
from lightning_reg.diffusion.samplers import ddim
from lightning_reg.diffusion.schedules import EDMSchedule, VPSchedule
from lightning_reg.errors import ConfigError
from lightning_reg.guidance import GuidedDenoiser, make_guidance
from lightning_reg.models.dit import DIT_CONFIGS, DiT, describe, dit_config_of, load_dit_checkpoint
from lightning_reg.models.mlp import ToyMLP
from lightning_reg.module import ConditionalDiffusion

FIXTURE = Path(__file__).parent / "fixtures" / "dit_official_tiny.pt"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE, weights_only=True)


def _loaded(fixture) -> DiT:
    model = DiT(**fixture["config"])
    model.load_state_dict(fixture["state_dict"], strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------- architecture
def test_public_state_dict_loads_strictly_and_reproduces_the_public_outputs(fixture):
    model = _loaded(fixture)
    assert list(model.state_dict()) == list(fixture["state_dict"])  # same names, same order, 32 tensors
    torch.testing.assert_close(model.pos_embed, fixture["state_dict"]["pos_embed"], rtol=0, atol=1e-7)
    with torch.no_grad():
        out = model(fixture["x"], fixture["t"], fixture["y"])
    assert out.shape == (6, 8, 8, 8)
    assert (out - fixture["out"]).abs().max() < 1e-5
    assert model.num_classes == 10 and model.data_shape == (4, 8, 8) and model.learn_sigma
    assert model.label_embedding is model.y_embedder.embedding_table and model.label_embedding.num_embeddings == 11


@pytest.mark.parametrize("name", list(DIT_CONFIGS))
def test_presets_round_trip_through_their_state_dict_shapes(name):
    with torch.device("meta"):
        model = DiT(input_size=32, num_classes=1000, **DIT_CONFIGS[name])
    config = dit_config_of(model.state_dict())
    assert config == dict(DIT_CONFIGS[name], input_size=32, in_channels=4, mlp_ratio=4.0, num_classes=1000,
                          learn_sigma=True)


def test_xl2_has_the_published_size():
    with torch.device("meta"):
        model = DiT(**DIT_CONFIGS["DiT-XL/2"])
    # 675,129,632 with pos_embed, which the public code keeps as a frozen parameter (here a buffer)
    assert sum(p.numel() for p in model.parameters()) + model.pos_embed.numel() == 675_129_632
    assert model.y_embedder.embedding_table.weight.shape == (1001, 1152)


# ---------------------------------------------------------------------------------------- loader
def test_loader_reads_plain_and_training_script_checkpoints(fixture, tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save(fixture["state_dict"], plain)
    model = load_dit_checkpoint(plain, image_size=64, num_heads=4)  # 8x8 latents of 64x64 images
    with torch.no_grad():
        assert (model(fixture["x"], fixture["t"], fixture["y"]) - fixture["out"]).abs().max() < 1e-5
    ema = {k: v + 1 for k, v in fixture["state_dict"].items()}
    nested = tmp_path / "0400000.pt"  # the public train.py's layout, argparse args included
    torch.save({"model": fixture["state_dict"], "ema": ema, "opt": {}, "args": Namespace(model="DiT-XL/2")}, nested)
    loaded = load_dit_checkpoint(nested, model=DiT(**fixture["config"]))
    torch.testing.assert_close(loaded.pos_embed, ema["pos_embed"])  # the EMA weights, as the public sampler


def test_loader_errors_are_one_line(fixture, tmp_path):
    plain = tmp_path / "tiny.pt"
    torch.save(fixture["state_dict"], plain)
    cases = [
        (dict(model="DiT-XL/2"), r"is DiT depth 2, hidden 64, patch 2 on 8x8 inputs, 10 classes, not DiT-XL/2 "),
        (dict(image_size=256, num_heads=4), r"not 256x256 images \(.*on 32x32 inputs"),
        (dict(model="DiT-XXL/2"), r"unknown DiT model 'DiT-XXL/2'"),
        (dict(model=DiT(**dict(fixture["config"], num_classes=1000))), r"10 classes, not .*1000 classes"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            load_dit_checkpoint(plain, **kwargs)
        assert "\n" not in str(err.value)
    toy = tmp_path / "toy.pt"
    torch.save(ToyMLP(num_classes=2, dim=2).state_dict(), toy)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(plain.read_bytes()[:5000])
    for path, message in [(toy, r"not a DiT state dict in the public layout: no \['pos_embed'"),
                          (FIXTURE, r"is not a state dict \(plain, or under 'ema' or 'model'\): its entries \['config'"),
                          (truncated, r"cannot be read as a torch weights file"),
                          (tmp_path / "missing.pt", r"does not exist"),
                          (plain, r"hidden size 64 matches no DiT-S/B/L/XL size; pass num_heads")]:
        with pytest.raises(ConfigError, match=message) as err:
            load_dit_checkpoint(path)
        assert "\n" not in str(err.value)


def test_xl2_checkpoint_of_another_image_size_is_named():
    with torch.device("meta"):
        state_dict = DiT(input_size=64, **DIT_CONFIGS["DiT-XL/2"]).state_dict()
    config = dit_config_of(state_dict)
    assert config["input_size"] == 64  # a 512x512 checkpoint: 64x64 latents
    assert describe(config) == "DiT-XL/2 on 64x64 inputs, 1000 classes"


# ------------------------------------------------------------------------------ learned sigma, guidance
def _authors_guided_eps(net, x, t, y, w2, reg_factor_s=None):
    """DiT's ``forward_with_cfg`` (REG authors' patch when ``reg_factor_s`` = s_t): eps channels 0-2 guided,
    channel 3 and the variance channels from each half's own output; REG's factor sums all 4 eps channels."""
    null = torch.full_like(y, net.num_classes)
    with torch.enable_grad():
        half = x.clone().requires_grad_(True)
        out = net(torch.cat([half, half]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out[:, :4].chunk(2)
        factor = 1.0
        if reg_factor_s is not None:
            factor = 1 - reg_factor_s * torch.autograd.grad(cond.sum(), half)[0]
    cond, uncond, rest = cond.detach(), uncond.detach(), out[: len(x), 3:].detach()
    guided = cond + (w2 - 1) * factor * (cond - uncond)
    return torch.cat([guided[:, :3], rest], dim=1)


@pytest.mark.parametrize("reg", ["none", "paper"])
def test_learned_sigma_channels_split_and_guided_as_the_authors(fixture, reg):
    net = _loaded(fixture)
    schedule = VPSchedule()
    denoiser = Denoiser(net, schedule, Prediction("eps"))
    x, y = fixture["x"][:4], fixture["y"][:4].clamp(max=9)
    t = torch.tensor(500.0)
    a, s = (float(c) for c in schedule.alpha_sigma(t))
    guided = GuidedDenoiser(denoiser, make_guidance("cfg", scale=4.0, convention="w2", reg=reg,
                                                    guidance_channels=[0, 1, 2]), y)
    with torch.no_grad():
        eps = eps_from_x0(guided(x, t), x, a, s)
    want = _authors_guided_eps(net, x, t.expand(4), y, 4.0, s if reg == "paper" else None)
    torch.testing.assert_close(eps, want[:, :4], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(guided.learned_variance(), want[:, 4:], rtol=1e-5, atol=1e-5)


def test_learned_sigma_needs_the_vp_schedule(fixture):
    with pytest.raises(ConfigError, match="learn_sigma .* needs the 'vp' schedule, not 'edm'"):
        Denoiser(_loaded(fixture), EDMSchedule(), Prediction("eps"))


def _public_respaced_tables(num_timesteps: int, steps: int):
    """ADM/DiT ``SpacedDiffusion`` for ``space_timesteps(T, str(steps))`` on linear betas, in numpy float64:
    the kept timesteps (ascending) and, per respaced index, beta, the clipped log posterior variance and
    the posterior-mean coefficients."""
    betas = np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64)
    alphas_cumprod = np.cumprod(1 - betas)
    stride = (num_timesteps - 1) / (steps - 1)
    kept = sorted({round(i * stride) for i in range(steps)})
    new_betas, last = [], 1.0
    for i in kept:
        new_betas.append(1 - alphas_cumprod[i] / last)
        last = alphas_cumprod[i]
    beta = np.array(new_betas)
    abar = np.cumprod(1 - beta)
    abar_prev = np.append(1.0, abar[:-1])
    posterior_var = beta * (1 - abar_prev) / (1 - abar)
    log_var_clipped = np.log(np.append(posterior_var[1], posterior_var[1:]))
    coef_x0 = beta * np.sqrt(abar_prev) / (1 - abar)
    coef_xt = (1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar)
    return kept, beta, abar, log_var_clipped, coef_x0, coef_xt


def test_ddpm_with_learned_variance_matches_the_public_p_sample(fixture):
    """First three and last three of 250 respaced steps, CFG w2 = 4 on channels 0-2, noise drawn in order."""
    net = _loaded(fixture)
    schedule = VPSchedule()
    kept, beta, abar, log_var_clipped, coef_x0, coef_xt = _public_respaced_tables(1000, 250)
    times = schedule.sampling_times(250)
    assert times[:-1].long().tolist() == kept[::-1]
    x0, y = fixture["x"][:3], torch.tensor([1, 4, 7])
    guidance = make_guidance("cfg", scale=4.0, convention="w2", guidance_channels=[0, 1, 2])
    for indices in (range(249, 246, -1), range(2, -1, -1)):
        g = torch.Generator().manual_seed(1)
        zs = [torch.randn(x0.shape, generator=g) for _ in indices]
        want = x0.double()
        for k, z in zip(indices, zs):  # the public p_sample, by hand
            out = _authors_guided_eps(net, want.float(), torch.full((3,), float(kept[k])), y, 4.0).double()
            eps, v = out[:, :4], out[:, 4:]
            pred_x0 = want / math.sqrt(abar[k]) - math.sqrt(1 / abar[k] - 1) * eps
            mean = coef_x0[k] * pred_x0 + coef_xt[k] * want
            frac = (v + 1) / 2
            log_var = frac * math.log(beta[k]) + (1 - frac) * log_var_clipped[k]
            want = mean + (k != 0) * (0.5 * log_var).exp() * z.double()
        noises = iter(zs)
        guided = GuidedDenoiser(Denoiser(net, schedule, Prediction("eps")), guidance, y)
        start = 249 - indices[0]
        got = ddim(guided, x0, schedule, 250, eta=1.0, times=times[start:start + 4],
                   noise_sampler=lambda x: next(noises), learned_variance=guided.learned_variance)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
        if indices[0] == 249:  # noise scale differs from the fixed posterior std: the learned variance is used
            fixed = ddim(GuidedDenoiser(Denoiser(net, schedule, Prediction("eps")), guidance, y), x0, schedule,
                         250, eta=1.0, times=times[:4], noise_sampler=lambda x: torch.zeros_like(x))
            assert (got - fixed).abs().max() > 1e-3


# -------------------------------------------------------------------------------------- training
def test_learned_sigma_training_loss_is_finite_and_trains_the_variance(fixture):
    torch.manual_seed(0)
    module = ConditionalDiffusion(_loaded(fixture).train(), VPSchedule(), label_dropout=0.1)
    x0, y = fixture["x"], fixture["y"].clamp(max=9)
    loss = module.diffusion_loss(module.net, x0, y)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    grad = module.net.final_layer.linear.bias.grad.reshape(4, 8)  # (p1 p2 c) rows: eps 0-3, v 4-7
    assert grad[:, :4].abs().sum() > 0 and grad[:, 4:].abs().sum() > 0
    # t = 0 (decoder NLL) and t = 999 (KL) both finite
    module.schedule.sample_training_times = lambda n, device=None: torch.tensor([0.0, 999.0] * (n // 2)).double()
    assert torch.isfinite(module.diffusion_loss(module.net, x0, y))


def test_variance_vlb_vanishes_at_the_true_posterior():
    """``v = -1`` is the posterior variance; with ``x0_hat = x0`` the KL is 0 for t > 0, the NLL at t = 0 is not."""
    schedule = VPSchedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0.0, 1.0, 500.0, 999.0], dtype=torch.float64)
    a, s = (c.reshape(-1, 1, 1, 1) for c in schedule.alpha_sigma(t))
    x_t = a * x0 + s * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    vb = learned_variance_vlb(schedule, x0, x_t, t, x0, -torch.ones_like(x0))
    torch.testing.assert_close(vb[1:], torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-9)
    assert vb[0] > 0 and torch.isfinite(vb[0])
    # v = 0.5, x0_hat off by 0.3: the KL of two Gaussians (torch.distributions), posterior from the DDPM table
    v, x0_hat = torch.full_like(x0, 0.5), x0 + 0.3
    got = learned_variance_vlb(schedule, x0, x_t, t, x0_hat, v)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    for i, k in [(1, 1), (2, 500), (3, 999)]:
        beta, prev = 1 - abar[k] / abar[k - 1], abar[k - 1]
        var_q = beta * (1 - prev) / (1 - abar[k])
        mean = lambda z: (beta * prev.sqrt() * z + (1 - prev) * (1 - beta).sqrt() * x_t[i]) / (1 - abar[k])  # noqa: E731
        var_p = (0.75 * beta.log() + 0.25 * var_q.log()).exp()
        kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean(x0[i]), var_q.sqrt()),
                                               torch.distributions.Normal(mean(x0_hat[i]), var_p.sqrt()))
        torch.testing.assert_close(got[i], kl.mean() / math.log(2), rtol=1e-6, atol=0)
