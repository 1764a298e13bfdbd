"""Perturbed references: the model itself, given the same condition, run under a perturbation (PAG, SEG, SLG).

A ``PerturbedTerm`` is one more guidance term ``w(t) (x0_c - x0_p)`` beside a method's own (diffusers' PAG
pipeline: ``eps_u + w2 (eps_c - eps_u) + w_pag (eps_c - eps_p)``), with its own weight and ``[start, stop]``
window. ``x0_p`` is one forward of the model with torch hooks on the chosen modules, installed for that call only
and removed after it, also when it raises (``Perturbation.applied``): the conditional branch, REG's differentiable
forward and its backward never see them.

* ``pag`` (Ahn et al. 2024, arXiv 2403.17377): the self-attention map ``softmax(q k^T / sqrt(d))`` replaced by
  the identity ``I``, so that the attention's output is ``I v = v``.
* ``seg`` (Hong 2024, arXiv 2408.00760): the queries blurred by a Gaussian of std ``blur_sigma`` on the square
  token grid, which blurs the attention logits ``q k^T`` along the queries (a smoothed attention energy).
* ``slg`` (SD 3.5's skip layer guidance; STG, Hyung et al. 2024): the chosen blocks skipped, each returning its
  input; a joint block of SD3 (``SD3Transformer.block_returns``) returns both of its streams' inputs, as
  ``SD3Transformer2DModel(skip_layers=...)`` skips it.

Layers are chosen as diffusers chooses them: an int is a block of the net's transformer stack (``blocks``,
``transformer_blocks``, ...; diffusers' ``fqn="auto"``), a string a regular expression searched in the module
names (``pag_applied_layers``). PAG and SEG perturb the self-attention modules inside (diffusers' test:
``is_cross_attention`` is false; our UNet and DiT attention declare it), SLG skips the outermost chosen modules.
PAG and SEG act on ``F.scaled_dot_product_attention`` inside those modules (diffusers' guiders' way for PAG), so
any attention written with it is covered; one computed otherwise is refused.
"""

from __future__ import annotations

import inspect
import math
import re
from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from lightning_reg.diffusion.conditions import Condition
from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.errors import ConfigError
from lightning_reg.guidance.rule import GuidanceRule

BLOCK_STACKS = ("blocks", "transformer_blocks", "single_transformer_blocks", "layers")  # diffusers' fqn "auto"
INFINITE_BLUR = 9999.0  # SEG's inf_blur_threshold: a larger sigma is the infinite blur, the queries' mean
Named = tuple[str, nn.Module]  # a module with its qualified name


def block_stack(net: nn.Module) -> str:
    """The name of the net's transformer stack: the first ``BLOCK_STACKS`` attribute that is a ``ModuleList``, of
    the net or of a module it wraps (a direct child)."""
    for prefix, module in [("", net), *net.named_children()]:
        for attr in BLOCK_STACKS:
            if isinstance(getattr(module, attr, None), nn.ModuleList):
                return f"{prefix}.{attr}" if prefix else attr
    raise ConfigError(f"{type(net).__name__} has no transformer stack ({', '.join(BLOCK_STACKS)}) for integer "
                      "layers: name the layers by pattern (module names, e.g. 'mid' or 'down_blocks.1')")


