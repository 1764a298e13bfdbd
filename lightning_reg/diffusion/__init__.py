"""The diffusion core: forward processes, prediction targets, the denoiser and samplers."""

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.samplers import SAMPLERS, get_sampler
from lightning_reg.diffusion.schedules import SCHEDULES, EDMSchedule, FlowSchedule, NoiseSchedule, VPSchedule, make_schedule

__all__ = ["Denoiser", "Prediction", "SAMPLERS", "get_sampler", "SCHEDULES", "EDMSchedule", "FlowSchedule",
           "NoiseSchedule", "VPSchedule", "make_schedule"]
