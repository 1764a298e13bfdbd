"""Guidance methods and REG (docs/theory.md §2-3) against closed forms derived by hand.

A backbone linear in x, ``eps = A x + b_y``, has the Jacobian ``J = A``, so every formula has a
closed form in ``A``, ``b`` and the schedule's ``s_t``; nonlinear nets are checked against the same
formulas evaluated with ``torch.autograd`` in the test.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from helpers import A, BIAS, NULL, NUM_CLASSES, Counting, LinearEps, SmoothNet, linear_model, vp_s

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.predictions import Prediction, eps_from_x0
from lightning_reg.diffusion.samplers import get_sampler
from lightning_reg.diffusion.schedules import EDMSchedule, FlowSchedule, VPSchedule
from lightning_reg.errors import ConfigError
from lightning_reg.guidance import GuidedDenoiser, make_guidance
from lightning_reg.models.mlp import ToyMLP

TOL = dict(rtol=0, atol=1e-10)


@pytest.fixture
def xy():
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])


def guided_eps(model, guidance, x, y, t):
    """The library's guided estimate, converted to eps units."""
    a, s = model.coefficients(t, x)
    return eps_from_x0(GuidedDenoiser(model, guidance, y)(x, torch.tensor(float(t))), x, a, s)


# --- closed forms on the linear backbone ------------------------------------------------------------

def closed_form(reg: str, x, y, w: float, s: float, a=A, bias=BIAS, null=NULL):
    """CFG ``eps_c + w d``; REG paper ``eps_c + w d ⊙ (1 - s A^T 1)``; REG vjp ``eps_c + w (d - s A^T d)``."""
    eps_c = x @ a.T + bias[y]
    d = bias[y] - bias[null]
    if reg == "none":
        return eps_c + w * d
    if reg == "paper":
        return eps_c + w * d * (1 - s * a.sum(0))
    return eps_c + w * (d - s * d @ a)


@pytest.mark.parametrize("reg", ["none", "paper", "vjp"])
@pytest.mark.parametrize("t", [50, 400, 900])
def test_linear_backbone_matches_closed_form(xy, reg, t):
    x, y = xy
    w = 1.5
    out = guided_eps(linear_model(), make_guidance("cfg", scale=w, reg=reg), x, y, t)
    torch.testing.assert_close(out, closed_form(reg, x, y, w, vp_s(t)[1]), **TOL)


def test_paper_and_vjp_differ_for_non_diagonal_jacobian(xy):
    """The two REG forms agree only when J is diagonal; A is not, so the test above tells them apart."""
    x, y = xy
    model = linear_model()
    paper, vjp = (guided_eps(model, make_guidance("cfg", scale=1.0, reg=r), x, y, 400) for r in ("paper", "vjp"))
    assert (paper - vjp).abs().max() > 1e-2
    diagonal = linear_model(a=torch.diag(A.diagonal()))
    paper, vjp = (guided_eps(diagonal, make_guidance("cfg", scale=1.0, reg=r), x, y, 400) for r in ("paper", "vjp"))
    torch.testing.assert_close(paper, vjp, **TOL)


# --- other parameterisations: the general factor a_t * grad(1^T x0_hat_c) ---------------------------

def eps_form_by_hand(eps_c_fn, eps_ref, x, s: float, w: float, reg: str):
    """docs/theory.md §2 in eps units with autograd: paper ``d ⊙ (1 - s grad(1^T eps_c))``, vjp ``d - s J^T d``."""
    x = x.detach().requires_grad_(True)
    eps_c = eps_c_fn(x)
    d = (eps_c - eps_ref).detach()
    if reg == "paper":
        (grad_sum,) = torch.autograd.grad(eps_c.sum(), x)
        return (eps_c + w * d * (1 - s * grad_sum)).detach()
    (jtd,) = torch.autograd.grad(eps_c, x, grad_outputs=d)
    return (eps_c + w * (d - s * jtd)).detach()


