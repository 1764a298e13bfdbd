"""The cheaper REG forms (``reuse``, ``window``, ``graph_free``, ``graph_free_reuse``, ``adaptive``) against closed forms derived by hand.

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
from lightning_reg.guidance.reg import FD_STEP, correction_drift, reused_factor
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


class AffinePlus(nn.Module):
    """``eps = M x + r(x, y) + b_y``: an affine backbone with a chosen curved part ``r``."""

    def __init__(self, m: torch.Tensor, curved):
        super().__init__()
        self.num_classes, self.data_shape, self.curved = 2, (3,), curved
        self.register_buffer("m", m)
        self.register_buffer("bias", BIAS)

    def forward(self, x, t, y):
        return x @ self.m.T + self.curved(x, y) + self.bias[y]


def quadratic_eps(c: float = 0.3) -> AffinePlus:
    """``eps = A x + c x ⊙ x + b_y``: ``J 1 = A 1 + 2 c x``, and the mean of ``eps(x ± h 1)`` is ``eps(x) + c h^2``."""
    return AffinePlus(A, lambda x, y: c * x * x)


@pytest.mark.parametrize("t", [100, 600])
def test_graph_free_is_exact_for_a_quadratic_denoiser(xy, t):
    x, y = xy
    w, c, (a, s) = 2.0, 0.3, vp_s(t)
    h = FD_STEP * s
    out = call(model_for("vp-eps", quadratic_eps(c)), make_guidance("cfg", scale=w, reg="graph_free"), x, y, t)
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
@pytest.mark.parametrize("carried, options, fresh", [
    ("reuse", dict(reg_every=1), "paper"),
    ("graph_free_reuse", dict(reg_every=1), "graph_free"),
    # a curved backbone drifts at every check where guidance acts: with tolerance 0 an interval grows only where the
    # carried factor was exact on REG's correction (up to the rounding of rows probed apart)
    ("adaptive", dict(reg_tolerance=0.0), "graph_free"),
])
def test_a_carried_factor_never_kept_is_its_fresh_form(xy, kind, carried, options, fresh):
    x, y = xy
    model = model_for(kind, SmoothNet())
    expected = chain(model, make_guidance("cfg", scale=1.0, reg=fresh), x, y, kind)
    out = chain(model, make_guidance("cfg", scale=1.0, reg=carried, **options), x, y, kind)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12 if carried == "adaptive" else 0)


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


# --- short ------------------------------------------------------------------------------------------

class Residual(nn.Linear):
    """``h + tanh(W h + shift)``."""

    def forward(self, h, shift=0):
        return h + torch.tanh(super().forward(h) + shift)


class TwoBlockResidual(nn.Module):
    """``h0 = E x``, ``h1 = h0 + tanh(W1 h0 + e_y)``, ``h2 = h1 + tanh(W2 h1)``, ``eps = P h2``: its Jacobian is
    ``P (I + D2 W2)(I + D1 W1) E``; the short backward through the last block takes ``P (I + D2 W2) E``."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_classes, self.data_shape = 2, (3,)
        self.embed = nn.Linear(3, 4, bias=False, dtype=torch.float64)
        self.blocks = nn.ModuleList(Residual(4, 4, bias=False, dtype=torch.float64) for _ in range(2))
        self.label = nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))
        self.out = nn.Linear(4, 3, bias=False, dtype=torch.float64)
        for layer in (self.embed, *self.blocks, self.out):
            layer.weight.data = torch.randn(layer.weight.shape, generator=g, dtype=torch.float64) / 2

    def reg_short_backward(self, blocks):
        return list(self.blocks[:2 - blocks]), self.embed

    def forward(self, x, t, y):
        h = self.embed(x)
        return self.out(self.blocks[1](self.blocks[0](h, self.label[y])))


