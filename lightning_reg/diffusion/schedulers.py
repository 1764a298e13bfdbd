"""diffusers' schedulers as samplers: ``--sampler diffusers:<SchedulerClass>`` over the same guided denoiser.

The scheduler is built from the model's own schedule, so the user never restates it: a ``vp`` schedule's betas,
``timestep_spacing`` and ``steps_offset`` (DiT's ``even`` respacing is diffusers' ``linspace``), an ``edm``
schedule's sigmas and ``sigma_data``, a ``flow`` schedule's time shift (FlowMatch schedulers' ``shift``, or a
multistep solver on flow sigmas with ``flow_shift``; SD3's 3.0 comes with its pipeline folder). Options
(``--sampler_kwargs``) are the scheduler's own (``use_karras_sigmas``, ``algorithm_type``, ``solver_order`` ...),
and a ``shift`` given there replaces the schedule's. At each step the loop does what a diffusers pipeline does:
the guided denoiser's ``x0`` (REG included) is converted to the scheduler's ``model_output`` type
(``Prediction.from_x0``) and handed to ``scheduler.step``. Stochastic schedulers draw their noise from the
per-sample generators of ``noise_sampler`` (``PerSampleNoise.generators``), so results do not depend on the batch or
the processes.
"""

from __future__ import annotations

import copy
import difflib
import inspect
from typing import Mapping

import torch
from torch import Tensor

from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import EDMSchedule, FlowSchedule, NoiseSchedule, VPSchedule
from lightning_reg.errors import ConfigError, one_line

PREFIX = "diffusers:"

# what the model's schedule decides: never a sampler option
MODEL_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
              "rescale_betas_zero_snr", "snr_shift_scale", "timestep_type", "sigma_data", "use_flow_sigmas")
# what a model of each kind can hand a scheduler, as diffusers reads it (prediction_type)
FLOW_OUTPUTS = ("flow_prediction", "epsilon", "sample")
OUTPUT_TYPES = {"vp": ("epsilon", "v_prediction", "sample"), "edm": ("epsilon",), "flow": FLOW_OUTPUTS,
                "flow_sigmas": FLOW_OUTPUTS}
STEP_ARGUMENTS = ("self", "model_output", "timestep", "sample", "generator", "return_dict")  # the loop's own
DIFFUSERS_BETAS = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
# diffusers' prediction_type <-> ours (what the scheduler's model_output is)
OUTPUT_KINDS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "velocity"}
NOT_SAMPLERS = ("Inverse", "RePaint")  # inversion (data to noise) and inpainting schedulers


def scheduler_names() -> list[str]:
    """The scheduler classes diffusers exports (their names, nothing imported)."""
    import diffusers

    return sorted(n for n in dir(diffusers) if n.endswith("Scheduler"))


def scheduler_class(name: str) -> type:
    """diffusers' scheduler class ``name`` (only a ``SchedulerMixin`` diffusers itself exports)."""
    import diffusers

    names = scheduler_names()
    if name not in names:
        near = difflib.get_close_matches(name, names, n=1)
        raise ConfigError(f"--sampler {PREFIX}{name}: not a diffusers scheduler"
                          f"{f' (did you mean {near[0]!r}?)' if near else ''}; e.g. "
                          f"{PREFIX}DPMSolverMultistepScheduler, {PREFIX}EulerDiscreteScheduler, "
                          f"{PREFIX}UniPCMultistepScheduler")
    cls = getattr(diffusers, name)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ConfigError(f"--sampler {PREFIX}{name} needs a package diffusers leaves optional (torchsde for the SDE "
                          "solvers), not installed here; choose another scheduler")
    if any(word in name for word in NOT_SAMPLERS):
        raise ConfigError(f"--sampler {PREFIX}{name}: an inversion or inpainting scheduler, not a sampler from noise")
    return cls


def options_of(cls: type) -> list[str]:
    """The options a scheduler class takes (its ``__init__`` parameters)."""
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def family(cls: type, schedule: NoiseSchedule) -> str:
    """How ``cls`` samples ``schedule``: ``vp`` (betas), ``edm`` (EDM sigmas), ``flow`` (FlowMatch sigmas) or
    ``flow_sigmas`` (a VP multistep solver switched to flow sigmas); refused when it cannot."""
    options, name = options_of(cls), cls.__name__
    own = ("flow" if name.startswith("FlowMatch") else "edm" if name.startswith("EDM")
           else "vp" if "beta_schedule" in options and hasattr(cls, "step") else None)
    if own is None:
        raise ConfigError(f"--sampler {PREFIX}{name} cannot be built from a model's noise schedule (it takes no "
                          "betas, EDM sigmas or flow sigmas)")
    if isinstance(schedule, FlowSchedule) and own == "vp" and "use_flow_sigmas" in options:
        return "flow_sigmas"
    wanted = {VPSchedule: "vp", EDMSchedule: "edm", FlowSchedule: "flow"}.get(type(schedule))
    if own != wanted:
        hint = {"vp": "e.g. DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler",
                "edm": "EDMEulerScheduler or EDMDPMSolverMultistepScheduler",
                "flow": "FlowMatchEulerDiscreteScheduler, or DPMSolverMultistepScheduler / UniPCMultistepScheduler "
                        "(on flow sigmas)"}.get(wanted, "a scheduler of the same family")
        raise ConfigError(f"--sampler {PREFIX}{name} is a scheduler for {own} models; the model's "
                          f"schedule is {schedule.name}: choose {hint}")
    return own


