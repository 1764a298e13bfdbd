"""Guidance as one object: a rule (``rule.py``, ``methods.py``), its branches (``branches.py``), more terms with
perturbed references (``perturbed.py``: PAG, SEG, SLG) and REG (``reg.py``), and the guided denoiser ``D(x, t)``
that samplers call.

``w(t) = 0`` for the rule and every term (or sampling progress outside their ``[start, stop]`` windows) is the
plain conditional prediction: one forward of batch B, no backward. Otherwise the guided estimate is ``x0_c + g``
with ``g`` the sum of the step's terms (the rule's and the perturbed ones'), applied by the branches, and REG,
when on, rectifies that sum (``Rectifier.guided``).
"""

from __future__ import annotations

import difflib
import inspect
from typing import Mapping

import torch
from torch import Tensor

from lightning_reg.diffusion.conditions import Condition
from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.errors import ConfigError
from lightning_reg.guidance.branches import Branches
from lightning_reg.guidance.methods import GUIDANCE
from lightning_reg.guidance.perturbed import PERTURBATIONS, PerturbedTerm
from lightning_reg.guidance.reg import Rectifier
from lightning_reg.guidance.rule import GuidanceRule
from lightning_reg.guidance.step import ChainState, GuidanceStep


class Guidance:
    """A guidance method: ``rule`` (weight and term), ``branches`` (the two predictions, rescale, channel mask),
    ``rectifier`` (REG's mode; ``none``: off) and ``terms``, more terms each with its own weight, window and
    perturbed reference (diffusers' CFG + PAG). Built by ``make_guidance`` from one flat dict."""

    def __init__(self, rule: GuidanceRule, branches: Branches | None = None, rectifier: Rectifier | None = None,
                 terms: list[PerturbedTerm] | None = None):
        self.rule, self.branches = rule, branches or Branches()
        self.rectifier = rectifier or Rectifier()
        self.terms = terms or []

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
        """Check the models this method will run with, and this guidance against the backbone's own
        ``check_guidance`` where it has one."""
        self.branches.bind(model, self.rule.name, self.rule.needs_reference_model, self.rule.guides)
        self.rectifier.bind(model)
        for term in self.terms:
            term.bind(model)
        check = getattr(model.net, "check_guidance", None)  # distilled Flux: REG needs true CFG
        if check is not None:
            check(self)

    def guided(self, model: Denoiser, x: Tensor, t, y: Condition,
               state: ChainState) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(x0, v_c, x0_r)``: the guided estimate, the conditional branch's learned variance (``None`` without)
        and what the sampler renoises with: CFG++'s reference prediction (on the guided channels, ``x0_c`` on the
        others) inside its window, else ``None`` (``x0`` itself)."""
        w = self.rule.weight_at(t, model.schedule)
        renoise = self.rule.renoises and self.rule.in_window(t, model.schedule)  # CFG++: the reference at any w
        terms = [(term, w_k) for term in self.terms if (w_k := term.weight_at(t, model.schedule))]
        if w == 0 and not terms and not renoise:
            return *self.branches.conditional(model, x, t, y), None
        step = GuidanceStep(model, x, t, state)
        replaced = self.rule.replacement(step) if w else None
        if replaced is not None:  # its learned variance, as every step's, is the conditional branch's
            if self.branches.channels is None and not model.learn_sigma:
                return replaced, None, None
            x0_c, v = self.branches.conditional(model, x, t, y)
            return (replaced if self.branches.channels is None else x0_c + self.branches.mask(replaced - x0_c)), v, None
        with torch.no_grad():
            perturbed = [(term, w_k, term.reference_prediction(model, x, t, y)) for term, w_k in terms]
        renoising = {}

        def applied_term(x0_c: Tensor, x0_ref: Tensor | None) -> Tensor:
            """The step's terms summed, rescaled and masked by the branches: what REG multiplies."""
            if renoise:
                renoising["x0"] = x0_ref if self.branches.channels is None else x0_c + self.branches.mask(x0_ref - x0_c)
            g = self.rule.guidance_term(x0_c, x0_ref, w, step) if w else torch.zeros_like(x0_c)
            return self.branches.applied(x0_c, sum((term.guidance_term(x0_c, x0_p, w_k, step)
                                                    for term, w_k, x0_p in perturbed), g), step)

        reference = bool(w) or renoise
        if self.rectifier.active(step.progress) and (w or terms):
            x0, v = self.rectifier.guided(applied_term, self.branches, model, x, t, y, step, reference=reference)
        else:
            x0_c, x0_ref, v = self.branches.predict(model, x, t, y, reference=reference)
            x0 = x0_c + applied_term(x0_c, x0_ref)
        return x0, v, renoising.get("x0")

    def __repr__(self):
        terms = "".join(f", {term!r}" for term in self.terms)
        return f"Guidance({self.rule!r}, {self.branches!r}, {self.rectifier!r}{terms})"


