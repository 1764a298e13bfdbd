"""Guidance as one object: a rule (``rule.py``, ``methods.py``), its branches (``branches.py``) and REG
(``reg.py``), and the guided denoiser ``D(x, t)`` that samplers call.

``w(t) = 0`` (or sampling progress outside the rule's ``[start, stop]``) is the plain conditional prediction:
one forward of batch B, no backward. Otherwise the guided estimate is ``x0_c + g`` with the rule's term
applied by the branches, and REG, when on, rectifies it (``Rectifier.guided``).
"""

from __future__ import annotations

import difflib
import inspect

from torch import Tensor

from lightning_reg.diffusion.conditions import Condition
from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.errors import ConfigError
from lightning_reg.guidance.branches import Branches
from lightning_reg.guidance.methods import GUIDANCE
from lightning_reg.guidance.reg import Rectifier
from lightning_reg.guidance.rule import GuidanceRule
from lightning_reg.guidance.step import ChainState, GuidanceStep


class Guidance:
    """A guidance method: ``rule`` (weight and term), ``branches`` (the two predictions, rescale, channel mask)
    and ``rectifier`` (REG's mode; ``none``: off). Built by ``make_guidance`` from one flat dict."""

    def __init__(self, rule: GuidanceRule, branches: Branches | None = None, rectifier: Rectifier | None = None):
        self.rule, self.branches = rule, branches or Branches()
        self.rectifier = rectifier or Rectifier()

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def w(self) -> float:
        """The rule's weight in the ``w`` convention."""
        return self.rule.w

    @property
    def reference(self) -> Denoiser | None:
        return self.branches.reference

    def bind(self, model: Denoiser) -> None:
        """Check the models this method will run with."""
        self.branches.bind(model, self.rule.name, self.rule.needs_reference_model, self.rule.guides)

    def term(self, x0_c: Tensor, x0_ref: Tensor, w: float, step: GuidanceStep) -> Tensor:
        """The applied guidance term: the rule's ``g``, rescaled and masked by the branches; what REG multiplies."""
        return self.branches.applied(x0_c, self.rule.guidance_term(x0_c, x0_ref, w, step), step)

    def guided(self, model: Denoiser, x: Tensor, t, y: Condition, state: ChainState) -> tuple[Tensor, Tensor | None]:
        """``(x0, v_c)``: the guided estimate and the conditional branch's learned variance (``None`` without)."""
        w = self.rule.weight_at(t, model.schedule)
        if w == 0:
            return self.branches.conditional(model, x, t, y)
        step = GuidanceStep(model, x, t, state)
        replaced = self.rule.replacement(step)
        if replaced is not None:  # its learned variance, as every step's, is the conditional branch's
            if self.branches.channels is None and not model.learn_sigma:
                return replaced, None
            x0_c, v = self.branches.conditional(model, x, t, y)
            return (replaced if self.branches.channels is None else x0_c + self.branches.mask(replaced - x0_c)), v
        if self.rectifier.active(step.progress):
            return self.rectifier.guided(lambda x0_c, x0_ref: self.term(x0_c, x0_ref, w, step), self.branches,
                                         model, x, t, y, step)
        x0_c, x0_ref, v = self.branches.predict(model, x, t, y)
        return x0_c + self.term(x0_c, x0_ref, w, step), v

    def __repr__(self):
        return f"Guidance({self.rule!r}, {self.branches!r}, {self.rectifier!r})"


class GuidedDenoiser:
    """``D(x, t)`` for a fixed condition ``y``: what the samplers call in place of the bare denoiser.

    It owns the ``ChainState`` of its chain (APG's momentum, CFG-Zero*'s step count, REG ``reuse``'s factor) and
    the conditional branch's learned variance of its last call (``learned_variance``, which the DDPM sampler
    asks after each call), so one ``GuidedDenoiser`` per chain (``generate`` builds one per batch) keeps batches
    and ranks independent; ``reset()`` or a call at a noisier time than the last starts a new chain.
    """

    def __init__(self, model: Denoiser, guidance: Guidance, y: Condition):
        model.conditioning.check(y)
        guidance.bind(model)
        self.model, self.guidance, self.y = model, guidance, y
        self.state, self.variance = ChainState(), None

    def reset(self) -> None:
        self.state.reset()

    def learned_variance(self) -> Tensor | None:
        """``v`` of the conditional branch of the last call (improved DDPM eq. 15's interpolation), or ``None``."""
        return self.variance

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.state.visit(t)
        x0, self.variance = self.guidance.guided(self.model, x, t, self.y, self.state)
        return x0

    def __repr__(self):
        return repr(self.guidance)


BRANCH_OPTIONS = {"branch_layout": "layout", "reference": "reference", "guidance_channels": "channels",
                  "guidance_rescale": "rescale"}
REG_OPTIONS = {"reg": "mode", "reg_every": "every", "reg_window": "window"}


def rule_parameters(cls: type) -> list[str]:
    """The keyword parameters a rule class takes: its own and its bases' named ``__init__`` parameters, but those
    it sets itself (``fixed``)."""
    names = []
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and klass is not object:
            names += [p.name for p in inspect.signature(klass.__init__).parameters.values()
                      if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return [name for name in names if name not in cls.fixed]


def make_guidance(method: str = "cfg", **params) -> Guidance:
    """A guidance method by name from one flat dict, e.g. ``make_guidance("cfg", scale=1, reg="paper")``:
    ``reg``, ``reg_every``, ``reg_window`` go to REG; ``branch_layout``, ``reference`` (a ``Denoiser``),
    ``guidance_channels``, ``guidance_rescale`` to the branches; the rest to the method's rule."""
    if method not in GUIDANCE:
        raise ConfigError(f"unknown guidance method {method!r}; choose one of {sorted(GUIDANCE)}")
    if "reference_checkpoint" in params:
        raise ConfigError("reference_checkpoint names a file: sample.py and sweep.py load it; from Python pass "
                          "reference=<a Denoiser>")
    accepted = sorted(set(rule_parameters(GUIDANCE[method])) | set(BRANCH_OPTIONS) | set(REG_OPTIONS))
    unknown = [k for k in params if k not in accepted]
    if unknown:
        near = difflib.get_close_matches(str(unknown[0]), accepted, n=1)
        raise ConfigError(f"bad parameters for guidance {method!r}: unknown {unknown[0]!r}"
                          f"{f' (did you mean {near[0]!r}?)' if near else ''}; accepted: {accepted}")
    branches = {BRANCH_OPTIONS[k]: params.pop(k) for k in list(params) if k in BRANCH_OPTIONS}
    reg = {REG_OPTIONS[k]: params.pop(k) for k in list(params) if k in REG_OPTIONS}
    try:
        rule = GUIDANCE[method](**params)
    except TypeError as err:
        raise ConfigError(f"bad parameters for guidance {method!r}: {err}") from None
    return Guidance(rule, Branches(**branches), Rectifier(**reg))


