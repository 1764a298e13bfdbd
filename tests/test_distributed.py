"""Real multi-process runs (CPU, gloo, two processes): training with the sampling callback on two processes and
on two "nodes" (torchrun on the loopback address), ``sample.py`` on two nodes against one process, and a rank
that fails ending every process with a message that names it (docs/distributed.md)."""

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers import TOY_SAMPLE_ARGS as ARGS  # over conftest's session `checkpoint`
from helpers import classifier_checkpoint

from lightning_reg.data.digits import prepare_digits
from lightning_reg.guidance.guided import make_guidance
from lightning_reg.sampling.cli import main as sample_main
from lightning_reg.sampling.engine import balanced_labels, generate, rank_indices
from lightning_reg.sources import load_denoiser

ROOT = Path(__file__).parents[1]
SETTINGS = [{"method": "cfg", "scale": 1.0, "reg": "none"}, {"method": "cfg", "scale": 1.0, "reg": "paper"}]
CALLBACK = {"num_samples": 10, "steps": 3, "batch_size": 4, "save_samples": True, "settings": SETTINGS}
TOY_METRICS = ("energy_distance", "sliced_wasserstein", "on_shape", "log_likelihood")
LIMIT_S = 240  # every multi-process run here ends well within this, or the test fails


def train_config(folder: Path, net: dict, data: dict, callback: dict) -> Path:
    """A 4-step run validating (and sampling) at steps 2 and 4, CSV logs and a last.ckpt under ``folder``."""
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 4, "val_check_interval": 2,
                    "check_val_every_n_epoch": None, "limit_val_batches": 1, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(folder),
                    "callbacks": [
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"save_last": True}},
                        {"class_path": "lightning_reg.callbacks.SamplingCallback", "init_args": callback}],
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(folder), "name": "logs"}}},
        "model": {"net": net, "lr": 0.005, "warmup_steps": 1, "ema_decay": 0.5},
        "data": data}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


TOY_NET = {"class_path": "lightning_reg.models.mlp.ToyMLP",
           "init_args": {"num_classes": 2, "dim": 2, "hidden": 32, "blocks": 1, "x_scale": 1.0}}
TOY_DATA = {"class_path": "lightning_reg.data.toy.Toy2D",
            "init_args": {"num_train": 512, "num_val": 64, "batch_size": 64}}


def environment(*paths: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (ROOT, *paths))), "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], cwd: Path, *paths: Path) -> subprocess.CompletedProcess:
    """``python ARGS`` in ``cwd``, stopped (and the test failed) after ``LIMIT_S``."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env=environment(*paths), capture_output=True, text=True,
                          timeout=LIMIT_S)


def two_nodes(args: list[str], cwd: Path, node_args: tuple[list[str], list[str]] = ([], [])) -> list[tuple]:
    """``torchrun --nnodes 2 --nproc_per_node 1`` on the loopback address, node 0 and node 1 as two background
    processes (``node_args[r]`` added on node ``r``); ``[(returncode, stdout, stderr, seconds)]`` per node.
    A node still running after ``LIMIT_S`` is killed and the test fails."""
    port, start = free_port(), time.time()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                               str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port",
                               str(port), *args, *node_args[rank]], cwd=cwd, env=environment(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
              for rank in range(2)]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1.0, LIMIT_S - (time.time() - start)))
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, 9)
            pytest.fail(f"two-node run still running after {LIMIT_S} s: {args}")
        results.append((proc.returncode, out, err, time.time() - start))
    return results


def logged(log_dir: Path) -> pd.DataFrame:
    """The rows of ``metrics.csv`` that hold the callback's metrics, by step."""
    metrics = pd.read_csv(log_dir / "metrics.csv")
    keys = [c for c in metrics.columns if c.startswith("sample/")]
    return metrics.dropna(subset=keys, how="all").set_index("step")[keys]


