"""Guidance methods and REG (REG_NOTES §2-3)."""

from lightning_reg.guidance.base import Guidance, GuidedDenoiser
from lightning_reg.guidance.methods import (CFG, GUIDANCE, Autoguidance, Conditional, CosineCFG, IntervalCFG,
                                            LinearCFG, make_guidance)
from lightning_reg.guidance.reg import REG_MODES, rectified_guidance

__all__ = ["Guidance", "GuidedDenoiser", "CFG", "GUIDANCE", "Autoguidance", "Conditional", "CosineCFG",
           "IntervalCFG", "LinearCFG", "make_guidance", "REG_MODES", "rectified_guidance"]
