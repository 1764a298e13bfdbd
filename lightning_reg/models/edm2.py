"""EDM2: the magnitude-preserving UNet of Karras et al. 2024, "Analyzing and Improving the Training Dynamics
of Diffusion Models" (config G, Appendix B), with EDM's preconditioning (Karras et al. 2022, Table 1).

Written from the paper's equations; the parameter names follow the official snapshots, so their state
dicts load strictly (``load_edm2``, docs/edm2.md). Magnitude preservation (paper §3, eqs. 9-13):

* every weight ``w`` is normalised per output unit on each forward, ``w_i / (eps + ||w_i|| / sqrt(fan_in))``,
  then scaled by ``gain / sqrt(fan_in)``; no biases, no normalisation layers but pixel norm;
* ``mp_silu(x) = silu(x) / 0.596``; ``mp_sum(a, b, t) = ((1 - t) a + t b) / sqrt((1 - t)^2 + t^2)``;
  ``mp_cat`` concatenates with weights that keep unit magnitude;
* attention on cosine-normalised q, k, v; activations clipped to [-256, 256]; the output convolution and
  each block's embedding scaled by learned gains (``out_gain``, ``emb_gain``).

Weights keep their stored dtype (the official files: float16) and are computed in float32 on every forward
(normalised, then scaled by ``gain / sqrt(fan_in)``, that quotient in the gain's stored dtype, as the public
code computes it), then cast to the activations' dtype.

Backbone protocol (``Denoiser``): ``EDM2Precond(x_in, t, y)`` returns ``F`` for ``x_in = c_in x`` with the
EDM schedule's ``t = 250 ln sigma`` (so ``c_noise = ln(sigma) / 4 = t / 1000``) and label ids ``y``, taken
one-hot as the network expects; ``D = c_skip x + c_out F`` is ``Prediction('edm')``. An EDM2 network has
no null label: classifier-free guidance's reference is a separate unconditional network, an ordinary
guidance ``reference`` (``EDM2Denoiser``).
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.latent import LatentCodec
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import EDMSchedule
from lightning_reg.errors import ConfigError, one_line
from lightning_reg.io.edm2 import read_edm2_snapshot
from lightning_reg.io.edm2_pickle import EDM2Snapshot
from lightning_reg.io.files import state_dict_mismatch

EPS = 1e-4
SILU_GAIN = 0.596  # E[silu(x)^2]^(1/2) for x ~ N(0, 1)


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 (the weights' compute dtype)."""
    return torch.promote_types(dtype, torch.float32)


def normalize(x: Tensor, dim: Sequence[int] | int | None = None) -> Tensor:
    """``x / (eps + ||x|| / sqrt(n))`` over ``dim`` (all but the first by default): unit RMS per slice."""
    dim = tuple(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=at_least_float32(x.dtype))
    norm = EPS + norm * math.sqrt(norm.numel() / x.numel())
    return x / norm.to(x.dtype)


def mp_silu(x: Tensor) -> Tensor:
    return F.silu(x) / SILU_GAIN


