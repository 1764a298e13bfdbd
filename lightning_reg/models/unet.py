"""A compact class-conditional UNet in the style of ADM.

Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis" (NeurIPS 2021), after Ho et al. 2020:
residual blocks (GroupNorm, SiLU, 3x3 convolutions) conditioned by scale-shift normalisation on the time
embedding plus the class embedding, self-attention at chosen resolutions, skip connections from each
encoder stage to the decoder. Backbone protocol: ``forward(x, t, y) -> tensor shaped like x`` (twice the
channels with ``learn_sigma``); label id ``num_classes`` is the null label used for classifier-free guidance.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from lightning_reg.errors import ConfigError
from lightning_reg.models.embeddings import sinusoidal_embedding


class ResBlock(nn.Module):
    """``x + conv(SiLU(GN(conv(SiLU(GN(x)))) * (1 + scale) + shift))``, the ADM block with scale-shift norm."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, in_channels), nn.SiLU(),
                                       nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        self.out_norm = nn.GroupNorm(groups, out_channels)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        scale, shift = rearrange(self.emb(emb), "b (two c) -> two b c 1 1", two=2)
        h = self.out_norm(self.in_layers(x)) * (1 + scale) + shift
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """``x + proj(softmax(q k^T / sqrt(d)) v)`` over the H*W positions, multi-head, on GroupNorm'd input."""

    is_cross_attention = False  # diffusers' flag of self-attention, what PAG and SEG perturb (guidance/perturbed.py)

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        qkv = rearrange(self.qkv(self.norm(x)), "b (three h d) py px -> three b h (py px) d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(*qkv)
        return x + self.proj(rearrange(out, "b h (py px) d -> b (h d) py px", py=x.shape[-2]))


class Downsample(nn.Module):
    """Halves the resolution with a strided 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Doubles the resolution: nearest-neighbour upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    """A residual block, optionally followed by self-attention (one step of the encoder or decoder)."""

    def __init__(self, block: ResBlock, attention: AttentionBlock | None):
        super().__init__()
        self.block, self.attention = block, attention

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.block(x, emb)
        return h if self.attention is None else self.attention(h)


class UNet(nn.Module):
    """Class-conditional UNet on (B, C, H, W) images.

    ``t`` is a (B,) float tensor (the DDPM index, any real range); ``y`` is (B,) long labels in
    ``[0, num_classes]`` where ``num_classes`` is the null label. Level ``i`` of ``channel_mult`` works
    at resolution ``image_size / 2**i`` with ``base_channels * channel_mult[i]`` channels and
    ``num_res_blocks`` residual blocks (the decoder has one more per level, for the extra skip);
    ``attention_resolutions`` lists the resolutions (in pixels) that get self-attention after each block,
    the middle block included. ``norm_groups`` is the GroupNorm group count (ADM: 32 at its 128+
    channels; 8 suits the small CPU widths). The output convolution starts at zero, so the untrained
    net predicts 0. The class embedding follows ADM: ``nn.Embedding``'s N(0, 1) rows added to the time embedding.
    ``learn_sigma`` doubles the output channels: the prediction, then the DDPM variance interpolation that the
    ``Denoiser``, the VLB loss and the ``ddpm`` sampler read (as for DiT).
    """

    def __init__(
        self,
        num_classes: int,
        image_size: int = 16,
        channels: int = 1,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attention_resolutions: Sequence[int] = (8,),
        num_heads: int = 4,
        dropout: float = 0.0,
        learn_sigma: bool = False,
        norm_groups: int = 8,
    ):
        super().__init__()
        channel_mult, attention_resolutions = tuple(channel_mult), tuple(attention_resolutions)
        widths = [base_channels * m for m in channel_mult]
        resolutions = [image_size // 2**i for i in range(len(channel_mult))]
        check_config(num_classes, image_size, base_channels, widths, num_res_blocks, attention_resolutions, resolutions,
                     num_heads, dropout, norm_groups)
        self.num_classes, self.base_channels = num_classes, base_channels
        self.data_shape = (channels, image_size, image_size)
        self.learn_sigma = learn_sigma  # 2 x channels out: the prediction and the DDPM variance (Denoiser splits them)
        self.out_channels = 2 * channels if learn_sigma else channels
        emb_dim = 4 * base_channels

        def stage(c_in: int, c_out: int, resolution: int) -> Stage:
            attention = AttentionBlock(c_out, num_heads, norm_groups) if resolution in attention_resolutions else None
            return Stage(ResBlock(c_in, c_out, emb_dim, norm_groups, dropout), attention)

        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim)  # last row = null label (CFG)
        self.input_conv = nn.Conv2d(channels, base_channels, 3, padding=1)

        self.down = nn.ModuleList()
        skips, c = [base_channels], base_channels  # channels of every tensor the decoder concatenates
        for level, (width, res) in enumerate(zip(widths, resolutions)):
            for _ in range(num_res_blocks):
                self.down.append(stage(c, width, res))
                c = width
                skips.append(c)
            if level < len(widths) - 1:
                self.down.append(Downsample(c))
                skips.append(c)
        self.middle = nn.ModuleList([stage(c, c, resolutions[-1]),
                                     Stage(ResBlock(c, c, emb_dim, norm_groups, dropout), None)])

        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            for _ in range(num_res_blocks + 1):
                self.up.append(stage(c + skips.pop(), widths[level], resolutions[level]))
                c = widths[level]
            if level > 0:
                self.up.append(Upsample(c))

        self.out = nn.Sequential(nn.GroupNorm(norm_groups, c), nn.SiLU(),
                                 nn.Conv2d(c, self.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @property
    def label_embedding(self) -> nn.Embedding:
        """The class embedding, ``num_classes + 1`` rows with the null label last."""
        return self.label_embed

    def reg_short_backward(self, blocks: int) -> tuple[list[nn.Module], None]:
        """REG's short backward (guidance/reg.py): the middle and the decoder but its last ``blocks`` modules run
        without graph; the encoder keeps its graph, the skips it hands the last blocks carry ``x``'s gradient."""
        if not 1 <= blocks <= len(self.up):
            raise ConfigError(f"reg_blocks={blocks}: this UNet's decoder has {len(self.up)} blocks")
        return [*self.middle, *self.up[:len(self.up) - blocks]], None

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        emb = self.time_mlp(sinusoidal_embedding(t, self.base_channels).to(x.dtype)) + self.label_embed(y)
        h = self.input_conv(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb)
            skips.append(h)
        for layer in self.middle:
            h = layer(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1) if isinstance(layer, Stage) else h, emb)
        return self.out(h)


