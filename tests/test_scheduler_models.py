"""``--sampler diffusers:<SchedulerClass>`` on real models: diffusers' schedulers stepping our guided denoiser (REG
included). On the toy checkpoint through ``sample.py`` (outputs and meta.json, resumption, batch-size and process
independence through the per-sample generators, one-line errors that write nothing); on the public-layout DiT
fixture (REG through a multistep solver; diffusers' DDPM with DiT's learned variance against our built-in
``ddpm``); on the EDM2 fixtures (EDMEuler / EDMDPMSolverMultistep with REG; EDMEuler against an Euler loop written
here over the scheduler's own sigmas)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TOY_SAMPLE_ARGS as ARGS  # 30 samples in 3 shards of 10, batches of 4, REG paper, seed 5

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import VPSchedule
from lightning_reg.guidance import GuidedDenoiser, make_guidance
from lightning_reg.sampling.cli import main as sample_main
from lightning_reg.sampling.engine import PerSampleNoise, balanced_labels, generate

ROOT = Path(__file__).parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
LIMIT_S = 240  # a two-process run ends well within this, or the test fails
pytestmark = pytest.mark.usefixtures("one_thread")

DPM = ["--sampler", "diffusers:DPMSolverMultistepScheduler",
       "--sampler_kwargs", "{algorithm_type: dpmsolver++, use_karras_sigmas: true}", "--steps", "8"]
ANCESTRAL = ["--sampler", "diffusers:EulerAncestralDiscreteScheduler"]  # stochastic: draws noise at every step

def load(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(folder / "samples.npz") as f:
        return f["arr_0"], f["labels"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def toy_args(checkpoint: Path, out: Path, *more: str) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--output", str(out), *ARGS, *more]  # later flags override ARGS


# ------------------------------------------------------------------------------------ toy checkpoint, sample.py
@pytest.fixture(scope="module")
def ancestral_run(checkpoint, tmp_path_factory) -> Path:
    """An uninterrupted one-process EulerAncestral run (REG paper, batches of 4)."""
    out = tmp_path_factory.mktemp("ancestral") / "out"
    sample_main(toy_args(checkpoint, out, *ANCESTRAL))
    return out


def test_dpm_solver_karras_run_writes_samples_and_records_the_sampler(checkpoint, tmp_path):
    """DPM-Solver++ (Karras sigmas, 8 steps) with REG paper: 30 finite 2-D samples, class-balanced labels; meta.json
    and run.json record the sampler and its options; the samples are ``generate``'s with the same sampler, options,
    labels and seed (the flags reach the scheduler)."""
    from lightning_reg.sources import load_denoiser

    out = tmp_path / "dpm"
    sample_main(toy_args(checkpoint, out, *DPM))
    samples, labels = load(out)
    assert samples.shape == (30, 2) and samples.dtype == np.float32 and np.isfinite(samples).all()
    assert labels.tolist() == balanced_labels(30, 2).tolist()
    kwargs = {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}
    for record in (json.loads((out / "meta.json").read_text())["config"], json.loads((out / "run.json").read_text())):
        assert record["sampler"] == "diffusers:DPMSolverMultistepScheduler"
        assert record["sampler_kwargs"] == kwargs and record["steps"] == 8
    denoiser = load_denoiser(checkpoint, ema=True)
    direct = generate(denoiser, make_guidance("cfg", scale=1.0, reg="paper"), labels[:10], np.arange(10),
                      sampler="diffusers:DPMSolverMultistepScheduler", sampler_kwargs=kwargs, steps=8, seed=5,
                      batch_size=4)
    np.testing.assert_array_equal(samples[:10], direct.numpy())  # shard 0, in the same batches of 4


def test_ancestral_run_interrupted_then_resumed_equals_uninterrupted(ancestral_run, checkpoint, tmp_path, capsys):
    """EulerAncestral with ``--max_shards 1``, then the same command again: samples.npz byte for byte the
    uninterrupted run's (the resumed shards draw their step noise from their own samples' generators)."""
    out = tmp_path / "resumed"
    sample_main(toy_args(checkpoint, out, *ANCESTRAL, "--max_shards", "1"))
    assert "run the same command again to resume" in capsys.readouterr().out
    assert not (out / "samples.npz").exists() and (out / "shard_00000.npz").is_file()
    sample_main(toy_args(checkpoint, out, *ANCESTRAL))
    assert json.loads((out / "meta.json").read_text())["new_shards"] == 2
    assert sha256(out / "samples.npz") == sha256(ancestral_run / "samples.npz")


def test_ancestral_samples_do_not_depend_on_the_batch_size(ancestral_run, checkpoint, tmp_path):
    """Batches of 2 and of 5 (and the reference run's 4) give the same samples up to float32 rounding: each
    sample's initial and step noise come from its own generator. Not the same bytes: the backbone's matrix products
    round differently with the number of rows (the built-in ``ddpm`` differs as much; measured: at most 7e-5, on
    chains that read x0 at t = 999, where sigma / alpha = 157 amplifies the rounding of eps); a different noise would
    move the samples by O(1). At one batch size the bytes are a sample's own whatever its batch partners (below)."""
    small, large = tmp_path / "b2", tmp_path / "b5"
    sample_main(toy_args(checkpoint, small, *ANCESTRAL, "--batch_size", "2"))
    sample_main(toy_args(checkpoint, large, *ANCESTRAL, "--batch_size", "5"))
    reference = load(ancestral_run)[0]
    for folder in (small, large):
        np.testing.assert_allclose(load(folder)[0], reference, rtol=1e-5, atol=5e-4)
    # the step noise matters: the deterministic Euler scheduler gives other samples from the same initial noise
    euler = tmp_path / "euler"
    sample_main(toy_args(checkpoint, euler, "--sampler", "diffusers:EulerDiscreteScheduler"))
    assert np.abs(load(euler)[0] - reference).max() > 0.1


def test_ancestral_samples_at_one_batch_size_do_not_depend_on_their_partners(checkpoint):
    """Samples 0-3 in one batch of 4, and samples 2, 9, 0, 13 in another: samples 0 and 2 are bit-identical (their
    step noise is drawn from their own generators, whatever rows share the batch)."""
    from lightning_reg.sources import load_denoiser

    denoiser, labels = load_denoiser(checkpoint, ema=True), balanced_labels(30, 2)
    guidance = make_guidance("cfg", scale=1.0, reg="paper")

    def run(indices):
        return generate(denoiser, guidance, labels[indices], indices, sampler=ANCESTRAL[1], steps=6, seed=5,
                        batch_size=4)

    first, mixed = run(torch.arange(4)), run(torch.tensor([2, 9, 0, 13]))
    assert torch.equal(first[0], mixed[2]) and torch.equal(first[2], mixed[0])


@pytest.mark.parametrize("args, message", [
    (["--sampler", "diffusers:EulerDiscreetScheduler"],
     r"--sampler diffusers:EulerDiscreetScheduler: not a diffusers scheduler \(did you mean "
     r"'EulerDiscreteScheduler'\?\)"),
    (["--sampler", "diffusers:FlowMatchEulerDiscreteScheduler"],
     r"FlowMatchEulerDiscreteScheduler is a scheduler for flow models; the model's schedule is vp"),
    ([*DPM, "--sampler_kwargs", "{use_karras_sigmaz: true}"],
     r"DPMSolverMultistepScheduler takes no option 'use_karras_sigmaz' \(did you mean 'use_karras_sigmas'\?\)"),
    ([*DPM, "--sampler_kwargs", "{beta_schedule: linear}"],
     r"--sampler_kwargs: beta_schedule is the model's \(read from its noise schedule\); remove it"),
])
def test_bad_scheduler_flags_are_one_line_and_write_nothing(checkpoint, tmp_path, refused, args, message):
    """A misspelt scheduler (its near name given), a scheduler of another family than the model's VP schedule, a
    misspelt option (its near name given), an option the model's schedule decides: one ``error:`` line, exit 2,
    no output folder."""
    out = tmp_path / "out"
    refused(lambda: sample_main(toy_args(checkpoint, out, *args)), message, out)


@pytest.mark.slow
@pytest.mark.timeout(LIMIT_S + 60)
def test_two_ddp_processes_equal_one(ancestral_run, checkpoint, tmp_path):
    """EulerAncestral with REG paper on two CPU processes (Fabric DDP, gloo): samples.npz byte for byte the one-
    process run's (rank r takes shards r, r + 2, ...; every sample's noise is its own)."""
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), *toy_args(checkpoint, out, *ANCESTRAL),
                           "--trainer.devices", "2", "--trainer.accelerator", "cpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=LIMIT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "meta.json").read_text())["world_size"] == 2
    assert sha256(out / "samples.npz") == sha256(ancestral_run / "samples.npz")


