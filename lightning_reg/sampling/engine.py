"""The one sampling path: guided samples for given labels and sample indices, deterministic per index.

Sample ``i`` draws its initial noise *and* the fresh noise of every stochastic step from its own
``torch.Generator`` seeded by ``sample_seed(seed, i)``, so its chain never depends on which other
samples share its batch, on the batch size or on the number of processes (up to the backbone's own
floating-point rounding, which can vary with the batch size; see ``docs/sampling.md``).

Both the validation callback (``lightning_reg.callbacks.SamplingCallback``) and ``sample.py`` call
``generate``; the chain itself is ``get_sampler(sampler)`` over a ``GuidedDenoiser``. A ``LatentDenoiser``'s
chain runs on latents, decoded to images only after its last step.
"""

from __future__ import annotations

import hashlib
import re
from typing import Callable, Mapping, Sequence

import torch
from einops import rearrange
from torch import Tensor
from tqdm.auto import tqdm

from lightning_reg.diffusion import conditions as cond
from lightning_reg.diffusion.conditions import Condition
from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.samplers import get_sampler
from lightning_reg.diffusion.schedulers import PREFIX as SCHEDULER_PREFIX
from lightning_reg.errors import ConfigError, check_int
from lightning_reg.guidance.guided import Guidance, GuidedDenoiser


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device, precision: str):
    """The sampling precision: ``bf16`` / ``fp16`` run the chain under ``torch.autocast`` to that type (the
    network's matrix products in half precision; the chain's state and arithmetic stay float32; REG's
    backward pass runs under the same autocast). The REG authors' DiT patch samples under
    ``torch.cuda.amp.autocast()``, i.e. ``fp16``. ``fp32`` changes nothing."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index``: the first 63 bits of ``sha256("seed:index")`` (no collisions
    between runs with different ``seed``, unlike ``seed * K + index``)."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


class PerSampleNoise:
    """Standard-normal draws where row ``r`` always comes from sample ``indices[r]``'s own generator.

    Used as the initial noise (``draw``) and as the samplers' ``noise_sampler(x)``. Draws are made on the
    CPU (float32) and moved to ``x``'s device and dtype, so they do not depend on the accelerator either.
    """

    def __init__(self, seed: int, indices: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]

    def draw(self, shape: Sequence[int], device="cpu", dtype=torch.float32) -> Tensor:
        """One ``shape`` draw per sample, stacked to ``(len(indices), *shape)``."""
        rows = [torch.randn(tuple(shape), generator=g) for g in self.generators]
        return torch.stack(rows).to(device=device, dtype=dtype)

    def __call__(self, x: Tensor) -> Tensor:
        return self.draw(x.shape[1:], x.device, x.dtype)


def balanced_labels(n: int, num_classes: int) -> Tensor:
    """Class-balanced labels: sample ``i`` gets class ``i % num_classes``."""
    check_int("num_classes", num_classes)
    return torch.arange(n) % num_classes


def sample_keys(n: int, denoiser: Denoiser, labels: Sequence[int] | None = None,
                prompts: Sequence[str] | None = None) -> Tensor:
    """Per sample its key's index: the class of sample ``i`` (``labels[i % len(labels)]``, or class-balanced), or
    with ``prompts`` its caption's line ``i % len(prompts)``. The one choice of ``sample.py``, sweeps and the
    callback; ``sample_conditions`` turns keys into conditions."""
    takes_prompts = denoiser.conditioning.takes_prompts
    if takes_prompts != (prompts is not None):
        raise ConfigError("the model is a text-to-image model: give --prompts FILE (one caption a line)"
                          if takes_prompts else
                          "--prompts is for a text-to-image model; this model is class-conditional (--labels)")
    if prompts is not None:
        return torch.arange(n) % len(prompts)
    if labels is None:
        return balanced_labels(n, denoiser.num_classes)
    classes = torch.tensor(list(labels))
    try:
        denoiser.conditioning.check(denoiser.conditioning.make(classes))
    except ConfigError as err:
        raise ConfigError(f"--labels: {err}") from None
    return classes[torch.arange(n) % len(classes)]


def sample_conditions(denoiser: Denoiser, keys: Tensor, prompts: Sequence[str] | None = None) -> Condition:
    """The conditions of samples whose keys are ``keys`` (``sample_keys``): made by the denoiser's conditioning
    (captions encoded here, so each process encodes only its own samples' captions)."""
    if prompts is not None:
        return denoiser.conditioning.make([prompts[int(i)] for i in keys])
    return denoiser.conditioning.make(keys)


def rank_indices(n: int, rank: int, world_size: int) -> Tensor:
    """The sample indices process ``rank`` of ``world_size`` takes: ``rank, rank + W, rank + 2W, ... < n``."""
    return torch.arange(rank, n, world_size)


def gather_by_index(local: Tensor, n: int, world_size: int, all_gather: Callable[[Tensor], Tensor]) -> Tensor:
    """All ``n`` rows in index order, from each rank's ``local = rows[rank_indices(n, rank, W)]``.

    Ranks hold ``ceil(n / W)`` or one fewer rows; each pads to ``ceil(n / W)`` so ``all_gather`` (which
    returns ``(W, m, ...)``) can stack them, and row ``m * W + w`` of the interleave is index ``m W + w``.
    """
    if world_size == 1:
        return local
    per_rank = -(-n // world_size)
    pad = local.new_zeros(per_rank - len(local), *local.shape[1:])
    gathered = all_gather(torch.cat([local, pad]))
    return rearrange(gathered, "w m ... -> (m w) ...")[:n]


def setting_name(guidance: Mapping) -> str:
    """A readable, metric-key-safe name for a guidance dict, e.g. ``{method: cfg, scale: 1, reg: paper}``
    -> ``cfg_w1_paper`` (``w2`` convention: ``cfg_w2x1.5_paper``); other parameters are appended as
    ``_key<value>``, a list's items joined by ``-`` (``_reg_window0-0.3``), a mapping's as key and value
    (``_paglayersmid-scale3``); any other character than letters, digits and ``_ . + = -`` is dropped: no
    brackets, commas, spaces or slashes in a folder name."""
    params = dict(guidance)
    method, reg = params.pop("method", "cfg"), params.pop("reg", "none")
    convention = params.pop("convention", "w")
    scale = params.pop("scale", 0.0 if method == "conditional" else 1.0)
    params.pop("reference", None)
    params.pop("reference_checkpoint", None)
    weight = f"w{scale:g}" if convention == "w" else f"w2x{scale:g}"
    def value(v) -> str:
        if isinstance(v, Mapping):  # a term's options (pag, seg, slg): key and value, joined like a list's items
            return "-".join(f"{k}{value(item)}" for k, item in sorted(v.items()))
        if isinstance(v, (list, tuple)):
            return "-".join(value(item) for item in v)
        return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)

    extra = "".join(f"_{k}{value(v)}" for k, v in sorted(params.items()) if v is not None)
    return re.sub(r"[^A-Za-z0-9_.+=-]", "", f"{method}_{weight}_{reg}{extra}")


def generate(denoiser: Denoiser, guidance: Guidance, conditions: Condition, indices, *, sampler: str = "ddpm",
             steps: int, seed: int, batch_size: int, device="cpu", sampler_kwargs: Mapping | None = None,
             precision: str = "fp32", progress: bool = False) -> Tensor:
    """Samples (float32 on the CPU, ``(N, *denoiser.sample_shape)``: ``x_0``, or a ``LatentDenoiser``'s decoded
    images) for ``conditions`` (N rows; class ids, a text model's prompt embeddings, or a mapping of tensors:
    ``sample_conditions``) at sample ``indices`` (N,). The conditions are split and moved, never looked into
    (``diffusion/conditions.py``); the denoiser's conditioning checks them.

    Each batch runs ``get_sampler(sampler, **sampler_kwargs)(GuidedDenoiser(denoiser, guidance, y), noise,
    schedule, steps, noise_sampler=...)`` with the per-sample noise of ``PerSampleNoise(seed, indices)``,
    under ``autocast(device, precision)``. ``denoiser`` must already be on ``device``.
    """
    if not isinstance(conditions, Mapping):
        conditions = torch.as_tensor(conditions)
    indices = torch.as_tensor(indices).long().reshape(-1)
    if cond.batch_size(conditions) != len(indices):
        raise ConfigError(f"conditions and indices must have one entry per sample, got {cond.batch_size(conditions)} "
                          f"and {len(indices)}")
    check_int("steps", steps)
    check_int("batch_size", batch_size)
    sample_fn = get_sampler(sampler, **dict(sampler_kwargs or {}))
    denoiser.conditioning.check(conditions)
    dtype = denoiser.state_dtype
    out = []
    with tqdm(total=len(indices), desc=f"sampling {sampler}", unit="sample",
              disable=None if progress else True) as bar:  # None: no bar off a terminal (a log file)
        for y, idx in zip(cond.split(conditions, batch_size), indices.split(batch_size)):
            noise = PerSampleNoise(seed, idx.tolist())
            guided = GuidedDenoiser(denoiser, guidance, cond.to(y, device))
            # a learned variance (DiT) reaches the VP samplers explicitly, from the guided call's conditional branch
            model = {"learned_variance": guided.learned_variance} if denoiser.learn_sigma else {}
            if sampler.startswith(SCHEDULER_PREFIX):  # what a diffusers scheduler is handed: the model's own target
                model["prediction"] = denoiser.prediction.kind
            with autocast(device, precision):
                x0 = sample_fn(guided, noise.draw(denoiser.data_shape, device, dtype), denoiser.schedule, steps,
                               noise_sampler=noise, **model)
            out.append(denoiser.decode(x0).float().cpu())
            bar.update(len(idx))
    return torch.cat(out) if out else torch.empty(0, *denoiser.sample_shape)