def check_config(num_classes: int, image_size: int, base_channels: int, widths: list[int], num_res_blocks: int,
                 attention_resolutions: tuple[int, ...], resolutions: list[int], num_heads: int,
                 dropout: float, norm_groups: int) -> None:
    """One ConfigError line for a UNet that cannot be built as asked."""
    if num_classes < 1:
        raise ConfigError(f"UNet num_classes must be >= 1, got {num_classes}")
    if not widths or min(widths) < 1:
        raise ConfigError(f"UNet base_channels and channel_mult must be positive and non-empty, got widths {widths}")
    if num_res_blocks < 1:
        raise ConfigError(f"UNet num_res_blocks must be >= 1, got {num_res_blocks}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"UNet dropout must lie in [0, 1), got {dropout}")
    levels = len(widths)
    if image_size < 2 ** (levels - 1) or image_size % 2 ** (levels - 1):
        raise ConfigError(f"UNet image_size={image_size} must be divisible by 2**(len(channel_mult) - 1) = "
                          f"{2 ** (levels - 1)} ({levels} levels halve it {levels - 1} times)")
    uneven = [w for w in dict.fromkeys([base_channels, *widths]) if w % norm_groups]  # the input conv's too
    if uneven:
        raise ConfigError(f"UNet channels {uneven} (base_channels and base_channels * channel_mult) are not divisible by "
                          f"norm_groups={norm_groups} (GroupNorm)")
    missing = sorted(set(attention_resolutions) - set(resolutions))
    if missing:
        raise ConfigError(f"UNet attention_resolutions {missing} are not among the resolutions {resolutions} "
                          f"of image_size={image_size} with {levels} levels")
    attended = [w for w, r in zip(widths, resolutions) if r in attention_resolutions and w % num_heads]
    if num_heads < 1 or attended:
        raise ConfigError(f"UNet num_heads={num_heads} must be >= 1 and divide the channels {attended} at the "
                          f"attention resolutions")
