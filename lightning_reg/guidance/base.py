"""The shared base of all guidance methods, and the guided denoiser that samplers call.

Convention (docs/theory.md): the guided estimate is ``x0_c + g``, where a method's guidance term ``g`` is
CFG's ``w(t) * (x0_c - x0_ref)`` (in eps units ``eps_c + w(t) * d``, ``d = eps_c - eps_ref``; see
``diffusion/predictions.py``) or another function of the two predictions (``guidance_term``). A method
may be configured in the other common convention ``eps_ref + w2 * d`` by ``convention: w2``; ``w2 = w + 1``.
``w(t) = 0`` means the plain conditional prediction: one forward of batch B, no backward. REG multiplies
whatever ``g`` a method returns (``reg.py``), so no method carries its own copy of it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.predictions import eps_from_x0, x0_from_eps
from lightning_reg.errors import ConfigError
from lightning_reg.guidance.reg import DEFAULT_EVERY, DEFAULT_WINDOW, Rectifier

CONVENTIONS = ("w", "w2")
BRANCH_LAYOUTS = ("auto", "batched", "split")
# the output space of guidance rescale: what eps-networks and flow networks output
OUTPUT_SPACES = {"vp": "eps", "edm": "eps", "flow": "velocity"}


def check_finite(name: str, value: float, minimum: float | None = None, maximum: float | None = None) -> float:
    """A finite number in ``[minimum, maximum]``; else a ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value}")
    return float(value)


def sample_dims(x: Tensor) -> tuple[int, ...]:
    """All non-batch dimensions: per-sample norms, dot products and stds reduce over these."""
    return tuple(range(1, x.ndim))


