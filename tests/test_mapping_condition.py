"""A backbone whose condition is a mapping (``mapping_backbone.py``: a label and a continuous vector) goes through
the whole house with no change to the package: guidance and REG against a hand computation, ``train.py fit``
with the sampling callback on two processes, ``sample.py`` on one and two processes (the same bytes), a sweep."""

import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import LinearEps
from mapping_backbone import LabelVectorMLP, LinearLabelVector  # also registers LabelVectorMLP for checkpoints

from lightning_reg.diffusion import conditions
from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.predictions import Prediction, eps_from_x0
from lightning_reg.diffusion.schedules import VPSchedule
from lightning_reg.errors import ConfigError
from lightning_reg.guidance import GuidedDenoiser, make_guidance
from lightning_reg.sampling.cli import main as sample_main
from lightning_reg.sampling.engine import generate
from lightning_reg.sampling.sweep import main as sweep_main

ROOT, TESTS = Path(__file__).parents[1], Path(__file__).parent
LIMIT_S = 240
A = torch.tensor([[0.3, -0.2], [0.1, 0.4]], dtype=torch.float64)  # column sums A^T 1 = (0.4, 0.2)
BIAS = torch.tensor([[1.0, -2.0], [-0.5, 1.5], [0.2, 0.1]], dtype=torch.float64)  # 2 classes, last row: null
C = torch.tensor([[0.7, 0.0], [-0.3, 0.5]], dtype=torch.float64)


def linear_model() -> Denoiser:
    return Denoiser(LinearLabelVector(A, BIAS, C), VPSchedule(1000), Prediction("eps"))


def condition(labels, vectors) -> dict:
    return {"label": torch.tensor(labels), "vector": torch.tensor(vectors, dtype=torch.float64)}


