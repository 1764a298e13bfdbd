"""Every rule-based guider against diffusers' own class (``diffusers.guiders``, 0.42.1), over whole chains.

A table backbone hands the project's path (``GuidedDenoiser`` over a ``Denoiser``) random raw outputs fixed per
time and branch, read as the prediction a rule works in: x0 for CFG, APG, APG-mix and FDG, the flow velocity for
CFG-Zero* and MAMBO-G (flow schedule), the output space for TCFG (eps on VP, the velocity on flow). diffusers'
guider gets the same tensors after ``set_state`` and ``prepare_inputs``, as its pipelines call them, step by step
over one chain (momentum and step counts included); our guided x0, read back as that prediction, equals its
``pred`` to 1e-6.

Windows: diffusers guides step ``i`` of ``n`` when ``int(start n) <= i < int(stop n)``; we guide while the progress
``p(t)`` of the step's time lies in ``[start, stop]``. ``mapped_window`` turns the one into the other on the
chain's times; unmapped, the same fractions guide other steps (tested).

Then REG on each new rule (closed-form linear backbone, ``tests/test_guiders.py``): ``paper`` gives
``x0_c + (1 - s A^T 1) ⊙ g`` and ``vjp`` ``x0_c + g - s A^T g`` for the rule's own term ``g``.
"""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from diffusers.guiders import (AdaptiveProjectedGuidance, AdaptiveProjectedMixGuidance, ClassifierFreeGuidance,
                               ClassifierFreeZeroStarGuidance, FrequencyDecoupledGuidance, MagnitudeAwareGuidance,
                               TangentialClassifierFreeGuidance)
from helpers import NULL, linear_model
from torch import nn

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import FlowSchedule, VPSchedule
from lightning_reg.errors import ConfigError
from lightning_reg.guidance import GuidedDenoiser, make_guidance

STEPS = 10
SHAPE = (3, 8, 8)  # images: FDG's pyramid needs them
BATCH = 4
WINDOW = (0.15, 0.85)  # diffusers: steps 1..7 of 10; the same fractions of progress: steps 2..7 (VP), 2..8 (flow)
VP, FLOW = VPSchedule(1000), FlowSchedule()


class TableNet(nn.Module):
    """Raw outputs fixed per time: ``table[net_t] = (cond, uncond)`` (``net_t`` the time the backbone is given),
    ``uncond`` for the null label's rows."""

    def __init__(self, table: dict[float, tuple[torch.Tensor, torch.Tensor]], data_shape: tuple[int, ...]):
        super().__init__()
        self.num_classes, self.data_shape, self.table = NULL, data_shape, table

    def forward(self, x, t, y):
        cond, uncond = self.table[float(t[0])]
        return torch.where((y == NULL).view(-1, *[1] * len(self.data_shape)), uncond, cond)


def net_time(schedule, t: float) -> float:
    return float(schedule.net_time(torch.tensor(t, dtype=torch.float64)))


@pytest.fixture
def float64_diffusers(monkeypatch):
    """diffusers runs TCFG's SVD and CFG-Zero*'s ``s*`` in float32 (``.float()``), which alone leaves ~3e-5 between
    the two on these float64 tensors: keep float64 through ``.float()``, so the comparison is of the math."""
    cast = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float", lambda x: x if x.dtype == torch.float64 else cast(x))


def chain_times(schedule) -> list[float]:
    """The times of a ``STEPS``-step chain (the clean end is not a step)."""
    return [float(t) for t in schedule.sampling_times(STEPS)[:-1]]


def mapped_window(start: float, stop: float, times: list[float], schedule) -> dict[str, float]:
    """Our ``start``/``stop`` for diffusers' on a chain at ``times``: the progress of its first and last guided
    step, ``int(start n)`` and ``int(stop n) - 1``."""
    n = len(times)
    return {"start": schedule.progress(times[int(start * n)]), "stop": schedule.progress(times[int(stop * n) - 1])}