@pytest.mark.parametrize("reg", ["paper", "vjp"])
@pytest.mark.parametrize("prediction", ["edm", "x0"])
def test_edm_form_equals_eps_form(xy, reg, prediction):
    """``D_bar = D_c + w grad(1^T D_c) ⊙ (D_c - D_ref)`` (vjp: ``D_c + w J_D^T (D_c - D_ref)``) = eps form."""
    x, y = xy
    sigma, w = 1.3, 0.8
    model = Denoiser(SmoothNet(), EDMSchedule(), Prediction(prediction))
    out = GuidedDenoiser(model, make_guidance("cfg", scale=w, reg=reg), y)(x, torch.tensor(sigma, dtype=torch.float64))

    xg = x.clone().requires_grad_(True)
    d_c = model(xg, sigma, y)
    with torch.no_grad():
        d_ref = model(x, sigma, torch.full_like(y, NULL))
    g = w * (d_c - d_ref).detach()
    if reg == "paper":
        (grad_sum,) = torch.autograd.grad(d_c.sum(), xg)
        edm = d_c.detach() + grad_sum * g
    else:
        (edm,) = torch.autograd.grad(d_c, xg, grad_outputs=g)
        edm = d_c.detach() + edm
    torch.testing.assert_close(out, edm, **TOL)

    eps_bar = eps_form_by_hand(lambda z: (z - model(z, sigma, y)) / sigma, (x - d_ref) / sigma, x, sigma, w, reg)
    torch.testing.assert_close(out, x - sigma * eps_bar, **TOL)


@pytest.mark.parametrize("reg", ["none", "paper", "vjp"])
def test_v_prediction_equals_eps_form(xy, reg):
    """VP v-net ``F``: ``eps = a F + s x`` (a^2 + s^2 = 1); the guided x0 is the eps form converted."""
    x, y = xy
    t, w = 300, 1.2
    a, s = vp_s(t)
    net = SmoothNet()
    model = Denoiser(net, VPSchedule(1000), Prediction("v"))
    out = GuidedDenoiser(model, make_guidance("cfg", scale=w, reg=reg), y)(x, torch.tensor(float(t)))

    tt = torch.full((len(x),), float(t), dtype=torch.float64)
    eps = lambda z, labels: a * net(z, tt, labels) + s * z  # noqa: E731
    with torch.no_grad():
        eps_ref = eps(x, torch.full_like(y, NULL))
    if reg == "none":
        eps_c = eps(x, y).detach()
        eps_bar = eps_c + w * (eps_c - eps_ref)
    else:
        eps_bar = eps_form_by_hand(lambda z: eps(z, y), eps_ref, x, s, w, reg)
    torch.testing.assert_close(out, (x - s * eps_bar) / a, **TOL)


@pytest.mark.parametrize("reg", ["paper", "vjp"])
def test_flow_velocity_equals_eps_form(xy, reg):
    """Flow ``x = (1-t) x0 + t eps``, velocity ``v = eps - x0``: ``eps = x + (1-t) v``; ``a_t = 1 - t``, ``s_t = t``."""
    x, y = xy
    t, w = 0.6, 1.0
    net = SmoothNet()
    model = Denoiser(net, FlowSchedule(), Prediction("velocity"))
    out = GuidedDenoiser(model, make_guidance("cfg", scale=w, reg=reg), y)(x, torch.tensor(t, dtype=torch.float64))

    tt = torch.full((len(x),), 1000.0 * t, dtype=torch.float64)
    eps = lambda z, labels: z + (1 - t) * net(z, tt, labels)  # noqa: E731
    with torch.no_grad():
        eps_ref = eps(x, torch.full_like(y, NULL))
    eps_bar = eps_form_by_hand(lambda z: eps(z, y), eps_ref, x, t, w, reg)
    torch.testing.assert_close(out, (x - t * eps_bar) / (1 - t), **TOL)


# --- special cases and cost ---------------------------------------------------------------------------

@pytest.mark.parametrize("reg", ["none", "paper", "vjp"])
def test_zero_weight_is_conditional_with_one_forward(xy, reg):
    x, y = xy
    net = Counting(LinearEps(A, BIAS))
    model = Denoiser(net, VPSchedule(1000), Prediction("eps"))
    t = torch.tensor(400.0)
    with torch.no_grad():
        out = GuidedDenoiser(model, make_guidance("cfg", scale=0.0, reg=reg), y)(x, t)
        conditional = GuidedDenoiser(model, make_guidance("conditional"), y)(x, t)
        plain = model(x, t, y)
    assert net.calls == [(5, False)] * 3 and net.backwards == 0
    torch.testing.assert_close(out, conditional, rtol=0, atol=0)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)


@pytest.mark.parametrize("reg", ["paper", "vjp"])
def test_net_ignoring_x_makes_reg_equal_cfg(xy, reg):
    """``J = 0``: both rectifications reduce to the identity, REG == CFG."""
    x, y = xy
    model = linear_model(a=torch.zeros(3, 3, dtype=torch.float64))
    cfg = guided_eps(model, make_guidance("cfg", scale=2.0), x, y, 400)
    torch.testing.assert_close(guided_eps(model, make_guidance("cfg", scale=2.0, reg=reg), x, y, 400), cfg, **TOL)


