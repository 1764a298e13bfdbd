"""APG, CFG-Zero* and guidance rescale against closed forms on the linear backbone.

With ``eps = A x + b_y`` (``tests/test_guidance.py``) and ``x0 = (x - s eps) / a``, every prediction is
known in closed form, and REG's factor is too: ``grad_x(1^T x0_c) = (1 - s A^T 1) / a`` and
``J_x0 = (I - s A) / a``. So for *any* guidance term ``g`` (x0 units) the guided estimate is
``x0_c + g`` (no REG), ``x0_c + (1 - s A^T 1) ⊙ g`` (paper) or ``x0_c + g - s A^T g`` (vjp): the tests
compute each method's ``g`` by hand and check that REG multiplies exactly that ``g``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import A, BIAS, NULL, Counting, LinearEps, linear_model, vp_s

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import EDMSchedule, FlowSchedule, VPSchedule
from lightning_reg.errors import ConfigError
from lightning_reg.guidance import ChainState, GuidedDenoiser, make_guidance
from lightning_reg.models.mlp import ToyMLP
from lightning_reg.sampling.engine import generate

TOL = dict(rtol=0, atol=1e-10)
T = 400  # a DDPM index of the 1000-step linear schedule


@pytest.fixture
def xy():
    g = torch.Generator().manual_seed(5)
    return torch.randn(4, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1, 1, 0])


def predictions(x, y, t=T):
    """``(eps_c, eps_u, x0_c, x0_u, a, s)`` of the linear backbone at DDPM index ``t``."""
    a, s = vp_s(t)
    eps_c, eps_u = x @ A.T + BIAS[y], x @ A.T + BIAS[NULL]
    return eps_c, eps_u, (x - s * eps_c) / a, (x - s * eps_u) / a, a, s


def apg_by_hand(x0_c, d, w, eta=0.0, norm_threshold=0.0):
    """Sadat et al. (2024), Alg. 1, one sample (row) at a time: threshold, project on x0_c,
    ``w (d_orth + eta d_par)``."""
    rows = []
    for c, di in zip(x0_c, d):
        if norm_threshold > 0:
            di = di * min(1.0, norm_threshold / float(di.norm()))
        unit = c / c.norm()
        parallel = torch.dot(di, unit) * unit
        rows.append(w * (di - parallel + eta * parallel))
    return torch.stack(rows)


def cfg_zero_star_by_hand(v_c, v_u, w, a, s):
    """``v_c + w (v_c - s* v_u)``, ``s* = <v_c, v_u> / ||v_u||^2`` per row, on velocities ``v = eps - x0``;
    the term in x0 units, by ``x0 = (x - s v) / (a + s)``."""
    s_star = torch.stack([torch.dot(c, u) / torch.dot(u, u) for c, u in zip(v_c, v_u)])[:, None]
    return -s / (a + s) * w * (v_c - s_star * v_u)


def rescale_by_hand(eps_c, eps_guided, phi, a, s):
    """Lin et al. (2023), §3.4 on eps: ``phi * eps_g std(eps_c)/std(eps_g) + (1 - phi) eps_g``; the term in
    x0 units."""
    ratio = torch.stack([c.std() / g.std() for c, g in zip(eps_c, eps_guided)])[:, None]
    eps = phi * eps_guided * ratio + (1 - phi) * eps_guided
    return -s / a * (eps - eps_c)


def hand_terms(x, y):
    """Each new method's parameters and its ``g`` (x0 units) at t = ``T``, derived above by hand."""
    eps_c, eps_u, x0_c, x0_u, a, s = predictions(x, y)
    d = x0_c - x0_u
    threshold = float(d.norm(dim=1).mean())  # between the two classes' norms: clips one class only
    cfg_eps = eps_c + 1.5 * (eps_c - eps_u)
    return {
        "apg": ({"method": "apg", "scale": 1.5}, apg_by_hand(x0_c, d, 1.5)),
        "apg_eta_threshold": ({"method": "apg", "scale": 1.5, "eta": 0.3, "norm_threshold": threshold},
                              apg_by_hand(x0_c, d, 1.5, eta=0.3, norm_threshold=threshold)),
        "cfg_zero_star": ({"method": "cfg_zero_star", "scale": 1.5, "zero_init_steps": 0},
                          cfg_zero_star_by_hand(eps_c - x0_c, eps_u - x0_u, 1.5, a, s)),
        "cfg_rescale": ({"method": "cfg", "scale": 1.5, "guidance_rescale": 0.7},
                        rescale_by_hand(eps_c, cfg_eps, 0.7, a, s)),
        "apg_rescale": ({"method": "apg", "scale": 1.5, "guidance_rescale": 0.5}, rescale_by_hand(
            eps_c, eps_c - a / s * apg_by_hand(x0_c, d, 1.5), 0.5, a, s)),
    }