def run_chains(params: dict, guider, schedule, prediction: str, spread: float, shape=SHAPE, seed: int = 0):
    """``(ours, diffusers')`` per step of one chain: our guided x0 read back as ``prediction``, and the guider's
    ``pred`` on the same raw outputs. ``uncond = cond + spread_i * noise``, ``spread_i`` in ``[spread/4, spread]``
    per sample (so norms and ratios differ between samples)."""
    g = torch.Generator().manual_seed(seed)
    times = chain_times(schedule)
    spreads = torch.linspace(spread / 4, spread, BATCH, dtype=torch.float64).view(-1, *[1] * len(shape))
    table, xs = {}, []
    draw = lambda: torch.randn(BATCH, *shape, generator=g, dtype=torch.float64)  # noqa: E731
    for t in times:
        cond = draw()
        table[net_time(schedule, t)] = (cond, cond + spreads * draw())
        xs.append(draw())
    read = Prediction(prediction)
    model = Denoiser(TableNet(table, shape), schedule, read)
    denoiser = GuidedDenoiser(model, make_guidance(**params, branch_layout="split"), torch.arange(BATCH) % 2)
    ours, theirs = [], []
    for i, (t, x) in enumerate(zip(times, xs)):
        a, s = model.coefficients(t, x)
        ours.append(read.from_x0(denoiser(x, torch.tensor(t, dtype=torch.float64)), x, a, s))
        guider.set_state(step=i, num_inference_steps=STEPS, timestep=torch.tensor(t))
        guider.prepare_inputs({})  # where APG and APG-mix make their momentum buffer, at step 0
        theirs.append(guider.forward(*table[net_time(schedule, t)]).pred)
    return ours, theirs


# our parameters, diffusers' guider given (start, stop), the chain's schedule, the prediction the table is read as,
# the spread of uncond around cond, the window tested (diffusers' fractions) and the sample shape. diffusers'
# defaults first, then other settings; `w2` is diffusers' default formulation, `w` its use_original_formulation=True.
Case = namedtuple("Case", "params guider schedule prediction spread window shape", defaults=(WINDOW, SHAPE))
TOKENS = (16, 12)  # diffusers' MAMBO-G takes torch.norm over dims (1, 2, 3) of images, which torch refuses
CASES = {
    "cfg": Case({"method": "cfg", "scale": 7.5, "convention": "w2", "guidance_rescale": 0.7},
                lambda **window: ClassifierFreeGuidance(guidance_rescale=0.7, **window), VP, "eps", 1.0),
    "apg": Case({"method": "apg", "scale": 7.5, "eta": 1.0, "norm_threshold": 15.0},
                lambda **window: AdaptiveProjectedGuidance(use_original_formulation=True, **window), VP, "x0", 1.5),
    "apg_momentum": Case({"method": "apg", "scale": 3.0, "eta": 0.2, "norm_threshold": 10.0, "momentum": -0.5},
                         lambda **window: AdaptiveProjectedGuidance(
                             guidance_scale=3.0, eta=0.2, adaptive_projected_guidance_rescale=10.0,
                             adaptive_projected_guidance_momentum=-0.5, use_original_formulation=True, **window),
                         VP, "x0", 1.5),
    # diffusers zeroes its first steps even outside the window: a window from 0 keeps the zeroed step inside
    "cfg_zero_star": Case({"method": "cfg_zero_star", "scale": 7.5, "convention": "w2", "zero_init_steps": 1},
                          lambda **window: ClassifierFreeZeroStarGuidance(**window), FLOW, "velocity", 1.0,
                          (0.0, WINDOW[1])),
    "cfg_zero_star_no_zero_init": Case({"method": "cfg_zero_star", "scale": 2.0, "zero_init_steps": 0},
                                       lambda **window: ClassifierFreeZeroStarGuidance(
                                           guidance_scale=2.0, zero_init_steps=0, use_original_formulation=True,
                                           **window), FLOW, "velocity", 1.0),
    "apg_mix": Case({"method": "apg_mix", "scale": 3.5, "apg_scale": 10.0, "momentum": -0.5, "norm_threshold": 10.0,
                     "apg_start_step": 5},
                    lambda **window: AdaptiveProjectedMixGuidance(use_original_formulation=True, **window),
                    VP, "x0", 1.5),
    "apg_mix_early": Case({"method": "apg_mix", "scale": 2.5, "apg_scale": 4.0, "convention": "w2", "eta": 0.3,
                           "momentum": -0.3, "apg_start_step": 2},
                          lambda **window: AdaptiveProjectedMixGuidance(
                              guidance_scale=1.5, adaptive_projected_guidance_scale=3.0, eta=0.3,
                              adaptive_projected_guidance_momentum=-0.3, adaptive_projected_guidance_rescale=0.0,
                              adaptive_projected_guidance_start_step=2, use_original_formulation=True, **window),
                          VP, "x0", 1.5),
    "fdg": Case({"method": "fdg", "scale": 10.0, "scale_low": 5.0, "convention": "w2"},
                lambda **window: FrequencyDecoupledGuidance(**window), VP, "x0", 1.0),
    "fdg_three_levels_eta": Case({"method": "fdg", "scale": 4.0, "scale_low": 2.0, "levels": 3, "eta": 0.5},
                                 lambda **window: FrequencyDecoupledGuidance(
                                     guidance_scales=[4.0, 4.0, 2.0], parallel_weights=0.5,
                                     use_original_formulation=True, **window), VP, "x0", 1.0),
    "mambo_g": Case({"method": "mambo_g", "scale": 10.0, "convention": "w2"},
                    lambda **window: MagnitudeAwareGuidance(**window), FLOW, "velocity", 0.2, shape=TOKENS),
    "mambo_g_original": Case({"method": "mambo_g", "scale": 4.0, "alpha": 2.0},
                             lambda **window: MagnitudeAwareGuidance(guidance_scale=4.0, alpha=2.0,
                                                                     use_original_formulation=True, **window),
                             FLOW, "velocity", 0.5, shape=TOKENS),
    "tcfg": Case({"method": "tcfg", "scale": 7.5, "convention": "w2"},
                 lambda **window: TangentialClassifierFreeGuidance(**window), VP, "eps", 1.0),
    "tcfg_flow_original": Case({"method": "tcfg", "scale": 3.0},
                               lambda **window: TangentialClassifierFreeGuidance(
                                   guidance_scale=3.0, use_original_formulation=True, **window),
                               FLOW, "velocity", 1.0),
}