@pytest.mark.parametrize("reg", ["paper", "vjp"])
def test_x0_net_ignoring_x_has_zero_rectification(xy, reg):
    """An x0-predicting net constant in x has ``grad(1^T x0_c) = 0``: REG leaves the conditional prediction."""
    x, y = xy
    model = Denoiser(LinearEps(torch.zeros(3, 3, dtype=torch.float64), BIAS), VPSchedule(1000), Prediction("x0"))
    out = GuidedDenoiser(model, make_guidance("cfg", scale=2.0, reg=reg), y)(x, torch.tensor(400.0))
    torch.testing.assert_close(out, BIAS[y], **TOL)


@pytest.mark.parametrize("reg, layout, inside_calls, backwards", [
    ("none", "batched", [(10, False)], 0),
    ("none", "split", [(5, False), (5, False)], 0),
    ("none", "auto", [(5, False), (5, False)], 0),  # the CPU's layout
    ("paper", "batched", [(5, False), (5, True)], 1),
    ("vjp", "batched", [(5, False), (5, True)], 1),
])
def test_interval_cost(xy, reg, layout, inside_calls, backwards):
    """Outside the interval: one forward of B; inside: 2B batched or B + B split (CFG), B + B and one backward
    (REG)."""
    x, y = xy
    net = Counting(LinearEps(A, BIAS))
    model = Denoiser(net, VPSchedule(1000), Prediction("eps"))
    guided = GuidedDenoiser(model, make_guidance("interval", scale=1.0, t_lo=205, t_hi=502, reg=reg,
                                                 branch_layout=layout), y)
    with torch.no_grad():
        guided(x, torch.tensor(700.0))
        guided(x, torch.tensor(100.0))
        assert net.calls == [(5, False), (5, False)] and net.backwards == 0
        net.calls.clear()
        out = guided(x, torch.tensor(502.0))  # the bounds belong to the interval
    assert net.calls == inside_calls and net.backwards == backwards
    a, s = vp_s(502)
    torch.testing.assert_close(eps_from_x0(out, x, a, s), closed_form(reg, x, y, 1.0, s), **TOL)


# --- weight schedules and conventions --------------------------------------------------------------------

def test_weight_schedules_match_formulas():
    model = linear_model()
    # cosine (MDT), w2 = 3 (w = 2), power s = 2, at t = 600 of T = 1000: p = 0.4, p^s = 0.16
    w2_t = 3 * (1 - math.cos(math.pi * 0.16)) / 2
    assert make_guidance("cosine", scale=2.0, power=2.0).rule.weight(torch.tensor(600.0), model.schedule) == pytest.approx(
        w2_t - 1, abs=1e-12)
    # cos(0.16 pi) = 0.87631: early in sampling the term is negative and points to eps_u
    assert w2_t - 1 == pytest.approx(-0.81446, abs=1e-5)
    # linear from w = 2 to w_end = 0.5; t = 250: p = 0.75, w(t) = 2 - 1.5 * 0.75
    assert make_guidance("linear", scale=2.0, scale_end=0.5).rule.weight(torch.tensor(250.0), model.schedule) == pytest.approx(
        0.875, abs=1e-12)
    assert make_guidance("linear", scale=2.0).rule.weight(torch.tensor(0.0), model.schedule) == pytest.approx(0.0, abs=1e-12)
    interval = make_guidance("interval", scale=1.5, t_lo=205, t_hi=502)
    assert [interval.rule.weight(torch.tensor(t), model.schedule) for t in (204.0, 205.0, 400.0, 502.0, 503.0)] == [
        0.0, 1.5, 1.5, 1.5, 0.0]


@pytest.mark.parametrize("reg", ["none", "paper", "vjp"])
def test_cosine_reg_rectifies_the_term_w2t_minus_one(xy, reg):
    """Cosine guidance is ``eps_c + (w2(t) - 1) d`` and REG multiplies exactly that term (docs/theory.md §3)."""
    x, y = xy
    w2_t = 3 * (1 - math.cos(math.pi * 0.16)) / 2
    out = guided_eps(linear_model(), make_guidance("cosine", scale=2.0, power=2.0, reg=reg), x, y, 600)
    torch.testing.assert_close(out, closed_form(reg, x, y, w2_t - 1, vp_s(600)[1]), **TOL)


