"""A small class-conditional Diffusion Transformer.

Peebles & Xie, "Scalable Diffusion Models with Transformers" (ICCV 2023).
Backbone protocol: ``forward(x, t, y) -> tensor shaped like x``; label id
``num_classes`` is the null label used for classifier-free guidance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from lightning_reg.models.embeddings import sinusoidal_embedding


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: per-sample shift/scale broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head self-attention using ``scaled_dot_product_attention``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (paper Sec. 3.2)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))


class DiT(nn.Module):
    """Class-conditional DiT on (B, C, H, W) images (paper Sec. 3, Fig. 3).

    ``t`` is a (B,) float tensor of times in any real range; ``y`` is (B,) long
    labels in ``[0, num_classes]`` where ``num_classes`` is the null label.
    """

    def __init__(
        self,
        num_classes: int,
        image_size: int = 32,
        channels: int = 3,
        patch_size: int = 4,
        width: int = 256,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        out_channels: int | None = None,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be divisible by patch_size={patch_size}")
        if width % heads:
            raise ValueError(f"width={width} must be divisible by heads={heads}")
        self.num_classes = num_classes
        self.data_shape = (channels, image_size, image_size)
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.out_channels = out_channels or channels

        self.patch_embed = nn.Linear(channels * patch_size**2, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2, width))
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.label_embed = nn.Embedding(num_classes + 1, width)  # last row = null label (CFG)
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.final = nn.Linear(width, self.out_channels * patch_size**2)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.label_embed.weight, std=0.02)
        for m in self.time_mlp[::2]:
            nn.init.normal_(m.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the output layer at zero (Sec. 3.2)
        for layer in [b.ada[-1] for b in self.blocks] + [self.final_ada[-1], self.final]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        h = rearrange(x, "b c (gh p1) (gw p2) -> b (gh gw) (p1 p2 c)", p1=p, p2=p)
        h = self.patch_embed(h) + self.pos_embed
        c = self.time_mlp(sinusoidal_embedding(t, h.shape[-1]).to(h.dtype)) + self.label_embed(y)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        h = self.final(modulate(self.final_norm(h), shift, scale))
        return rearrange(h, "b (gh gw) (p1 p2 c) -> b c (gh p1) (gw p2)", gh=self.grid, p1=p, p2=p)
