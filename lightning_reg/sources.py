"""Model sources: one small class per checkpoint format, behind one ``load_model(spec)``.

    denoiser = load_model(ModelSpec("run/last.ckpt"))                                   # format: lightning
    denoiser = load_model(ModelSpec("DiT-XL-2-256x256.pt", model="DiT-XL/2", vae="stabilityai/sd-vae-ft-ema"))

A source reads its file once (through ``lightning_reg.io``), builds the ``Denoiser`` and carries as *data*
what the format implies (the public DiT: a linear VP schedule of 1000 steps and eps prediction);
``load_model`` attaches the VAE (``spec.vae``) once, for every format. Adding a format is one subclass of
``ModelSource`` registered with ``@register_source`` (``docs/architecture.md``, "Model sources").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.latent import ChannelLatentCodec, LatentCodec, LatentDenoiser
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import make_schedule
from lightning_reg.diffusion.text import TextToImage, is_pipeline, load_text_to_image
from lightning_reg.errors import ConfigError
from lightning_reg.io.files import read_torch
from lightning_reg.io.vae import load_autoencoder
from lightning_reg.io.edm2_pickle import EDM2Snapshot
from lightning_reg.models.dit import load_dit_checkpoint, read_state_dict
from lightning_reg.models.edm2 import EDM2Denoiser, EDM2Precond, load_edm2, snapshot_metadata
from lightning_reg.module import CHECKPOINT_WHAT, module_from_checkpoint, read_checkpoint


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and how (``sample.py``'s ``--checkpoint``, ``--format``, ``--model``, ...).

    Args:
        checkpoint: the file (or folder) of the weights.
        format: a registered source name (``lightning``, ``dit``, ...) or ``None``: the first source whose
            ``claims(spec)`` accepts it (``diffusers`` for a pipeline folder or cached hub name, ``dit`` when
            ``model`` names a DiT, else ``lightning``).
        model: the architecture a format needs named (DiT: ``DiT-XL/2``).
        image_size: the image size the model must serve (DiT: latent side times 8).
        num_heads: DiT widths outside the paper's sizes (heads do not show in the weights).
        vae: an ``AutoencoderKL`` folder or cached hub name: sample in its latent space, decode at the end.
        ema: a ``lightning`` checkpoint's EMA weights (else its raw weights).
        field: the option name that errors quote.
        negative_prompt: a ``diffusers`` pipeline's reference prompt (its embedding is the null condition).
        gradient_checkpointing: a ``diffusers`` pipeline's UNet recomputes its blocks in REG's backward.
    """

    checkpoint: str | None
    format: str | None = None
    model: str | None = None
    image_size: int | None = None
    num_heads: int | None = None
    vae: str | None = None
    ema: bool = True
    field: str = "--checkpoint"
    negative_prompt: str = ""
    gradient_checkpointing: bool = False