@pytest.mark.parametrize("layout", ["batched", "split"])
@pytest.mark.parametrize("reg", ["none", "paper", "vjp"])
def test_reg_on_a_mapping_condition_matches_the_hand_computation(reg, layout):
    """``eps_c = A x + B[label] + C v``, the null condition ``(K, 0)``: ``d = B[label] + C v - B[K]``; CFG
    ``eps_c + w d``, REG paper ``eps_c + w d ⊙ (1 - s A^T 1)``, vjp ``eps_c + w (d - s A^T d)``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, generator=g, dtype=torch.float64)
    y = condition([0, 1, 1, 0], [[0.5, -1.0], [2.0, 0.3], [-0.4, 0.0], [1.0, 1.0]])
    model, w, t = linear_model(), 1.5, torch.tensor(400.0)
    a, s = model.coefficients(t, x)
    guided = GuidedDenoiser(model, make_guidance("cfg", scale=w, reg=reg, branch_layout=layout), y)
    with torch.no_grad():
        eps = eps_from_x0(guided(x, t), x, a, s)
    eps_c = x @ A.T + BIAS[y["label"]] + y["vector"] @ C.T
    d = BIAS[y["label"]] + y["vector"] @ C.T - BIAS[2]
    want = {"none": eps_c + w * d, "paper": eps_c + w * d * (1 - s * A.sum(0)),
            "vjp": eps_c + w * (d - s * d @ A)}[reg]
    torch.testing.assert_close(eps, want, rtol=0, atol=1e-10)


def test_a_mapping_condition_is_batched_split_and_checked_without_guidance_looking_inside():
    y = condition([0, 1, 1], [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    parts = conditions.split(y, 2)
    assert [conditions.batch_size(p) for p in parts] == [2, 1]
    assert torch.equal(conditions.cat(parts)["vector"], y["vector"])
    assert torch.equal(conditions.index(y, torch.tensor([2, 0]))["label"], torch.tensor([1, 0]))
    with pytest.raises(ConfigError, match="share their batch dimension"):
        conditions.batch_size({"label": torch.zeros(2), "vector": torch.zeros(3, 2)})
    with pytest.raises(ConfigError, match=r"a mapping of \['label', 'vector'\]"):
        GuidedDenoiser(linear_model(), make_guidance("cfg"), torch.tensor([0, 1]))
    labels = Denoiser(LinearEps(torch.eye(2), torch.zeros(3, 2), (2,)), VPSchedule(1000), Prediction("eps"))
    guidance = make_guidance("cfg", scale=1.0)
    for bad, got in (({"label": torch.tensor([0])}, r"\{label: torch.int64 \(1,\)\}"),
                     (torch.tensor([[0], [1]]), r"torch.int64 \(2, 1\)"), (torch.tensor([0.5]), "torch.float32")):
        with pytest.raises(ConfigError, match=rf"1-D tensor of class ids \(B,\), got {got}"):
            generate(labels, guidance, bad, range(conditions.batch_size(bad)), steps=1, seed=0, batch_size=2)
    assert generate(labels, guidance, np.array([0, 1]), [0, 1], steps=1, seed=0, batch_size=2).shape == (2, 2)
    # generate splits the mapping into batches and the chains do not depend on the batch size
    torch.manual_seed(0)
    model = Denoiser(LabelVectorMLP(hidden=8), VPSchedule(1000), Prediction("eps"))
    keys = model.conditioning.make(torch.tensor([0, 1, 0, 1, 1]))
    runs = [generate(model, make_guidance("cfg", scale=1.0, reg="paper"), keys, range(5), sampler="ddim", steps=4,
                     seed=3, batch_size=b) for b in (2, 5)]
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-6, atol=1e-6)


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (ROOT, TESTS))), "OMP_NUM_THREADS": "1"}


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=environment(), capture_output=True, text=True,
                          timeout=LIMIT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


SAMPLE_ARGS = ["--num_samples", "12", "--shard_size", "4", "--batch_size", "3", "--steps", "4", "--seed", "2",
               "--sampler", "ddim", "--distribution", "toy2d", "--guidance", "{method: cfg, scale: 1.0, reg: paper}"]


@pytest.mark.slow
@pytest.mark.timeout(3 * LIMIT_S)
def test_a_mapping_backbone_trains_samples_and_sweeps_on_one_and_two_processes(tmp_path):
    settings = [{"method": "cfg", "scale": 1.0, "reg": reg} for reg in ("none", "paper", "vjp")]
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_steps": 4, "val_check_interval": 2,
                    "check_val_every_n_epoch": None, "limit_val_batches": 1, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"save_last": True}},
                                  {"class_path": "lightning_reg.callbacks.SamplingCallback",
                                   "init_args": {"num_samples": 10, "steps": 3, "batch_size": 4,
                                                 "settings": settings}}],
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path), "name": "logs"}}},
        "model": {"net": {"class_path": "mapping_backbone.LabelVectorMLP", "init_args": {"hidden": 16}},
                  "lr": 0.005, "warmup_steps": 1, "ema_decay": 0.5, "label_dropout": 0.2},
        "data": {"class_path": "lightning_reg.data.toy.Toy2D",
                 "init_args": {"num_train": 256, "num_val": 64, "batch_size": 32}}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    run([str(ROOT / "train.py"), "fit", "--config", str(tmp_path / "train.yaml")], tmp_path)
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("sample/cfg_w1_vjp/energy_distance")]
    assert len(rows) == 2 and all(float(r[f"sample/cfg_w1_{m}/energy_distance"]) > 0 for r in rows
                                  for m in ("none", "paper", "vjp"))
    (checkpoint,) = tmp_path.rglob("last.ckpt")

    sample_main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "one"), *SAMPLE_ARGS])
    script = tmp_path / "sample_mapping.py"  # sample.py with the test backbone registered, in every process
    script.write_text("import mapping_backbone\nfrom lightning_reg.sampling.cli import main\nmain()\n")
    run([str(script), "--checkpoint", str(checkpoint), "--output", str(tmp_path / "two"), *SAMPLE_ARGS,
         "--trainer.devices", "2"], tmp_path)
    assert sha256(tmp_path / "two" / "samples.npz") == sha256(tmp_path / "one" / "samples.npz")

    sweep_main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "sweep"), "--distribution", "toy2d",
                "--methods", "[{method: cfg, weights: [0.5, 2]}, {method: apg, weights: [1]}]", "--reg", "[none, vjp]",
                "--num_samples", "8", "--batch_size", "8", "--shard_size", "8", "--steps", "3", "--sampler", "ddim"])
    with open(tmp_path / "sweep" / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["setting"] for r in table] == ["cfg_w0.5_none", "cfg_w2_none", "cfg_w0.5_vjp", "cfg_w2_vjp",
                                             "apg_w1_none", "apg_w1_vjp"]
    assert all(float(r["energy_distance"]) > 0 for r in table)


def test_the_mapping_backbone_checkpoint_class_is_registered_by_its_own_file():
    from lightning_reg.module import CHECKPOINT_CLASSES

    assert CHECKPOINT_CLASSES["net"]["mapping_backbone.LabelVectorMLP"] is LabelVectorMLP