class Perturbation:
    """A perturbation of the modules chosen by ``layers`` (ints: blocks of the transformer stack; strings: regular
    expressions searched in module names), installed on a net for one call by ``applied``."""

    name = "perturbation"
    what = "module"  # what it perturbs, for errors

    def __init__(self, layers: Sequence[int | str]):
        if isinstance(layers, (str, int)):
            layers = [layers]
        layers = list(layers) if isinstance(layers, (list, tuple)) else []
        if not layers or not all(valid_layer(layer) for layer in layers):
            raise ConfigError(f"{self.name} layers must be a non-empty list of block indices (ints >= 0) and/or "
                              f"module name patterns (regular expressions), got {layers!r}")
        self.layers = layers

    def scope(self, net: nn.Module, layer: int | str) -> list[Named]:
        """The named modules one ``layers`` entry covers: block ``layer`` of the stack and its submodules, or the
        modules whose names match the pattern (the net itself never)."""
        if isinstance(layer, str):
            return [(name, m) for name, m in net.named_modules() if name and re.search(layer, name)]
        stack = block_stack(net)
        size = len(net.get_submodule(stack))
        if layer >= size:
            raise ConfigError(f"{self.name} layer {layer} is outside {type(net).__name__}.{stack} ({size} blocks)")
        path = f"{stack}.{layer}"
        return [(name, m) for name, m in net.named_modules() if name == path or name.startswith(path + ".")]

    def chosen(self, scope: list[Named]) -> list[Named]:
        """The modules of a scope this perturbation hooks."""
        raise NotImplementedError

    def install(self, module: nn.Module, net: nn.Module) -> list[RemovableHandle]:
        """Hook one chosen module of ``net``; the handles remove the hooks."""
        raise NotImplementedError

    def targets(self, net: nn.Module) -> list[nn.Module]:
        """Every chosen module of ``net``, once; a ``layers`` entry that chooses none is a ConfigError."""
        targets = {}
        for layer in self.layers:
            chosen = self.chosen(self.scope(net, layer))
            if not chosen:
                raise ConfigError(f"{self.name} layer {layer!r} matches no {self.what} of {type(net).__name__}")
            targets.update({id(m): m for _, m in chosen})
        return list(targets.values())

    @contextmanager
    def applied(self, net: nn.Module) -> Iterator[None]:
        """``net`` perturbed inside the ``with``, unperturbed after it, whatever was raised."""
        handles = []
        try:
            for module in self.targets(net):
                handles += self.install(module, net)
            yield
        finally:
            for handle in handles:
                handle.remove()

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def valid_layer(layer) -> bool:
    """An int >= 0 (not a bool) or a string that compiles as a regular expression."""
    if isinstance(layer, str):
        try:
            re.compile(layer)
        except re.error:
            return False
        return bool(layer)
    return isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0


class AttentionOverride(TorchFunctionMode):
    """While active, ``F.scaled_dot_product_attention(q, k, v, ...)`` is ``attend(sdpa, q, k, v, ...)``; ``calls``
    counts them."""

    def __init__(self, attend: Callable[..., Tensor]):
        super().__init__()
        self.attend, self.calls = attend, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        return self.attend(func, *args, **kwargs)


class AttentionPerturbation(Perturbation):
    """PAG and SEG: inside each chosen self-attention module, its ``F.scaled_dot_product_attention`` calls go through
    ``attend``."""

    what = "self-attention module"

    def chosen(self, scope):
        return [(name, m) for name, m in scope if getattr(m, "is_cross_attention", None) is False]

    def attend(self, sdpa: Callable[..., Tensor], query: Tensor, key: Tensor, value: Tensor, *args, **kwargs) -> Tensor:
        raise NotImplementedError

    def install(self, module, net):
        override = AttentionOverride(self.attend)

        def enter(module, args):
            override.calls = 0
            override.__enter__()

        def leave(module, args, output):
            override.__exit__(None, None, None)
            if output is not None and not override.calls:  # output None: the forward raised
                raise ConfigError(f"{self.name} perturbs attention computed by F.scaled_dot_product_attention; "
                                  f"{type(module).__name__} computed its own (set diffusers' AttnProcessor2_0)")

        return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]


class PAG(AttentionPerturbation):
    """Perturbed-attention guidance (Ahn et al. 2024): the self-attention map is the identity, so the
    attention's output is ``v`` (diffusers' ``PAGIdentitySelfAttnProcessor2_0``: ``to_out(to_v(h))``)."""

    name = "pag"

    def attend(self, sdpa, query, key, value, *args, **kwargs):
        return value


class SEG(AttentionPerturbation):
    """Smoothed energy guidance (Hong 2024): the queries blurred (``smoothed_queries``) before attention.

    ``blur_sigma`` above ``INFINITE_BLUR`` (the default, infinity) is the infinite blur: every query the mean.
    """

    name = "seg"

    def __init__(self, layers: Sequence[int | str], blur_sigma: float = math.inf):
        super().__init__(layers)
        if isinstance(blur_sigma, bool) or not isinstance(blur_sigma, (int, float)) or not blur_sigma > 0:
            raise ConfigError(f"seg blur_sigma must be a number > 0 (.inf: the queries' mean), got {blur_sigma!r}")
        self.blur_sigma = float(blur_sigma)

    def attend(self, sdpa, query, key, value, *args, **kwargs):
        return sdpa(smoothed_queries(query, self.blur_sigma), key, value, *args, **kwargs)


