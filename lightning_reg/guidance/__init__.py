"""Guidance methods and REG (docs/theory.md §2-3)."""

from lightning_reg.guidance.base import ChainState, Guidance, GuidedDenoiser, GuidanceStep
from lightning_reg.guidance.methods import (APG, CFG, GUIDANCE, Autoguidance, CFGZeroStar, Conditional, CosineCFG,
                                            IntervalCFG, LinearCFG, make_guidance)
from lightning_reg.guidance.reg import REG_MODES, rectified_guidance

__all__ = ["ChainState", "Guidance", "GuidedDenoiser", "GuidanceStep", "APG", "CFG", "CFGZeroStar", "GUIDANCE",
           "Autoguidance", "Conditional", "CosineCFG", "IntervalCFG", "LinearCFG", "make_guidance", "REG_MODES",
           "rectified_guidance"]
