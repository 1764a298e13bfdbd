"""Forward noising processes ``x_t = a_t * x_0 + s_t * eps`` (docs/theory.md notation).

Every schedule maps a time value ``t`` to ``(a_t, s_t)``; samplers and guidance only ever see
those two numbers, so the same code serves discrete VP (DDPM), EDM and rectified flow:

=============  =====================  ======================  ==========================
schedule       time ``t``             ``a_t``                 ``s_t``
=============  =====================  ======================  ==========================
``vp``         index 0..T-1 (-1 clean) ``sqrt(abar_t)``       ``sqrt(1 - abar_t)``
``edm``        noise level sigma       1                       sigma
``flow``       t in [0, 1]             ``1 - t``               t
=============  =====================  ======================  ==========================
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from lightning_reg.errors import ConfigError, check_int, check_number


def _as_tensor(t: Tensor | float) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


class NoiseSchedule(ABC):
    """A forward process over a time variable; ``sampling_times`` runs from noise to clean."""

    name: str
    prior_std: float = 1.0  # std of x at the first sampling time: x_T = prior_std * noise
    predictions: tuple[str, ...]  # prediction targets this schedule supports

    @abstractmethod
    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """``(a_t, s_t)`` as float64 tensors shaped like ``t``."""

    @abstractmethod
    def sample_training_times(self, n: int, device=None) -> Tensor:
        """Times at which training noises the data."""

    @abstractmethod
    def sampling_times(self, steps: int) -> Tensor:
        """``steps + 1`` decreasing times; the last one is clean (``s = 0``; a VP schedule stepping as SD's
        schedulers do may end at index 0 instead)."""

    @abstractmethod
    def net_time(self, t: Tensor) -> Tensor:
        """The time value the backbone is conditioned on."""

    @abstractmethod
    def progress(self, t: Tensor | float) -> float:
        """Sampling progress ``p``: 0 at the noisiest time, 1 at the clean end (docs/theory.md, notation)."""

    def check_steps(self, steps: int) -> None:
        check_int("steps", steps)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self).keys() == vars(other).keys() and all(
            torch.equal(v, vars(other)[k]) if isinstance(v, Tensor) else v == vars(other)[k]
            for k, v in vars(self).items()
        )


MAX_TIMESTEPS = 1_000_000  # a DDPM chain of more steps than this is a mistake (or a file's attempt at memory)

# VPSchedule sampling times: DiT/ADM respacing, then diffusers' timestep_spacing values
SPACINGS = ("even", "leading", "trailing", "linspace")


class VPSchedule(NoiseSchedule):
    """Discrete variance-preserving (DDPM) process with linear, cosine or scaled-linear betas over ``T`` steps.

    ``scaled_linear`` is latent diffusion's (Rombach et al. 2022; Stable Diffusion 1.x/2.x):
    ``beta_t = linspace(sqrt(beta_start), sqrt(beta_end), T)^2``.

    Sampling times (``spacing``): ``even`` is DiT/ADM respacing; ``leading``, ``trailing`` and ``linspace``
    are diffusers' ``timestep_spacing`` with its ``steps_offset``, stepped as diffusers' DDIM steps, from
    ``t`` to ``t - T // steps``, the last step to the clean end (``final_alpha_one``, diffusers'
    ``set_alpha_to_one``) or else to index 0 (``abar_0``, what SD's schedulers do).
    """

    name = "vp"
    predictions = ("eps", "x0", "v")

    def __init__(self, num_timesteps: int = 1000, betas: str = "linear",
                 beta_start: float = 1e-4, beta_end: float = 0.02, spacing: str = "even",
                 steps_offset: int = 0, final_alpha_one: bool = True):
        if not isinstance(num_timesteps, int) or not 0 < num_timesteps <= MAX_TIMESTEPS:
            raise ConfigError(f"num_timesteps must be a positive integer of at most {MAX_TIMESTEPS:,}, got "
                              f"{num_timesteps!r}")
        if betas in ("linear", "scaled_linear"):
            if not 0 < beta_start <= beta_end < 1:
                raise ConfigError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
            beta = (torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64, device="cpu")
                    if betas == "linear" else
                    torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64,
                                   device="cpu") ** 2)
        elif betas == "cosine":  # Nichol & Dhariwal (2021), eq. 17
            f = lambda u: math.cos((u / num_timesteps + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            beta = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(num_timesteps)],
                                dtype=torch.float64, device="cpu")
        else:
            raise ConfigError(f"unknown betas schedule {betas!r}; choose 'linear', 'scaled_linear' or 'cosine'")
        if spacing not in SPACINGS:
            raise ConfigError(f"unknown spacing {spacing!r}; choose one of {list(SPACINGS)}")
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
            raise ConfigError(f"steps_offset must be a non-negative integer, got {steps_offset!r}")
        self.num_timesteps, self.betas = num_timesteps, betas
        self.beta_start, self.beta_end = beta_start, beta_end
        self.spacing, self.steps_offset, self.final_alpha_one = spacing, steps_offset, bool(final_alpha_one)
        # index 0 of the padded table is the clean time t = -1 (abar = 1); the table is host data, on the CPU even
        # when a network is built on the meta device around it (io.files.build_within)
        self.alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64, device="cpu"), torch.cumprod(1 - beta, 0)])

    def alpha_sigma(self, t):
        """The table at an index; between two indices (a Karras-sigma scheduler's fractional timesteps) ``log(s/a)``
        linear in ``t``, the inverse of how diffusers maps sigmas to timesteps (``_sigma_to_t``)."""
        t = _as_tensor(t)
        index = t.round()
        abar = self.alpha_bar[index.long() + 1]
        between = ((t - index).abs() > 1e-6) & (t > 0) & (t < self.num_timesteps - 1)
        if between.any():
            table = self.alpha_bar[1:]
            log_sigma = 0.5 * ((1 - table) / table).log()
            lo = t.floor().clamp(0, self.num_timesteps - 2).long()
            w = t - lo
            abar = torch.where(between, torch.sigmoid(-2 * ((1 - w) * log_sigma[lo] + w * log_sigma[lo + 1])), abar)
        return abar.sqrt(), (1 - abar).sqrt()

    def sample_training_times(self, n, device=None):
        return torch.randint(0, self.num_timesteps, (n,), device=device).double()

    def sampling_times(self, steps):
        """``even``: DiT/ADM respacing, ``steps`` evenly strided indices of ``T-1 .. 0``, then clean (-1).
        diffusers' spacings: its DDIM scheduler's ``timesteps``, then their last minus ``T // steps`` (clean
        when negative, or index 0 without ``final_alpha_one``)."""
        self.check_steps(steps)
        T = self.num_timesteps
        if steps > T:
            raise ConfigError(f"steps={steps} exceeds the schedule's num_timesteps={T}")
        if self.spacing == "even":
            times = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round()
            return torch.cat([times, torch.tensor([-1.0], dtype=torch.float64)])
        stride = T // steps
        if self.spacing == "leading":
            times = torch.arange(steps - 1, -1, -1, dtype=torch.float64) * stride + self.steps_offset
        elif self.spacing == "trailing":
            times = torch.arange(T, 0, -T / steps, dtype=torch.float64).round() - 1
        else:
            times = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().flip(0)
        last = float(times[-1]) - stride
        times = torch.cat([times, torch.tensor([last if last >= 0 else -1.0 if self.final_alpha_one else 0.0],
                                               dtype=torch.float64)])
        if times[0] > T - 1 or (len(times) > 2 and not torch.all(times[:-2] - times[1:-1] == stride)):
            raise ConfigError(f"spacing {self.spacing!r} with steps={steps} (steps_offset={self.steps_offset}) "
                              f"gives times that are not {stride} apart or beyond T-1={T - 1}, which diffusers' "
                              f"DDIM steps assume; choose steps dividing {T} or spacing 'leading'")
        return times

    def net_time(self, t):
        return t

    def progress(self, t):
        return 1.0 - float(t) / self.num_timesteps


class EDMSchedule(NoiseSchedule):
    """EDM (Karras et al. 2022): ``x = x_0 + sigma * eps``; Karras sigmas (eq. 5) for sampling."""

    name = "edm"
    predictions = ("edm", "x0", "eps")

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5):
        if not 0 < sigma_min < sigma_max:
            raise ConfigError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if sigma_data <= 0 or rho <= 0 or p_std <= 0:
            raise ConfigError("sigma_data, rho and p_std must be positive")
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data
        self.prior_std = sigma_max

    def alpha_sigma(self, t):
        sigma = _as_tensor(t)
        return torch.ones_like(sigma), sigma

    def sample_training_times(self, n, device=None):
        return (torch.randn(n, device=device, dtype=torch.float64) * self.p_std + self.p_mean).exp()

    def _ramp(self, sigma):
        """Position of sigma on the Karras ramp in ``sigma^(1/rho)``: 0 at sigma_max, 1 at sigma_min."""
        hi, lo = self.sigma_max ** (1 / self.rho), self.sigma_min ** (1 / self.rho)
        return (hi - sigma ** (1 / self.rho)) / (hi - lo)

    def sampling_times(self, steps):
        self.check_steps(steps)
        hi, lo = self.sigma_max ** (1 / self.rho), self.sigma_min ** (1 / self.rho)
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
        sigmas = (hi + ramp * (lo - hi)) ** self.rho
        return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])

    def net_time(self, t):
        return 250.0 * t.log()  # EDM's c_noise = ln(sigma)/4, scaled x1000 like DDPM indices

    def progress(self, t):
        return min(max(self._ramp(float(t)), 0.0), 1.0)


class FlowSchedule(NoiseSchedule):
    """Rectified flow / flow matching: ``x_t = (1 - t) x_0 + t eps``, Euler steps on a uniform grid ``u`` mapped to
    ``t = shift u / (1 + (shift - 1) u)`` (SD3's time shift; ``shift = 1``: the uniform grid itself). ``shift`` is a
    sampling choice, also what the adapter builds FlowMatch schedulers with (``diffusion/schedulers.py``); training
    times are not shifted."""

    name = "flow"
    predictions = ("velocity", "x0")

    def __init__(self, shift: float = 1.0):
        self.shift = check_number("shift", shift)
        if self.shift <= 0:
            raise ConfigError(f"shift must be positive, got {shift}")

    def alpha_sigma(self, t):
        t = _as_tensor(t)
        return 1 - t, t

    def sample_training_times(self, n, device=None):
        return torch.rand(n, device=device, dtype=torch.float64)

    def sampling_times(self, steps):
        self.check_steps(steps)
        u = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        return self.shift * u / (1 + (self.shift - 1) * u)

    def net_time(self, t):
        return 1000.0 * t

    def progress(self, t):
        return 1.0 - float(t)


SCHEDULES = {"vp": VPSchedule, "edm": EDMSchedule, "flow": FlowSchedule}


def make_schedule(name: str, **kwargs) -> NoiseSchedule:
    """Build a schedule by name (``vp``, ``edm``, ``flow``)."""
    if name not in SCHEDULES:
        raise ConfigError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](**kwargs)
