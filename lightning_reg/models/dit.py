"""The class-conditional Diffusion Transformer in the public DiT layout, and its checkpoint loader.

Peebles & Xie, "Scalable Diffusion Models with Transformers" (ICCV 2023). Parameter names, shapes and
arithmetic follow the public code (facebookresearch/DiT ``models.py``), so its checkpoints
(``DiT-XL-2-256x256.pt`` and anything its training script saves) load strictly and give the same outputs.

Backbone protocol: ``forward(x, t, y)``, attributes ``num_classes``, ``data_shape``, ``learn_sigma`` and
the property ``label_embedding``; label id ``num_classes`` is the null label of classifier-free
guidance (the last row of the label table). With ``learn_sigma`` the output has ``2 * in_channels``
channels: the prediction, then the variance interpolation ``v`` of improved DDPM (Nichol & Dhariwal
2021, eq. 15). Differences from the public class: no label dropout inside ``forward``
(``ConditionalDiffusion`` drops labels) and the null row always exists.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from lightning_reg.errors import ConfigError
from lightning_reg.io.files import load_weights, read_torch, unwrap_state_dict
from lightning_reg.models.embeddings import sinusoidal_embedding

# The paper's Table 1 sizes; every one comes with patch sizes 2, 4 and 8 (``DiT-XL/2`` etc.).
DIT_SIZES = {"S": dict(depth=12, hidden_size=384, num_heads=6), "B": dict(depth=12, hidden_size=768, num_heads=12),
             "L": dict(depth=24, hidden_size=1024, num_heads=16), "XL": dict(depth=28, hidden_size=1152, num_heads=16)}
DIT_CONFIGS = {f"DiT-{size}/{patch}": dict(arch, patch_size=patch)
               for size, arch in DIT_SIZES.items() for patch in (2, 4, 8)}
FREQUENCY_DIM = 256  # width of the sinusoidal time features fed to ``t_embedder.mlp``
LATENT_DOWNSAMPLE = 8  # the Stable Diffusion VAE: 256x256 images are 32x32 latents


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x (1 + scale) + shift``, per sample, broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2D sin-cos position embedding (MAE), (grid^2, dim): half the width encodes the column
    (``[sin, cos]`` over ``dim/4`` frequencies), half the row; tokens in row-major order."""
    quarter = dim // 4
    omega = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class PatchEmbedder(nn.Module):
    """Non-overlapping ``p x p`` patches -> tokens by a strided convolution (timm ``PatchEmbed``)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(self.proj(x), "b d gh gw -> b (gh gw) d")


class TimestepEmbedder(nn.Module):
    """``t`` -> ``mlp([cos(t f_i), sin(t f_i)])`` with 256 frequency features."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(t.float(), FREQUENCY_DIM).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Label table of ``num_classes + 1`` rows, the null label last."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: Tensor) -> Tensor:
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention as timm's ``Attention`` (qkv bias, no q/k norm), by ``scaled_dot_product_attention``."""

    is_cross_attention = False  # diffusers' flag of self-attention, what PAG and SEG perturb (guidance/perturbed.py)

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        return self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))`` (timm ``Mlp`` without dropout)."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden_size, mlp_hidden), nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def layer_norm(hidden_size: int) -> nn.LayerNorm:
    return nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)