@pytest.mark.parametrize("method, params", [
    ("cfg", {}), ("interval", {"t_lo": 200.0, "t_hi": 700.0}), ("linear", {"scale_end": 1.25}), ("cosine", {}),
])
@pytest.mark.parametrize("reg", ["none", "paper"])
def test_w2_convention_equals_w_convention(xy, method, params, reg):
    x, y = xy
    model = linear_model()
    params_w2 = {k: v + 1 if k == "scale_end" else v for k, v in params.items()}
    for t in (900, 400):
        as_w = guided_eps(model, make_guidance(method, scale=1.5, reg=reg, **params), x, y, t)
        as_w2 = guided_eps(model, make_guidance(method, scale=2.5, convention="w2", reg=reg, **params_w2), x, y, t)
        torch.testing.assert_close(as_w2, as_w, **TOL)


@pytest.mark.parametrize("reg", ["none", "paper", "vjp"])
def test_guidance_channels_leave_other_channels_conditional(reg):
    """DiT's ``guidance_channels=[0, 1, 2]`` on 4-channel latents: channel 3 is the conditional prediction."""
    g = torch.Generator().manual_seed(2)
    shape, dim = (4, 2, 2), 16
    model = linear_model(torch.randn(dim, dim, generator=g, dtype=torch.float64) * 0.3,
                         torch.randn(NUM_CLASSES + 1, dim, generator=g, dtype=torch.float64), shape)
    x, y, t = torch.randn(3, *shape, generator=g, dtype=torch.float64), torch.tensor([0, 1, 0]), torch.tensor(400.0)
    masked = GuidedDenoiser(model, make_guidance("cfg", scale=2.0, reg=reg, guidance_channels=[0, 1, 2]), y)(x, t)
    with torch.no_grad():
        conditional = model(x, t, y)
    torch.testing.assert_close(masked[:, 3], conditional[:, 3], **TOL)
    assert (masked[:, :3] - conditional[:, :3]).abs().min() > 0  # the guided channels did move
    if reg != "vjp":  # elementwise forms: the guided channels equal the unmasked result
        full = GuidedDenoiser(model, make_guidance("cfg", scale=2.0, reg=reg), y)(x, t)
        torch.testing.assert_close(masked[:, :3], full[:, :3], **TOL)


# --- nonlinear backbone: batch independence, grad modes ------------------------------------------------

@pytest.fixture(scope="module")
def mlp_model():
    torch.manual_seed(0)
    return Denoiser(ToyMLP(NUM_CLASSES, dim=2, hidden=64, blocks=2), VPSchedule(1000), Prediction("eps"))


@pytest.mark.parametrize("reg", ["paper", "vjp"])
def test_mixed_label_batch_equals_each_sample_alone(mlp_model, reg):
    g = torch.Generator().manual_seed(3)
    x, y, t = torch.randn(6, 2, generator=g), torch.tensor([0, 1, 1, 0, 1, 0]), torch.tensor(300.0)
    guidance = make_guidance("cfg", scale=1.5, reg=reg)
    batch = GuidedDenoiser(mlp_model, guidance, y)(x, t)
    alone = torch.cat([GuidedDenoiser(mlp_model, guidance, y[i:i + 1])(x[i:i + 1], t) for i in range(len(x))])
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-5)
    cfg = GuidedDenoiser(mlp_model, make_guidance("cfg", scale=1.5), y)(x, t)
    assert (batch - cfg).abs().max() > 1e-4  # the rectification is not a no-op on this net


@pytest.mark.parametrize("reg", ["paper", "vjp"])
def test_reg_under_no_grad_and_inference_mode(mlp_model, reg):
    g = torch.Generator().manual_seed(4)
    x, y, t = torch.randn(4, 2, generator=g), torch.tensor([0, 1, 0, 1]), torch.tensor(300.0)
    guidance = make_guidance("cfg", scale=1.0, reg=reg)
    outside = GuidedDenoiser(mlp_model, guidance, y)(x, t)
    with torch.no_grad():
        no_grad = GuidedDenoiser(mlp_model, guidance, y)(x, t)
    with torch.inference_mode():  # inputs made here are inference tensors, as in Lightning's validation
        xi, yi, ti = x.clone(), y.clone(), t.clone()
        inference = GuidedDenoiser(mlp_model, guidance, yi)(xi, ti)
    for out in (outside, no_grad, inference):
        assert not out.requires_grad and out.grad_fn is None
        torch.testing.assert_close(out, outside, rtol=0, atol=0)
    assert all(p.grad is None for p in mlp_model.parameters())