def mp_sum(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """Magnitude-preserving blend (paper eq. 12)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """Magnitude-preserving concatenation on channels (paper eq. 13): parts weighted ``1 - t`` and ``t``."""
    na, nb = a.shape[1], b.shape[1]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c * (1 - t) / math.sqrt(na)), b * (c * t / math.sqrt(nb))], dim=1)


def resample(x: Tensor, mode: str) -> Tensor:
    """``down``: 2x2 average pooling; ``up``: nearest-neighbour 2x (both magnitude preserving); ``keep``."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return x


class MPFourier(nn.Module):
    """Random Fourier features ``sqrt(2) cos(f x + phi)``; ``freqs``/``phases`` are fixed buffers (from the file)."""

    def __init__(self, channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels))

    def forward(self, x: Tensor) -> Tensor:
        dtype = at_least_float32(x.dtype)
        y = torch.outer(x.to(dtype), self.freqs.to(dtype)) + self.phases.to(dtype)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (``kernel`` 2-D) or linear layer (``kernel`` empty), no bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: Tensor, gain: Tensor | float = 1.0) -> Tensor:
        w = self.weight.to(at_least_float32(self.weight.dtype))
        if self.training and torch.is_grad_enabled():  # forced weight normalisation (paper §3): unit-RMS rows
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        return x @ w.t() if w.ndim == 2 else F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(nn.Module):
    """An encoder (``enc``) or decoder (``dec``) block (paper Fig. 21): resample, residual branch
    ``conv(mp_silu(conv(mp_silu(x)) * (1 + emb_gain * emb)))`` blended by ``res_balance``, optional
    self-attention blended by ``attn_balance``, clipping. Encoder blocks pixel-normalise their input."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", attention: bool = False, channels_per_head: int = 64,
                 dropout: float = 0.0, res_balance: float = 0.3, attn_balance: float = 0.3, clip_act: float = 256):
        super().__init__()
        self.out_channels, self.flavor, self.resample_mode = out_channels, flavor, resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, [3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, [])
        self.conv_res1 = MPConv(out_channels, out_channels, [3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, [1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, [1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, [1, 1]) if self.num_heads else None

    def attention(self, x: Tensor) -> Tensor:
        """Multi-head self-attention over positions with q, k, v normalised per head (cosine attention)."""
        b, c, h, w = x.shape
        qkv = self.attn_qkv(x).reshape(b, self.num_heads, -1, 3, h * w)
        q, k, v = normalize(qkv, dim=2).unbind(3)  # (b, heads, c_head, positions)
        weights = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
        return self.attn_proj(torch.einsum("nhqk,nhck->nhcq", weights, v).reshape(b, c, h, w))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)
        if self.num_heads:
            x = mp_sum(x, self.attention(x), self.attn_balance)
        return x.clip(-self.clip_act, self.clip_act) if self.clip_act else x


class UNet(nn.Module):
    """The EDM2 UNet: ``num_blocks`` encoder blocks per level (a ``down`` block between levels), two blocks
    at the bottom, ``num_blocks + 1`` decoder blocks per level fed the encoder's outputs by ``mp_cat``; the
    embedding ``mp_silu(mp_sum(noise emb, label emb, label_balance))``; a constant-ones input channel."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_noise: int | None = None,
                 channel_mult_emb: int | None = None, num_blocks: int = 3, attn_resolutions: Sequence[int] = (16, 8),
                 label_balance: float = 0.5, concat_balance: float = 0.5, **block_kwargs):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, [])
        self.emb_label = MPConv(label_dim, cemb, []) if label_dim else None

        self.enc = nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(cout, channels, [3, 3])
                cout = channels
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, "enc", "down", **block_kwargs)
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = Block(cout, channels, cemb, "enc",
                                                          attention=res in attn_resolutions, **block_kwargs)
                cout = channels

        self.dec = nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, "dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, "dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, "dec", "up", **block_kwargs)
            for i in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{i}"] = Block(cout + skips.pop(), channels, cemb, "dec",
                                                          attention=res in attn_resolutions, **block_kwargs)
                cout = channels
        self.out_conv = MPConv(cout, img_channels, [3, 3])

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None) -> Tensor:
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * math.sqrt(class_labels.shape[1])), self.label_balance)
        emb = mp_silu(emb)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if "conv" in name else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)


UNET_DEFAULTS = {k: p.default for k, p in inspect.signature(UNet).parameters.items()}
UNET_ARGS = ("model_channels", "channel_mult", "channel_mult_noise", "channel_mult_emb", "num_blocks",
             "attn_resolutions", "label_balance", "concat_balance", "channels_per_head", "dropout",
             "res_balance", "attn_balance", "clip_act")

# The img512 presets of the EDM2 paper (Table 2): 64x64x4 SD-VAE latents, 1000 classes; channels per size.
EDM2_SIZES = {"xs": 128, "s": 192, "m": 256, "l": 320, "xl": 384, "xxl": 448}


def edm2_img512_config(size: str) -> dict:
    """Constructor arguments of the official ``edm2-img512-<size>`` networks (dropout is training-only)."""
    if size not in EDM2_SIZES:
        raise ConfigError(f"unknown EDM2 size {size!r}; choose one of {list(EDM2_SIZES)}")
    return dict(img_resolution=64, img_channels=4, label_dim=1000, model_channels=EDM2_SIZES[size],
                dropout=0.0 if size in ("xs", "s") else 0.1)


class EDM2Precond(nn.Module):
    """The official ``Precond``: ``unet`` plus the uncertainty head ``logvar_fourier``/``logvar_linear``
    (the training loss's ``u(sigma)``, paper eq. 8). As a backbone it returns ``F`` (module docstring).
    ``use_fp16`` is kept as recorded (the public code's float16 activations on CUDA); here reduced precision
    comes from autocast. It trains no null label (``trains_null_label``: ``ConditionalDiffusion`` refuses
    label dropout for it)."""

    trains_null_label = False

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool = True,
                 sigma_data: float = 0.5, logvar_channels: int = 128, **unet_kwargs):
        super().__init__()
        unknown = sorted(set(unet_kwargs) - set(UNET_ARGS))
        if unknown:
            raise ConfigError(f"unknown EDM2 network arguments {unknown}; known: {list(UNET_ARGS)}")
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.sigma_data, self.use_fp16 = sigma_data, use_fp16
        self.unet = UNet(img_resolution, img_channels, label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, [])

    @property
    def num_classes(self) -> int:
        return self.label_dim

    @property
    def data_shape(self) -> tuple[int, int, int]:
        return (self.img_channels, self.img_resolution, self.img_resolution)

    @property
    def ignores_condition(self) -> bool:
        """An unconditional network (``label_dim = 0``) ignores the labels: any model's guidance reference."""
        return not self.label_dim

    def one_hot(self, y: Tensor, like: Tensor) -> Tensor | None:
        """Label ids as the float one-hot vectors the network takes (``None`` for an unconditional one)."""
        if not self.label_dim:
            return None
        return F.one_hot(y.long().expand(like.shape[0]), self.label_dim).to(like.dtype)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        c_noise = (t / 1000).to(at_least_float32(x.dtype))  # t = 250 ln(sigma): EDM's c_noise = ln(sigma) / 4
        return self.unet(x, c_noise, self.one_hot(y, x))

    def logvar(self, sigma: Tensor) -> Tensor:
        """The learned uncertainty ``u(sigma)`` (paper eq. 8), shaped (B, 1, 1, 1)."""
        c_noise = torch.as_tensor(sigma, dtype=torch.float32).flatten().log() / 4
        return self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)