# ------------------------------------------------------------------------------- DiT, public layout (learned sigma)
@pytest.fixture(scope="module")
def dit() -> Denoiser:
    """The public-layout DiT fixture (depth 2, width 64, 8x8x4 latents, 10 classes, learned sigma) on DDPM's
    linear betas with DiT's ``even`` respacing."""
    from lightning_reg.models.dit import DiT

    fixture = torch.load(FIXTURES / "dit_official_tiny.pt", weights_only=True)
    net = DiT(**fixture["config"])
    net.load_state_dict(fixture["state_dict"], strict=True)
    return Denoiser(net.eval(), VPSchedule(), Prediction("eps"))


def dit_guidance(reg: str):
    """The DiT authors' CFG: w2 = 4 on the first three latent channels."""
    return make_guidance("cfg", scale=4.0, convention="w2", reg=reg, guidance_channels=[0, 1, 2])


DIT_LABELS, DIT_INDICES = torch.tensor([1, 4, 7]), [0, 1, 2]


def test_dit_dpm_solver_with_reg(dit):
    """DPM-Solver++ (5 steps) over the guided DiT: finite latents of the right shape, and REG paper changes them."""
    runs = {reg: generate(dit, dit_guidance(reg), DIT_LABELS, DIT_INDICES,
                          sampler="diffusers:DPMSolverMultistepScheduler", steps=5, seed=0, batch_size=3)
            for reg in ("none", "paper")}
    for samples in runs.values():
        assert samples.shape == (3, 4, 8, 8) and torch.isfinite(samples).all()
    assert (runs["paper"] - runs["none"]).abs().max() > 1e-3