@pytest.mark.parametrize("windowed", [False, True], ids=["no_window", "window"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_guided_prediction_equals_diffusers_guider(case, windowed, float64_diffusers, one_thread):
    params, guider, schedule, prediction, spread, window, shape = CASES[case]
    theirs_window = dict(zip(("start", "stop"), window)) if windowed else {}
    ours_window = mapped_window(*window, chain_times(schedule), schedule) if windowed else {}
    ours, theirs = run_chains({**params, **ours_window}, guider(**theirs_window), schedule, prediction, spread, shape)
    for step, (mine, reference) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-6, msg=lambda m: f"step {step}: {m}")


def test_windows_without_the_mapping_guide_other_steps(one_thread):
    """The same fractions as diffusers' ``start``/``stop``, read as our progress window, disagree with it at the
    window's first step on both grids (``int(0.15 * 10) = 1``, but ``p`` of step 1 is 0.112 on VP, 0.1 on flow)."""
    for schedule, prediction in ((VP, "x0"), (FLOW, "velocity")):
        ours, theirs = run_chains({"method": "cfg", "scale": 2.0, "start": WINDOW[0], "stop": WINDOW[1]},
                                  ClassifierFreeGuidance(guidance_scale=2.0, use_original_formulation=True,
                                                         start=WINDOW[0], stop=WINDOW[1]), schedule, prediction, 1.0)
        differs = [int(not torch.allclose(mine, reference, rtol=0, atol=1e-6)) for mine, reference in zip(ours, theirs)]
        assert differs[1] == 1 and sum(differs) == (1 if schedule is VP else 2)  # flow: step 8 too (p = 0.8)


@pytest.mark.parametrize("shape, levels", [((3, 9, 7), 2), ((2, 12, 10), 3)])
def test_fdg_with_equal_weights_is_cfg_at_any_size(shape, levels):
    """The pyramid inverts exactly: ``w_low = w``, ``eta = 1`` is CFG, also where the image is padded to a multiple
    of ``2^(levels-1)`` and cropped back (diffusers' kornia pads to a power of two and keeps the padded size)."""
    g = torch.Generator().manual_seed(3)
    dim = torch.Size(shape).numel()
    model = linear_model(torch.randn(dim, dim, generator=g, dtype=torch.float64) * 0.05,
                         torch.randn(3, dim, generator=g, dtype=torch.float64), shape)
    x, y, t = torch.randn(2, *shape, generator=g, dtype=torch.float64), torch.tensor([0, 1]), torch.tensor(400.0)
    fdg = GuidedDenoiser(model, make_guidance("fdg", scale=1.5, scale_low=1.5, levels=levels), y)(x, t)
    cfg = GuidedDenoiser(model, make_guidance("cfg", scale=1.5), y)(x, t)
    torch.testing.assert_close(fdg, cfg, rtol=0, atol=1e-12)


# --- REG on each new rule: the closed-form linear backbone on 1x6x6 images ------------------------------------

REG_SHAPE = (1, 6, 6)
NEW_RULES = [
    {"method": "apg_mix", "scale": 1.5, "apg_scale": 2.0, "eta": 0.2, "momentum": -0.5, "apg_start_step": 0},
    {"method": "fdg", "scale": 2.0, "scale_low": 0.5, "eta": 0.5},
    {"method": "mambo_g", "scale": 2.0, "alpha": 1.0},
    {"method": "tcfg", "scale": 1.5},
]


@pytest.mark.parametrize("params", NEW_RULES, ids=[p["method"] for p in NEW_RULES])
def test_reg_multiplies_each_new_rules_term(params):
    """Two steps of a chain (APG-mix's second is an APG step, with the first step's momentum): with the rule's
    own term ``g`` (its guided x0 without REG, minus ``x0_c``), REG paper is ``x0_c + (1 - s A^T 1) ⊙ g`` and vjp
    ``x0_c + g - s A^T g``, exactly."""
    g = torch.Generator().manual_seed(4)
    dim = torch.Size(REG_SHAPE).numel()
    a_matrix = torch.randn(dim, dim, generator=g, dtype=torch.float64) * 0.1
    model = linear_model(a_matrix, torch.randn(3, dim, generator=g, dtype=torch.float64), REG_SHAPE)
    x, y = torch.randn(3, *REG_SHAPE, generator=g, dtype=torch.float64), torch.tensor([0, 1, 0])
    chains = {reg: GuidedDenoiser(model, make_guidance(**params, reg=reg), y) for reg in ("none", "paper", "vjp")}
    for t in (600.0, 400.0):
        t = torch.tensor(t, dtype=torch.float64)
        out = {reg: chain(x, t).flatten(1) for reg, chain in chains.items()}
        with torch.no_grad():
            x0_c = model(x, t, y).flatten(1)
        term = out["none"] - x0_c
        assert term.abs().max() > 1e-3  # the rule guides
        s = float(model.schedule.alpha_sigma(t)[1])
        torch.testing.assert_close(out["paper"], x0_c + (1 - s * a_matrix.sum(0)) * term, rtol=0, atol=1e-10)
        torch.testing.assert_close(out["vjp"], x0_c + term - s * term @ a_matrix, rtol=0, atol=1e-10)


def test_new_rules_on_the_toy_backbone_without_images():
    """Three of the four need no image: on the 3-value linear backbone they guide; FDG refuses in one line."""
    x, y, t = torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1]), torch.tensor(400.0)
    for method in ("apg_mix", "mambo_g", "tcfg"):
        out = GuidedDenoiser(linear_model(), make_guidance(method, scale=1.0, reg="paper"), y)(x, t)
        assert torch.isfinite(out).all()
    with pytest.raises(ConfigError, match=r"fdg with levels=2 needs images \(C, H, W\) at least 3 pixels a side; "
                                          r"the samples are \(3,\)"):
        GuidedDenoiser(linear_model(), make_guidance("fdg", scale=1.0), y)(x, t)