def guided(model, params, x, y, t=T):
    return GuidedDenoiser(model, make_guidance(**params), y)(x, torch.tensor(float(t), dtype=torch.float64))


@pytest.mark.parametrize("case", ["apg", "apg_eta_threshold", "cfg_zero_star", "cfg_rescale", "apg_rescale"])
@pytest.mark.parametrize("reg", ["none", "paper", "vjp"])
def test_linear_backbone_matches_closed_form(xy, case, reg):
    """The guided x0 is ``x0_c + factor(g)`` with the method's own ``g``: REG multiplies it, unchanged."""
    x, y = xy
    params, g = hand_terms(x, y)[case]
    _, _, x0_c, _, _, s = predictions(x, y)
    rectified = {"none": g, "paper": (1 - s * A.sum(0)) * g, "vjp": g - s * g @ A}[reg]
    torch.testing.assert_close(guided(linear_model(), {**params, "reg": reg}, x, y), x0_c + rectified, **TOL)


def test_threshold_clips_one_class_and_eta_one_is_cfg(xy):
    """The hand-made cases above are not degenerate: the threshold binds for one class only, the
    projection changes the term, and ``eta = 1`` without threshold or momentum is plain CFG."""
    x, y = xy
    _, _, x0_c, x0_u, _, _ = predictions(x, y)
    d = x0_c - x0_u
    threshold = hand_terms(x, y)["apg_eta_threshold"][0]["norm_threshold"]
    assert ((d.norm(dim=1) > threshold) == (y == 1)).all()
    assert (apg_by_hand(x0_c, d, 1.5) - 1.5 * d).abs().max() > 0.1
    model = linear_model()
    torch.testing.assert_close(guided(model, {"method": "apg", "scale": 1.5, "eta": 1.0}, x, y),
                               guided(model, {"method": "cfg", "scale": 1.5}, x, y), **TOL)


@pytest.mark.parametrize("params", [
    {"method": "apg", "eta": 0.5, "norm_threshold": 1.0, "momentum": -0.5},
    {"method": "cfg_zero_star"},
    {"method": "cfg_zero_star", "zero_init_steps": 0},
    {"method": "cfg", "guidance_rescale": 0.7},
])
@pytest.mark.parametrize("reg", ["none", "paper", "vjp"])
def test_zero_weight_is_conditional_with_one_forward(xy, params, reg):
    """``w = 0`` is the conditional prediction for every method, one forward of B (no zeroed step either)."""
    x, y = xy
    net = Counting(LinearEps(A, BIAS))
    model = Denoiser(net, VPSchedule(1000), Prediction("eps"))
    denoiser = GuidedDenoiser(model, make_guidance(**params, scale=0.0, reg=reg), y)
    with torch.no_grad():
        outs = [denoiser(x, torch.tensor(t)) for t in (900.0, 400.0)]
        plain = [model(x, torch.tensor(t), y) for t in (900.0, 400.0)]
    assert net.calls == [(4, False)] * 4 and net.backwards == 0
    for out, expected in zip(outs, plain):
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("params", [{"method": "apg", "eta": 0.2}, {"method": "cfg_zero_star", "zero_init_steps": 0}])
@pytest.mark.parametrize("reg", ["none", "paper"])
def test_w2_convention_equals_w_convention(xy, params, reg):
    x, y = xy
    model = linear_model()
    torch.testing.assert_close(guided(model, {**params, "scale": 2.5, "convention": "w2", "reg": reg}, x, y),
                               guided(model, {**params, "scale": 1.5, "reg": reg}, x, y), **TOL)


