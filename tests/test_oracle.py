"""The optimal-guidance oracle and the exact mixture denoiser (docs/theory.md §1, §2, §4)."""

from __future__ import annotations

import csv

import pytest
import torch

from lightning_reg.data.mixtures import GaussianMixture
from lightning_reg.data.toy import ToyDistribution, toy1d_distribution, toy2d_distribution
from lightning_reg.diffusion.schedules import EDMSchedule, VPSchedule
from lightning_reg.errors import ConfigError
from lightning_reg.experiments import toy1d, toy2d
from lightning_reg.oracle import (ExactMixtureDenoiser, density_ratio_log_reward, grad_log_expected_reward,
                                  no_foresight_estimates, sample_guided_target)

SCHEDULE = VPSchedule(1000)
T = lambda t: torch.tensor(float(t), dtype=torch.float64)  # noqa: E731


@pytest.mark.parametrize("distribution", [toy1d_distribution(), toy2d_distribution()], ids=["1d", "2d"])
@pytest.mark.parametrize("t", [0, 300, 999])
def test_exact_denoiser_is_tweedie(distribution, t):
    """``D(x, t, y) = (x + s^2 grad log p_t(x|y)) / a`` for every label, the null label included."""
    den = ExactMixtureDenoiser(distribution, SCHEDULE)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(distribution.num_classes + 1).repeat(5)
    x = 1.5 * torch.randn(len(labels), distribution.dim, dtype=torch.float64, generator=g)
    a, s = SCHEDULE.alpha_sigma(t)
    tweedie = torch.stack([(x[i:i + 1] + s ** 2 * distribution.mixture(int(y)).score(x[i:i + 1], a, s)) / a
                           for i, y in enumerate(labels)])[:, 0]
    torch.testing.assert_close(den(x, T(t), labels), tweedie)


def test_exact_denoiser_refuses_other_schedules():
    with pytest.raises(ConfigError, match="'vp' schedule"):
        ExactMixtureDenoiser(toy1d_distribution(), EDMSchedule())


def _finite_difference_jacobian(f, x, h=1e-5):
    """``J[n, i, j] = d f_i / d x_j`` by central differences (f maps (N, D) -> (N, D) row-wise)."""
    cols = [(f(x + h * e) - f(x - h * e)) / (2 * h) for e in torch.eye(x.shape[1], dtype=x.dtype)]
    return torch.stack(cols, dim=2)


