"""The cheaper REG forms (``reuse``, ``window``, ``graph_free``) against closed forms derived by hand.

On a backbone linear in x, ``eps = A x + b_y``, ``J_eps = A``: the paper factor (eps units) is
``1 - s_t A^T 1`` and the graph-free one ``1 - s_t A 1`` (row sums; equal for a symmetric ``A``); the
eps-space row sum ``A^T 1`` does not change along the chain, so ``reuse`` equals ``paper`` there at any k.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.predictions import Prediction, eps_from_x0
from lightning_reg.diffusion.samplers import get_sampler
from lightning_reg.diffusion.schedules import EDMSchedule, FlowSchedule, VPSchedule
from lightning_reg.errors import ConfigError
from lightning_reg.guidance import GuidedDenoiser, make_guidance
from lightning_reg.guidance.reg import FD_STEP, reused_factor
from helpers import A, BIAS, NULL, Counting, LinearEps, SmoothNet, vp_s

TOL = dict(rtol=0, atol=1e-9)
SYMMETRIC = (A + A.T) / 2
# (schedule, prediction, times of a chain, sampler): every schedule and the predictions it takes
SCHEDULES = {
    "vp-eps": (VPSchedule(1000), "eps", "ddim"),
    "vp-v": (VPSchedule(1000), "v", "ddim"),
    "edm": (EDMSchedule(), "edm", "edm_heun"),
    "flow": (FlowSchedule(), "velocity", "flow_euler"),
}
MID_TIME = {"vp-eps": 400.0, "vp-v": 400.0, "edm": 1.3, "flow": 0.6}


@pytest.fixture
def xy():
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])


def model_for(kind: str, net: nn.Module) -> Denoiser:
    schedule, prediction, _ = SCHEDULES[kind]
    return Denoiser(net, schedule, Prediction(prediction))


def call(model, guidance, x, y, t):
    with torch.no_grad():
        return GuidedDenoiser(model, guidance, y)(x, torch.tensor(t, dtype=torch.float64))


def chain(model, guidance, x, y, kind: str, steps: int = 6):
    _, _, sampler = SCHEDULES[kind]
    return get_sampler(sampler)(GuidedDenoiser(model, guidance, y), x, model.schedule, steps)


# --- graph_free ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_graph_free_equals_paper_for_a_symmetric_jacobian(xy, kind):
    """Every prediction of a linear backbone is affine in x: the central difference is exact, and with a
    symmetric ``A`` the J 1 of graph_free is the J^T 1 of the paper form."""
    x, y = xy
    model = model_for(kind, LinearEps(SYMMETRIC, BIAS))
    paper, free = (call(model, make_guidance("cfg", scale=1.5, reg=r), x, y, MID_TIME[kind])
                   for r in ("paper", "graph_free"))
    torch.testing.assert_close(free, paper, **TOL)


@pytest.mark.parametrize("t", [50, 400, 900])
def test_graph_free_uses_row_sums(xy, t):
    """Non-symmetric ``A``: graph_free is ``eps_c + w d ⊙ (1 - s_t A 1)``, not the paper's column sums."""
    x, y = xy
    w, (a, s) = 1.5, vp_s(t)
    out = call(model_for("vp-eps", LinearEps(A, BIAS)), make_guidance("cfg", scale=w, reg="graph_free"), x, y, t)
    eps_c, d = x @ A.T + BIAS[y], BIAS[y] - BIAS[NULL]
    torch.testing.assert_close(eps_from_x0(out, x, a, s), eps_c + w * d * (1 - s * A.sum(1)), **TOL)


class QuadraticEps(nn.Module):
    """``eps = A x + c x ⊙ x + b_y``: ``J 1 = A 1 + 2 c x``, and the mean of ``eps(x ± h 1)`` is ``eps(x) + c h^2``."""

    def __init__(self, c: float = 0.3):
        super().__init__()
        self.num_classes, self.data_shape, self.c = 2, (3,), c
        self.register_buffer("a", A)
        self.register_buffer("bias", BIAS)

    def forward(self, x, t, y):
        return x @ self.a.T + self.c * x * x + self.bias[y]


@pytest.mark.parametrize("t", [100, 600])
def test_graph_free_is_exact_for_a_quadratic_denoiser(xy, t):
    x, y = xy
    w, c, (a, s) = 2.0, 0.3, vp_s(t)
    h = FD_STEP * s
    out = call(model_for("vp-eps", QuadraticEps(c)), make_guidance("cfg", scale=w, reg="graph_free"), x, y, t)
    eps_c = x @ A.T + c * x * x + c * h * h + BIAS[y]
    eps_ref = x @ A.T + c * x * x + BIAS[NULL]
    factor = 1 - s * (A.sum(1) + 2 * c * x)
    torch.testing.assert_close(eps_from_x0(out, x, a, s), eps_c + w * (eps_c - eps_ref) * factor, **TOL)


