"""Sinusoidal embeddings shared by the backbones (Vaswani et al. 2017, §3.5)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sinusoidal_embedding(v: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """``[cos(v f_i), sin(v f_i)]`` with ``f_i = max_period^(-i / (dim/2))``.

    ``v`` of shape (B,) gives (B, dim); (B, k) gives (B, k * dim), one embedding per column.
    """
    half = dim // 2
    dtype = torch.promote_types(v.dtype, torch.float32)  # float64 inputs stay float64
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=v.device, dtype=dtype) / half)
    angles = v.to(dtype).unsqueeze(-1) * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1).flatten(start_dim=1)