# --- autoguidance ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("reg", ["none", "paper"])
def test_autoguidance_uses_reference_model_with_same_labels(xy, reg):
    x, y = xy
    a_ref = torch.tensor([[0.2, 0.1, 0.0], [-0.3, 0.5, 0.2], [0.0, 0.3, -0.1]], dtype=torch.float64)
    bias_ref = BIAS.flip(0)
    guidance = make_guidance("autoguidance", scale=0.7, reg=reg, reference=linear_model(a_ref, bias_ref))
    out = guided_eps(linear_model(), guidance, x, y, 400)
    eps_c, eps_ref = x @ A.T + BIAS[y], x @ a_ref.T + bias_ref[y]
    d = eps_c - eps_ref
    factor = 1 - vp_s(400)[1] * A.sum(0) if reg == "paper" else 1.0  # only the conditional branch's J
    torch.testing.assert_close(out, eps_c + 0.7 * d * factor, **TOL)


# --- bad input ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("params, message", [
    ({"method": "cgf"}, "unknown guidance method 'cgf'"),
    ({"method": "cfg", "reg": "papr"}, "unknown REG mode 'papr'"),
    ({"method": "cfg", "convention": "w3"}, "unknown weight convention"),
    ({"method": "cfg", "scale": float("nan")}, "cfg scale must be a finite number"),
    ({"method": "cfg", "scale": float("inf")}, "cfg scale must be a finite number"),
    ({"method": "cfg", "scale": -0.5}, "scale=-0.5 is below 0"),
    ({"method": "cfg", "scale": 0.5, "convention": "w2"}, "scale=0.5 is below 1"),
    ({"method": "linear", "scale_end": float("nan")}, "linear scale_end must be a finite number"),
    ({"method": "interval", "t_lo": 500.0, "t_hi": 200.0}, "inverted guidance interval"),
    ({"method": "interval", "t_hi": float("nan")}, "interval t_hi must be a finite number"),
    ({"method": "cosine", "power": -1.0}, "cosine power must be >= 0"),
    ({"method": "cfg", "guidance_channels": []}, "guidance_channels must be a non-empty list"),
    ({"method": "cfg", "shift": 1.0}, "bad parameters for guidance 'cfg'"),
])
def test_bad_parameters_raise_config_error(params, message):
    with pytest.raises(ConfigError, match=message):
        make_guidance(**params)


@pytest.mark.parametrize("guidance, message", [
    (lambda: make_guidance("cfg", guidance_channels=[0, 3]), r"guidance_channels \[3\] outside the model's 3"),
    (lambda: make_guidance("autoguidance"), "autoguidance needs a reference model: set reference_checkpoint"),
    (lambda: make_guidance("autoguidance", reference_checkpoint="weak.ckpt"), "reference_checkpoint names a file: sample.py and sweep.py load it"),
    (lambda: make_guidance("autoguidance", reference=linear_model(bias=torch.zeros(4, 3, dtype=torch.float64))),
     "reference has num_classes=3"),
    (lambda: make_guidance("cfg", reference=linear_model(bias=torch.zeros(1, 3, dtype=torch.float64))),
     "reference has num_classes=0"),  # a network that would index the labels: only one that ignores them fits
    (lambda: make_guidance("autoguidance", reference=linear_model(
        torch.eye(4, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64), (4,))), r"data_shape=\(4,\)"),
    (lambda: make_guidance("autoguidance", reference=Denoiser(LinearEps(A, BIAS), VPSchedule(500), Prediction("eps"))),
     "another noise schedule"),
])
def test_bad_bindings_raise_config_error(xy, guidance, message):
    with pytest.raises(ConfigError, match=message):
        GuidedDenoiser(linear_model(), guidance(), xy[1])


class InfBelow(nn.Module):
    """``eps = A x + b_y``, but ``inf`` once the net time drops below ``t_bad``."""

    def __init__(self, t_bad: float):
        super().__init__()
        self.linear, self.t_bad = LinearEps(A, BIAS), t_bad
        self.num_classes, self.data_shape = self.linear.num_classes, self.linear.data_shape

    def forward(self, x, t, y):
        out = self.linear(x, t, y)
        return torch.where(t[:, None] < self.t_bad, torch.full_like(out, float("inf")), out)


@pytest.mark.parametrize("reg", ["none", "paper"])
def test_non_finite_sample_names_step_and_method(xy, reg):
    """DDIM over T = 100 in 5 steps visits t = 99, 74, 50, 25, 0: the net breaks at step 2 (t = 50)."""
    x, y = xy
    model = Denoiser(InfBelow(60.0), VPSchedule(100), Prediction("eps"))
    guided = GuidedDenoiser(model, make_guidance("cfg", scale=1.0, reg=reg), y)
    with pytest.raises(FloatingPointError, match=r"sampling step 2 \(t=50\).*method='cfg'"):
        get_sampler("ddim")(guided, x, model.schedule, steps=5)