def smoothed_queries(query: Tensor, sigma: float) -> Tensor:
    """SEG's blur of queries ``(..., N, d)`` as the authors' SDXL code and diffusers do it: the first ``side^2``
    tokens (``side = isqrt(N)``) as a square grid, each channel blurred by the 2-D Gaussian of std ``sigma`` with
    ``ceil(6 sigma) + 1`` taps made odd, at most the grid's side (``side + 1`` for an even side), reflect-padded;
    above ``INFINITE_BLUR``, their mean. The other tokens are kept."""
    side = math.isqrt(query.shape[-2])
    grid = query[..., :side * side, :].transpose(-1, -2)  # (..., d, side^2)
    if sigma > INFINITE_BLUR:
        blurred = grid.mean(dim=-1, keepdim=True).expand_as(grid)
    else:
        taps = min(math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2, side - (side % 2 - 1))
        half = (taps - 1) / 2
        pdf = torch.exp(-0.5 * (torch.linspace(-half, half, taps, dtype=query.dtype, device=query.device) / sigma) ** 2)
        kernel = pdf / pdf.sum()
        images = F.pad(grid.reshape(-1, 1, side, side), [taps // 2] * 4, mode="reflect")
        blurred = F.conv2d(images, (kernel[:, None] * kernel[None, :])[None, None]).reshape(grid.shape)
    return torch.cat([blurred.transpose(-1, -2), query[..., side * side:, :]], dim=-2)


class SLG(Perturbation):
    """Skip layer guidance (SD 3.5; STG, Hyung et al. 2024): each chosen block returns its input (its first argument
    or ``hidden_states``): the outermost modules of each ``layers`` entry, a whole block for an int. A block of the
    transformer stack of a net that declares ``block_returns`` (``SD3Transformer``: its joint blocks return
    ``(encoder_hidden_states, hidden_states)``) returns those inputs, so both streams pass it unchanged."""

    name = "slg"
    what = "block"

    def chosen(self, scope):
        outermost = []
        for name, m in scope:  # named_modules lists a module before its submodules
            if not any(name.startswith(kept + ".") for kept, _ in outermost):
                outermost.append((name, m))
        return outermost

    def install(self, module, net):
        return [module.register_forward_hook(partial(skipped, returns=block_returns(net, module)), with_kwargs=True)]


def block_returns(net: nn.Module, module: nn.Module) -> tuple[str, ...] | None:
    """The names of the inputs a skipped ``module`` returns: ``net.block_returns`` for a block of the transformer
    stack of a net that declares it, else ``None`` (the block returns its one input)."""
    returns = getattr(net, "block_returns", None)
    if returns is None or not any(module is block for block in net.get_submodule(block_stack(net))):
        return None
    return tuple(returns)


def skipped(module: nn.Module, args: tuple, kwargs: dict, output, returns: tuple[str, ...] | None = None):
    """A skipped block's output: its input (its first argument or ``hidden_states``), or the tuple of its inputs
    named by ``returns``; each shaped as the output it replaces (an output ``None``, the text stream of SD3's last
    block, is replaced by its input too)."""
    if returns is None:
        inputs, outputs = (args[0] if args else kwargs.get("hidden_states"),), (output,)
    else:
        named = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        inputs, outputs = tuple(named.get(name) for name in returns), output
    def stands_for(new, old) -> bool:  # an input in place of an output
        if old is None:
            return returns is not None and isinstance(new, Tensor)
        return isinstance(new, Tensor) and isinstance(old, Tensor) and new.shape == old.shape

    if not (isinstance(outputs, tuple) and len(outputs) == len(inputs)
            and all(stands_for(new, old) for new, old in zip(inputs, outputs))):
        raise ConfigError(f"slg cannot skip {type(module).__name__}: only a block that returns one tensor shaped as "
                          "its input (its first argument or hidden_states), or a block of a transformer stack whose "
                          "wrapper declares block_returns (SD3's joint blocks), can be skipped")
    return inputs if returns is not None else inputs[0]


PERTURBATIONS = {cls.name: cls for cls in (PAG, SEG, SLG)}


class PerturbedTerm(GuidanceRule):
    """One more guidance term, CFG's ``w(t) (x0_c - x0_p)`` with its own ``scale``, ``convention`` and ``[start,
    stop]`` window, whose reference ``x0_p`` is the model given the same condition under ``perturbation``."""

    def __init__(self, perturbation: Perturbation, **kwargs):
        self.perturbation = perturbation
        super().__init__(**kwargs)

    @property
    def name(self) -> str:
        return self.perturbation.name

    def bind(self, model: Denoiser) -> None:
        """Check that every ``layers`` entry chooses modules of the model's backbone."""
        self.perturbation.targets(model.net)

    def reference_prediction(self, model: Denoiser, x: Tensor, t, y: Condition) -> Tensor:
        """``x0_p``: one forward of ``model`` with its backbone perturbed for that call only."""
        with self.perturbation.applied(model.net):
            return model(x, t, y)