def step_options_of(cls: type) -> list[str]:
    """The options of a scheduler's ``step`` (DDIM's ``eta``, Euler's ``s_churn`` ...), handed to every step."""
    step = getattr(cls, "step", None)  # a scheduler without one is refused by ``family``
    return [] if step is None else [p for p in inspect.signature(step).parameters if p not in STEP_ARGUMENTS]


def check_options(cls: type, options: Mapping) -> None:
    """Refuse options ``cls`` does not take (naming the near one) and those the model's schedule decides."""
    accepted = options_of(cls) + step_options_of(cls)
    for key in options:
        if key in MODEL_KEYS:
            raise ConfigError(f"--sampler_kwargs: {key} is the model's (read from its noise schedule); remove it")
        if key not in accepted:
            near = difflib.get_close_matches(str(key), accepted, n=1)
            raise ConfigError(f"--sampler_kwargs: {cls.__name__} takes no option {key!r}"
                              f"{f' (did you mean {near[0]!r}?)' if near else ''}; it takes {accepted}")


def model_config(cls: type, schedule: NoiseSchedule, kind: str, output: str) -> dict:
    """The scheduler options that restate the model's ``schedule`` (those ``cls`` takes), ``output`` being
    the prediction type handed to it."""
    if kind == "vp":
        config = {"num_train_timesteps": schedule.num_timesteps, "beta_schedule": DIFFUSERS_BETAS[schedule.betas],
                  "beta_start": schedule.beta_start, "beta_end": schedule.beta_end, "prediction_type": output,
                  "timestep_spacing": "linspace" if schedule.spacing == "even" else schedule.spacing,
                  "steps_offset": schedule.steps_offset, "set_alpha_to_one": schedule.final_alpha_one,
                  "clip_sample": False}  # the built-in samplers do not clip either
    elif kind == "edm":
        config = {"sigma_min": schedule.sigma_min, "sigma_max": schedule.sigma_max, "rho": schedule.rho,
                  "sigma_data": schedule.sigma_data, "prediction_type": output}
    else:  # flow: t = sigma, the backbone's time 1000 t, the schedule's time shift (FlowMatch: shift, else flow_shift)
        config = {"num_train_timesteps": 1000, "use_flow_sigmas": True, "prediction_type": output,
                  "shift": schedule.shift, "flow_shift": schedule.shift}
    return {k: v for k, v in config.items() if k in options_of(cls)}


def output_type(kind: str, prediction: str, options: Mapping) -> str:
    """The ``prediction_type`` handed to the scheduler: an option, else the model's own where a VP scheduler takes
    it (so the chain equals the diffusers pipeline's), else epsilon; EDM's ``epsilon`` is its preconditioned
    output ``F``, flow's the velocity."""
    if kind == "edm":
        return options.get("prediction_type", "epsilon")
    if kind in ("flow", "flow_sigmas"):
        return options.get("prediction_type", "flow_prediction")
    own = {v: k for k, v in OUTPUT_KINDS.items()}.get(prediction, "epsilon")
    return options.get("prediction_type", own)