@pytest.mark.parametrize("reg", ["none", "paper"])
def test_dit_diffusers_ddpm_with_learned_range_equals_the_builtin_ddpm(dit, reg):
    """diffusers' DDPMScheduler with ``variance_type: learned_range`` (improved DDPM eq. 15 on DiT's variance
    channels) is our ``ddpm`` with DiT's learned variance, on the same model, seeds and steps.

    Same timesteps: DiT/ADM ``even`` respacing is ``torch.linspace(999, 0, n).round()``, diffusers' ``linspace``
    spacing ``np.linspace(0, 999, n).round()[::-1]``; they agree for 2 <= n <= 29 (checked) but not for n = 1
    (diffusers' one step is at t = 0), so 5 steps, checked below. Same noise: both draw each step's noise from
    the per-sample generators, in the same order. The chain's latents reach a few hundred (a random tiny net, x0
    read at t = 999); the two differ only by float32 rounding (measured: 7e-7 of the largest value), so the bound
    is 1e-5 of the largest value; the fixed-variance DDPMScheduler is 1e-3 of it away."""
    import diffusers

    steps = 5
    reference = diffusers.DDPMScheduler(timestep_spacing="linspace")
    reference.set_timesteps(steps)
    assert torch.equal(reference.timesteps.double(), torch.linspace(999, 0, steps, dtype=torch.float64).round())
    assert torch.equal(reference.timesteps.double(), VPSchedule().sampling_times(steps)[:-1])

    def run(sampler, **kwargs):
        return generate(dit, dit_guidance(reg), DIT_LABELS, DIT_INDICES, sampler=sampler, steps=steps, seed=0,
                        batch_size=3, sampler_kwargs=kwargs)

    builtin = run("ddpm")
    learned = run("diffusers:DDPMScheduler", variance_type="learned_range")
    scale = float(builtin.abs().max())
    assert torch.isfinite(learned).all() and learned.shape == (3, 4, 8, 8)
    assert float((learned - builtin).abs().max()) < 1e-5 * scale
    fixed = run("diffusers:DDPMScheduler")  # fixed_small: the posterior std, not DiT's
    assert float((fixed - builtin).abs().max()) > 1e-3 * scale


