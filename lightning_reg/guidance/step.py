"""What one guided denoiser call sees: ``x_t``, ``(a_t, s_t)``, the output spaces, and the chain's state.

Convention (docs/theory.md): the guided estimate is ``x0_c + g``; a method's guidance term ``g`` is written in
x0 units, whatever the network predicts (``diffusion/predictions.py``).
"""

from __future__ import annotations

from torch import Tensor

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.predictions import eps_from_x0, x0_from_eps

# the output space of guidance rescale: what eps-networks and flow networks output
OUTPUT_SPACES = {"vp": "eps", "edm": "eps", "flow": "velocity"}


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
    """One denoiser call: ``x_t``, ``(a_t, s_t)``, sampling progress and the chain's state, with the output spaces
    methods use.

    * ``output``/``to_x0``: the schedule's ``OUTPUT_SPACES`` entry, ``eps`` for VP and EDM, the velocity
      for flow (what eps- and flow networks output, and what their samplers step with).
    * ``velocity``/``x0_from_velocity``: the flow velocity ``v = eps - x0`` for *every* schedule:
      ``x / (a + s) = (1 - t') x0 + t' eps`` with ``t' = s / (a + s)`` is a rectified-flow path whose
      velocity is ``eps - x0``, so ``x0 = (x - s v) / (a + s)``.
    """

    def __init__(self, model: Denoiser, x: Tensor, t: Tensor | float, state: ChainState):
        self.x, self.state = x, state
        self.a, self.s = model.coefficients(t, x)
        self.progress = model.schedule.progress(t)
        self.flow = OUTPUT_SPACES[model.schedule.name] == "velocity"

    def velocity(self, x0: Tensor) -> Tensor:
        return eps_from_x0(x0, self.x, self.a, self.s) - x0

    def x0_from_velocity(self, v: Tensor) -> Tensor:
        return (self.x - self.s * v) / (self.a + self.s)

    def output(self, x0: Tensor) -> Tensor:
        return self.velocity(x0) if self.flow else eps_from_x0(x0, self.x, self.a, self.s)

    def to_x0(self, out: Tensor) -> Tensor:
        return self.x0_from_velocity(out) if self.flow else x0_from_eps(out, self.x, self.a, self.s)
