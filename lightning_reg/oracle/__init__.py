"""The optimal-guidance oracle (docs/theory.md §1, §4): exact toy denoisers and Monte Carlo ``grad log E_t``."""

from lightning_reg.oracle.exact import ExactMixtureDenoiser, MixturePosteriorMean
from lightning_reg.oracle.expected_reward import (METHODS, density_ratio_log_reward, grad_log_expected_reward,
                                                  guidance_gradients, no_foresight_estimates, remaining_times,
                                                  sample_guided_target)

__all__ = ["ExactMixtureDenoiser", "MixturePosteriorMean", "METHODS", "density_ratio_log_reward",
           "grad_log_expected_reward", "guidance_gradients", "no_foresight_estimates", "remaining_times",
           "sample_guided_target"]