# --- CFG-Zero*: the output space per schedule, and the zeroed steps --------------------------------------

@pytest.mark.parametrize("reg", ["none", "paper"])
def test_cfg_zero_star_on_flow_works_on_velocities(xy, reg):
    """Flow: the net's output is the velocity ``v = A x + b_y``, ``x0 = x - t v``; s* is taken on velocities."""
    x, y = xy
    t = 0.6
    model = Denoiser(LinearEps(A, BIAS), FlowSchedule(), Prediction("velocity"))
    out = guided(model, {"method": "cfg_zero_star", "scale": 2.0, "zero_init_steps": 0, "reg": reg}, x, y, t)
    v_c, v_u = x @ A.T + BIAS[y], x @ A.T + BIAS[NULL]
    g = cfg_zero_star_by_hand(v_c, v_u, 2.0, a=1 - t, s=t)
    # x0 = x - t v, a_t = 1 - t: the paper factor a_t grad(1^T x0_c) = (1 - t)(1 - t A^T 1)
    factor = (1 - t) * (1 - t * A.sum(0)) if reg == "paper" else 1.0
    torch.testing.assert_close(out, x - t * v_c + factor * g, **TOL)


@pytest.mark.parametrize("schedule, prediction, t, zeroed", [
    (VPSchedule(1000), "eps", 999.0, lambda x: x / sum(vp_s(999))),  # x0 = eps = x / (a + s)
    (EDMSchedule(), "edm", 80.0, lambda x: x / 81),  # a = 1, s = sigma
    (FlowSchedule(), "velocity", 1.0, lambda x: x),  # v = 0: Euler keeps x
])
def test_zeroed_step_is_zero_output_without_forward(xy, schedule, prediction, t, zeroed):
    x, y = xy
    net = Counting(LinearEps(A, BIAS))
    denoiser = GuidedDenoiser(Denoiser(net, schedule, Prediction(prediction)),
                              make_guidance("cfg_zero_star", scale=1.0, reg="paper"), y)
    torch.testing.assert_close(denoiser(x, torch.tensor(t, dtype=torch.float64)), zeroed(x), **TOL)
    assert net.calls == [] and net.backwards == 0


def test_zero_init_counts_steps_of_each_chain(xy):
    """``zero_init_steps = 2``: the chain's first two distinct times are zeroed; EDM Heun's repeated time
    is one step; a new chain (noisier time) or a new GuidedDenoiser zeroes again."""
    x, y = xy
    net = Counting(LinearEps(A, BIAS))
    model = Denoiser(net, EDMSchedule(), Prediction("edm"))
    denoiser = GuidedDenoiser(model, make_guidance("cfg_zero_star", scale=1.0, zero_init_steps=2, branch_layout="batched"), y)
    for sigma in (80.0, 40.0, 40.0):  # step 0, step 1 (Heun corrector), step 1 again
        torch.testing.assert_close(denoiser(x, torch.tensor(sigma)), x / (1 + sigma), **TOL)
    assert net.calls == []
    assert (denoiser(x, torch.tensor(20.0)) - x / 21).abs().min() > 0 and [n for n, _ in net.calls] == [8]
    torch.testing.assert_close(denoiser(x, torch.tensor(80.0)), x / 81, **TOL)  # a new chain
    assert len(net.calls) == 1


def test_zero_init_steps_outside_the_window_are_the_conditional_prediction(xy):
    """Outside ``[start, stop]`` every method gives the conditional prediction, CFG-Zero*'s zeroed steps included
    (as at ``w = 0``): with ``start = 0.5`` the chain's first step is ``x0_c``, not ``x / (1 + sigma)``."""
    x, y = xy
    model = Denoiser(LinearEps(A, BIAS), EDMSchedule(), Prediction("edm"))
    denoiser = GuidedDenoiser(model, make_guidance("cfg_zero_star", scale=1.0, zero_init_steps=1, start=0.5), y)
    torch.testing.assert_close(denoiser(x, torch.tensor(80.0)), model(x, torch.tensor(80.0), y), **TOL)


