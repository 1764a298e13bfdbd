"""The ``dit`` source: a public DiT state dict (``DiT-XL-2-256x256.pt``, or the public training script's
checkpoints) under the schedule and prediction the format implies (a linear VP schedule of 1000 steps, eps).

It owns ``ModelSpec.model``, ``image_size`` and ``num_heads``: the architecture is named (``--model``), the
image size it must serve is checked once the VAE is attached (``verify``), and the heads complete a width
outside the paper's sizes (``models.dit.load_dit_checkpoint`` checks both against the weights).
"""

from __future__ import annotations

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.errors import ConfigError
from lightning_reg.models.dit import load_dit_checkpoint, read_state_dict
from lightning_reg.sources.base import ModelSource, ModelSpec, register_source


@register_source
class DiTSource(ModelSource):
    """A public DiT state dict (``DiT-XL-2-256x256.pt``, or the public training script's checkpoints)."""

    name, what = "dit", "torch weights file of a DiT"
    priority = 20
    schedule = {"name": "vp", "num_timesteps": 1000, "betas": "linear"}
    prediction = "eps"
    needs_vae = True
    options = ("model", "image_size", "num_heads")
    option_hint = "a public DiT checkpoint: give --model too (e.g. DiT-XL/2)"
    suffix = ".pt"  # the public files' (``hint``)

    def claims(self, spec: ModelSpec) -> bool:
        return spec.model is not None

    def hint(self, spec: ModelSpec) -> str | None:
        if str(spec.checkpoint).endswith(self.suffix):
            return "a public DiT checkpoint needs --model, e.g. DiT-XL/2"
        return None

    def described(self, spec: ModelSpec) -> str:
        return f"--model {spec.model}" if spec.model else super().described(spec)

    @staticmethod
    def field(spec: ModelSpec) -> str:
        return f"{spec.field}: DiT checkpoint"

    def read(self, spec: ModelSpec) -> dict:
        return read_state_dict(spec.checkpoint, self.field(spec))

    def denoiser(self, spec: ModelSpec, contents: dict) -> Denoiser:
        net = load_dit_checkpoint(spec.checkpoint, spec.model, spec.image_size, spec.num_heads,
                                  field=self.field(spec), state_dict=contents)
        return self.implied_denoiser(net)

    def verify(self, spec: ModelSpec, denoiser: Denoiser) -> None:
        """``--image_size`` against the images the VAE decodes the model's latents to."""
        if spec.vae is not None and spec.image_size is not None and denoiser.image_shape[1] != spec.image_size:
            raise ConfigError(f"--image_size {spec.image_size}: the model's {denoiser.data_shape[1]}x"
                              f"{denoiser.data_shape[2]} latents decode to {denoiser.image_shape[1]}x"
                              f"{denoiser.image_shape[2]} images with this VAE")
