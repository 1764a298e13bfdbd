"""Shared fixtures: a tiny ToyMLP-backed ``ConditionalDiffusion`` that trains in seconds on a CPU."""

import pytest
import torch

from lightning_reg.diffusion.schedules import VPSchedule
from lightning_reg.models.mlp import ToyMLP
from lightning_reg.module import ConditionalDiffusion


@pytest.fixture
def tiny_module():
    """``tiny_module(**kwargs)``: a seeded 2-class, 2-D model (hidden 32, 1 block, VP T=1000) with overrides."""

    def make(num_classes: int = 2, dim: int = 2, seed: int = 0, **kwargs) -> ConditionalDiffusion:
        torch.manual_seed(seed)
        net = ToyMLP(num_classes=num_classes, dim=dim, hidden=32, blocks=1)
        return ConditionalDiffusion(net, kwargs.pop("schedule", VPSchedule()), **kwargs)

    return make


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: its tensors are small, and on a busy 2-core machine two
    OpenMP threads make each tiny op ~100x slower. Restores the previous setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def clip_tokenizer():
    """A CLIP tokenizer over a small local vocabulary (lower-case letters, digits and punctuation, each also
    as a word end ``</w>``, one merge), nothing downloaded: ``<|startoftext|>`` 0, ``<|endoftext|>`` 1 (also
    pad), 139 ids in all; ``model_max_length`` 16."""
    import string

    from transformers import CLIPTokenizer

    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in (*chars, *(c + "</w>" for c in chars), "an"):
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[("a", "n")], model_max_length=16)


@pytest.fixture
def hub_cache(tmp_path):
    """``hub_cache(folder, "owner/name")``: a Hugging Face cache under ``tmp_path`` (the layout
    ``huggingface-cli download`` writes) holding ``folder`` as the one snapshot of that hub name; returns the
    cache folder."""
    import shutil

    def make(folder, name: str):
        revision = "0" * 40
        repo = tmp_path / f"models--{name.replace('/', '--')}"
        shutil.copytree(folder, repo / "snapshots" / revision)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision)
        return str(tmp_path)

    return make