def assert_samples_match_one_process(folder: Path, log_dir: Path, world: int = 2) -> None:
    """The samples the callback gathered at the last validation (step 4) are what one process generates from
    the run's final EMA weights: bit for bit with the ranks' batches, to rounding in one batch."""
    denoiser = load_denoiser(folder / "logs" / "version_0" / "checkpoints" / "last.ckpt", ema=True)
    n, batch = CALLBACK["num_samples"], CALLBACK["batch_size"]
    labels = balanced_labels(n, denoiser.num_classes)
    with np.load(log_dir / "samples" / "step_4.npz") as saved:
        assert np.array_equal(saved["labels"], labels.numpy())
        for setting, name in zip(SETTINGS, ("cfg_w1_none", "cfg_w1_paper")):
            guidance = make_guidance(**setting)
            gathered = torch.from_numpy(saved[name])
            by_rank = torch.empty_like(gathered)
            for rank in range(world):
                idx = rank_indices(n, rank, world)
                by_rank[idx] = generate(denoiser, guidance, labels[idx], idx, steps=CALLBACK["steps"], seed=0,
                                        batch_size=batch)
            assert torch.equal(gathered, by_rank)
            one_batch = generate(denoiser, guidance, labels, torch.arange(n), steps=CALLBACK["steps"], seed=0,
                                 batch_size=n)
            torch.testing.assert_close(gathered, one_batch, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(LIMIT_S + 60)
def test_toy_training_on_two_processes_logs_the_callback_metrics(tmp_path):
    config = train_config(tmp_path, TOY_NET, TOY_DATA, CALLBACK)
    proc = run([str(ROOT / "train.py"), "fit", "--config", str(config), "--trainer.devices", "2",
                "--trainer.strategy", "ddp"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_dir = tmp_path / "logs" / "version_0"
    assert f"logs:       {log_dir}" in proc.stdout  # after_fit on every rank, printed by rank 0
    rows = logged(log_dir)
    assert rows.index.tolist() == [1, 3]  # global steps 2 and 4, logged zero-based
    for name in ("cfg_w1_none", "cfg_w1_paper"):
        for metric in TOY_METRICS:
            assert np.isfinite(rows[f"sample/{name}/{metric}"]).all()
    assert sorted(p.name for p in (log_dir / "samples").iterdir()) == [
        "step_2.npz", "step_2.png", "step_4.npz", "step_4.png"]
    assert_samples_match_one_process(tmp_path, log_dir)


@pytest.mark.slow
@pytest.mark.timeout(LIMIT_S + 60)
def test_digits_training_on_two_processes_logs_fid_and_accuracy(tmp_path):
    data_root = tmp_path / "data"
    prepare_digits("sklearn", data_root)  # once, before the processes start
    network = classifier_checkpoint(tmp_path / "clf.ckpt", image_size=8, channels=1, num_classes=10)
    net = {"class_path": "lightning_reg.models.unet.UNet",
           "init_args": {"num_classes": 10, "image_size": 8, "channels": 1, "base_channels": 8, "channel_mult": [1],
                         "num_res_blocks": 1, "attention_resolutions": []}}
    data = {"class_path": "lightning_reg.data.digits.Digits",
            "init_args": {"source": "sklearn", "root": str(data_root), "image_size": 8, "batch_size": 16}}
    callback = {"num_samples": 10, "steps": 2, "batch_size": 10, "sampler": "ddim", "settings": SETTINGS[:1],
                "metrics": ["fid", "accuracy"], "feature_network": str(network)}
    config = train_config(tmp_path, net, data, callback)
    proc = run([str(ROOT / "train.py"), "fit", "--config", str(config), "--trainer.devices", "2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = logged(tmp_path / "logs" / "version_0")
    assert rows.index.tolist() == [1, 3]
    assert (rows["sample/cfg_w1_none/fid"] > 0).all()
    assert rows["sample/cfg_w1_none/accuracy"].between(0, 1).all()


@pytest.mark.slow
@pytest.mark.timeout(LIMIT_S + 60)
def test_two_node_training_ends_cleanly_and_gathers_what_one_process_generates(tmp_path):
    config = train_config(tmp_path, TOY_NET, TOY_DATA, CALLBACK)
    nodes = two_nodes([str(ROOT / "train.py"), "fit", "--config", str(config), "--trainer.num_nodes", "2"], tmp_path)
    for rank, (code, _, err, _) in enumerate(nodes):
        assert code == 0, f"node {rank}: {err[-3000:]}"
    log_dir = tmp_path / "logs" / "version_0"
    assert logged(log_dir).index.tolist() == [1, 3]
    assert_samples_match_one_process(tmp_path, log_dir)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.timeout(LIMIT_S + 60)
def test_two_node_samples_are_byte_identical_to_one_process(checkpoint, tmp_path):
    one = tmp_path / "one"
    sample_main(["--checkpoint", str(checkpoint), "--output", str(one), *ARGS])
    two = tmp_path / "two"
    nodes = two_nodes([str(ROOT / "sample.py"), "--checkpoint", str(checkpoint), "--output", str(two), *ARGS,
                       "--trainer.num_nodes", "2"], tmp_path)
    for rank, (code, _, err, _) in enumerate(nodes):
        assert code == 0, f"node {rank}: {err[-3000:]}"
    assert sha256(two / "samples.npz") == sha256(one / "samples.npz")
    assert "on 2 process(es)" in nodes[0][1]


@pytest.mark.slow
@pytest.mark.timeout(LIMIT_S + 60)
def test_a_checkpoint_missing_on_one_node_ends_both_with_its_rank(checkpoint, tmp_path):
    out = tmp_path / "out"
    nodes = two_nodes([str(ROOT / "sample.py"), "--output", str(out), *ARGS, "--trainer.num_nodes", "2"], tmp_path,
                      (["--checkpoint", str(checkpoint)], ["--checkpoint", str(tmp_path / "only_on_node_0.ckpt")]))
    for code, _, _, seconds in nodes:
        assert code != 0 and seconds < LIMIT_S
    errors = [line for line in nodes[0][2].splitlines() if line.startswith("error:")]
    assert errors == [f"error: rank 1 of 2: --checkpoint {tmp_path / 'only_on_node_0.ckpt'} does not exist"], \
        nodes[0][2][-3000:]
    assert not out.exists()  # nothing written


@pytest.mark.slow
@pytest.mark.timeout(LIMIT_S + 60)
def test_a_corrupt_shard_read_by_rank_0_ends_every_node(checkpoint, tmp_path):
    out = tmp_path / "out"
    args = ["--checkpoint", str(checkpoint), "--output", str(out), *ARGS]
    sample_main([*args, "--max_shards", "1"])
    with np.load(out / "shard_00000.npz") as shard:  # indices shifted: every rank's check of the headers passes,
        np.savez(out / "shard_00000.npz", **{**shard, "indices": shard["indices"] + 1})  # rank 0 reads it last
    nodes = two_nodes([str(ROOT / "sample.py"), *args, "--trainer.num_nodes", "2"], tmp_path)
    for code, _, _, seconds in nodes:
        assert code != 0 and seconds < LIMIT_S
    assert f"error: rank 0 of 2: ConfigError: the shards in {out} do not cover the indices" in nodes[0][2]
    assert "error: rank 1 of 2: lost contact with another process" in nodes[1][2], nodes[1][2][-3000:]
    assert not (out / "samples.npz").exists()


FAILING_DATA = '''
from lightning_reg.data.toy import Toy2D


class FailsOnRank1(Toy2D):
    """Toy2D whose rank 1 cannot read its data, while rank 0 waits for it at Lightning's setup barrier."""

    def setup(self, stage=None):
        if self.trainer.global_rank == 1:
            raise OSError("training shard 3 is corrupt")
        super().setup(stage)
'''


@pytest.mark.slow
@pytest.mark.timeout(LIMIT_S + 60)
def test_a_training_rank_that_raises_ends_every_process(tmp_path):
    (tmp_path / "failing_data.py").write_text(FAILING_DATA)
    data = {**TOY_DATA, "class_path": "failing_data.FailsOnRank1"}
    config = train_config(tmp_path, TOY_NET, data, CALLBACK)
    start = time.time()
    proc = run([str(ROOT / "train.py"), "fit", "--config", str(config), "--trainer.devices", "2"], tmp_path, tmp_path)
    assert proc.returncode != 0 and time.time() - start < LIMIT_S
    assert "error: rank 1 of 2: OSError: training shard 3 is corrupt" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("flag", ["--trainer.num_nodes", "--trainer.devices"])
def test_a_non_positive_process_count_is_one_line(checkpoint, tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        sample_main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), flag, "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {flag} must be a positive integer, got 0"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.timeout(LIMIT_S + 60)
def test_a_resume_checkpoint_missing_on_one_node_ends_both_with_its_rank(checkpoint, tmp_path):
    config = train_config(tmp_path, TOY_NET, TOY_DATA, CALLBACK)
    missing = tmp_path / "only_on_node_0.ckpt"
    nodes = two_nodes([str(ROOT / "train.py"), "fit", "--config", str(config), "--trainer.num_nodes", "2"], tmp_path,
                      (["--ckpt_path", str(checkpoint)], ["--ckpt_path", str(missing)]))
    for code, _, _, seconds in nodes:
        assert code != 0 and seconds < LIMIT_S
    errors = [line for line in nodes[0][2].splitlines() if line.startswith("error:")]
    assert errors == [f"error: rank 1 of 2: --ckpt_path {missing} does not exist"], nodes[0][2][-3000:]
    assert f"error: rank 1 of 2: --ckpt_path {missing} does not exist" in nodes[1][2]