@pytest.mark.parametrize("distribution", [toy1d_distribution(), toy2d_distribution()], ids=["1d", "2d"])
def test_no_foresight_estimates_match_the_formulas(distribution):
    """CFG's estimate is ``w (grad log p_t(x|y) - grad log p_t(x))``; REG-vjp is ``(I - s J)^T`` of it and
    REG-paper ``(J^T 1)``-diagonal form, ``J = d eps_c / dx`` (docs/theory.md §2)."""
    den, w, t = ExactMixtureDenoiser(distribution, SCHEDULE), 1.5, 300
    a, s = SCHEDULE.alpha_sigma(t)
    x = torch.tensor([[0.3, -0.4], [0.9, 0.1], [-0.2, 0.6]], dtype=torch.float64)[:, :distribution.dim]
    y = torch.zeros(len(x), dtype=torch.long)
    est = no_foresight_estimates(den, x, T(t), y, w)
    cfg = w * (distribution.conditionals[0].score(x, a, s) - distribution.unconditional.score(x, a, s))
    torch.testing.assert_close(est["cfg"], cfg)
    jac = _finite_difference_jacobian(lambda z: -s * distribution.conditionals[0].score(z, a, s), x)
    eye = torch.eye(distribution.dim, dtype=torch.float64)
    torch.testing.assert_close(est["reg_vjp"], torch.einsum("nij,ni->nj", eye - s * jac, cfg), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(est["reg_paper"], (1 - s * jac.sum(1)) * cfg, rtol=1e-5, atol=1e-7)
    if distribution.dim == 2:  # off-diagonal Jacobian terms: the two forms differ
        assert not torch.allclose(est["reg_paper"], est["reg_vjp"], rtol=1e-3)


def _grad_log_reward(log_reward, x, y):
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(log_reward(x, y).sum(), x)[0]


def test_oracle_at_the_clean_end_and_the_last_step():
    """Our VP grid ends ``..., 0, -1``: at the clean time ``-1`` no step is left and ``E = R_0``; at ``t = 0``
    the last DDPM step is deterministic, so ``E_0(x) = R_0(D(x, 0))`` and ``grad log E_0 ≈ grad log R_0``."""
    distribution = toy1d_distribution()
    den, log_reward = ExactMixtureDenoiser(distribution, SCHEDULE), density_ratio_log_reward(distribution, 1.0)
    x = torch.linspace(-1, 2, 31, dtype=torch.float64)[:, None]
    y = torch.zeros(31, dtype=torch.long)
    clean = grad_log_expected_reward(den, x, T(-1), y, log_reward, 20, rollouts=3)
    torch.testing.assert_close(clean, _grad_log_reward(log_reward, x, y))
    last = grad_log_expected_reward(den, x, T(0), y, log_reward, 20, rollouts=3)
    x_in = x.clone().requires_grad_(True)
    chained = torch.autograd.grad(log_reward(den(x_in, T(0), y), y).sum(), x_in)[0]
    torch.testing.assert_close(last, chained)
    torch.testing.assert_close(last, _grad_log_reward(log_reward, x, y), rtol=0.02, atol=0.02)


def test_oracle_is_zero_without_guidance():
    distribution = toy2d_distribution()
    den = ExactMixtureDenoiser(distribution, SCHEDULE)
    x = torch.randn(6, 2, dtype=torch.float64)
    grad = grad_log_expected_reward(den, x, T(SCHEDULE.sampling_times(25)[5]), torch.ones(6, dtype=torch.long),
                                    density_ratio_log_reward(distribution, 0.0), 25, rollouts=4)
    assert torch.equal(grad, torch.zeros_like(x))


def test_oracle_refuses_bad_input():
    distribution = toy1d_distribution()
    den = ExactMixtureDenoiser(distribution, SCHEDULE)
    x, y = torch.zeros(2, 1, dtype=torch.float64), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ConfigError, match="sampling times"):
        grad_log_expected_reward(den, x, T(500), y, density_ratio_log_reward(distribution, 1.0), 20)
    with pytest.raises(ConfigError, match="rollouts"):
        grad_log_expected_reward(den, x, T(0), y, density_ratio_log_reward(distribution, 1.0), 20, rollouts=0)


# Closed form: data N(mu, sigma^2), reward R_0 = exp(-(x_0 - m)^2 / (2 tau^2)).
MU, SIGMA, M, TAU, STEPS = 0.3, 0.7, 1.2, 0.5, 20


def _gaussian_chain(t_index: int, eta: float):
    """The respaced DDIM/DDPM chain from ``times[t_index]`` with the exact denoiser of ``N(mu, sigma^2)``
    is linear-Gaussian: ``x_0 | x_t ~ N(A x_t + B, V)``. Each step maps
    ``x -> a' x0_hat + k eps_hat + c z`` with ``x0_hat = mu + g (x - a mu)``, ``g = a sigma^2 / (a^2 sigma^2 + s^2)``,
    ``eps_hat = (x - a x0_hat) / s``, ``c = eta s' sqrt(1 - (a s' / (a' s))^2)``, ``k = sqrt(s'^2 - c^2)``."""
    times = SCHEDULE.sampling_times(STEPS)[t_index:]
    A, B, V = 1.0, 0.0, 0.0
    for t, t_next in zip(times[:-1], times[1:]):
        (a, s), (an, sn) = (tuple(float(v) for v in SCHEDULE.alpha_sigma(u)) for u in (t, t_next))
        g = a * SIGMA ** 2 / (a ** 2 * SIGMA ** 2 + s ** 2)
        c = eta * sn * max(1 - (a * sn / (an * s)) ** 2, 0.0) ** 0.5
        k = (sn ** 2 - c ** 2) ** 0.5
        slope = an * g + k * (1 - a * g) / s  # d x_next / d x
        offset = (an - k * a / s) * (MU - g * a * MU)
        A, B, V = slope * A, slope * B + offset, slope ** 2 * V + c ** 2
    return A, B, V


def _closed_form(x, t_index, eta):
    """``E_t = ∫ N(x0; A x + B, V) R_0 dx0 ∝ exp(-(A x + B - m)^2 / (2 (V + tau^2)))``, so
    ``grad log E_t = -(A x + B - m) / (V + tau^2) * A``."""
    A, B, V = _gaussian_chain(t_index, eta)
    return -(A * x + B - M) / (V + TAU ** 2) * A