def test_chain_state_steps_and_resets():
    state = ChainState()
    steps = []
    for t in (80.0, 40.0, 40.0, 20.0, 20.0, 5.0, 80.0, 30.0):
        state.visit(t)
        steps.append(state.step)
    assert steps == [0, 1, 1, 2, 2, 3, 0, 1]


# --- APG momentum: one state per chain -------------------------------------------------------------------

def test_apg_momentum_is_a_running_average_over_the_chain(xy):
    """``m_1 = d_1``, ``m_2 = d_2 + beta m_1``; the term uses ``m`` (then threshold and projection)."""
    x, y = xy
    beta, w = -0.5, 1.5
    model = linear_model()
    denoiser = GuidedDenoiser(model, make_guidance("apg", scale=w, momentum=beta, eta=0.2), y)
    (_, _, x0_c1, x0_u1, _, _), (_, _, x0_c2, x0_u2, _, _) = predictions(x, y, 600), predictions(x, y, T)
    first = denoiser(x, torch.tensor(600.0))
    torch.testing.assert_close(first, x0_c1 + apg_by_hand(x0_c1, x0_c1 - x0_u1, w, eta=0.2), **TOL)
    m2 = (x0_c2 - x0_u2) + beta * (x0_c1 - x0_u1)
    torch.testing.assert_close(denoiser(x, torch.tensor(float(T))), x0_c2 + apg_by_hand(x0_c2, m2, w, eta=0.2), **TOL)
    # a new chain starts from m = 0: reset(), a noisier time, or a new GuidedDenoiser
    fresh = x0_c2 + apg_by_hand(x0_c2, x0_c2 - x0_u2, w, eta=0.2)
    denoiser.reset()
    torch.testing.assert_close(denoiser(x, torch.tensor(float(T))), fresh, **TOL)
    denoiser(x, torch.tensor(600.0))  # noisier than T: a new chain, m = d_600
    torch.testing.assert_close(denoiser(x, torch.tensor(float(T))), x0_c2 + apg_by_hand(x0_c2, m2, w, eta=0.2), **TOL)
    assert not any(isinstance(v, torch.Tensor) for v in vars(denoiser.guidance).values())  # no state on the method


def test_interleaved_chains_of_one_method_keep_their_own_state(xy):
    """Each GuidedDenoiser owns its chain's state: two chains of one guidance object, stepped in turn, equal
    each chain run alone (a state kept on the method would mix their momenta)."""
    x, y = xy
    guidance = make_guidance("apg", scale=1.5, momentum=-0.5)
    first, second = (GuidedDenoiser(linear_model(), guidance, y) for _ in range(2))
    inputs = {first: x, second: 2 * x}
    interleaved = {d: [] for d in inputs}
    for t in (600.0, 400.0, 200.0):
        for d, xd in inputs.items():
            interleaved[d].append(d(xd, torch.tensor(t)))
    for d, xd in inputs.items():
        alone = GuidedDenoiser(linear_model(), guidance, y)
        for t, out in zip((600.0, 400.0, 200.0), interleaved[d]):
            torch.testing.assert_close(out, alone(xd, torch.tensor(t)), rtol=0, atol=0)


@pytest.mark.parametrize("params", [{"method": "apg", "momentum": -0.5, "norm_threshold": 2.0, "reg": "paper"},
                                    {"method": "cfg_zero_star", "zero_init_steps": 2, "reg": "none"}])