@pytest.mark.parametrize("t", [100, 500, 900])
def test_short_backward_by_hand(xy, t):
    x, y = xy
    net = TwoBlockResidual()
    w, (a, s) = 1.5, vp_s(t)
    model = model_for("vp-eps", net)
    out = call(model, make_guidance("cfg", scale=w, reg="short", reg_blocks=1), x, y, t)
    E, (W1, W2), P = net.embed.weight, (b.weight for b in net.blocks), net.out.weight
    h0 = x @ E.T
    h1 = h0 + torch.tanh(h0 @ W1.T + net.label[y])
    d2 = 1 - torch.tanh(h1 @ W2.T) ** 2  # (B, 4)
    ones = torch.ones(3, dtype=torch.float64)
    rows = torch.stack([ones @ P @ (torch.eye(4, dtype=torch.float64) + d2[i, :, None] * W2) @ E for i in range(len(x))])
    with torch.no_grad():
        eps_c, eps_u = net(x, None, y), net(x, None, torch.full_like(y, 2))
    expected = eps_c + w * (eps_c - eps_u) * (1 - s * rows)
    torch.testing.assert_close(eps_from_x0(out, x, a, s).detach(), expected, **TOL)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    whole = call(model, make_guidance("cfg", scale=w, reg="short", reg_blocks=2), x, y, t)  # nothing cut: paper
    torch.testing.assert_close(whole, call(model, make_guidance("cfg", scale=w, reg="paper"), x, y, t), **TOL)


def test_short_backward_runs_the_unets_early_blocks_without_graph():
    from lightning_reg.models.unet import UNet

    torch.manual_seed(0)
    net = UNet(num_classes=2, image_size=8, channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(), norm_groups=4)
    torch.nn.init.normal_(net.out[-1].weight, std=0.1)
    grad_modes = {}
    for name in ("down.0", "middle.0", "up.2", "up.3", "up.4"):
        net.get_submodule(name).register_forward_hook(
            lambda m, args, out, name=name: grad_modes.setdefault(name, []).append(torch.is_grad_enabled()))
    model = Denoiser(net, VPSchedule(1000), Prediction("eps"))
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    short = call(model, make_guidance("cfg", scale=1.0, reg="short", reg_blocks=2, branch_layout="split"), x, y, 400.0)
    # the calls: the null label without graph, then the conditional branch with the short backward's graph
    assert {name: modes[0] for name, modes in grad_modes.items()} == {
        "down.0": False, "middle.0": False, "up.2": False, "up.3": False, "up.4": False}
    assert {name: modes[-1] for name, modes in grad_modes.items()} == {
        "down.0": True, "middle.0": False, "up.2": False, "up.3": True, "up.4": True}
    paper = call(model, make_guidance("cfg", scale=1.0, reg="paper"), x, y, 400.0)
    assert 0 < (short - paper).abs().max() < (paper - call(model, make_guidance("cfg", scale=1.0), x, y, 400.0)).abs().max()


def tiny_backbones():
    from lightning_reg.models.dit import DiT
    from lightning_reg.models.mlp import ToyMLP
    from lightning_reg.models.unet import UNet

    return {"DiT": DiT(input_size=4, in_channels=1, num_classes=2, depth=2, hidden_size=8, num_heads=2, patch_size=2),
            "ToyMLP": ToyMLP(num_classes=2, dim=3, hidden=8, blocks=2),
            "UNet": UNet(num_classes=2, image_size=8, channels=1, base_channels=8, channel_mult=(1, 2),
                         num_res_blocks=1, attention_resolutions=(), norm_groups=4)}