@pytest.fixture
def gaussian():
    den = ExactMixtureDenoiser(ToyDistribution([GaussianMixture([MU], [SIGMA])]), SCHEDULE)
    return den, (lambda x0, y: -((x0[:, 0] - M) ** 2) / (2 * TAU ** 2))


def test_gaussian_chain_mean_is_the_posterior_mean():
    """Sanity check of the closed form: the chain's mean ``A x + B`` is the exact ``E[x_0 | x_t]``."""
    t_index = 8
    a, s = SCHEDULE.alpha_sigma(SCHEDULE.sampling_times(STEPS)[t_index])
    A, B, _ = _gaussian_chain(t_index, 1.0)
    x = torch.linspace(-2, 2, 5, dtype=torch.float64)[:, None]
    torch.testing.assert_close(A * x + B, GaussianMixture([MU], [SIGMA]).posterior_mean(x, a, s))


def test_deterministic_oracle_equals_closed_form(gaussian):
    den, log_reward = gaussian
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    y = torch.zeros(9, dtype=torch.long)
    for t_index in (3, 12, 19):
        t = SCHEDULE.sampling_times(STEPS)[t_index]
        grad = grad_log_expected_reward(den, x, t, y, log_reward, STEPS, rollouts=1, eta=0.0)
        torch.testing.assert_close(grad, _closed_form(x, t_index, 0.0))