class ModelSource:
    """A checkpoint format: ``read`` the file once, ``denoiser`` builds the model from what was read.

    Class data: ``name`` (the ``format`` key), ``what`` (the noun of its errors), ``schedule`` and
    ``prediction`` (what the format implies, ``None`` when the checkpoint records its own), ``needs_vae``.
    """

    name: ClassVar[str]
    what: ClassVar[str]
    schedule: ClassVar[dict | None] = None  # make_schedule(**schedule)
    prediction: ClassVar[str | None] = None
    needs_vae: ClassVar[bool] = False
    own_decoder: ClassVar[bool] = False  # builds its own decoder (``load_model`` attaches no ``spec.vae``)
    options: ClassVar[tuple[str, ...]] = ()  # which of ModelSpec's model, image_size, num_heads it takes

    def claims(self, spec: ModelSpec) -> bool:
        """Whether an unspecified ``format`` means this source."""
        return False

    def check(self, spec: ModelSpec) -> None:
        """Refuse options the format does not take, before the file is read."""
        if spec.checkpoint is None:
            raise ConfigError(f"{spec.field} is required: the {self.what} file")
        others = [f for f in ("model", "image_size", "num_heads") if getattr(spec, f) is not None
                  and f not in self.options]
        if others:
            raise ConfigError(f"--{others[0]} is for a public DiT checkpoint: give --model too (e.g. DiT-XL/2)")
        text = [f for f in ("negative_prompt", "gradient_checkpointing") if getattr(spec, f) and f not in self.options]
        if text:
            raise ConfigError(f"--{text[0]} is for a diffusers text-to-image pipeline (--pipeline), not a {self.what}")
        if self.needs_vae and spec.vae is None:
            model = f"--model {spec.model}" if spec.model else f"a {self.what}"
            raise ConfigError(f"{model} samples latents: give --vae (the Stable Diffusion VAE, e.g. "
                              "stabilityai/sd-vae-ft-ema or a local folder)")

    def read(self, spec: ModelSpec) -> Any:
        return read_torch(spec.checkpoint, spec.field, self.what)

    def denoiser(self, spec: ModelSpec, contents: Any) -> Denoiser:
        raise NotImplementedError

    def with_reference(self, spec: ModelSpec, denoiser: Denoiser, path: str,
                       field: str) -> tuple[Denoiser, Denoiser | None, dict | None]:
        """The guiding file ``path`` as ``(denoiser, reference, meta)``: by default a ``ConditionalDiffusion``
        checkpoint given the same labels (autoguidance's ``reference``)."""
        return denoiser, load_denoiser(path, spec.ema, field), None

    def meta(self, contents: Any) -> dict | None:
        """What ``meta.json`` records of the file beyond its sha256 (``None``: nothing)."""
        return None

    def implied_denoiser(self, net) -> Denoiser:
        """``net`` under the format's own schedule and prediction."""
        return Denoiser(net, make_schedule(**self.schedule), Prediction(self.prediction))


SOURCES: dict[str, ModelSource] = {}


def register_source(cls: type[ModelSource]) -> type[ModelSource]:
    """Class decorator: make ``cls`` the source of ``format: cls.name``."""
    SOURCES[cls.name] = cls()
    return cls


@register_source
class DiffusersSource(ModelSource):
    """A diffusers ``StableDiffusionPipeline`` folder or cached hub name (``diffusion.text``): its UNet under its
    scheduler's schedule and prediction, its VAE's latents and its prompt encoder (``TextDenoiser.encode``)."""

    name, what = "diffusers", "diffusers pipeline folder"
    options = ("negative_prompt", "gradient_checkpointing")

    def claims(self, spec: ModelSpec) -> bool:
        return spec.model is None and spec.checkpoint is not None and is_pipeline(spec.checkpoint)

    def check(self, spec: ModelSpec) -> None:
        super().check(spec)
        if spec.vae is not None:
            raise ConfigError(f"--vae: a diffusers pipeline brings its own VAE ({spec.field} {spec.checkpoint}/vae); "
                              "leave --vae unset")

    def read(self, spec: ModelSpec) -> TextToImage:
        return load_text_to_image(spec.checkpoint, negative_prompt=spec.negative_prompt,
                                  gradient_checkpointing=spec.gradient_checkpointing, field=spec.field)

    def denoiser(self, spec: ModelSpec, contents: TextToImage) -> Denoiser:
        return contents.denoiser


@register_source
class LightningSource(ModelSource):
    """A ``ConditionalDiffusion`` checkpoint of ``train.py`` (schedule and prediction in its hyperparameters)."""

    name, what = "lightning", CHECKPOINT_WHAT

    def claims(self, spec: ModelSpec) -> bool:
        return spec.model is None

    def read(self, spec: ModelSpec) -> dict:
        try:
            return read_checkpoint(spec.checkpoint, spec.field)
        except ConfigError as err:
            if str(spec.checkpoint).endswith(".pt") and spec.format is None:
                raise ConfigError(f"{err} (a public DiT checkpoint needs --model, e.g. DiT-XL/2)") from None
            if str(spec.checkpoint).endswith((".pkl", ".safetensors")) and spec.format is None:
                raise ConfigError(f"{err} (an EDM2 snapshot needs --format edm2)") from None
            raise

    def denoiser(self, spec: ModelSpec, contents: dict) -> Denoiser:
        model = module_from_checkpoint(contents, spec.checkpoint, spec.field)
        return model.ema_denoiser() if spec.ema else model.denoiser