def test_batches_of_one_generate_call_do_not_share_chain_state(params, one_thread):
    """Two batches of one ``generate`` call equal two separate calls and one batch of 4 (per-sample state)."""
    torch.manual_seed(0)
    model = Denoiser(ToyMLP(num_classes=2, dim=2, hidden=16, blocks=1, x_scale=1.0), VPSchedule(1000),
                     Prediction("eps")).eval()
    guidance = make_guidance(**params, scale=2.0)
    run = lambda idx, batch: generate(model, guidance, torch.tensor(idx) % 2, idx, steps=5, seed=1,  # noqa: E731
                                      batch_size=batch, sampler="ddim")
    two_batches = run([0, 1, 2, 3], 2)
    torch.testing.assert_close(two_batches, torch.cat([run([0, 1], 2), run([2, 3], 2)]), rtol=0, atol=0)
    torch.testing.assert_close(two_batches, run([0, 1, 2, 3], 4), rtol=1e-5, atol=1e-5)  # float32 rounding
    cfg = generate(model, make_guidance("cfg", scale=2.0), torch.tensor([0, 1]), [0, 1], steps=5, seed=1,
                   batch_size=2, sampler="ddim")
    assert (two_batches[:2] - cfg).abs().max() > 1e-3  # the method did something


def test_apg_momentum_and_reg_under_inference_mode(xy):
    x, y = xy
    guidance = make_guidance("apg", scale=1.0, momentum=-0.5, reg="vjp")
    outside = GuidedDenoiser(linear_model(), guidance, y)
    expected = [outside(x, torch.tensor(t)) for t in (600.0, 400.0)]
    with torch.inference_mode():
        inside = GuidedDenoiser(linear_model(), guidance, y.clone())
        results = [inside(x.clone(), torch.tensor(t)) for t in (600.0, 400.0)]
    for out, ref in zip(results, expected):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


# --- guidance_channels, start/stop ------------------------------------------------------------------------

@pytest.mark.parametrize("params", [
    {"method": "apg", "eta": 0.3, "momentum": -0.5},
    {"method": "cfg_zero_star", "zero_init_steps": 1},
    {"method": "cfg", "guidance_rescale": 0.7},
])
@pytest.mark.parametrize("reg", ["none", "paper", "vjp"])
def test_guidance_channels_leave_other_channels_conditional(params, reg):
    g = torch.Generator().manual_seed(2)
    shape, dim = (4, 2, 2), 16
    model = linear_model(torch.randn(dim, dim, generator=g, dtype=torch.float64) * 0.3,
                         torch.randn(3, dim, generator=g, dtype=torch.float64), shape)
    x, y = torch.randn(3, *shape, generator=g, dtype=torch.float64), torch.tensor([0, 1, 0])
    denoiser = GuidedDenoiser(model, make_guidance(**params, scale=2.0, reg=reg, guidance_channels=[0, 1, 2]), y)
    for t in (700.0, 400.0):  # cfg_zero_star: the first is a zeroed step
        out = denoiser(x, torch.tensor(t))
        with torch.no_grad():
            conditional = model(x, torch.tensor(t), y)
        torch.testing.assert_close(out[:, 3], conditional[:, 3], **TOL)
        assert (out[:, :3] - conditional[:, :3]).abs().min() > 0


def test_start_stop_fractions_of_progress(xy):
    """``start``/``stop`` bound the progress ``p = 1 - t/T`` (both included); outside, the conditional prediction."""
    x, y = xy
    model = linear_model()
    params = {"method": "apg", "scale": 1.5, "start": 0.4, "stop": 0.6}
    for t, inside in ((601.0, False), (600.0, True), (T, True), (399.0, False)):
        _, _, x0_c, x0_u, _, _ = predictions(x, y, int(t))
        expected = x0_c + (apg_by_hand(x0_c, x0_c - x0_u, 1.5) if inside else 0)
        torch.testing.assert_close(guided(model, params, x, y, t), expected, **TOL)


# --- the same formulas as diffusers' guiders ----------------------------------------------------------------

