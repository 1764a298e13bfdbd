"""Sampling at scale: one deterministic sampling path (``engine``) and its resumable output folder (``writer``)."""

from lightning_reg.sampling.engine import (PerSampleNoise, balanced_labels, gather_by_index, generate, rank_indices,
                                           sample_seed, setting_name)

__all__ = ["PerSampleNoise", "balanced_labels", "gather_by_index", "generate", "rank_indices", "sample_seed",
           "setting_name"]