@register_source
class DiTSource(ModelSource):
    """A public DiT state dict (``DiT-XL-2-256x256.pt``, or the public training script's checkpoints)."""

    name, what = "dit", "torch weights file of a DiT"
    schedule = {"name": "vp", "num_timesteps": 1000, "betas": "linear"}
    prediction = "eps"
    needs_vae = True
    options = ("model", "image_size", "num_heads")

    def claims(self, spec: ModelSpec) -> bool:
        return spec.model is not None

    @staticmethod
    def field(spec: ModelSpec) -> str:
        return f"{spec.field}: DiT checkpoint"

    def read(self, spec: ModelSpec) -> dict:
        return read_state_dict(spec.checkpoint, self.field(spec))

    def denoiser(self, spec: ModelSpec, contents: dict) -> Denoiser:
        net = load_dit_checkpoint(spec.checkpoint, spec.model, spec.image_size, spec.num_heads,
                                  field=self.field(spec), state_dict=contents)
        return self.implied_denoiser(net)


@register_source
class EDM2Source(ModelSource):
    """An official EDM2 snapshot (``edm2-*.pkl``, read without running its code) or its ``convert_edm2``
    safetensors file (docs/edm2.md). Its guiding file is its reference condition: an unconditional network
    (``label_dim = 0``) answers the null condition (CFG); a conditional one is the reference given the same
    labels (autoguidance). img512 latents decode through the SD VAE with the snapshot's per-channel scale and
    bias (``spec.vae``, default ``stabilityai/sd-vae-ft-mse``, never downloaded); img64 networks work on pixels."""

    name, what = "edm2", "EDM2 snapshot (.pkl or .safetensors)"
    own_decoder = True
    vae = "stabilityai/sd-vae-ft-mse"
    latent_encoder, pixel_encoder = "StabilityVAEEncoder", "StandardRGBEncoder"

    def read(self, spec: ModelSpec) -> tuple[EDM2Precond, EDM2Snapshot]:
        try:
            return load_edm2(spec.checkpoint)
        except ConfigError as err:
            raise ConfigError(f"{spec.field}: {err}") from None

    def codec(self, spec: ModelSpec, snapshot: EDM2Snapshot) -> LatentCodec | None:
        if snapshot.encoder == self.latent_encoder:
            return ChannelLatentCodec(load_autoencoder(spec.vae or self.vae), snapshot.latent_scale,
                                      snapshot.latent_bias)
        if snapshot.encoder not in (self.pixel_encoder, None):
            raise ConfigError(f"{spec.field}: the snapshot's encoder {snapshot.encoder!r} is unknown; EDM2 files "
                              f"have {self.latent_encoder} (img512) or {self.pixel_encoder} (img64)")
        if spec.vae is not None:
            raise ConfigError(f"--vae {spec.vae}: {spec.checkpoint} is a pixel-space EDM2 network "
                              f"({self.pixel_encoder}); give no --vae")
        return None

    def denoiser(self, spec: ModelSpec, contents: tuple[EDM2Precond, EDM2Snapshot]) -> EDM2Denoiser:
        net, snapshot = contents
        if not net.label_dim:
            raise ConfigError(f"{spec.field} {spec.checkpoint}: the main EDM2 network is unconditional "
                              "(label_dim=0); give a conditional network as --checkpoint and the unconditional "
                              "one as --guidance.reference_checkpoint (CFG)")
        return EDM2Denoiser(net, codec=self.codec(spec, snapshot))

    def with_reference(self, spec: ModelSpec, denoiser: EDM2Denoiser, path: str,
                       field: str) -> tuple[Denoiser, Denoiser | None, dict]:
        net, snapshot = self.read(ModelSpec(path, self.name, field=field))
        if net.label_dim:
            kind, reference = "autoguidance", EDM2Denoiser(net)
        else:
            kind, reference = "cfg_unconditional", None
            try:
                denoiser = EDM2Denoiser(denoiser.net, unconditional=net, codec=denoiser.codec)
            except ConfigError as err:
                raise ConfigError(f"{field} {path}: {err}") from None
        return denoiser, reference, {"kind": kind, **self.meta((net, snapshot))}

    def meta(self, contents: tuple[EDM2Precond, EDM2Snapshot]) -> dict:
        return snapshot_metadata(contents[1])