@pytest.mark.parametrize("name, blocks, message", [
    ("linear", 2, "reg: short needs a backbone that names its last blocks"),
    ("DiT", 3, "reg_blocks=3: this DiT has 2 blocks"),
    ("ToyMLP", 3, "reg_blocks=3: this ToyMLP has 2 blocks"),
    ("UNet", 6, "reg_blocks=6: this UNet's decoder has 5 blocks"),
    ("UNet", 0, "reg_blocks must be a positive integer"),
])
def test_short_backward_refusals(name, blocks, message):
    net = LinearEps(A, BIAS) if name == "linear" else tiny_backbones()[name]
    with pytest.raises(ConfigError, match=message):
        GuidedDenoiser(model_for("vp-eps", net), make_guidance("cfg", scale=1.0, reg="short", reg_blocks=blocks),
                       torch.tensor([0, 1]))


@pytest.mark.parametrize("params, message", [
    (dict(reg="reuse", reg_every=0), "reg_every must be a positive integer"),
    (dict(reg="window", reg_window=[0.7, 0.2]), "reg_window must be"),
    (dict(reg="window", reg_window=[0.5]), "reg_window must be"),
    (dict(reg="cheap"), "unknown REG mode 'cheap'"),
    (dict(reg="adaptive", reg_tolerance=-0.1), "reg_tolerance must be >= 0"),
    (dict(reg="graph_free_reuse", reg_every=1.5), "reg_every must be a positive integer"),
    (dict(branch_layout="stacked"), "unknown branch_layout 'stacked'"),
])
def test_bad_reg_options_raise_config_error(params, message):
    with pytest.raises(ConfigError, match=message):
        make_guidance("cfg", scale=1.0, **params)


CHEAP_MODES = ["reuse", "window", "graph_free", "graph_free_reuse", "adaptive"]  # short: by hand below


@pytest.mark.parametrize("reg", CHEAP_MODES)
@pytest.mark.parametrize("method, params", [
    ("cfg", {}), ("apg", dict(eta=0.0, momentum=-0.5)), ("cosine", {}), ("linear", {}),
    ("cfg_zero_star", dict(zero_init_steps=0)), ("interval", dict(t_lo=0.0, t_hi=1e9)),
    ("cfgpp", dict(scale=0.4, convention="w2")),
])
def test_every_method_under_each_cheap_mode_is_the_closed_form(xy, reg, method, params):
    """On ``eps = S x + b_y`` with ``S`` symmetric every factor is exact and constant in eps units: along a whole
    chain, each call of every method under every cheap mode is ``x0_c + (1 - s_t S^T 1) ⊙ g``, with ``g`` the
    plain method's term at the same ``x`` (a plain chain fed the same calls, so stateful rules agree)."""
    x, y = xy
    model = model_for("vp-eps", LinearEps(SYMMETRIC, BIAS))
    params = {"scale": 2.0, **params}
    rectified = GuidedDenoiser(model, make_guidance(method, reg=reg, reg_window=[0.0, 1.0], **params), y)
    plain = GuidedDenoiser(model, make_guidance(method, **params), y)
    seen = []

    def checked(x_t, t):
        out, plain_out = rectified(x_t, t), plain(x_t, t)
        _, s = model.coefficients(t, x_t)
        x0_c = model(x_t, t, y)
        torch.testing.assert_close(out, x0_c + (1 - s * SYMMETRIC.sum(0)) * (plain_out - x0_c), **TOL)
        seen.append(float((plain_out - x0_c).abs().max()))
        return out

    get_sampler("ddim")(checked, x, model.schedule, 8)
    assert len(seen) == 8 and sum(v > 1e-3 for v in seen) >= 7  # guided calls (linear's w(t) ends at 0)


# --- graph_free_reuse and adaptive --------------------------------------------------------------------

def fresh_calls(net: Counting, rows: int) -> list[int]:
    """The indices of the (batched-layout) calls that ran the 3B graph-free probes."""
    assert all(grad is False for _, grad in net.calls) and net.backwards == 0
    return [i for i, (n, _) in enumerate(net.calls) if n == 3 * rows]