def test_formulas_agree_with_diffusers_guiders(xy):
    """Our ``w`` convention is diffusers' ``use_original_formulation=True`` (APG: the paper's Algorithm 1);
    CFG-Zero* (fed velocities) and guidance rescale equal diffusers' default formulation at
    ``guidance_scale = w + 1``."""
    from diffusers.guiders import ClassifierFreeGuidance, ClassifierFreeZeroStarGuidance
    from diffusers.guiders.adaptive_projected_guidance import normalized_guidance

    x, y = xy
    eps_c, eps_u, x0_c, x0_u, a, s = predictions(x, y)
    model = linear_model()
    apg = normalized_guidance(x0_c, x0_u, 1.5, eta=0.3, norm_threshold=1.0, use_original_formulation=True)
    torch.testing.assert_close(guided(model, {"method": "apg", "scale": 1.5, "eta": 0.3, "norm_threshold": 1.0},
                                      x, y), apg, **TOL)
    zero_star = ClassifierFreeZeroStarGuidance(guidance_scale=2.5, zero_init_steps=0)
    zero_star.set_state(step=3, num_inference_steps=10, timestep=torch.tensor(T))
    v = zero_star.forward(eps_c - x0_c, eps_u - x0_u).pred  # computes s* in float32 with a 1e-8 guard
    torch.testing.assert_close(guided(model, {"method": "cfg_zero_star", "scale": 1.5, "zero_init_steps": 0}, x, y),
                               (x - s * v) / (a + s), rtol=0, atol=1e-5)
    rescale = ClassifierFreeGuidance(guidance_scale=2.5, guidance_rescale=0.7)
    rescale.set_state(step=3, num_inference_steps=10, timestep=torch.tensor(T))
    eps = rescale.forward(eps_c, eps_u).pred
    torch.testing.assert_close(guided(model, {"method": "cfg", "scale": 1.5, "guidance_rescale": 0.7}, x, y),
                               (x - s * eps) / a, **TOL)


# --- bad input -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("params, message", [
    ({"method": "apg", "momentum": 0.5, "shift": 1}, "bad parameters for guidance 'apg': .*'shift'"),
    ({"method": "cfg_zero_star", "eta": 0.0}, "bad parameters for guidance 'cfg_zero_star': .*'eta'"),
    ({"method": "apg", "scale": -0.1}, "scale=-0.1 is below 0"),
    ({"method": "cfg_zero_star", "scale": 0.5, "convention": "w2"}, "scale=0.5 is below 1"),
    ({"method": "apg", "eta": float("nan")}, "apg eta must be a finite number"),
    ({"method": "apg", "norm_threshold": -1.0}, "apg norm_threshold must be >= 0"),
    ({"method": "apg", "momentum": float("inf")}, "apg momentum must be a finite number"),
    ({"method": "cfg_zero_star", "zero_init_steps": -1}, "zero_init_steps must be an integer >= 0, got -1"),
    ({"method": "cfg_zero_star", "zero_init_steps": 1.5}, "zero_init_steps must be an integer >= 0, got 1.5"),
    ({"method": "cfg", "guidance_rescale": 1.5}, "guidance_rescale must be <= 1"),
    ({"method": "interval", "start": -0.1, "t_lo": 1}, "interval start must be >= 0"),
    ({"method": "interval", "scale": 1.0}, "interval needs t_lo and/or t_hi"),
    ({"method": "cfg", "scal": 1.0}, r"unknown 'scal' \(did you mean 'scale'\?\); accepted: \['branch_layout'"),
    ({"method": "conditional", "scale": 1.0}, r"bad parameters for guidance 'conditional': unknown 'scale'"),
    ({"method": "linear", "start": 0.6, "stop": 0.4}, "linear stop must be >= 0.6"),
    ({"method": "cosine", "stop": 1.2}, "cosine stop must be <= 1"),
])
def test_bad_parameters_raise_one_config_error_line(params, message):
    with pytest.raises(ConfigError, match=message) as err:
        make_guidance(**params)
    assert "\n" not in str(err.value)


def test_guidance_rescale_refuses_one_value_samples():
    model = Denoiser(LinearEps(A[:1, :1], BIAS[:, :1], (1,)), VPSchedule(1000), Prediction("eps"))
    with pytest.raises(ConfigError, match=r"guidance_rescale needs samples of at least 2 values.*\(1,\)"):
        GuidedDenoiser(model, make_guidance("cfg", guidance_rescale=0.5), torch.tensor([0]))