def test_monte_carlo_oracle_converges_to_closed_form(gaussian):
    den, log_reward = gaussian
    t_index = 10
    x = torch.linspace(-2, 2, 16, dtype=torch.float64)[:, None]
    y = torch.zeros(16, dtype=torch.long)
    exact = _closed_form(x, t_index, 1.0)
    errors = []
    for rollouts in (10, 100, 1000):
        grad = grad_log_expected_reward(den, x, SCHEDULE.sampling_times(STEPS)[t_index], y, log_reward, STEPS,
                                        rollouts=rollouts, generator=torch.Generator().manual_seed(0))
        errors.append(float((grad - exact).abs().mean()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.03 * float(exact.abs().mean())


def test_guided_target_samples_match_a_closed_form():
    """``N(0, 1) * exp(-(x - m)^2 / (2 v))`` is ``N(m / (1 + v), v / (1 + v))``: the resampled draws match it."""
    standard = ToyDistribution([GaussianMixture([0.0], [1.0])])
    m, v = 1.5, 0.5
    draws = sample_guided_target(standard, 0, lambda x0, y: -((x0[:, 0] - m) ** 2) / (2 * v), 20_000,
                                 generator=torch.Generator().manual_seed(0))
    assert draws.shape == (20_000, 1)
    assert float(draws.mean()) == pytest.approx(m / (1 + v), abs=0.02)
    assert float(draws.var()) == pytest.approx(v / (1 + v), abs=0.02)
    unguided = sample_guided_target(standard, 0, lambda x0, y: torch.zeros(len(x0)), 20_000,
                                    generator=torch.Generator().manual_seed(1))
    assert float(unguided.mean()) == pytest.approx(0.0, abs=0.03)
    assert float(unguided.var()) == pytest.approx(1.0, abs=0.04)
    with pytest.raises(ConfigError, match="pool"):
        sample_guided_target(standard, 0, lambda x0, y: torch.zeros(len(x0)), 10, pool=5)


def test_toy1d_experiment_writes_outputs(tmp_path, capsys, one_thread):
    toy1d.main(["--exact", "--steps", "5", "--grid", "12", "--rollouts", "4", "--out", str(tmp_path)])
    assert {p.name for p in tmp_path.iterdir()} == {"errors.csv", "estimates.pt", "values.png", "abs_error.png"}
    rows = list(csv.DictReader(open(tmp_path / "errors.csv")))
    assert [r["step"] for r in rows] == ["0", "1", "2", "3", "4", "all", "median"]
    estimates = torch.load(tmp_path / "estimates.pt")
    assert estimates["oracle"].shape == (5, 12, 1)
    assert "steps where REG (paper) is not closer" in capsys.readouterr().out


def test_toy2d_experiment_writes_outputs(tmp_path, one_thread):
    toy2d.main(["--exact", "--steps", "4", "--grid", "5", "--rollouts", "3", "--samples", "50", "--paper-t", "1",
                "--label", "1", "--out", str(tmp_path)])
    assert {p.name for p in tmp_path.iterdir()} == {"errors.csv", "sample_metrics.csv", "estimates.pt", "samples.png",
                                                    "fields.png", "reg_correction.png", "error_per_step.png"}
    assert all((tmp_path / name).stat().st_size > 5000 for name in ("samples.png", "fields.png"))
    rows = list(csv.DictReader(open(tmp_path / "sample_metrics.csv")))
    assert [r["method"] for r in rows] == ["cfg", "reg_paper", "reg_vjp"]
    assert all(0 <= float(r["on_shape"]) <= 1 and float(r["sliced_wasserstein"]) > 0 for r in rows)


@pytest.mark.parametrize("argv, field", [(["--steps", "0"], "--steps"), (["--label", "2"], "--label"),
                                         (["--paper_t", "30"], "--paper_t"), (["--w", "-1"], "--w")])
def test_toy2d_refuses_bad_flags(tmp_path, argv, field, one_thread):
    with pytest.raises(ConfigError, match=field):
        toy2d.main(["--exact", "--out", str(tmp_path / "out"), *argv])
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_is_a_config_error(tmp_path, one_thread):
    with pytest.raises(ConfigError, match="--checkpoint"):
        toy1d.main(["--checkpoint", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "out")])


def test_toy1d_authors_raw_chain(tmp_path, one_thread):
    """``--num-timesteps T --steps T``: raw DDPM steps of the linear betas (the authors' chain at T = 20, where
    abar_T = 0.82), not a respacing of the 1000-step schedule."""
    toy1d.main(["--exact", "--num-timesteps", "4", "--steps", "4", "--grid", "6", "--rollouts", "2", "--out",
                str(tmp_path)])
    assert torch.load(tmp_path / "estimates.pt")["times"].tolist() == [3, 2, 1, 0]
    a_T, _ = VPSchedule(20).alpha_sigma(19)
    assert float(a_T ** 2) == pytest.approx(0.8168, abs=1e-4)
    with pytest.raises(ConfigError, match="--steps 25 exceeds --num_timesteps 20"):
        toy1d.main(["--exact", "--num_timesteps", "20", "--steps", "25", "--output", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_overlap_task_reward_varies_where_samples_land():
    distribution = toy2d_distribution("overlap")
    log_reward = density_ratio_log_reward(distribution, 1.0)
    x0 = torch.tensor([[0.0, 0.0], [-0.7, 0.35], [0.7, -0.35]], dtype=torch.float64)
    r0 = log_reward(x0, torch.zeros(3, dtype=torch.long)).exp()
    assert float(r0[0]) == pytest.approx(1.0, abs=1e-9)  # the shared blob: p(x|0) = p(x|1)
    assert float(r0[1]) == pytest.approx(2.0, abs=1e-3) and float(r0[2]) < 1e-3  # own blob / the other class's
    with pytest.raises(ConfigError, match="unknown 2D task 'moons'"):
        toy2d_distribution("moons")


def test_toy2d_overlap_oracle_is_not_noise(tmp_path, one_thread):
    """Ring/cross: the oracle's arrows at the paper's t = 9 are ~1e-7 (R_0 constant on each shape); overlap: not."""
    x = toy2d.grid(5, torch.float64)
    y = torch.zeros(len(x), dtype=torch.long)
    medians = {}
    for task in ("ring_cross", "overlap"):
        distribution = toy2d_distribution(task)
        denoiser = ExactMixtureDenoiser(distribution, SCHEDULE)
        t = SCHEDULE.sampling_times(25)[25 - 1 - 9]
        grad = grad_log_expected_reward(denoiser, x, t, y, density_ratio_log_reward(distribution, 1.0), 25,
                                        rollouts=8, generator=torch.Generator().manual_seed(0))
        medians[task] = float(grad.norm(dim=1).median())
    assert medians["ring_cross"] < 1e-5 and medians["overlap"] > 1e-2
    with pytest.raises(ConfigError, match=r"--label must be 0 \(left\) or 1 \(right\) for --task overlap"):
        toy2d.main(["--exact", "--task", "overlap", "--label", "2", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