class Scheduled:
    """A built scheduler for ``steps`` steps and how the chain talks to it: the time the denoiser takes, the
    state it sees and the ``model_output`` it hands back."""

    def __init__(self, name: str, schedule: NoiseSchedule, steps: int, options: Mapping | None = None,
                 prediction: str = "eps"):
        options = dict(options or {})
        cls = scheduler_class(name)
        check_options(cls, options)
        self.kind = family(cls, schedule)
        self.schedule, self.name = schedule, name
        self.step_options = {k: options.pop(k) for k in list(options) if k in step_options_of(cls)}
        output = output_type(self.kind, prediction, options)
        if output not in OUTPUT_TYPES[self.kind]:
            raise ConfigError(f"--sampler_kwargs: prediction_type {output!r} cannot be handed to {name} over a "
                              f"{schedule.name} model (it takes {list(OUTPUT_TYPES[self.kind])}); leave it out: the "
                              "adapter converts x0 to the scheduler's type")
        self.output = Prediction("edm" if self.kind == "edm" else OUTPUT_KINDS[output],
                                 sigma_data=getattr(schedule, "sigma_data", 0.5))
        config = {**model_config(cls, schedule, "flow" if self.kind == "flow_sigmas" else self.kind, output),
                  **options}
        if config.get("variance_type") == "learned":
            raise ConfigError("--sampler_kwargs: variance_type learned takes a log variance; a learned-sigma model "
                              "(DiT) gives improved DDPM's interpolation: use variance_type learned_range")
        self.learns_variance = config.get("variance_type") == "learned_range"
        try:
            self.scheduler = cls(**config)
            self.scheduler.set_timesteps(steps)
            probe = copy.deepcopy(self.scheduler)  # one step on zeros: what only step() checks (prediction type)
            zeros = torch.zeros(1, 1, 2, 2)
            if hasattr(probe, "scale_model_input"):
                probe.scale_model_input(zeros, probe.timesteps[0])
            out = torch.cat([zeros, zeros], 1) if self.learns_variance else zeros
            probe.step(out, probe.timesteps[0], zeros, return_dict=False, **self.step_options)
        except (ValueError, TypeError, NotImplementedError, KeyError, AttributeError, IndexError) as err:
            raise ConfigError(f"--sampler {PREFIX}{name} with {options}: {one_line(err, 300)}") from None
        self.takes_generator = "generator" in inspect.signature(cls.step).parameters
        self.check_fits_model(steps)

    def check_fits_model(self, steps: int) -> None:
        """Refuse a scheduler that, once built, walks another chain than the model's: other betas (an option that
        rescales them), times outside the model's range, or a flow chain that stops short of the data (sigma > 0
        at its end, e.g. DEIS on flow sigmas)."""
        fault = None
        table = getattr(self.scheduler, "alphas_cumprod", None)
        if self.kind == "vp" and table is not None and not torch.allclose(
                torch.as_tensor(table, dtype=torch.float64), self.schedule.alpha_bar[1:], rtol=1e-4, atol=1e-7):
            fault = "its alphas_cumprod differ from the model's betas"
        times = [float(self.time(i, ts)) for i, ts in enumerate(self.timesteps)]
        high = self.schedule.num_timesteps - 1 if self.kind == "vp" else 1.0 if self.kind != "edm" else float("inf")
        if fault is None and not all(0 <= t <= high for t in times):
            fault = f"its times {min(times):.4g}..{max(times):.4g} leave the model's range [0, {high:g}]"
        sigmas = getattr(self.scheduler, "sigmas", None)
        if fault is None and self.kind in ("flow", "flow_sigmas") and sigmas is not None and float(sigmas[-1]) > 0:
            fault = f"it ends at sigma {float(sigmas[-1]):.3g}, not at the data (sigma 0)"
        if fault is not None:
            raise ConfigError(f"--sampler {PREFIX}{self.name} does not walk the model's chain at {steps} steps: {fault}"
                              "; choose another scheduler or remove the option that causes it")

    @property
    def timesteps(self) -> Tensor:
        return self.scheduler.timesteps

    def time(self, i: int, timestep: Tensor) -> Tensor:
        """Our schedule's time at step ``i``: a VP index (diffusers' timestep, fractional for Karras sigmas), EDM's
        or flow's sigma."""
        t = timestep if self.kind == "vp" else self.scheduler.sigmas[i]
        return torch.as_tensor(float(t), dtype=torch.float64)

    def model_input(self, x: Tensor, timestep: Tensor) -> Tensor:
        """The denoiser's ``x = a x0 + s eps`` from the scheduler's state: its ``scale_model_input`` (Euler-type
        schedulers keep ``x / a``), but EDM's, which is the preconditioned input the denoiser makes itself."""
        scale = getattr(self.scheduler, "scale_model_input", None)
        scaled = scale(x, timestep) if scale is not None else x
        return x if self.kind == "edm" else scaled

    def model_output(self, x0: Tensor, x: Tensor, t: Tensor, variance: Tensor | None) -> Tensor:
        """``x0`` as the scheduler's ``model_output`` at input ``x`` (with a learned variance where the scheduler's
        ``variance_type`` takes one: DDPM's ``learned_range``)."""
        a, s = self.schedule.alpha_sigma(t)
        out = self.output.from_x0(x0, x, float(a), float(s))
        if self.learns_variance:
            if variance is None:
                raise ConfigError("--sampler_kwargs: variance_type learned_range needs a model that learns its "
                                  "variance (learn_sigma, e.g. DiT)")
            out = torch.cat([out, variance.to(out.dtype)], dim=1)
        return out

    def step(self, out: Tensor, timestep: Tensor, x: Tensor, generators) -> Tensor:
        extra = {"generator": generators} if self.takes_generator and generators is not None else {}
        return self.scheduler.step(out, timestep, x, return_dict=False, **extra, **self.step_options)[0]


def check_scheduler(name: str, options: Mapping | None = None) -> None:
    """What can be checked without a model: the class exists and takes ``options``."""
    check_options(scheduler_class(name), dict(options or {}))