@pytest.mark.parametrize("kind", list(SCHEDULES))
@pytest.mark.parametrize("layout, calls", [("batched", [(15, False)]), ("split", [(5, False)] * 3)])
def test_graph_free_is_3b_rows_without_graph(xy, kind, layout, calls):
    x, y = xy
    net = Counting(SmoothNet())
    guidance = make_guidance("cfg", scale=1.0, reg="graph_free", branch_layout=layout)
    out = call(model_for(kind, net), guidance, x, y, MID_TIME[kind])
    assert net.calls == calls and net.backwards == 0
    other = make_guidance("cfg", scale=1.0, reg="graph_free", branch_layout="split" if layout == "batched" else "batched")
    torch.testing.assert_close(out, call(model_for(kind, net), other, x, y, MID_TIME[kind]), rtol=0, atol=1e-12)


def test_graph_free_autoguidance_probes_the_main_model_only(xy):
    x, y = xy
    main, weak = Counting(LinearEps(SYMMETRIC, BIAS)), Counting(LinearEps(0.5 * SYMMETRIC, BIAS))
    model = model_for("vp-eps", main)
    reference = model_for("vp-eps", weak)
    free, paper = (call(model, make_guidance("autoguidance", scale=1.0, reference=reference, reg=r), x, y, 400.0)
                   for r in ("graph_free", "paper"))
    assert main.calls[0] == (10, False) and weak.calls[0] == (5, False)
    torch.testing.assert_close(free, paper, **TOL)


class LearnedSigma(nn.Module):
    """``eps = A x + b_y`` and a variance interpolation ``v = tanh(x)`` (``learn_sigma``: 2C outputs)."""

    learn_sigma = True

    def __init__(self):
        super().__init__()
        self.num_classes, self.data_shape = 2, (3,)

    def forward(self, x, t, y):
        return torch.cat([x @ A.T + BIAS[y], torch.tanh(x)], dim=1)


@pytest.mark.parametrize("layout", ["batched", "split"])
def test_graph_free_keeps_one_variance_row_per_sample(xy, layout):
    """In either layout the mean of the two probes' ``v`` (as ``x0_c``), returned with the guided estimate."""
    x, y = xy
    model = model_for("vp-eps", LearnedSigma())
    guided = GuidedDenoiser(model, make_guidance("cfg", scale=1.0, reg="graph_free", branch_layout=layout), y)
    with torch.no_grad():
        guided(x, torch.tensor(400.0, dtype=torch.float64))
    h = FD_STEP * vp_s(400)[1]
    torch.testing.assert_close(guided.learned_variance(), (torch.tanh(x + h) + torch.tanh(x - h)) / 2, **TOL)


@pytest.mark.parametrize("channels", [None, [0, 2]])
def test_a_zeroed_cfg_zero_star_step_hands_on_the_conditional_variance(xy, channels):
    """CFG-Zero*'s zero-init step replaces the estimate, not the variance: a learned-sigma net's ``v`` is the
    conditional branch's there too (the DDPM sampler asks it after every call)."""
    x, y = xy
    model = model_for("vp-eps", LearnedSigma())
    guided = GuidedDenoiser(model, make_guidance("cfg_zero_star", scale=2.0, zero_init_steps=1,
                                                 guidance_channels=channels), y)
    with torch.no_grad():
        out = guided(x, torch.tensor(400.0, dtype=torch.float64))
    torch.testing.assert_close(guided.learned_variance(), torch.tanh(x), **TOL)
    a, s = vp_s(400)
    zeroed = x / (a + s)  # v = 0: x0_hat = eps_hat = x / (a + s)
    if channels is None:
        torch.testing.assert_close(out, zeroed, **TOL)
    else:
        torch.testing.assert_close(out[:, [0, 2]], zeroed[:, [0, 2]], **TOL)


# --- reuse --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_reuse_every_step_is_paper_over_a_chain(xy, kind):
    x, y = xy
    model = model_for(kind, SmoothNet())
    paper = chain(model, make_guidance("cfg", scale=1.0, reg="paper"), x, y, kind)
    reuse = chain(model, make_guidance("cfg", scale=1.0, reg="reuse", reg_every=1), x, y, kind)
    torch.testing.assert_close(reuse, paper, rtol=0, atol=0)


