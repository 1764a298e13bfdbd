"""``ConditionalDiffusion``: trains any backbone ``net(x, t, y)`` as a class-conditional diffusion model.

Label dropout (Ho & Salimans 2022) replaces a label by the null id ``num_classes`` with probability
``label_dropout`` so the same network also learns the unconditional prediction CFG needs. An EMA
copy of the weights (``torch.optim.swa_utils.AveragedModel``) is used for validation and sampling.

Conditions come from the denoiser (``Denoiser.training_batch``, ``diffusion/conditions.py``): class labels, or
a text-to-image model's (``ConditionalDiffusion.for_text``) (image, caption) batches, the images encoded by its
VAE and the captions by its text encoder (both frozen), where caption dropout replaces an embedding by the
empty prompt's (``Conditioning.null``), the text version of label dropout; or a backbone's own conditioning.
"""

from __future__ import annotations

import warnings

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lightning_reg.diffusion import conditions
from lightning_reg.diffusion.denoiser import Denoiser, broadcast_coef, learned_variance_vlb
from lightning_reg.diffusion.predictions import Prediction
from lightning_reg.diffusion.schedules import SCHEDULES, EDMSchedule, NoiseSchedule, VPSchedule
from lightning_reg.errors import ConfigError, one_line
from lightning_reg.io.files import build_within, read_torch, require_keys, state_dict_mismatch, unwrap_state_dict
from lightning_reg.io.plain import check_arguments, plain_data
from lightning_reg.models.dit import DiT
from lightning_reg.models.edm2 import EDM2Precond, load_edm2
from lightning_reg.models.mlp import ToyMLP
from lightning_reg.models.unet import UNet

CHECKPOINT_WHAT = "PyTorch checkpoint of a ConditionalDiffusion"
EMA_PREFIX = "ema.module."  # the EMA weights of ``net`` in a checkpoint's state dict


