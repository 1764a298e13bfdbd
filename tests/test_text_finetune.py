"""Fine-tuning a text-to-image UNet with ``ConditionalDiffusion`` on captioned digits (tiny random diffusers
components, nothing downloaded): caption dropout to the empty prompt, only the UNet trains, and the validation
callback samples with CFG and REG from the captions' embeddings."""

import lightning
import pytest
import torch

from lightning_reg.callbacks import SamplingCallback
from lightning_reg.data.digits import CaptionedDigits
from lightning_reg.diffusion.latent import LatentCodec
from lightning_reg.diffusion.latent import LatentDenoiser
from lightning_reg.models.stable_diffusion import PromptEncoder, PromptUNet, text_denoiser as build_text_denoiser
from lightning_reg.sources.diffusers import schedule_from_scheduler_config
from lightning_reg.module import ConditionalDiffusion

CAPTION = "digit {name}"  # within the tiny tokenizer's 16 tokens ("a handwritten digit {name}" by default)


@pytest.fixture
def text_denoiser(clip_tokenizer, tiny_components):
    parts = tiny_components(clip_tokenizer, seed=1)
    encoder = PromptEncoder(parts["tokenizer"], parts["text_encoder"])
    schedule, prediction = schedule_from_scheduler_config(parts["scheduler"].config)
    return build_text_denoiser(PromptUNet(parts["unet"], gradient_checkpointing=True), schedule, prediction,
                               LatentCodec(parts["vae"]), encoder([""]), encoder)


def test_captioned_digits_pairs():
    data = CaptionedDigits(max_samples=12, max_val_samples=4, caption="a handwritten digit {name}", batch_size=5)
    data.setup()
    x, captions = next(iter(data.val_dataloader()))
    assert x.shape == (4, 3, 16, 16) and -1 <= x.min() < x.max() <= 1 and torch.equal(x[:, 0], x[:, 2])
    assert len(data.splits["train"]) == 12 and all(c.startswith("a handwritten digit ") for c in captions)
    assert {c.split()[-1] for _, c in data.splits["train"]} <= {"zero", "one", "two", "three", "four", "five", "six",
                                                                "seven", "eight", "nine"}


def test_caption_dropout_replaces_whole_embeddings_by_the_empty_prompt(text_denoiser):
    module = ConditionalDiffusion.for_text(text_denoiser, label_dropout=0.5)
    y = text_denoiser.conditioning.make(["digit one", "digit two"] * 16)
    torch.manual_seed(0)
    dropped = module.drop_labels(y)
    null = dropped == text_denoiser.conditioning.null_embedding
    kept = dropped == y
    rows_null, rows_kept = null.flatten(1).all(1), kept.flatten(1).all(1)
    assert torch.all(rows_null ^ rows_kept) and 4 < int(rows_null.sum()) < 28  # whole rows, about half


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_finetune_on_captioned_digits_with_reg_sampling_at_validation(text_denoiser, tmp_path, one_thread):
    module = ConditionalDiffusion.for_text(text_denoiser, label_dropout=0.2, lr=1e-3, warmup_steps=1,
                                           ema_decay=0.5)
    assert all(p.requires_grad for p in module.net.parameters())  # checkpointing froze them for sampling only
    unet_before = {k: v.clone() for k, v in module.net.state_dict().items()}
    frozen = {k: v.clone() for k, v in text_denoiser.state_dict().items() if not k.startswith("net.")}
    settings = [{"method": "cfg", "scale": 2.0, "reg": "none"}, {"method": "cfg", "scale": 2.0, "reg": "paper"}]
    callback = SamplingCallback(num_samples=2, settings=settings, sampler="ddim", sampler_kwargs={"eta": 0.0},
                                steps=2, batch_size=2, metrics=[], prompts=["digit seven", "digit one"])
    data = CaptionedDigits(max_samples=40, max_val_samples=8, caption=CAPTION, batch_size=8)
    trainer = lightning.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                                check_val_every_n_epoch=2, limit_val_batches=1, callbacks=[callback])
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 10 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    changed = [k for k, v in module.net.state_dict().items() if not torch.equal(v, unet_before[k])]
    assert len(changed) > len(unet_before) // 2  # the UNet trained
    for k, v in text_denoiser.state_dict().items():  # the VAE, the text encoder and the null embedding did not
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    assert (tmp_path / "samples" / "step_10.png").is_file()  # the callback's grid: 2 settings x 2 captions
    ema = module.ema_denoiser()
    assert isinstance(ema, LatentDenoiser) and ema.net is module.ema.module and ema.conditioning.takes_prompts
    x, _ = callback.sample(trainer, module)
    assert set(x) == {"cfg_w2_none", "cfg_w2_paper"} and x["cfg_w2_none"].shape == (2, 3, 16, 16)
    assert not torch.equal(x["cfg_w2_none"], x["cfg_w2_paper"])  # REG changes the samples