class ChainState:
    """What one sampling chain carries from call to call: its step index and methods' running values.

    A chain visits non-increasing times (DDPM index, sigma or flow t all fall from noise to clean; EDM's
    Heun corrector calls the next time twice). ``step`` counts the distinct times seen so far (0 at the
    first). A call at a *noisier* time than the last one starts a new chain and clears the state.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.last_t, self.step, self.values = None, -1, {}

    def visit(self, t: Tensor | float) -> None:
        t = float(t)
        if self.last_t is not None and t > self.last_t:
            self.reset()
        if self.last_t is None or t < self.last_t:
            self.step += 1
        self.last_t = t


class GuidanceStep:
    """One denoiser call: ``x_t``, ``(a_t, s_t)`` and the chain's state, with the output spaces methods use.

    * ``output``/``to_x0``: the schedule's ``OUTPUT_SPACES`` entry, ``eps`` for VP and EDM, the velocity
      for flow (what eps- and flow networks output, and what their samplers step with).
    * ``velocity``/``x0_from_velocity``: the flow velocity ``v = eps - x0`` for *every* schedule:
      ``x / (a + s) = (1 - t') x0 + t' eps`` with ``t' = s / (a + s)`` is a rectified-flow path whose
      velocity is ``eps - x0``, so ``x0 = (x - s v) / (a + s)``.
    """

    def __init__(self, model: Denoiser, x: Tensor, t: Tensor | float, state: ChainState):
        self.x, self.t, self.state = x, t, state
        self.a, self.s = model.coefficients(t, x)
        self.flow = OUTPUT_SPACES[model.schedule.name] == "velocity"

    def velocity(self, x0: Tensor) -> Tensor:
        return eps_from_x0(x0, self.x, self.a, self.s) - x0

    def x0_from_velocity(self, v: Tensor) -> Tensor:
        return (self.x - self.s * v) / (self.a + self.s)

    def output(self, x0: Tensor) -> Tensor:
        return self.velocity(x0) if self.flow else eps_from_x0(x0, self.x, self.a, self.s)

    def to_x0(self, out: Tensor) -> Tensor:
        return self.x0_from_velocity(out) if self.flow else x0_from_eps(out, self.x, self.a, self.s)


class Guidance:
    """Base class: a guidance weight over time, a reference prediction, a guidance term, and the REG switch.

    Args:
        scale: guidance strength, read in ``convention`` (``w``: ``eps_c + w d``; ``w2``: ``eps_u + w2 d``).
        convention: ``w`` or ``w2``.
        reg: ``none``, ``paper`` (REG, the default form when on), ``vjp`` (exact first order), or a cheaper
            form of ``paper``: ``reuse``, ``window``, ``graph_free`` (``reg.py``, docs/guidance.md).
        reg_every: ``reuse``'s k: the factor is computed every k guided calls and reused in between.
        reg_window: ``window``'s ``[start, stop]`` of sampling progress where REG is on.
        branch_layout: how the conditional and reference branches run: ``batched`` (one forward of 2B),
            ``split`` (two of B) or ``auto`` (``split`` on the CPU, ``batched`` elsewhere; see ``layout``).
        guidance_channels: guide only these channels (dim 1), the others keep the conditional
            prediction; DiT's checkpoints used ``[0, 1, 2]``. ``None``: all channels.
        start, stop: guide only while sampling progress ``p`` (0 at the noisy start, 1 at the clean end)
            lies in ``[start, stop]`` (diffusers' guiders' ``start``/``stop``); the conditional prediction outside.
        guidance_rescale: ``phi`` of Lin et al. (2023, §3.4): the guided output's per-sample std is matched
            to the conditional one's, blended by ``phi`` (0: off).
        reference: a separate reference ``Denoiser`` given the *same* labels (autoguidance, Karras et al.
            2024: a smaller or earlier model); ``None``: the null label through the model (CFG).
            ``reference_checkpoint`` names its file (``sample.py`` loads it into ``reference``).
    """

    name = "guidance"
    needs_reference_model = False

    def __init__(self, scale: float = 1.0, convention: str = "w", reg: str = "none",
                 guidance_channels: Sequence[int] | None = None, start: float = 0.0, stop: float = 1.0,
                 guidance_rescale: float = 0.0, reg_every: int = DEFAULT_EVERY,
                 reg_window: Sequence[float] = DEFAULT_WINDOW, branch_layout: str = "auto",
                 reference: Denoiser | None = None, reference_checkpoint: str | None = None):
        if convention not in CONVENTIONS:
            raise ConfigError(f"unknown weight convention {convention!r}; choose 'w' or 'w2'")
        self.rectifier = Rectifier(reg, reg_every, reg_window)
        if branch_layout not in BRANCH_LAYOUTS:
            raise ConfigError(f"unknown branch_layout {branch_layout!r}; choose one of {list(BRANCH_LAYOUTS)}")
        self.branch_layout = branch_layout
        scale = check_finite(f"{self.name} scale", scale)
        self.w = self.to_w(scale, convention, "scale")
        self.convention, self.reg = convention, reg
        if guidance_channels is not None:
            guidance_channels = list(guidance_channels)
            if not guidance_channels or not all(isinstance(c, int) and not isinstance(c, bool)
                                                for c in guidance_channels):
                raise ConfigError(f"guidance_channels must be a non-empty list of channel indices or null "
                                  f"(all channels), got {guidance_channels!r}")
        self.guidance_channels = guidance_channels
        self.start = check_finite(f"{self.name} start", start, 0.0, 1.0)
        self.stop = check_finite(f"{self.name} stop", stop, self.start, 1.0)
        self.guidance_rescale = check_finite(f"{self.name} guidance_rescale", guidance_rescale, 0.0, 1.0)
        self.reference, self.reference_checkpoint = reference, reference_checkpoint

    @staticmethod
    def to_w(value: float, convention: str, field: str) -> float:
        """A weight given in ``convention`` as the ``w`` of ``eps_c + w d``; refuses ``w < 0``."""
        w = value - 1.0 if convention == "w2" else value
        if w < 0:
            low = "1 (w2 convention)" if convention == "w2" else "0 (w convention)"
            raise ConfigError(f"{field}={value} is below {low}: that extrapolates away from the condition")
        return w

    def weight(self, t: Tensor, model: Denoiser) -> float:
        """``w(t)``, the weight of ``d`` at time ``t`` (subclasses vary it)."""
        return self.w

    def weight_at(self, t: Tensor, model: Denoiser) -> float:
        """``w(t)`` inside the ``[start, stop]`` window of sampling progress, 0 outside it."""
        return self.weight(t, model) if self.start <= model.schedule.progress(t) <= self.stop else 0.0

    def guidance_term(self, x0_c: Tensor, x0_ref: Tensor, w: float, step: GuidanceStep) -> Tensor:
        """The method's ``g`` in x0 units, added to ``x0_c``: CFG's ``w(t) (x0_c - x0_ref)``."""
        return w * (x0_c - x0_ref)

    def bind(self, model: Denoiser) -> None:
        """Check the models this method will run with."""
        if self.guidance_channels is not None:
            channels = model.data_shape[0]
            bad = [c for c in self.guidance_channels if not 0 <= c < channels]
            if bad:
                raise ConfigError(f"guidance_channels {bad} outside the model's {channels} channels")
        if self.guidance_rescale and math.prod(model.data_shape) < 2:
            raise ConfigError(f"guidance_rescale needs samples of at least 2 values (a std), the model's "
                              f"data_shape is {model.data_shape}")
        ref = self.reference
        if ref is None:
            if self.reference_checkpoint:
                raise ConfigError(f"reference_checkpoint={self.reference_checkpoint!r} is set but was not loaded; "
                                  "pass reference=Denoiser(...) or sample through sample.py")
            return
        if ref.num_classes != model.num_classes or ref.data_shape != model.data_shape:
            raise ConfigError(
                f"{self.name} reference has num_classes={ref.num_classes}, data_shape={ref.data_shape}; "
                f"the model has num_classes={model.num_classes}, data_shape={model.data_shape}")
        if ref.schedule != model.schedule:
            raise ConfigError(f"{self.name} reference was trained with another noise schedule")

    def _masked(self, g: Tensor) -> Tensor:
        """``g`` on ``guidance_channels`` (dim 1), zero elsewhere; all of ``g`` when unset."""
        if self.guidance_channels is None:
            return g
        mask = torch.zeros(g.shape[1], dtype=g.dtype, device=g.device)
        mask[self.guidance_channels] = 1
        return g * mask.reshape(1, -1, *([1] * (g.ndim - 2)))

    def _rescaled(self, x0_c: Tensor, g: Tensor, step: GuidanceStep) -> Tensor:
        """``g`` after guidance rescale (Lin et al. 2023, §3.4) in the output space:
        ``o = o_g (phi std(o_c) / std(o_g) + 1 - phi)`` with ``o_c``, ``o_g`` the conditional and guided outputs."""
        if not self.guidance_rescale:
            return g
        out_c, out_g = step.output(x0_c), step.output(x0_c + g)
        ratio = out_c.std(dim=sample_dims(out_c), keepdim=True) / out_g.std(dim=sample_dims(out_g), keepdim=True)
        phi = self.guidance_rescale
        return step.to_x0(out_g * (phi * ratio + 1 - phi)) - x0_c

    def _term(self, x0_c: Tensor, x0_ref: Tensor, w: float, step: GuidanceStep) -> Tensor:
        """The full guidance term: the method's ``g``, rescaled, on ``guidance_channels``; what REG multiplies."""
        return self._masked(self._rescaled(x0_c, self.guidance_term(x0_c, x0_ref, w, step), step))

    def reference_x0(self, model: Denoiser, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """The reference prediction: ``reference`` given the same labels, else the model's null condition through
        the model (CFG)."""
        if self.reference is not None:
            return self.reference(x, t, y)
        return model(x, t, model.null_condition(y))

    def conditional_and_reference(self, model: Denoiser, x: Tensor, t: Tensor, y: Tensor,
                                  x_cond: Tensor | None = None):
        """The conditional prediction at ``x_cond`` (default ``x``; k stacked batches: kB rows) and the reference
        at ``x``: ``reference`` given the same labels, or else the model's null condition through the model, its
        (k + 1)B rows in one forward (``batched``, as DiT does for CFG) or one forward of B each (``split``), by
        ``branch_layout``."""
        x_cond = x if x_cond is None else x_cond
        y_cond = torch.cat([y] * (len(x_cond) // len(x)))  # labels or (B, L, D) prompt embeddings alike
        if self.reference is not None:
            return model(x_cond, t, y_cond), self.reference(x, t, y)
        rows, labels = torch.cat([x_cond, x]), torch.cat([y_cond, model.null_condition(y)])
        if self.layout(x) == "batched":
            x0 = model(rows, t, labels)
        else:
            x0 = torch.cat([model(r, t, l) for r, l in zip(rows.split(len(x)), labels.split(len(x)))])
        return x0[:len(x_cond)], x0[len(x_cond):]

    def layout(self, x: Tensor) -> str:
        """``branch_layout``; ``auto``: ``split`` on the CPU (faster there at every batch measured,
        benchmarks/README.md), ``batched`` elsewhere."""
        if self.branch_layout != "auto":
            return self.branch_layout
        return "split" if x.device.type == "cpu" else "batched"

    def guided_x0(self, model: Denoiser, x: Tensor, t: Tensor, y: Tensor, state: ChainState) -> Tensor:
        """``x0_c + g``, with ``g`` rectified by REG when it is on; ``x0_c`` where ``w(t) = 0`` or ``p`` is
        outside ``[start, stop]``.

        Channels outside ``guidance_channels`` keep the conditional prediction in every mode (the
        ``vjp`` rectification of the masked term is masked again, since ``J^T`` mixes channels).
        """
        w = self.weight_at(t, model)
        if w == 0:
            return model(x, t, y)
        step = GuidanceStep(model, x, t, state)
        if self.rectifier.active(model.schedule.progress(t)):
            return self.rectifier.guided_x0(self, model, x, t, y, w, step)
        x0_c, x0_ref = self.conditional_and_reference(model, x, t, y)
        return x0_c + self._term(x0_c, x0_ref, w, step)

    def __repr__(self):
        fields = {k: v for k, v in vars(self).items() if k != "reference"}
        return f"{type(self).__name__}(method={self.name!r}, {', '.join(f'{k}={v!r}' for k, v in fields.items())})"


class GuidedDenoiser:
    """``D(x, t)`` for fixed labels ``y``: what the samplers call in place of the bare denoiser.

    It owns the ``ChainState`` of its chain (APG's momentum, CFG-Zero*'s step count), so one
    ``GuidedDenoiser`` per chain (``generate`` builds one per batch) keeps batches and ranks independent;
    ``reset()`` or a call at a noisier time than the last starts a new chain.
    """

    def __init__(self, model: Denoiser, guidance: Guidance, y: Tensor):
        model.check_labels(y)
        guidance.bind(model)
        self.model, self.guidance, self.y = model, guidance, y
        self.state = ChainState()

    def reset(self) -> None:
        self.state.reset()

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.state.visit(t)
        return self.guidance.guided_x0(self.model, x, t, self.y, self.state)

    def __repr__(self):
        return repr(self.guidance)