class ConditionalDiffusion(L.LightningModule):
    """Args:
        net: backbone ``net(x, t, y)`` with attributes ``num_classes`` and ``data_shape``.
        schedule: forward process (``VPSchedule``, ``EDMSchedule``, ``FlowSchedule``).
        prediction: what ``net`` predicts: ``eps``, ``x0``, ``v`` (VP), ``edm`` (EDM), ``velocity`` (flow).
        label_dropout: probability of training a sample with the null label (DiT: 0.1).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up.
        ema_decay: decay of the EMA weights used for validation and sampling.
        init_from: fine-tuning: a checkpoint of the same backbone whose EMA weights start both the
            trained and the EMA weights (not saved as a hyperparameter: the run's own checkpoints
            stand alone). It may have fewer classes (see ``init_weights_from``).
        freeze: parameter-name prefixes of ``net`` kept fixed during training (e.g. ``[blocks]``).
        uncertainty: weight the loss by the backbone's learned uncertainty ``u = net.logvar(t)`` (EDM2 paper
            eq. 8: ``mse / exp(u) + u``); an EDM2 snapshot starts with ``from_edm2`` (docs/edm2.md).
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule | None = None, prediction: str = "eps",
                 label_dropout: float = 0.1, lr: float = 1e-3, weight_decay: float = 0.0,
                 warmup_steps: int = 100, ema_decay: float = 0.999, init_from: str | None = None,
                 freeze: list[str] | None = None, uncertainty: bool = False):
        super().__init__()
        if not 0.0 <= label_dropout < 1.0:
            raise ConfigError(f"label_dropout must lie in [0, 1), got {label_dropout}")
        if not 0.0 <= ema_decay < 1.0:
            raise ConfigError(f"ema_decay must lie in [0, 1), got {ema_decay}")
        if label_dropout and not getattr(net, "trains_null_label", True):
            raise ConfigError(f"model.label_dropout={label_dropout}: {type(net).__name__} has no null label (EDM2 "
                              "guides with a separate unconditional network); set it to 0")
        if uncertainty and not callable(getattr(net, "logvar", None)):
            raise ConfigError(f"model.uncertainty needs a backbone with a logvar(t) head (EDM2Precond), not "
                              f"{type(net).__name__}")
        if lr <= 0 or warmup_steps < 0:
            raise ConfigError("lr must be positive and warmup_steps non-negative")
        with warnings.catch_warnings():
            # Under LightningCLI the backbone is saved as its class_path config (so ``load_from_checkpoint``
            # rebuilds it); Lightning's advice to ignore it would drop that config.
            warnings.filterwarnings("ignore", message="Attribute 'net' is an instance of `nn.Module`")
            self.save_hyperparameters(ignore=["init_from"])
        for key in ("net", "schedule"):  # live objects (built in Python, not from a config) are not pickled
            if not isinstance(self.hparams.get(key), (dict, type(None))):
                self._hparams.pop(key)
                self._hparams_initial.pop(key, None)
        self.net = net
        self.schedule = schedule or VPSchedule()
        sigma_data = getattr(self.schedule, "sigma_data", 0.5)
        self.denoiser = Denoiser(net, self.schedule, Prediction(prediction, sigma_data))
        self.ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        if init_from is not None:
            self.init_weights_from(init_from)
        self.freeze_parameters(freeze or [])

    @classmethod
    def from_edm2(cls, path: str, **kwargs) -> "ConditionalDiffusion":
        """An EDM2 snapshot (``.pkl`` or ``.safetensors``, ``load_edm2``) to fine-tune: its network with float32
        trainable weights, EDM's loss under the snapshot's ``P_mean`` / ``P_std`` / ``sigma_data``, the logvar
        uncertainty weighting, no label dropout; ``kwargs`` override any argument (docs/edm2.md)."""
        net, snapshot = load_edm2(path)
        loss = snapshot.loss_kwargs
        schedule = EDMSchedule(p_mean=loss.get("P_mean", -1.2), p_std=loss.get("P_std", 1.2),
                               sigma_data=loss.get("sigma_data", net.sigma_data))
        net = net.to(torch.float32).requires_grad_(True).train()  # master weights of the optimiser
        return cls(net, schedule, **{"prediction": "edm", "label_dropout": 0.0, "uncertainty": True, **kwargs})

    def init_weights_from(self, path: str) -> None:
        """Start ``net`` and its EMA from the EMA weights of the checkpoint at ``path`` (fine-tuning), or from
        an EDM2 snapshot's weights (``.pkl`` / ``.safetensors``, cast to ``net``'s dtype).

        A checkpoint with fewer classes (same backbone otherwise) is widened: the label-embedding rows of
        its classes are kept, and every new row (the new classes and the null label, last) starts as its
        null row, so a new class starts from the unconditional model it was fine-tuned from.
        """
        if str(path).endswith((".pkl", ".safetensors")):
            self.load_net_weights(load_edm2(path)[1].state_dict, path)
            return
        checkpoint = read_checkpoint(path, "model.init_from")
        source = unwrap_state_dict(checkpoint["state_dict"], path, "model.init_from", under=(), prefix=EMA_PREFIX)
        target = self.net.state_dict()
        key = next(f"{name}.weight" for name, m in self.net.named_modules() if m is self.net.label_embedding)
        old, new = source.get(key), target[key]
        if old is not None and old.shape[0] < new.shape[0] and old.shape[1:] == new.shape[1:]:
            widened = old[-1].expand_as(new).clone()
            widened[: old.shape[0] - 1] = old[:-1]
            source[key] = widened
        self.load_net_weights(source, path)

    def load_net_weights(self, source: dict, path: str) -> None:
        """``source`` into ``net`` (strictly, cast to its dtypes) and its EMA."""
        mismatch = state_dict_mismatch(self.net.state_dict(), source)
        if mismatch:
            raise ConfigError(f"model.init_from {path} holds another architecture than model.net: {mismatch}")
        self.net.load_state_dict(source)
        self.ema.module.load_state_dict(self.net.state_dict())

    def freeze_parameters(self, prefixes: list[str]) -> None:
        """Keep fixed the parameters of ``net`` named ``prefix`` or ``prefix.*`` (``blocks``, ``blocks.0``)."""
        names = [name for name, _ in self.net.named_parameters()]

        def under(name: str, prefix: str) -> bool:
            return name == prefix or name.startswith(prefix + ".")

        unmatched = [p for p in prefixes if not any(under(name, p) for name in names)]
        if unmatched:
            tops = sorted({name.split(".")[0] for name in names})
            raise ConfigError(f"model.freeze {unmatched} match no parameter of model.net; its modules: {tops}")
        for name, param in self.net.named_parameters():
            param.requires_grad_(not any(under(name, p) for p in prefixes))

    @classmethod
    def for_text(cls, text: Denoiser, **kwargs) -> "ConditionalDiffusion":
        """Fine-tuning of a text-to-image ``text`` denoiser's UNet (``models.stable_diffusion``; its VAE and text encoder
        stay frozen). The UNet's weights train even where sampling froze them for gradient checkpointing."""
        text.net.requires_grad_(True)
        module = cls(text.net, text.schedule, text.prediction.kind, **kwargs)
        module.denoiser = text
        return module

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    def ema_denoiser(self) -> Denoiser:
        """The denoiser on the EMA weights (what validation and sampling use)."""
        return self.denoiser.with_net(self.ema.module)

    def drop_labels(self, y):
        """Label dropout: each condition (a label, a prompt embedding, ...) replaced by the null one with
        probability ``label_dropout``."""
        drop = torch.rand(conditions.batch_size(y), device=self.device) < self.hparams.label_dropout
        return self.denoiser.conditioning.drop(y, drop) if self.hparams.label_dropout else y

    def diffusion_loss(self, net: nn.Module, x0: Tensor, y: Tensor) -> Tensor:
        """Unweighted MSE between ``net``'s output and the prediction target at a random time.

        A backbone with ``learn_sigma`` (DiT) adds the VLB term that trains its variance channels, on a
        detached mean (improved DDPM's hybrid loss ``mse + vb``, as DiT trains).
        """
        t = self.schedule.sample_training_times(x0.shape[0], device=x0.device)
        a, s = (broadcast_coef(c, x0) for c in self.schedule.alpha_sigma(t))
        eps = torch.randn_like(x0)
        x_t = a * x0 + s * eps
        prediction = self.denoiser.prediction
        out = net(prediction.input_scale(a, s) * x_t, self.schedule.net_time(t).to(x0.dtype), y)
        out, v = out.chunk(2, dim=1) if self.denoiser.learn_sigma else (out, None)
        err = (out - prediction.target(x0, eps, a, s)).pow(2)
        if self.hparams.get("uncertainty"):  # EDM2 paper eq. 8: the learned u(sigma) per sample
            u = net.logvar(t).to(err.dtype).reshape(-1, *[1] * (err.ndim - 1))
            err = err / u.exp() + u
        mse = err.mean()
        if v is None:
            return mse
        x0_hat = prediction.to_x0(out.detach(), x_t, a, s)
        return mse + learned_variance_vlb(self.schedule, x0, x_t, t, x0_hat, v).mean()

    def training_step(self, batch, batch_idx):
        x0, y = self.denoiser.training_batch(batch)
        self.denoiser.conditioning.check(y, allow_null=True)
        loss = self.diffusion_loss(self.net, x0, self.drop_labels(y))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_fit_start(self) -> None:
        """Warn when the EMA cannot forget the first weights within the run: ``ema_decay ** max_steps`` of them
        stay in the average (1% or more: a model that samples well on its raw weights samples noise on its EMA)."""
        steps, decay = self.trainer.max_steps, self.hparams.ema_decay
        if steps > 0 and decay ** steps >= 0.01:
            rank_zero_warn(f"ema_decay={decay} over max_steps={steps}: the EMA weights used for validation and "
                           f"sampling keep {decay ** steps:.0%} of the first step's weights; lower ema_decay (to "
                           f"{max(0.0, 1 - 5 / steps):.4g} or less: 1 - 5 / max_steps) or train longer")

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.ema.update_parameters(self.net)

    def validation_step(self, batch, batch_idx):
        x0, y = self.denoiser.training_batch(batch)
        loss = self.diffusion_loss(self.ema.module, x0, y)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        trainable = [p for p in self.net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup = max(self.hparams.warmup_steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def read_checkpoint(path, field: str) -> dict:
    """The Lightning checkpoint at ``path`` (``io.read_torch``: tensors and plain data only) with its ``state_dict``."""
    return require_keys(read_torch(path, field, CHECKPOINT_WHAT), ["state_dict"], path, field, "Lightning checkpoint")


# The classes a checkpoint's hyperparameters may name, by the ``class_path`` LightningCLI records: an allow-list,
# so rebuilding a model never imports a name a file gives (docs/security.md). ``register_checkpoint_class`` adds
# a backbone of one's own (in one's own Python code, before loading).
CHECKPOINT_CLASSES: dict[str, dict[str, type]] = {"net": {}, "schedule": {}}


def register_checkpoint_class(cls: type, field: str = "net") -> type:
    """Allow ``field`` (``net`` or ``schedule``) of a checkpoint's hyperparameters to name ``cls``."""
    CHECKPOINT_CLASSES[field][f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


for _cls in (ToyMLP, UNet, DiT, EDM2Precond):
    register_checkpoint_class(_cls)
for _cls in SCHEDULES.values():
    register_checkpoint_class(_cls, "schedule")

# ``ConditionalDiffusion`` arguments a checkpoint may set besides ``net`` and ``schedule`` (``init_from`` names a
# file: never taken from a file).
CHECKPOINT_SCALARS = ("prediction", "label_dropout", "lr", "weight_decay", "warmup_steps", "ema_decay", "freeze",
                      "uncertainty")


def registered_class(spec, field: str, where: str) -> tuple[type, dict]:
    """``(class, init_args)`` of a hyperparameter ``{class_path, init_args}`` whose class is registered for
    ``field``; the name is looked up, never imported."""
    allowed = CHECKPOINT_CLASSES[field]
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str) or set(spec) - {"class_path",
                                                                                                 "init_args"}:
        raise ConfigError(f"{where}.{field} is not {{class_path, init_args}} of a {field} class")
    name = spec["class_path"]
    if name not in allowed:
        raise ConfigError(f"{where}.{field}.class_path {name[:100]!r} is not a {field} this project builds from a "
                          f"file (nothing was imported); accepted: {sorted(allowed)} (docs/security.md)")
    return allowed[name], spec.get("init_args") or {}


def module_from_checkpoint(checkpoint: dict, path, field: str) -> ConditionalDiffusion:
    """The ``ConditionalDiffusion`` of an already read checkpoint, rebuilt from its hyperparameters as *data*:
    ``net`` and ``schedule`` name registered classes (``CHECKPOINT_CLASSES``), every argument is type-checked
    (``io.check_arguments``) and the backbone's size is bounded by its weights; on the CPU. Anything else is one
    ConfigError naming the field."""
    try:
        return rebuild(checkpoint, path, field).eval()
    except ConfigError as err:
        raise ConfigError(f"{field} {path} is not a loadable ConditionalDiffusion checkpoint: {err}") from None
    except (TypeError, ValueError, KeyError, RuntimeError, AttributeError, IndexError) as err:
        # our own constructors refusing values of the right type (a width that does not divide), weights that
        # do not fit the module
        raise ConfigError(f"{field} {path} is not a loadable ConditionalDiffusion checkpoint "
                          f"({type(err).__name__}: {one_line(err)})") from None


def rebuild(checkpoint: dict, path, field: str) -> ConditionalDiffusion:
    """``module_from_checkpoint``'s work; its errors name the hyperparameter at fault."""
    where = "hyper_parameters"
    state = unwrap_state_dict(checkpoint["state_dict"], path, field, under=())
    hparams = plain_data(checkpoint.get("hyper_parameters") or {}, where)
    if not isinstance(hparams, dict) or "net" not in hparams:
        raise ConfigError(f"its {where} do not name the backbone (no 'net'), so it was not written by train.py")
    unknown = sorted(set(hparams) - set(CHECKPOINT_SCALARS) - {"net", "schedule", "_instantiator"})
    if unknown:
        raise ConfigError(f"its {where} hold {unknown[0]!r}, not an argument a checkpoint may set; accepted: "
                          f"{['net', 'schedule', *CHECKPOINT_SCALARS]}")
    scalars = check_arguments(ConditionalDiffusion, {k: hparams[k] for k in CHECKPOINT_SCALARS if k in hparams}, where,
                              complete=False)
    net_cls, net_args = registered_class(hparams["net"], "net", where)
    limit = max(sum(v.numel() for k, v in state.items() if k.startswith("net.")), 1)
    net_args = check_arguments(net_cls, net_args, f"{where}.net.init_args", int_limit=limit)
    schedule = None
    if hparams.get("schedule") is not None:
        schedule_cls, schedule_args = registered_class(hparams["schedule"], "schedule", where)
        schedule = schedule_cls(**check_arguments(schedule_cls, schedule_args, f"{where}.schedule.init_args"))
    model = build_within(lambda: ConditionalDiffusion(net_cls(**net_args), schedule, **scalars), state,
                         f"network ({where}.net)")
    model.load_state_dict(state, strict=True)
    return model