class GuidedDenoiser:
    """``D(x, t)`` for a fixed condition ``y``: what the samplers call in place of the bare denoiser.

    It owns the ``ChainState`` of its chain (APG's momentum, CFG-Zero*'s step count, REG ``reuse``'s factor), and
    of its last call the conditional branch's learned variance (``learned_variance``, which the DDPM sampler asks
    after each call) and CFG++'s renoising prediction (``renoising_x0``, which the first-order steps ask), so one
    ``GuidedDenoiser`` per chain (``generate`` builds one per batch) keeps batches and ranks independent;
    ``reset()`` or a call at a noisier time than the last starts a new chain.
    """

    def __init__(self, model: Denoiser, guidance: Guidance, y: Condition):
        model.conditioning.check(y)
        guidance.bind(model)
        self.model, self.guidance, self.y = model, guidance, y
        self.state, self.variance, self.x0_r = ChainState(), None, None

    @property
    def renoises(self) -> bool:
        """Whether a step must renoise with ``renoising_x0`` (CFG++), which only first-order steps define."""
        return self.guidance.rule.renoises

    def reset(self) -> None:
        self.state.reset()

    def learned_variance(self) -> Tensor | None:
        """``v`` of the conditional branch of the last call (improved DDPM eq. 15's interpolation), or ``None``."""
        return self.variance

    def renoising_x0(self) -> Tensor | None:
        """``x0_r`` of the last call, whose noise ``(x - a_t x0_r) / s_t`` the step renoises with: CFG++'s
        unconditional prediction, or ``None`` (the returned estimate's own noise)."""
        return self.x0_r

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.state.visit(t)
        x0, self.variance, self.x0_r = self.guidance.guided(self.model, x, t, self.y, self.state)
        return x0

    def __repr__(self):
        return repr(self.guidance)


BRANCH_OPTIONS = {"branch_layout": "layout", "reference": "reference", "guidance_channels": "channels",
                  "guidance_rescale": "rescale"}
REG_OPTIONS = {"reg": "mode", "reg_every": "every", "reg_window": "window", "reg_tolerance": "tolerance",
               "reg_blocks": "blocks"}


def rule_parameters(cls: type) -> list[str]:
    """The keyword parameters a rule (or perturbation) class takes: its own and its bases' named ``__init__``
    parameters, but those it sets itself (``fixed``)."""
    names = []
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and klass is not object:
            names += [p.name for p in inspect.signature(klass.__init__).parameters.values()
                      if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return [name for name in names if name not in getattr(cls, "fixed", ())]


def check_known(what: str, params: Mapping, accepted: list[str]) -> None:
    """A ConfigError naming the first of ``params`` not ``accepted`` (and the nearest accepted name)."""
    unknown = [k for k in params if k not in accepted]
    if unknown:
        near = difflib.get_close_matches(str(unknown[0]), accepted, n=1)
        raise ConfigError(f"bad parameters for {what}: unknown {unknown[0]!r}"
                          f"{f' (did you mean {near[0]!r}?)' if near else ''}; accepted: {accepted}")


def make_term(kind: str, options) -> PerturbedTerm:
    """A ``pag``, ``seg`` or ``slg`` term from its mapping: the term's ``scale``, ``convention``, ``start``, ``stop``
    and the perturbation's ``layers`` (and SEG's ``blur_sigma``)."""
    if not isinstance(options, Mapping):
        raise ConfigError(f"{kind} must be a mapping such as {{scale: 3.0, layers: [...]}}, got {options!r}")
    rule_options, perturbation = rule_parameters(GuidanceRule), PERTURBATIONS[kind]
    check_known(f"guidance {kind!r}", options, sorted(set(rule_options) | set(rule_parameters(perturbation))))
    try:
        return PerturbedTerm(perturbation(**{k: v for k, v in options.items() if k not in rule_options}),
                             **{k: v for k, v in options.items() if k in rule_options})
    except TypeError as err:
        raise ConfigError(f"bad parameters for guidance {kind!r}: {err}") from None


def make_guidance(method: str = "cfg", **params) -> Guidance:
    """A guidance method by name from one flat dict, e.g. ``make_guidance("cfg", scale=1, reg="paper")``:
    ``reg`` and its ``reg_*`` options go to REG; ``branch_layout``, ``reference`` (a ``Denoiser``),
    ``guidance_channels``, ``guidance_rescale`` to the branches; ``pag``, ``seg``, ``slg`` (mappings,
    ``make_term``) are more terms; the rest goes to the method's rule."""
    if method not in GUIDANCE:
        raise ConfigError(f"unknown guidance method {method!r}; choose one of {sorted(GUIDANCE)}")
    if "reference_checkpoint" in params:
        raise ConfigError("reference_checkpoint names a file: sample.py and sweep.py load it; from Python pass "
                          "reference=<a Denoiser>")
    check_known(f"guidance {method!r}", params, sorted(set(rule_parameters(GUIDANCE[method])) | set(BRANCH_OPTIONS)
                                                     | set(REG_OPTIONS) | set(PERTURBATIONS)))
    branches = {BRANCH_OPTIONS[k]: params.pop(k) for k in list(params) if k in BRANCH_OPTIONS}
    reg = {REG_OPTIONS[k]: params.pop(k) for k in list(params) if k in REG_OPTIONS}
    terms = [make_term(k, params.pop(k)) for k in list(params) if k in PERTURBATIONS]
    try:
        rule = GUIDANCE[method](**params)
    except TypeError as err:
        raise ConfigError(f"bad parameters for guidance {method!r}: {err}") from None
    return Guidance(rule, Branches(**branches), Rectifier(**reg), terms)


