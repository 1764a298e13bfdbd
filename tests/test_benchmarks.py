"""Every benchmark script imports and parses its flags: a script broken by a refactor fails here, not in
``make bench`` (the measurements themselves are not tests)."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "common")


@pytest.mark.timeout(300)
def test_every_benchmark_imports_and_prints_its_help():
    assert {"guidance_cost", "sd_cost", "edm2_cost"} <= set(SCRIPTS)
    code = ("import contextlib, importlib, io, sys\n"
            f"sys.path.insert(0, {str(BENCHMARKS)!r})\n"
            f"for name in {SCRIPTS!r}:\n"
            "    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
            "        importlib.import_module(name).main(['--help'])\n"
            "    assert 'usage' in out.getvalue(), name\n"
            "    print('ok', name)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [word for name in SCRIPTS for word in ("ok", name)]


def test_reg_factor_error_rows_on_a_tiny_unet(monkeypatch):
    """Every column of ``benchmarks/reg_factor_error.py`` along a 3-step chain; the carried factors have no
    previous step at the first row; adaptive's shares of fresh factors."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from reg_factor_error import COLUMNS, adaptive_shares, errors_along_chain

    from lightning_reg.diffusion.denoiser import Denoiser
    from lightning_reg.diffusion.predictions import Prediction
    from lightning_reg.diffusion.schedules import VPSchedule
    from lightning_reg.models.unet import UNet

    torch.manual_seed(0)
    net = UNet(num_classes=2, image_size=8, channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(), norm_groups=4)
    torch.nn.init.normal_(net.out[-1].weight, std=0.1)
    model = Denoiser(net, VPSchedule(1000), Prediction("eps"))
    rows = errors_along_chain(model, batch=4, steps=3, w=1.0)
    assert len(rows) == 3 and all(set(COLUMNS) <= set(row) for row in rows)
    assert all(math.isnan(rows[0][c]) for c in ("reuse eps", "reuse x0", "graph_free reuse"))
    assert all(math.isfinite(row[c]) and row[c] > 0 for row in rows[1:] for c in COLUMNS)
    shares = adaptive_shares(model, batch=4, steps=5, w=1.0)  # every chain starts with two fresh factors
    assert len(shares) == 5 and shares[:2] == [1.0, 1.0] and all(v in (0, 0.25, 0.5, 0.75, 1) for v in shares)


def test_transformer_cost_per_block_rows_at_a_tiny_width(monkeypatch):
    """``benchmarks/transformer_cost.py``'s per-block measurement on tiny SD3 and Flux blocks: every pass of every
    block in the tables; the forward (CFG's pass) saves nothing, the graph REG paper keeps is larger than what
    checkpointing keeps (exactly the block's inputs: both token streams and the time embedding, in each
    precision), and both grow with the tokens."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from transformer_cost import HELD, PASSES, PRECISIONS, BlockSpec, block_table, held_table, measure_blocks

    joint, flux = dict(num_attention_heads=2, attention_head_dim=8), dict(num_attention_heads=2, attention_head_dim=8,
                                                                        axes_dims_rope=(2, 2, 4))
    specs = [BlockSpec("joint", "joint", joint, "SD3", 2, (16, 8), (64, 8)),
             BlockSpec("double", "double", flux, "Flux", 1, (16, 8), (64, 8)),
             BlockSpec("single", "single", flux, "Flux", 2, (16, 8), (64, 8))]
    passes, held = measure_blocks(specs, repeats=1, warmup=0)
    for spec in specs:
        saved = {kind: passes[spec.name][kind]["saved"] for kind in PASSES}
        assert saved["forward"] == 0 and saved["forward + backward"] > saved["checkpointed"]
        assert saved["checkpointed"] == 4 * spec.width * (sum(spec.tokens) + 1)  # h, c and temb in float32
        for precision, (dtype, _, _) in PRECISIONS.items():
            graph, kept = (held[spec.name, precision][kind] for kind in HELD.values())
            assert kept == tuple(dtype.itemsize * spec.width * (k * sum(spec.tokens) + 1) for k in (1, 2))
            assert graph[1] > graph[0] > kept[0]
    rows = block_table(specs, passes).splitlines()
    assert len(rows) == 2 + len(specs) * len(PASSES) and all(row.count("|") == 10 for row in rows)
    rows = held_table(specs, held).splitlines()
    assert len(rows) == 2 + len(specs) * len(PRECISIONS) * len(HELD) and all(row.count("|") == 9 for row in rows)


def test_transformer_cost_extrapolation_adds_blocks_as_each_method_runs_them(monkeypatch):
    """``extrapolate_step``: each added block costs the passes the method runs through it (CFG two forwards, REG
    paper a forward and a forward + backward, checkpointed a forward and a checkpointed pass, graph_free three
    forwards) and adds what the method holds of it; ratios are to CFG's sum. ``affine`` through two points."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from transformer_cost import METHODS, affine, extrapolate_step

    passes = {"forward": {"wall": 1.0, "cpu": 1.0, "saved": 0},
              "forward + backward": {"wall": 2.0, "cpu": 3.0, "saved": 10},
              "checkpointed": {"wall": 3.0, "cpu": 4.0, "saved": 2}}
    step = {method: {"wall": 4.0, "cpu": 4.0, "peak": 100, "saved": 0} for method in METHODS}
    out = extrapolate_step(step, passes, blocks=2)
    assert list(out) == ["cfg", "reg paper", "reg paper, ckpt", "reg graph_free"]
    assert [out[m]["cpu"] for m in out] == [8.0, 12.0, 14.0, 10.0]
    assert [out[m]["wall"] for m in out] == [8.0, 10.0, 12.0, 10.0]
    assert [out[m]["cpu_ratio"] for m in out] == [1.0, 1.5, 1.75, 1.25]
    assert [(out[m]["saved"], out[m]["peak"]) for m in out] == [(0, 100), (20, 120), (4, 104), (0, 100)]
    assert affine((10, 18), 4, 12) == 26.0  # through (4, 10) and (8, 18): 2 + 2 x 12