def ada_ln(hidden_size: int, chunks: int) -> nn.Sequential:
    """``adaLN_modulation``: SiLU then a linear map to ``chunks`` shift/scale/gate vectors."""
    return nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, chunks * hidden_size))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (paper Sec. 3.2)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.norm2 = layer_norm(hidden_size), layer_norm(hidden_size)
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = ada_ln(hidden_size, 6)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then a linear map of each token to its ``p x p x out_channels`` patch."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size ** 2 * out_channels)
        self.adaLN_modulation = ada_ln(hidden_size, 2)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional DiT on (B, C, H, W) inputs (paper Sec. 3, Fig. 3); sizes in ``DIT_CONFIGS``.

    ``t`` is a (B,) float tensor of times (DDPM indices for the public checkpoints); ``y`` is (B,)
    long labels in ``[0, num_classes]``, ``num_classes`` being the null label. Output: ``2 * in_channels``
    channels with ``learn_sigma`` (prediction, then variance interpolation), else ``in_channels``.
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, num_classes: int = 1000,
                 learn_sigma: bool = True):
        super().__init__()
        if input_size % patch_size:
            raise ConfigError(f"DiT input_size={input_size} must be divisible by patch_size={patch_size}")
        if hidden_size % num_heads or hidden_size % 4:
            raise ConfigError(f"DiT hidden_size={hidden_size} must be divisible by 4 and by num_heads={num_heads}")
        self.num_classes, self.learn_sigma, self.patch_size = num_classes, learn_sigma, patch_size
        self.data_shape = (in_channels, input_size, input_size)
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.grid = input_size // patch_size
        self.x_embedder = PatchEmbedder(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None])
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The public initialisation: xavier-uniform linears (and patch conv), N(0, 0.02) label table and
        time MLP, and adaLN-Zero (every modulation and the output layer start at zero, Sec. 3.2)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.label_embedding.weight, std=0.02)
        for layer in self.t_embedder.mlp[::2]:
            nn.init.normal_(layer.weight, std=0.02)
        zero_layers = [b.adaLN_modulation[-1] for b in self.blocks]
        for layer in zero_layers + [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def label_embedding(self) -> nn.Embedding:
        """The class embedding, ``num_classes + 1`` rows with the null label last."""
        return self.y_embedder.embedding_table

    def reg_short_backward(self, blocks: int) -> tuple[list[nn.Module], nn.Module]:
        """REG's short backward (guidance/reg.py): all blocks but the last ``blocks`` run without graph, and the
        patch embedding joins their output as the residual stream's identity path."""
        if not 1 <= blocks <= len(self.blocks):
            raise ConfigError(f"reg_blocks={blocks}: this DiT has {len(self.blocks)} blocks")
        return list(self.blocks[:len(self.blocks) - blocks]), self.x_embedder

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        h = self.final_layer(h, c)
        return rearrange(h, "b (gh gw) (p1 p2 c) -> b c (gh p1) (gw p2)", gh=self.grid, p1=self.patch_size,
                         p2=self.patch_size)


# ------------------------------------------------------------------------------------- checkpoints
REQUIRED_KEYS = ("pos_embed", "x_embedder.proj.weight", "y_embedder.embedding_table.weight", "blocks.0.mlp.fc1.weight",
                 "final_layer.linear.weight")


def dit_config_of(state_dict: Mapping[str, Tensor], num_heads: int | None = None) -> dict:
    """The ``DiT`` constructor arguments a public-layout state dict was saved from.

    Shapes give everything but ``num_heads``, which is taken from the matching ``DIT_CONFIGS`` size
    (or the ``num_heads`` argument for a width not in the paper).
    """
    missing = [k for k in REQUIRED_KEYS if k not in state_dict]
    if missing:
        sample = ", ".join(list(state_dict)[:3]) or "nothing"
        raise ConfigError(f"not a DiT state dict in the public layout: no {missing} (it holds {sample}, ...)")
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    tokens = state_dict["pos_embed"].shape[1]
    grid = round(tokens ** 0.5)
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // patch ** 2
    if num_heads is None:
        num_heads = next((a["num_heads"] for a in DIT_SIZES.values() if a["hidden_size"] == hidden), None)
        if num_heads is None:
            raise ConfigError(f"DiT state dict of hidden size {hidden} matches no DiT-S/B/L/XL size; pass num_heads")
    return dict(input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth,
                num_heads=num_heads, mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
                num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
                learn_sigma=out_channels == 2 * in_channels)


def describe(config: Mapping) -> str:
    """``DiT-XL/2`` (or ``DiT depth 3, hidden 64, patch 2``) at its input size, with its classes."""
    shape = ("depth", "hidden_size", "patch_size")  # what the weights show (heads do not)
    name = next((n for n, a in DIT_CONFIGS.items() if all(a[k] == config[k] for k in shape)),
                f"DiT depth {config['depth']}, hidden {config['hidden_size']}, patch {config['patch_size']}")
    return f"{name} on {config['input_size']}x{config['input_size']} inputs, {config['num_classes']} classes"


def read_state_dict(path: str | Path, field: str = "DiT checkpoint") -> dict[str, Tensor]:
    """A DiT state dict from ``path``: plain (the released checkpoints) or under ``ema``/``model`` (the
    public training script's checkpoints, its argparse ``args`` beside the weights; EMA preferred, as its
    sampler does), through ``io.read_torch``."""
    checkpoint = read_torch(path, field, "torch weights file of a DiT", safe_globals=[Namespace])
    return unwrap_state_dict(checkpoint, path, field, under=("ema", "model"))


def load_dit_checkpoint(path: str | Path, model: str | DiT | None = None, image_size: int | None = None,
                        num_heads: int | None = None, latent_downsample: int = LATENT_DOWNSAMPLE,
                        field: str = "DiT checkpoint", state_dict: Mapping[str, Tensor] | None = None) -> DiT:
    """A ``DiT`` (eval mode, CPU, float32) holding the public-layout checkpoint at ``path``, loaded strictly.

    Args:
        model: ``None`` (size read from the weights), a ``DIT_CONFIGS`` name such as ``"DiT-XL/2"``
            the checkpoint must be, or a ``DiT`` to load into.
        image_size: if set, the image size the checkpoint must serve: its input size (latent side) times
            ``latent_downsample`` (8 for the SD VAE: ``DiT-XL-2-256x256.pt`` has 32x32 inputs).
        num_heads: only for widths outside the paper's sizes (heads do not show in the weights).
        state_dict: the weights if already read (``read_state_dict``), so the file is read once.

    Any mismatch is a one-line ``ConfigError`` naming what the checkpoint is and what was asked.
    """
    if isinstance(model, str) and model not in DIT_CONFIGS:
        raise ConfigError(f"unknown DiT model {model!r}; choose one of {list(DIT_CONFIGS)}")
    state_dict = read_state_dict(path, field) if state_dict is None else state_dict
    if num_heads is None and model is not None:
        num_heads = DIT_CONFIGS[model]["num_heads"] if isinstance(model, str) else model.blocks[0].attn.num_heads
    try:
        found = dit_config_of(state_dict, num_heads)
    except ConfigError as err:
        raise ConfigError(f"{field} {path}: {err}") from None
    if isinstance(model, str):
        wanted = dict(found, **DIT_CONFIGS[model])
    elif isinstance(model, DiT):
        wanted = dict(found, input_size=model.data_shape[1], in_channels=model.data_shape[0],
                      num_classes=model.num_classes, learn_sigma=model.learn_sigma, patch_size=model.patch_size,
                      depth=len(model.blocks), hidden_size=model.pos_embed.shape[-1])
    else:
        wanted = dict(found)
    if image_size is not None:
        wanted["input_size"] = image_size // latent_downsample
    if wanted != found:
        asked = f"{image_size}x{image_size} images ({describe(wanted)})" if image_size else describe(wanted)
        raise ConfigError(f"{field} {path} is {describe(found)}, not {asked}")
    net = model if isinstance(model, DiT) else DiT(**found)
    return load_weights(net, state_dict, path, field, "DiT in the public layout").eval()