# ------------------------------------------------------------------------------------------------- EDM2 fixtures
@pytest.fixture(scope="module")
def edm2():
    """The EDM2 main network and, as CFG's reference, the unconditional one (the fixtures' 8x8x4 latents)."""
    from lightning_reg.models.edm2 import EDM2Denoiser, load_edm2

    main, uncond = (load_edm2(FIXTURES / f"edm2_official_tiny_{name}.pkl")[0] for name in ("main", "uncond"))
    return EDM2Denoiser(main), EDM2Denoiser(uncond)


EDM2_LABELS, EDM2_INDICES, EDM2_STEPS = torch.tensor([7, 2, 9]), [0, 1, 2], 4


def edm2_guidance(reference, reg: str):
    return make_guidance("cfg", scale=2.0, convention="w2", reg=reg, reference=reference)


@pytest.mark.parametrize("scheduler", ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"])
def test_edm2_schedulers_with_reg(edm2, scheduler):
    """EDMEuler and EDM DPM-Solver++ over the guided EDM2 pair: finite latents of the right shape; REG paper and
    REG vjp each change the result, and differ from each other."""
    model, reference = edm2
    runs = {reg: generate(model, edm2_guidance(reference, reg), EDM2_LABELS, EDM2_INDICES,
                          sampler=f"diffusers:{scheduler}", steps=EDM2_STEPS, seed=3, batch_size=3)
            for reg in ("none", "paper", "vjp")}
    for samples in runs.values():
        assert samples.shape == (3, 4, 8, 8) and torch.isfinite(samples).all()
    for a, b in (("paper", "none"), ("vjp", "none"), ("vjp", "paper")):
        assert (runs[a] - runs[b]).abs().max() > 1e-2, (a, b)


def test_edm2_euler_scheduler_equals_a_hand_euler_loop(edm2):
    """EDMEuler (no churn) through the adapter is Euler on ``dx/dsigma = (x - D(x, sigma)) / sigma`` over the
    scheduler's own sigmas (built here from the EDM2 schedule's values, its last sigma 0), from
    ``noise * init_noise_sigma`` (diffusers' ``sqrt(sigma_max^2 + 1)``, as its pipelines start), REG off.
    float32 rounding apart (measured: 3e-6 on values up to 2.6)."""
    import diffusers

    model, reference = edm2
    guidance = edm2_guidance(reference, "none")
    schedule = model.schedule
    scheduler = diffusers.EDMEulerScheduler(sigma_min=schedule.sigma_min, sigma_max=schedule.sigma_max,
                                            rho=schedule.rho, sigma_data=schedule.sigma_data)
    scheduler.set_timesteps(EDM2_STEPS)
    sigmas = scheduler.sigmas.tolist()
    assert len(sigmas) == EDM2_STEPS + 1 and sigmas[-1] == 0 and sigmas[0] == pytest.approx(schedule.sigma_max)

    denoiser = GuidedDenoiser(model, guidance, EDM2_LABELS)
    x = PerSampleNoise(3, EDM2_INDICES).draw(model.data_shape) * float(scheduler.init_noise_sigma)
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            x = x + (sigma_next - sigma) * (x - denoiser(x, torch.tensor(sigma, dtype=torch.float64))) / sigma
    got = generate(model, guidance, EDM2_LABELS, EDM2_INDICES, sampler="diffusers:EDMEulerScheduler",
                   steps=EDM2_STEPS, seed=3, batch_size=3)
    assert torch.isfinite(x).all()
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-4)
