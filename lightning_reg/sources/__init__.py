"""Model sources: one small class per checkpoint format, behind one ``load_model(spec)``.

    denoiser = load_model(ModelSpec("run/last.ckpt"))                                   # format: lightning
    denoiser = load_model(ModelSpec("DiT-XL-2-256x256.pt", model="DiT-XL/2", vae="stabilityai/sd-vae-ft-ema"))

A source reads its file once (through ``lightning_reg.io``), builds the ``Denoiser`` and carries as *data*
what the format implies (the public DiT: a linear VP schedule of 1000 steps and eps prediction);
``load_models`` attaches the VAE (``spec.vae``) once, for every format.

The package: ``base`` (``ModelSpec``, ``ModelSource``, the registry, ``source_of`` and ``load_models``; no
format), and one module per format, which owns its options and their validation: ``diffusers`` (pipeline
folders; ``negative_prompt``, ``gradient_checkpointing``), ``lightning`` (``train.py`` checkpoints), ``dit``
(public DiT weights; ``model``, ``image_size``, ``num_heads``) and ``edm2`` (EDM2 snapshots, ``convert_edm2``).

Format guessing (``format: null``) asks the sources in ascending ``priority`` (a class attribute, unique,
checked by ``register_source``), never in import order; the first whose ``claims(spec)`` holds is the format:

    diffusers (10)  a pipeline folder or cached hub name (model_index.json), without --model
    dit       (20)  --model given
    lightning (30)  anything else (also the fallback, ``DEFAULT_FORMAT``)
    edm2      (40)  never guessed: --format edm2

Adding a format is one module with a ``ModelSource`` subclass registered with ``@register_source`` and
imported below (``docs/architecture.md``, "Model sources").
"""

from lightning_reg.sources.base import (DEFAULT_FORMAT, SOURCES, LoadedModels, ModelSource, ModelSpec, by_priority,
                                        load_denoiser, load_model, load_models, owner_of, register_source, source_of)
from lightning_reg.sources.diffusers import DiffusersSource
from lightning_reg.sources.dit import DiTSource
from lightning_reg.sources.edm2 import EDM2Source
from lightning_reg.sources.lightning import LightningSource

__all__ = ["DEFAULT_FORMAT", "DiTSource", "DiffusersSource", "EDM2Source", "LightningSource", "LoadedModels",
           "ModelSource", "ModelSpec", "SOURCES", "by_priority", "load_denoiser", "load_model", "load_models",
           "owner_of", "register_source", "source_of"]
