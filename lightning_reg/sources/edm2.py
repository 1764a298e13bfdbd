"""The ``edm2`` source: an official EDM2 snapshot (``edm2-*.pkl``, read without running its code) or its
``convert_edm2`` safetensors file (docs/edm2.md).

The file formats are ``io.edm2`` (and ``io.edm2_pickle``), the network built from a snapshot is
``models.edm2.load_edm2``; this module joins them into a denoiser, its guiding file and what ``meta.json``
records, and converts a pickle to safetensors once (``convert_edm2``). Format guessing never picks it (``--format
edm2``); the ``lightning`` source points a ``.pkl`` / ``.safetensors`` file here (``hint``).
"""

from __future__ import annotations

from pathlib import Path

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.latent import ChannelLatentCodec, LatentCodec
from lightning_reg.errors import ConfigError
from lightning_reg.io.edm2 import read_official_snapshot, save_edm2_safetensors, snapshot_metadata
from lightning_reg.io.edm2_pickle import EDM2Snapshot
from lightning_reg.io.vae import load_autoencoder
from lightning_reg.models.edm2 import EDM2Denoiser, EDM2Precond, edm2_from_snapshot, load_edm2
from lightning_reg.sources.base import ModelSource, ModelSpec, register_source


def convert_edm2(path: str | Path) -> Path:
    """Read an official ``edm2-*.pkl`` safely once and write ``<same name>.safetensors`` next to it, so later
    loads (``load_edm2``) never touch pickle."""
    path = Path(path)
    snapshot = read_official_snapshot(path)
    edm2_from_snapshot(snapshot, str(path))  # refuse a file our network cannot load before writing anything
    return save_edm2_safetensors(snapshot, path.with_suffix(".safetensors"))


@register_source
class EDM2Source(ModelSource):
    """An official EDM2 snapshot (``edm2-*.pkl``, read without running its code) or its ``convert_edm2``
    safetensors file (docs/edm2.md). Its guiding file is the guidance reference, given the same labels: an
    unconditional network (``label_dim = 0``, CFG: EDM2 trains no null label) or a weaker conditional one
    (autoguidance). img512 latents decode through the SD VAE with the snapshot's per-channel scale and
    bias (``spec.vae``, default ``stabilityai/sd-vae-ft-mse``, never downloaded); img64 networks work on pixels."""

    name, what = "edm2", "EDM2 snapshot (.pkl or .safetensors)"
    priority = 40  # claims nothing: --format edm2
    own_decoder = True
    vae = "stabilityai/sd-vae-ft-mse"
    latent_encoder, pixel_encoder = "StabilityVAEEncoder", "StandardRGBEncoder"
    suffixes = (".pkl", ".safetensors")  # the files ``hint`` recognises

    def hint(self, spec: ModelSpec) -> str | None:
        if str(spec.checkpoint).endswith(self.suffixes):
            return "an EDM2 snapshot needs --format edm2"
        return None

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

    def reference(self, spec: ModelSpec, path: str, field: str) -> tuple[Denoiser, dict]:
        """EDM2's guiding file, an ordinary guidance reference: an unconditional network (CFG) or a weaker
        conditional one (autoguidance), recorded as ``kind``."""
        net, snapshot = self.read(ModelSpec(path, self.name, field=field))
        kind = "autoguidance" if net.label_dim else "cfg_unconditional"
        return EDM2Denoiser(net), {"kind": kind, **self.meta((net, snapshot))}

    def meta(self, contents: tuple[EDM2Precond, EDM2Snapshot]) -> dict:
        return snapshot_metadata(contents[1])