def edm2_denoiser_parts(net: EDM2Precond) -> tuple[EDMSchedule, Prediction]:
    """The EDM schedule and ``edm`` prediction an EDM2 network runs under (its ``sigma_data``)."""
    return EDMSchedule(sigma_data=net.sigma_data), Prediction("edm", sigma_data=net.sigma_data)


class EDM2Denoiser(Denoiser):
    """``D(x, sigma, y)`` of an EDM2 network under its EDM schedule and preconditioning. An EDM2 network trains no
    null label (``EDM2Precond.trains_null_label``): classifier-free guidance's reference is a separate
    unconditional EDM2 network (``label_dim = 0``, itself an ``EDM2Denoiser``) given as the guidance
    ``reference``, as EDM2 guides; a weaker conditional one is autoguidance's. ``codec``: the img512 networks'
    latent decoder (``ChannelLatentCodec``, the snapshot's per-channel scale/bias and the SD VAE); ``None``: the
    network works on pixels in [-1, 1] (img64)."""

    def __init__(self, net: EDM2Precond, codec: LatentCodec | None = None):
        super().__init__(net, *edm2_denoiser_parts(net))
        if codec is not None and codec.latent_channels != net.img_channels:
            raise ConfigError(f"the EDM2 network works on {net.img_channels} channels but the VAE's latents have "
                              f"{codec.latent_channels}")
        self.codec = codec

    def with_net(self, net: EDM2Precond) -> "EDM2Denoiser":
        return EDM2Denoiser(net, self.codec).train(self.training)

    @property
    def state_dtype(self) -> torch.dtype:
        """float32 (or float64): the weights are stored float16 but computed in float32 (module docstring)."""
        return at_least_float32(super().state_dtype)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.data_shape if self.codec is None else self.codec.image_shape(self.data_shape)

    def decode(self, x0: Tensor) -> Tensor:
        return x0 if self.codec is None else self.codec.decode(x0).float()


def edm2_from_snapshot(snapshot: EDM2Snapshot, name: str = "EDM2 snapshot") -> EDM2Precond:
    """An ``EDM2Precond`` built from a snapshot's constructor arguments with its state dict loaded strictly.
    Arguments that ask for more UNet blocks than the file has tensors are refused before any block is built
    (a huge ``num_blocks`` would take hours); arguments of the wrong type or value are one line."""
    if snapshot.class_name != "Precond":
        raise ConfigError(f"{name} holds a {snapshot.class_name!r} network, not an EDM2 'Precond'")
    arguments = {**UNET_DEFAULTS, **snapshot.init_kwargs}
    levels, per_level = arguments["channel_mult"], arguments["num_blocks"]
    if isinstance(levels, (list, tuple)) and isinstance(per_level, int) and \
            len(levels) * (2 * per_level + 2) > len(snapshot.state_dict):
        raise ConfigError(f"{name}: its arguments ask for {len(levels)} levels of {per_level:,} blocks, more blocks "
                          f"than the file holds tensors ({len(snapshot.state_dict)}); refused")
    try:
        with torch.device("meta"):  # no random init: every tensor comes from the file
            net = EDM2Precond(**snapshot.init_kwargs)
    except (TypeError, ValueError, ArithmeticError, RuntimeError) as err:
        raise ConfigError(f"{name}: constructor arguments {json.dumps(snapshot.init_kwargs)[:300]} do not fit "
                          f"EDM2Precond ({one_line(err)})") from None
    load_edm2_state_dict(net, snapshot.state_dict, name)
    return net.eval().requires_grad_(False)


def load_edm2_state_dict(net: EDM2Precond, state_dict: dict[str, Tensor], name: str = "EDM2 state dict") -> None:
    """Strict load of the tensors as stored (their dtype kept, ``assign``), with one line naming missing,
    unexpected and mis-shaped tensors."""
    mismatch = state_dict_mismatch(net.state_dict(), state_dict, limit=4)
    if mismatch:
        raise ConfigError(f"{name} does not fit the EDM2 network: {mismatch}")
    net.load_state_dict(state_dict, strict=True, assign=True)


def load_edm2(path: str | Path) -> tuple[EDM2Precond, EDM2Snapshot]:
    """``(network, snapshot)`` from an official ``edm2-*.pkl`` (read without running its code) or from its
    ``convert_edm2`` safetensors file (the file read by ``io.edm2.read_edm2_snapshot``; docs/edm2.md)."""
    snapshot = read_edm2_snapshot(path)
    return edm2_from_snapshot(snapshot, str(Path(path))), snapshot
