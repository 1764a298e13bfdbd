"""What every model source shares: ``ModelSpec``, the ``ModelSource`` base class, the registry and the loading
(``load_models``). Nothing here knows a format: each lives in its own module of this package (``diffusers``,
``lightning``, ``dit``, ``edm2``), declares the ``ModelSpec`` options it takes and validates them itself; what
one source says about another's option or file it learns from the registry (``owner_of``, ``hint``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.latent import LatentCodec, LatentDenoiser
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import make_schedule
from lightning_reg.errors import ConfigError
from lightning_reg.guidance.branches import Branches
from lightning_reg.io.files import read_torch
from lightning_reg.io.vae import load_autoencoder


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and how (``sample.py``'s ``--checkpoint``, ``--format``, ``--model``, ...).

    The fields every format reads: ``checkpoint``, ``format``, ``vae``, ``ema``, ``field``. The others are one
    format's options (its source's ``options``; any other source refuses them, naming their owner):

    Args:
        checkpoint: the file (or folder) of the weights.
        format: a registered source name (``lightning``, ``dit``, ...) or ``None``: the source that claims the
            spec, asked in ``priority`` order (``diffusers`` for a pipeline folder or cached hub name, ``dit``
            when ``model`` names a DiT, else ``lightning``).
        model: owned by ``dit`` (``sources.dit``): the architecture (``DiT-XL/2``).
        image_size: owned by ``dit``: the image size the model must serve (latent side times 8).
        num_heads: owned by ``dit``: DiT widths outside the paper's sizes (heads do not show in the weights).
        vae: an ``AutoencoderKL`` folder or cached hub name: sample in its latent space, decode at the end
            (``dit`` needs one, ``edm2`` has a default, ``diffusers`` refuses it: the pipeline brings its own).
        ema: a ``lightning`` checkpoint's EMA weights (else its raw weights).
        field: the option name that errors quote.
        negative_prompt: owned by ``diffusers`` (``sources.diffusers``): the pipeline's reference prompt (its
            embedding is the null condition).
        gradient_checkpointing: owned by ``diffusers``: the pipeline's UNet recomputes its blocks in REG's
            backward.
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

    def is_set(self, option: str) -> bool:
        """Whether ``option`` differs from its default (the user gave it)."""
        default = next(f.default for f in fields(self) if f.name == option)
        return getattr(self, option) is not None if default is None else getattr(self, option) != default


class ModelSource:
    """A checkpoint format: ``read`` the file once, ``denoiser`` builds the model from what was read.

    Class data: ``name`` (the ``format`` key), ``what`` (the noun of its errors), ``priority`` (format guessing
    asks the sources in ascending ``priority``, see ``source_of``), ``schedule`` and ``prediction`` (what the
    format implies, ``None`` when the checkpoint records its own), ``needs_vae``, ``own_decoder``, ``options``
    (the ``ModelSpec`` fields beyond the common ones that it takes) and ``option_hint`` (how another source's
    error describes this one when given one of its options).
    """

    name: ClassVar[str]
    what: ClassVar[str]
    priority: ClassVar[int]  # format guessing: lower is asked first (``source_of``); unique
    schedule: ClassVar[dict | None] = None  # make_schedule(**schedule)
    prediction: ClassVar[str | None] = None
    needs_vae: ClassVar[bool] = False
    own_decoder: ClassVar[bool] = False  # builds its own decoder (``load_models`` attaches no ``spec.vae``)
    options: ClassVar[tuple[str, ...]] = ()  # the ModelSpec fields it takes beyond the common ones (ModelSpec)
    # "--<option> is for <option_hint>", ``{what}`` being the refusing source's noun; None: a generic text
    option_hint: ClassVar[str | None] = None

    def claims(self, spec: ModelSpec) -> bool:
        """Whether an unspecified ``format`` means this source."""
        return False

    def hint(self, spec: ModelSpec) -> str | None:
        """What to add when another source failed to read ``spec`` (no ``format`` given) and the file looks like
        this source's (by its name); ``None``: not recognised."""
        return None

    def described(self, spec: ModelSpec) -> str:
        """How errors name the model of ``spec``."""
        return f"a {self.what}"

    def refuse_option(self, option: str, refusing: ModelSource) -> str:
        """The error of an ``option`` this source owns, given to the source ``refusing``."""
        if self.option_hint is not None:
            return f"--{option} is for {self.option_hint.format(what=refusing.what)}"
        return f"--{option} is for a {self.what} (--format {self.name}), not a {refusing.what}"

    def check(self, spec: ModelSpec) -> None:
        """Refuse options the format does not take, before the file is read; a source checks its own options'
        values by overriding this (and ``verify``)."""
        if spec.checkpoint is None:
            raise ConfigError(f"{spec.field} is required: the {self.what} file")
        for option in (f.name for f in fields(ModelSpec)):
            owner = owner_of(option)
            if owner is not None and option not in self.options and spec.is_set(option):
                raise ConfigError(owner.refuse_option(option, self))
        if self.needs_vae and spec.vae is None:
            raise ConfigError(f"{self.described(spec)} samples latents: give --vae (the Stable Diffusion VAE, e.g. "
                              "stabilityai/sd-vae-ft-ema or a local folder)")

    def read(self, spec: ModelSpec) -> Any:
        return read_torch(spec.checkpoint, spec.field, self.what)

    def denoiser(self, spec: ModelSpec, contents: Any) -> Denoiser:
        raise NotImplementedError

    def verify(self, spec: ModelSpec, denoiser: Denoiser) -> None:
        """Check the loaded ``denoiser`` (over ``spec.vae``'s latents when set) against the spec's options."""

    def reference(self, spec: ModelSpec, path: str, field: str) -> tuple[Denoiser, dict | None]:
        """The guiding file ``path`` as ``(reference, meta)``: by default a ``ConditionalDiffusion`` checkpoint,
        the guidance ``reference`` given the same conditions."""
        return load_denoiser(path, spec.ema, field), None

    def location(self, spec: ModelSpec) -> str:
        """The file or folder the model was read from (what its sha256 covers)."""
        return spec.checkpoint

    def meta(self, contents: Any) -> dict | None:
        """What ``meta.json`` records of the file beyond its sha256 (``None``: nothing)."""
        return None

    def implied_denoiser(self, net) -> Denoiser:
        """``net`` under the format's own schedule and prediction."""
        return Denoiser(net, make_schedule(**self.schedule), Prediction(self.prediction))


