"""Guidance (docs/theory.md §2-3): rules (``rule``, ``methods``), branches (``branches``), REG (``reg``), composed
in ``guided``."""

from lightning_reg.guidance.branches import Branches
from lightning_reg.guidance.guided import Guidance, GuidedDenoiser, make_guidance
from lightning_reg.guidance.methods import (APG, CFG, FDG, GUIDANCE, TCFG, APGMix, Autoguidance, CFGPlusPlus,
                                            CFGZeroStar, Conditional, CosineCFG, IntervalCFG, LinearCFG, MamboG)
from lightning_reg.guidance.reg import REG_MODES, Rectifier, rectified_guidance
from lightning_reg.guidance.rule import GuidanceRule
from lightning_reg.guidance.step import ChainState, GuidanceStep

__all__ = ["APG", "APGMix", "Autoguidance", "Branches", "CFG", "CFGPlusPlus", "CFGZeroStar", "ChainState",
           "Conditional", "CosineCFG", "FDG", "GUIDANCE", "Guidance", "GuidanceRule", "GuidanceStep", "GuidedDenoiser",
           "IntervalCFG", "LinearCFG", "MamboG", "REG_MODES", "Rectifier", "TCFG", "make_guidance",
           "rectified_guidance"]