def source_of(spec: ModelSpec) -> ModelSource:
    """The source ``spec.format`` names, or the first that claims the spec."""
    if spec.format is not None:
        if spec.format not in SOURCES:
            raise ConfigError(f"unknown --format {spec.format!r}; choose one of {sorted(SOURCES)} or null (detected)")
        return SOURCES[spec.format]
    return next((s for s in SOURCES.values() if s.claims(spec)), SOURCES["lightning"])


@dataclass
class LoadedModels:
    """``load_models``' result: the denoiser, the guiding file's reference (``None`` without one, or when the
    reference lives in the denoiser's null condition) and the source's ``meta``."""

    denoiser: Denoiser
    reference: Denoiser | None = None
    meta: dict | None = None


def load_models(spec: ModelSpec, reference: str | None = None,
                reference_field: str = "--guidance.reference_checkpoint") -> LoadedModels:
    """The denoiser of ``spec`` (eval mode, CPU): its source reads the file once and builds it; over the VAE's
    latents when ``spec.vae`` is set (checked against ``spec.image_size``); with the guiding file ``reference``
    attached as that source implements the reference condition. Bad input: one ConfigError line."""
    source = source_of(spec)
    source.check(spec)
    contents = source.read(spec)
    denoiser = source.denoiser(spec, contents)
    if spec.vae is not None and not source.own_decoder:
        denoiser = LatentDenoiser.over(denoiser, LatentCodec(load_autoencoder(spec.vae)))
        if spec.image_size is not None and denoiser.image_shape[1] != spec.image_size:
            raise ConfigError(f"--image_size {spec.image_size}: the model's {denoiser.data_shape[1]}x"
                              f"{denoiser.data_shape[2]} latents decode to {denoiser.image_shape[1]}x"
                              f"{denoiser.image_shape[2]} images with this VAE")
    loaded = LoadedModels(denoiser, None, source.meta(contents))
    if reference is not None:
        loaded.denoiser, loaded.reference, reference_meta = source.with_reference(spec, denoiser, reference,
                                                                                  reference_field)
        if reference_meta is not None:
            loaded.meta = {**(loaded.meta or {}), "reference": reference_meta}
    loaded.denoiser.eval()
    if loaded.reference is not None:
        loaded.reference.eval()
    return loaded


def load_model(spec: ModelSpec) -> Denoiser:
    """``load_models(spec).denoiser``: the model alone."""
    return load_models(spec).denoiser


def load_denoiser(path, ema: bool = True, field: str = "--checkpoint") -> Denoiser:
    """A ``ConditionalDiffusion`` checkpoint's EMA (or raw) denoiser: ``load_model`` of a ``lightning`` spec."""
    if path is None:
        raise ConfigError(f"{field} is required: the .ckpt file of a trained ConditionalDiffusion")
    return load_model(ModelSpec(str(path), format="lightning", ema=ema, field=field))


__all__ = ["DiTSource", "DiffusersSource", "EDM2Source", "LightningSource", "LoadedModels", "ModelSource", "ModelSpec",
           "SOURCES", "load_denoiser", "load_model", "load_models", "register_source", "source_of"]