@pytest.mark.parametrize("params, message", [
    ({"method": "apg_mix", "apg_scal": 2.0}, r"unknown 'apg_scal' \(did you mean 'apg_scale'\?\)"),
    ({"method": "fdg", "scale_lo": 2.0}, r"unknown 'scale_lo' \(did you mean 'scale_low'\?\)"),
    ({"method": "mambo_g", "alpah": 2.0}, r"unknown 'alpah' \(did you mean 'alpha'\?\)"),
    ({"method": "tcfg", "eta": 0.5}, r"bad parameters for guidance 'tcfg': unknown 'eta'"),
    ({"method": "apg_mix", "apg_scale": 0.5, "convention": "w2"}, "apg_scale=0.5 is below 1"),
    ({"method": "apg_mix", "apg_start_step": -1}, "apg_mix apg_start_step must be an integer >= 0, got -1"),
    ({"method": "apg_mix", "eta": float("nan")}, "apg_mix eta must be a finite number"),
    ({"method": "fdg", "levels": 1}, "fdg levels must be an integer >= 2, got 1"),
    ({"method": "fdg", "scale_low": -1.0}, "scale_low=-1.0 is below 0"),
    ({"method": "mambo_g", "alpha": -1.0}, "mambo_g alpha must be >= 0"),
])
def test_bad_parameters_of_the_new_rules(params, message):
    with pytest.raises(ConfigError, match=message) as err:
        make_guidance(**params)
    assert "\n" not in str(err.value)