@pytest.mark.parametrize("k", [2, 3, 5])
def test_graph_free_reuse_costs_and_equals_paper_for_a_constant_symmetric_jacobian(xy, k):
    """Every k-th call the 3B probes, CFG's 2B forward in between, no graph; exact where ``J`` is symmetric and
    constant (the carried row sums never change)."""
    x, y = xy
    net = Counting(LinearEps(SYMMETRIC, BIAS))
    model = model_for("vp-eps", net)
    reused = chain(model, make_guidance("cfg", scale=1.0, reg="graph_free_reuse", reg_every=k,
                                        branch_layout="batched"), x, y, "vp-eps", steps=12)
    assert fresh_calls(net, len(x)) == list(range(0, 12, k)) and len(net.calls) == 12
    paper = chain(model, make_guidance("cfg", scale=1.0, reg="paper"), x, y, "vp-eps", steps=12)
    torch.testing.assert_close(reused, paper, **TOL)


def test_adaptive_doubles_its_interval_while_the_carried_factor_is_exact(xy):
    """Constant ``J``: the carried factor's drift is 0 at every check, so the interval goes 1, 2, 4, 8 (capped
    by ``reg_every``): fresh factors at calls 0, 1, 3, 7, 15, 23."""
    x, y = xy
    net = Counting(LinearEps(SYMMETRIC, BIAS))
    model = model_for("vp-eps", net)
    out = chain(model, make_guidance("cfg", scale=1.0, reg="adaptive", reg_every=8, branch_layout="batched"),
                x, y, "vp-eps", steps=25)
    assert fresh_calls(net, len(x)) == [0, 1, 3, 7, 15, 23]
    paper = chain(model, make_guidance("cfg", scale=1.0, reg="paper"), x, y, "vp-eps", steps=25)
    torch.testing.assert_close(out, paper, **TOL)


def curved_for_class_one(c: float = 0.3) -> AffinePlus:
    """``eps = S x + c [y = 1] sin(x) + b_y``: class 0's Jacobian is constant, class 1's changes along the chain."""
    return AffinePlus(SYMMETRIC, lambda x, y: c * (y == 1).to(x.dtype)[:, None] * torch.sin(x))


@pytest.mark.parametrize("tolerance", [1e-3, 0.05])
def test_adaptive_intervals_are_each_samples_own(xy, tolerance):
    """Class-0 samples (exact carried factor) lengthen their interval faster than class-1 samples (drifting): the
    batch probes only its due rows, so each sample's chain, and the rows the network runs, are those it gets alone."""
    x, y = xy
    net = Counting(curved_for_class_one())
    model = model_for("vp-eps", net)
    guidance = make_guidance("cfg", scale=1.0, reg="adaptive", reg_tolerance=tolerance, branch_layout="batched")
    guided = GuidedDenoiser(model, guidance, y)
    batch = get_sampler("ddim")(guided, x, model.schedule, 12)
    batch_rows, sizes = sum(n for n, _ in net.calls), {n for n, _ in net.calls}
    assert not sizes <= {2 * len(x), 3 * len(x)}  # some calls probed only part of the batch
    every = guided.state.values["reg_factor"]["every"]
    assert every[y == 0].min() > every[y == 1].max()
    net.calls.clear()
    for i in range(len(x)):
        alone = get_sampler("ddim")(GuidedDenoiser(model, guidance, y[i:i + 1]), x[i:i + 1], model.schedule, 12)
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=0, atol=1e-12)
    assert sum(n for n, _ in net.calls) == batch_rows


def test_correction_drift_by_hand():
    f = torch.tensor([[0.5, 2.0], [1.0, 1.0]])
    carried = torch.tensor([[1.0, 2.0], [1.0, 3.0]])
    g = torch.tensor([[2.0, 1.0], [1.0, 0.0]])
    # sample 0: ||(0.5, 0) * (2, 1)|| / ||(-0.5, 1) * (2, 1)|| = 1 / sqrt(2); sample 1: nothing to correct, exact
    torch.testing.assert_close(correction_drift(carried, f, g), torch.tensor([2 ** -0.5, 0.0]))


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