@pytest.mark.parametrize("k", [2, 3])
def test_reuse_in_eps_space_is_exact_for_a_constant_jacobian(xy, k):
    """``eps = A x + b``: the row sums ``A^T 1`` stay put, so reusing them is the paper form at every step."""
    x, y = xy
    model = model_for("vp-eps", LinearEps(A, BIAS))
    paper = chain(model, make_guidance("cfg", scale=1.0, reg="paper"), x, y, "vp-eps")
    reuse = chain(model, make_guidance("cfg", scale=1.0, reg="reuse", reg_every=k), x, y, "vp-eps")
    torch.testing.assert_close(reuse, paper, **TOL)


def test_reuse_cost_and_chain_reset(xy):
    """Every k-th step: B without graph + B with one and a backward; the steps between: CFG's one 2B forward.
    A noisier time starts a new chain, which computes afresh."""
    x, y = xy
    net = Counting(SmoothNet())
    guided = GuidedDenoiser(model_for("vp-eps", net), make_guidance("cfg", scale=1.0, reg="reuse", reg_every=3,
                                                                   branch_layout="batched"), y)
    with torch.no_grad():
        for t in (900.0, 800.0, 700.0, 600.0, 900.0):
            guided(x, torch.tensor(t))
    fresh, reused = [(5, False), (5, True)], [(10, False)]
    assert net.calls == fresh + reused + reused + fresh + fresh and net.backwards == 3


def test_reused_factor_spaces_by_hand():
    f, (a0, s0), (a1, s1) = torch.tensor([0.4, 1.2]), (0.6, 0.8), (0.8, 0.6)
    r = (1 - f) / s0  # eps-space row sums
    torch.testing.assert_close(reused_factor(f, a0, s0, a1, s1, "eps"), 1 - s1 * r)
    torch.testing.assert_close(reused_factor(f, a0, s0, a1, s1, "x0"), a1 * f / a0)
    torch.testing.assert_close(reused_factor(f, a0, s0, a0, s0, "x0"), f)


# --- window -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_window_is_the_plain_method_outside_and_paper_inside(xy, kind):
    x, y = xy
    net = Counting(SmoothNet())
    model = model_for(kind, net)
    times = model.schedule.sampling_times(10)[:-1]
    window = make_guidance("cfg", scale=1.0, reg="window", reg_window=[0.3, 0.6], branch_layout="batched")
    for t in times:
        net.calls.clear()
        out = call(model, window, x, y, float(t))
        inside = 0.3 <= model.schedule.progress(t) <= 0.6
        expected = call(model, make_guidance("cfg", scale=1.0, reg="paper" if inside else "none",
                                             branch_layout="batched"), x, y, float(t))
        assert net.calls[0] == ((5, False) if inside else (10, False))
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("params, message", [
    (dict(reg="reuse", reg_every=0), "reg_every must be a positive integer"),
    (dict(reg="window", reg_window=[0.7, 0.2]), "reg_window must be"),
    (dict(reg="window", reg_window=[0.5]), "reg_window must be"),
    (dict(reg="cheap"), "unknown REG mode 'cheap'"),
    (dict(branch_layout="stacked"), "unknown branch_layout 'stacked'"),
])
def test_bad_reg_options_raise_config_error(params, message):
    with pytest.raises(ConfigError, match=message):
        make_guidance("cfg", scale=1.0, **params)


@pytest.mark.parametrize("reg", ["reuse", "window", "graph_free"])
@pytest.mark.parametrize("method, params", [
    ("apg", dict(eta=0.0, momentum=-0.5)), ("cosine", {}), ("linear", {}), ("cfg_zero_star", {}),
    ("interval", dict(t_lo=0.0, t_hi=1e9)),
])
def test_every_method_runs_each_cheap_mode(xy, reg, method, params):
    """A short chain with every method; the guided result differs from the method without REG."""
    x, y = xy
    model = model_for("vp-eps", SmoothNet())
    plain = chain(model, make_guidance(method, scale=2.0, **params), x, y, "vp-eps")
    out = chain(model, make_guidance(method, scale=2.0, reg=reg, reg_window=[0.0, 1.0], **params), x, y, "vp-eps")
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-6


@pytest.mark.timeout(120)
def test_cheap_reg_experiment_prints_every_mode(capsys):
    """The oracle comparison on the exact 1D toy denoiser: a row per mode; graph_free's error equals paper's
    (1x1 Jacobian, exact central difference up to O(h^2)) to 3 digits."""
    from lightning_reg.experiments.cheap_reg import MODES, main

    main(["--task", "toy1d", "--exact", "--steps", "4", "--num-timesteps", "1000", "--rollouts", "4",
          "--grid", "16"])
    rows = {line.split("|")[1].strip(): [float(v) for v in line.split("|")[2:6]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "mode" not in line}
    assert list(rows) == list(MODES)
    assert rows["graph_free"] == pytest.approx(rows["reg paper"], rel=1e-3)
    assert rows["reg paper"][0] != rows["cfg"][0]