SOURCES: dict[str, ModelSource] = {}
DEFAULT_FORMAT = "lightning"  # the source of a spec no source claims
REFERENCE_FORMAT = "lightning"  # the default guiding file (``ModelSource.reference``, ``load_denoiser``)


def register_source(cls: type[ModelSource]) -> type[ModelSource]:
    """Class decorator: make ``cls`` the source of ``format: cls.name``. Its ``priority`` must be its own: format
    guessing never depends on the order of registration."""
    if not isinstance(getattr(cls, "priority", None), int):
        raise ValueError(f"source {cls.name!r}: give it an int priority (its place in format guessing)")
    taken = {s.priority: s.name for s in SOURCES.values() if s.name != cls.name}
    if cls.priority in taken:
        raise ValueError(f"source {cls.name!r}: priority {cls.priority} is {taken[cls.priority]!r}'s")
    unknown = set(cls.options) - {f.name for f in fields(ModelSpec)}
    if unknown:
        raise ValueError(f"source {cls.name!r}: options {sorted(unknown)} are not ModelSpec fields")
    SOURCES[cls.name] = cls()
    return cls


def by_priority() -> list[ModelSource]:
    """The registered sources in the order format guessing asks them."""
    return sorted(SOURCES.values(), key=lambda source: source.priority)


def owner_of(option: str) -> ModelSource | None:
    """The source whose ``options`` hold ``option``, the first in ``priority`` order when several take it (the one
    that errors name); ``None``: an option every format reads."""
    return next((source for source in by_priority() if option in source.options), None)


def source_of(spec: ModelSpec) -> ModelSource:
    """The source ``spec.format`` names, or the first in ``priority`` order that claims the spec (else
    ``DEFAULT_FORMAT``'s)."""
    if spec.format is not None:
        if spec.format not in SOURCES:
            raise ConfigError(f"unknown --format {spec.format!r}; choose one of {sorted(SOURCES)} or null (detected)")
        return SOURCES[spec.format]
    return next((s for s in by_priority() if s.claims(spec)), SOURCES[DEFAULT_FORMAT])


@dataclass
class LoadedModels:
    """``load_models``' result: the denoiser, where it was read from, the guiding file's reference (``None``
    without one) and the source's ``meta``."""

    denoiser: Denoiser
    location: str
    reference: Denoiser | None = None
    meta: dict | None = None


def load_models(spec: ModelSpec, reference: str | None = None,
                reference_field: str = "--guidance.reference_checkpoint") -> LoadedModels:
    """The denoiser of ``spec`` (eval mode, CPU): its source reads the file once and builds it; over the VAE's
    latents when ``spec.vae`` is set (then checked by the source, ``verify``); with the guiding file
    ``reference`` attached as that source implements the reference condition. Bad input: one ConfigError line."""
    source = source_of(spec)
    source.check(spec)
    contents = source.read(spec)
    denoiser = source.denoiser(spec, contents)
    if spec.vae is not None and not source.own_decoder:
        denoiser = LatentDenoiser.over(denoiser, LatentCodec(load_autoencoder(spec.vae)))
    source.verify(spec, denoiser)
    loaded = LoadedModels(denoiser, source.location(spec), None, source.meta(contents))
    if reference is not None:
        loaded.reference, reference_meta = source.reference(spec, reference, reference_field)
        if reference_meta is not None:
            loaded.meta = {**(loaded.meta or {}), "reference": reference_meta}
        try:  # the guiding file must fit the model, named before anything samples
            Branches(reference=loaded.reference).bind(loaded.denoiser, "guidance", needs_reference=True)
        except ConfigError as err:
            raise ConfigError(f"{reference_field} {reference}: {err}") from None
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
    return load_model(ModelSpec(str(path), format=REFERENCE_FORMAT, ema=ema, field=field))
