"""``sweep.py``: fronts and best points, resumption (settings and shards), and one-line errors that write nothing."""

import io
import json
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import lightning_reg.sampling.cli as sample_cli
import lightning_reg.sampling.sweep as sweep_module
from lightning_reg.guidance.reg import REG_MODES
from lightning_reg.metrics.fronts import (CHAIN_COLUMNS, axis_limits, best_rows, chain_labels, chains, dominates,
                                          fronts_figure, markdown_table, pareto_front, source_names, summary,
                                          write_table)
from lightning_reg.metrics.fronts import main as fronts_main
from lightning_reg.sampling.sweep import build_parser, sweep_settings
from lightning_reg.sampling.sweep import main as sweep_main
from lightning_reg.metrics.fronts import read_table

STEPS = 4
# 2 methods x 2 weights x 2 REG modes = 8 settings of 12 samples in 2 shards (one generate call per shard).
SWEEP = ["--methods", "[{method: cfg, weights: [0.5, 2]}, {method: interval, weights: [1, 3], t_lo: 0, t_hi: 500}]",
         "--reg", "[none, paper]", "--num_samples", "12", "--shard_size", "6", "--batch_size", "6",
         "--steps", str(STEPS), "--seed", "3", "--distribution", "toy2d"]
NAMES = ["cfg_w0.5_none", "cfg_w2_none", "cfg_w0.5_paper", "cfg_w2_paper", "interval_w1_none_t_hi500_t_lo0",
         "interval_w3_none_t_hi500_t_lo0", "interval_w1_paper_t_hi500_t_lo0", "interval_w3_paper_t_hi500_t_lo0"]
TIMING = ("time_per_sample_ms", "peak_memory_mib", "peak_memory_measure")


@pytest.fixture(scope="module", autouse=True)
def one_thread_module():
    """One intra-op thread for the whole module (as the ``one_thread`` fixture does per test): its module-scoped
    sweeps sample tiny batches, which two OpenMP threads on a busy 2-core machine slow down ~10x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def count_generate(monkeypatch):
    """Counts ``generate`` calls of the sampling chain (the 1-step check of each new setting excluded)."""
    calls = []

    def counted(*args, **kwargs):
        if kwargs["steps"] == STEPS:
            calls.append(len(args[3]))
        return generate(*args, **kwargs)

    generate = sample_cli.generate
    monkeypatch.setattr(sample_cli, "generate", counted)
    return calls


@pytest.fixture(scope="module")
def reference_sweep(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "sweep"
    sweep_main(["--checkpoint", str(checkpoint), "--output", str(out), *SWEEP])
    return out


def without_timing(rows):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


# energy distance (min) against on-shape (max); a hand-made table with known answers
TABLE = [
    {"method": "cfg", "reg": "none", "w": 0, "ed": 0.30, "on": 0.90},
    {"method": "cfg", "reg": "none", "w": 1, "ed": 0.10, "on": 0.95},  # best ed of (cfg, none)
    {"method": "cfg", "reg": "none", "w": 2, "ed": 0.20, "on": 0.99},
    {"method": "cfg", "reg": "paper", "w": 1, "ed": 0.08, "on": 0.96},  # best of (cfg, paper), dominates w=1 none
    {"method": "cfg", "reg": "paper", "w": 2, "ed": 0.12, "on": 0.99},  # dominates w=2 none
    {"method": "cosine", "reg": "none", "w": 1, "ed": 0.08, "on": 0.96},  # ties (cfg, paper, 1): both on the front
    {"method": "cosine", "reg": "none", "w": 2, "ed": float("nan"), "on": 1.0},  # NaN: never on a front or best
    {"method": "cosine", "reg": "paper", "w": 1, "ed": 0.40, "on": 0.85},
]
GOALS = {"ed": "min", "on": "max"}


def test_pareto_front_and_best_rows_of_a_hand_made_table():
    assert dominates(TABLE[3], TABLE[1], GOALS) and not dominates(TABLE[1], TABLE[3], GOALS)
    assert not dominates(TABLE[3], TABLE[5], GOALS)  # equal rows
    assert pareto_front(TABLE, GOALS) == [3, 4, 5]
    assert pareto_front(TABLE, {"ed": "min"}) == [3, 5]
    assert pareto_front(TABLE, {"on": "max"}) == [6]  # one objective: the best rows only
    best = best_rows(TABLE, ("method", "reg"), "ed", "min")
    assert list(best) == [("cfg", "none"), ("cfg", "paper"), ("cosine", "none"), ("cosine", "paper")]
    assert [best[k]["w"] for k in best] == [1, 1, 1, 1] and best[("cfg", "paper")]["ed"] == 0.08
    assert best_rows(TABLE, ("method",), "on", "max")[("cosine",)] is TABLE[6]  # the NaN ed does not matter here
    assert best_rows(TABLE, ("method",), "ed", "max")[("cosine",)] is TABLE[7]
    with pytest.raises(ValueError, match="'min' or 'max'"):
        best_rows(TABLE, ("method",), "ed", "lowest")


def test_fronts_cli_puts_two_sweeps_on_one_figure(reference_sweep, tmp_path, capsys):
    """Two tables (here the reference sweep's two methods, written apart) give one figure and every row."""
    rows = read_table(reference_sweep / "sweep.csv")
    write_table(tmp_path / "a.csv", rows[:4])
    write_table(tmp_path / "b.csv", rows[4:])
    fronts_main([str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "--front", "energy_distance", "on_shape",
                 "--output", str(tmp_path / "both.png")])
    out = capsys.readouterr().out
    assert Image.open(tmp_path / "both.png").size[0] >= 800
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)  # the header and one line per row, in the tables' order
    assert table[0].startswith("| source | method | reg | w |")  # which table each row came from
    assert table[5].startswith(f"| b | interval | none | 1 | {float(rows[4]['energy_distance']):.4g} |")
    line = next(line for line in out.splitlines() if re.match(r"b\s+interval\s+paper\s", line))
    best = min(rows[6:], key=lambda r: float(r["energy_distance"]))
    assert line.split()[3] == f"{float(best['w']):g}"
    for bad, message in (([str(tmp_path / "missing.csv")], "missing.csv does not exist"),
                         ([str(tmp_path / "a.csv"), "--front", "fid", "on_shape"], r"--front \['fid'\] are not")):
        argv = bad + (["--front", "energy_distance", "on_shape"] if "--front" not in bad else [])
        with pytest.raises(SystemExit) as exit_info:
            fronts_main(argv + ["--output", str(tmp_path / "bad.png")])
        assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)
        assert not (tmp_path / "bad.png").exists()


def test_sweep_outputs(reference_sweep, capsys, monkeypatch):
    rows = read_table(reference_sweep / "sweep.csv")
    assert [r["setting"] for r in rows] == NAMES
    assert [(r["method"], r["reg"], float(r["w"]), r["convention"], float(r["weight"])) for r in rows[:2]] == [
        ("cfg", "none", 0.5, "w", 0.5), ("cfg", "none", 2.0, "w", 2.0)]
    assert rows[4]["params"] == "t_hi=500 t_lo=0"
    for row in rows:
        assert {"energy_distance", "on_shape", "log_likelihood", "sliced_wasserstein"} <= set(row)
        assert float(row["time_per_sample_ms"]) > 0 and float(row["peak_memory_mib"]) > 0
        assert int(row["num_samples"]) == 12
        meta = json.loads((reference_sweep / row["setting"] / "meta.json").read_text())
        assert float(row["energy_distance"]) == meta["metrics"]["energy_distance"]  # the one evaluation path
        assert meta["generated_samples"] == 12 and meta["config"]["guidance"]["scale"] == float(row["weight"])
    assert Image.open(reference_sweep / "fronts.png").size[0] >= 800
    # the same command again: every setting is finished, nothing is sampled, the summary is printed again
    capsys.readouterr()
    titles = []
    monkeypatch.setattr(sweep_module, "save_fronts", lambda *args, title: titles.append(title))
    sweep_main(["--checkpoint", str(json.loads((reference_sweep / "cfg_w2_none" / "meta.json").read_text())
                                    ["checkpoint"]), "--output", str(reference_sweep), *SWEEP])
    out = capsys.readouterr().out
    best = min((r for r in rows if r["method"] == "cfg" and r["reg"] == "paper"),
               key=lambda r: float(r["energy_distance"]))
    line = next(line for line in out.splitlines() if re.match(r"cfg\s+paper\s", line))
    assert line.split()[2:4] == [f"{float(best['w']):g}", f"{float(best['energy_distance']):.4g}"]
    assert "8 of 8 settings" in out
    assert titles == ["sweep: 12 samples per setting, ddpm 4 steps"]  # the run's folder, not "last.ckpt"


def test_interrupted_sweep_resumes_and_equals_uninterrupted(reference_sweep, checkpoint, tmp_path, capsys,
                                                            count_generate):
    out = tmp_path / "sweep"
    args = ["--checkpoint", str(checkpoint), "--output", str(out), *SWEEP]
    sweep_main([*args, "--max_settings", "3"])
    assert "run the same command again to resume" in capsys.readouterr().out
    assert len(count_generate) == 3 * 2
    assert [r["setting"] for r in read_table(out / "sweep.csv")] == NAMES[:3]
    # a setting killed half-way: one of its two shards is done, no meta.json / row.json
    partial = out / NAMES[3]
    sweep_main([*args, "--max_settings", "1"])
    for name in ("row.json", "meta.json", "samples.npz", "samples.png", "shard_00001.npz"):
        (partial / name).unlink()
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*/shard_*.npz")}
    count_generate.clear()
    sweep_main(args)
    assert len(count_generate) == 1 + 4 * 2  # the partial setting's missing shard, then the 4 untouched settings
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())  # finished shards are not redone
    assert without_timing(read_table(out / "sweep.csv")) == without_timing(read_table(reference_sweep / "sweep.csv"))
    assert math.isclose(json.loads((partial / "row.json").read_text())["energy_distance"],
                        json.loads((reference_sweep / NAMES[3] / "row.json").read_text())["energy_distance"],
                        rel_tol=0, abs_tol=0)


def test_folder_of_another_sweep_is_refused_and_left_alone(reference_sweep, checkpoint, capsys):
    files = {p: p.stat().st_mtime_ns for p in reference_sweep.rglob("*")}
    with pytest.raises(SystemExit) as exit_info:
        sweep_main(["--checkpoint", str(checkpoint), "--output", str(reference_sweep), *SWEEP, "--seed", "4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --output {reference_sweep} holds another sweep (arguments differ in ['seed']); choose " \
                  "another folder"
    assert {p: p.stat().st_mtime_ns for p in reference_sweep.rglob("*")} == files


@pytest.mark.parametrize("change, message", [
    (["--methods", "[{method: cfg, weights: []}]"], r"--methods\[0\] \(cfg\): empty weight grid"),
    (["--methods", "[]"], "--methods is empty"),
    (["--methods", "[{method: cfg, weights: [1], power: 2}]"],
     r"--methods\[0\] \(cfg\) weight 1: bad parameters for guidance 'cfg': unknown 'power'; accepted: \['branch_layout'"),
    (["--methods", "[{method: cfg, weights: [1, -0.5]}]"],
     r"--methods\[0\] \(cfg\) weight -0.5: scale=-0.5 is below 0 \(w convention\)"),
    (["--methods", "[{method: cosine, weights: [2, 0.5]}]", "--convention", "w2"],
     r"--methods\[0\] \(cosine\) weight 0.5: scale=0.5 is below 1 \(w2 convention\)"),
    (["--methods", "[{method: cfg, weights: [1], reg: vjp}]"], r"\['reg'\] are set by the sweep"),
    (["--methods", "[{method: autoguidance, weights: [1], reference_checkpoint: weak.ckpt}]"],
     r"--methods\[0\] \(autoguidance\): reference_checkpoint is the sweep's guiding file: give it in --guidance"),
    (["--reg", "[none, half]"], r"--reg: unknown REG modes \['half'\]"),
    (["--distribution", "null"], "a sweep needs metrics"),
    (["--front", "[fid, on_shape]"], "--front must name two of the computed metrics"),
    (["--sampler", "euler"], "unknown sampler 'euler'"),
])
def test_bad_input_one_line_and_nothing_written(checkpoint, tmp_path, refused, change, message):
    out = tmp_path / "out"
    refused(lambda: sweep_main(["--checkpoint", str(checkpoint), "--output", str(out), *SWEEP, *change]), message, out)


def test_sweep_fingerprint_holds_the_metrics_options_too():
    """``SweepConfig.fingerprint``: the sample options as a run's, and the metrics' (its table holds them); the
    grid is left to the sweep's list of settings, and the figure's --front and --max_settings do not count."""
    from lightning_reg.sampling.config import SweepConfig

    base = {"checkpoint": "a.ckpt", "output": "out", "distribution": "toy2d",
            "methods": [{"method": "cfg", "weights": [1]}], "guidance": {"reference_checkpoint": "guide.ckpt"}}
    fingerprint = SweepConfig(**base).fingerprint("c" * 64, "r" * 64)
    assert fingerprint["distribution"] == "toy2d" and fingerprint["reference_sha256"] == "r" * 64
    assert not {"methods", "reg", "convention", "guidance", "front", "max_settings", "batch_size"} & set(fingerprint)
    other = SweepConfig(**{**base, "distribution": None, "evaluation": {"metrics": ["fid"]}}).fingerprint("c" * 64)
    assert sorted(k for k in fingerprint if fingerprint[k] != other[k]) == ["distribution", "evaluation",
                                                                             "reference_sha256"]
    for field in SweepConfig.__dataclass_fields__.values():
        assert field.metadata.get("decides", "samples") in ("samples", "metrics", "content", "grid", "run"), field


@pytest.mark.parametrize("name, data_key", [("sweep_toy2d", "distribution"), ("sweep_mnist", "evaluation")])
def test_shipped_sweep_configs_parse(name, data_key):
    """Both shipped sweeps name the six methods of the issue, >= 5 weights each and all three REG modes."""
    cfg = build_parser().parse_args(["--config", str(Path(__file__).parents[1] / "configs" / f"{name}.yaml")])
    assert [m["method"] for m in cfg.methods] == ["cfg", "interval", "linear", "cosine", "apg", "cfg_zero_star"]
    assert all(len(m["weights"]) >= 5 for m in cfg.methods) and list(cfg.reg) == ["none", "paper", "vjp"]
    assert cfg[data_key] is not None


def test_shipped_reg_modes_sweep_parses():
    """The cheap-REG sweep: CFG at w = 1 and 3 with every REG mode, >= 2,000 samples per setting, image metrics."""
    config = Path(__file__).parents[1] / "configs" / "sweep_mnist_reg_modes.yaml"
    cfg = build_parser().parse_args(["--config", str(config)])
    assert [(m["method"], list(m["weights"])) for m in cfg.methods] == [("cfg", [1, 3])]
    assert sorted(cfg.reg) == sorted(REG_MODES) and cfg.num_samples >= 2000 and cfg.evaluation is not None


def test_shipped_autoguidance_sweep_parses():
    """The digits autoguidance sweep: the guide as the sweep's reference, >= 2 weights, REG none / paper / vjp,
    >= 2,000 samples per setting, image metrics; its CFG side is the same config without the reference."""
    config = Path(__file__).parents[1] / "configs" / "sweep_mnist_autoguidance.yaml"
    cfg = build_parser().parse_args(["--config", str(config)])
    assert [m["method"] for m in cfg.methods] == ["autoguidance"] and len(cfg.methods[0]["weights"]) >= 2
    assert cfg.guidance["reference_checkpoint"].endswith("mnist_guide/version_0/checkpoints/last.ckpt")
    assert list(cfg.reg) == ["none", "paper", "vjp"] and cfg.num_samples >= 2000 and cfg.evaluation is not None
    cfg = build_parser().parse_args(["--config", str(config), "--guidance", "{}", "--methods",
                                     "[{method: cfg, weights: [0.25, 0.5, 1, 2, 3]}]"])
    assert cfg.guidance == {} and cfg.methods[0]["method"] == "cfg"


def test_sweep_of_the_public_dit_layout_opens_its_checkpoint_once_and_writes_its_table(tmp_path, monkeypatch):
    """Every sample.py option works in a sweep: the public-layout DiT fixture (``--format dit``, a width outside
    the paper's sizes so ``--num_heads``), a tiny random VAE, guidance on 3 of 4 latent channels for every
    setting, image metrics on a classifier; the checkpoint is read (and hashed) once for all settings."""
    import numpy as np

    import lightning_reg.io.files as io_files
    from helpers import classifier_checkpoint, tiny_autoencoder

    fixture = torch.load(Path(__file__).parent / "fixtures" / "dit_official_tiny.pt", weights_only=True)
    dit = tmp_path / "dit.pt"
    torch.save(fixture["state_dict"], dit)
    tiny_autoencoder().save_pretrained(tmp_path / "vae")
    clf = classifier_checkpoint(tmp_path / "clf.ckpt", image_size=64, channels=3, num_classes=10)
    np.savez(tmp_path / "ref.npz", arr_0=np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8))
    loads, hashes = [], []
    load, sha = torch.load, io_files.file_sha256
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: (loads.append(Path(f)), load(f, *a, **k))[1])
    monkeypatch.setattr(io_files, "file_sha256", lambda p, *a: (hashes.append(Path(p)), sha(p, *a))[1])
    monkeypatch.setattr(sample_cli, "file_sha256", io_files.file_sha256)
    out = tmp_path / "sweep"
    sweep_main(["--checkpoint", str(dit), "--format", "dit", "--num_heads", "4", "--vae", str(tmp_path / "vae"),
                "--guidance", "{guidance_channels: [0, 1, 2]}", "--sampler", "ddpm", "--steps", "2",
                "--methods", "[{method: cfg, weights: [0, 1.5]}]", "--reg", "[none, paper]",
                "--num_samples", "6", "--shard_size", "6", "--batch_size", "6",
                "--evaluation", f"{{metrics: [kid, accuracy], reference: {tmp_path / 'ref.npz'}, "
                                f"feature_network: {clf}}}", "--front", "[kid, accuracy]", "--output", str(out)])
    rows = read_table(out / "sweep.csv")
    assert [r["setting"] for r in rows] == [f"cfg_w{w}_{reg}_guidance_channels0-1-2"
                                            for reg in ("none", "paper") for w in ("0", "1.5")]
    assert all(0 <= float(r["accuracy"]) <= 1 and math.isfinite(float(r["kid"])) for r in rows)
    meta = json.loads((out / rows[0]["setting"] / "meta.json").read_text())
    assert meta["sample_shape"] == [3, 64, 64] and meta["data_shape"] == [4, 8, 8]
    assert loads.count(dit) == 1 and hashes.count(dit) == 1


def test_sweep_of_a_lightning_checkpoint_reads_it_once_for_all_settings(checkpoint, tmp_path, monkeypatch):
    loads = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: (loads.append(Path(f)), load(f, *a, **k))[1])
    sweep_main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "sweep"), *SWEEP, "--max_settings", "3"])
    assert len(list((tmp_path / "sweep").glob("*/row.json"))) == 3 and loads.count(checkpoint) == 1


# samplers x steps x (1 method x 1 weight x 2 REG modes): 3 chains x 2 = 6 settings of 6 samples in one shard
SAMPLERS = "[{sampler: ddim, steps: [2, 3]}, {sampler: ddpm, steps: 2}]"
CHAIN_SWEEP = ["--samplers", SAMPLERS, "--methods", "[{method: cfg, weights: [2]}]", "--reg", "[none, paper]",
               "--num_samples", "6", "--shard_size", "6", "--batch_size", "6", "--seed", "3", "--distribution",
               "toy2d"]
CHAINS = [("ddim", 2), ("ddim", 3), ("ddpm", 2)]
GUIDANCES = ["cfg_w2_none", "cfg_w2_paper"]
CHAIN_NAMES = [f"{sampler}{steps}_{g}" for sampler, steps in CHAINS for g in GUIDANCES]


@pytest.fixture(scope="module")
def chain_sweep(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chains") / "sweep"
    sweep_main(["--checkpoint", str(checkpoint), "--output", str(out), *CHAIN_SWEEP])
    return out


def test_sweep_over_samplers_and_steps_equals_plain_runs(chain_sweep, checkpoint, tmp_path, capsys):
    """A folder per sampler x steps x setting (``<sampler><steps>_<setting>``), rows with their sampler and
    steps, and each setting's samples byte-equal to a plain ``sample.py`` run with its sampler, steps and
    guidance; the summary has a line per chain, method and REG mode."""
    from lightning_reg.sampling.cli import main as sample_main

    assert sorted(p.name for p in chain_sweep.iterdir() if p.is_dir()) == sorted(CHAIN_NAMES)
    rows = read_table(chain_sweep / "sweep.csv")
    assert [r["setting"] for r in rows] == CHAIN_NAMES
    assert [(r["sampler"], int(r["steps"]), r["sampler_kwargs"]) for r in rows[::2]] == [(*c, "") for c in CHAINS]
    settings = json.loads((chain_sweep / "sweep.json").read_text())["settings"]
    assert settings[2] == {"guidance": {"method": "cfg", "scale": 2, "convention": "w", "reg": "none"},
                           "sampler": "ddim", "steps": 3, "sampler_kwargs": None}
    for (sampler, steps), (weight, reg) in zip(CHAINS, [(2, "paper"), (2, "none"), (2, "paper")]):
        out = tmp_path / f"{sampler}{steps}"
        sample_main(["--checkpoint", str(checkpoint), "--output", str(out), "--guidance",
                     f"{{method: cfg, scale: {weight}, reg: {reg}}}", "--sampler", sampler, "--steps", str(steps),
                     *CHAIN_SWEEP[6:]])
        setting = chain_sweep / f"{sampler}{steps}_cfg_w{weight:g}_{reg}"
        assert (out / "samples.npz").read_bytes() == (setting / "samples.npz").read_bytes(), setting.name
    samples = {name: (chain_sweep / name / "samples.npz").read_bytes() for name in CHAIN_NAMES}
    assert len(set(samples.values())) == len(CHAIN_NAMES)  # every sampler and step count samples its own
    capsys.readouterr()
    sweep_main(["--checkpoint", str(checkpoint), "--output", str(chain_sweep), *CHAIN_SWEEP])
    out = capsys.readouterr().out
    assert "6 of 6 settings" in out
    assert out.splitlines()[1].split()[:3] == ["sampler", "method", "reg"]
    assert [line.split()[:4] for line in out.splitlines()[2:]] == [
        [sampler, str(steps), "cfg", reg] for sampler, steps in CHAINS for reg in ("none", "paper")]
    assert Image.open(chain_sweep / "fronts.png").size[0] >= 800
    assert Image.open(chain_sweep / "steps.png").size[0] >= 800  # the front's metrics and the time against the steps


def test_sweep_without_samplers_keeps_its_names_and_fingerprint(reference_sweep):
    """Without ``--samplers``: the settings' names and the fingerprint's list of settings as before (older sweeps
    resume), and every row with the config's one sampler and steps."""
    assert sorted(p.name for p in reference_sweep.iterdir() if p.is_dir()) == sorted(NAMES)
    fingerprint = json.loads((reference_sweep / "sweep.json").read_text())
    assert fingerprint["settings"][0] == {"method": "cfg", "scale": 0.5, "convention": "w", "reg": "none"}
    assert (fingerprint["sampler"], fingerprint["steps"]) == ("ddpm", STEPS)
    assert {(r["sampler"], r["steps"]) for r in read_table(reference_sweep / "sweep.csv")} == {("ddpm", str(STEPS))}
    assert not (reference_sweep / "steps.png").exists()  # one chain: no steps figure


def test_sampler_sweep_resumes_and_refuses_another_grid(chain_sweep, checkpoint, tmp_path, capsys):
    """Interrupted after 2 settings, the same command finishes the table of the uninterrupted sweep (``--steps``,
    which ``--samplers`` replaces, may change); another sampler grid is refused for the folder."""
    out = tmp_path / "sweep"
    args = ["--checkpoint", str(checkpoint), "--output", str(out), *CHAIN_SWEEP]
    sweep_main([*args, "--max_settings", "2"])
    assert "run the same command again to resume" in capsys.readouterr().out
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*/shard_*.npz")}
    assert len(finished) == 2
    sweep_main([*args, "--steps", "9"])
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    assert without_timing(read_table(out / "sweep.csv")) == without_timing(read_table(chain_sweep / "sweep.csv"))
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        sweep_main([*args, "--samplers", "[{sampler: ddim, steps: [2, 4]}, {sampler: ddpm, steps: 2}]"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: --output {out} holds another sweep (arguments differ in " \
                                              "['settings']); choose another folder"
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == files


@pytest.mark.parametrize("samplers, message", [
    ("[]", r"--samplers is empty; give e\.g\. \[\{sampler: ddim, steps: \[20, 50\]\}\]"),
    ("[{steps: 2}]", r"--samplers\[0\] has no 'sampler'"),
    ("[{sampler: ddim, step: 2}]", r"--samplers\[0\]: unknown key 'step' \(did you mean 'steps'\?\); accepted: "
                                   r"\['name', 'sampler', 'sampler_kwargs', 'steps'\]$"),
    ("[{sampler: ddim}]", r"--samplers\[0\] \(ddim\): no steps; give 'steps' as an int or a non-empty list"),
    ("[{sampler: ddim, steps: []}]", r"--samplers\[0\] \(ddim\): no steps"),
    ("[{sampler: ddim, steps: [2, 0]}]", r"--samplers\[0\] \(ddim\) steps must be a positive integer, got 0$"),
    ("[{sampler: ddim, steps: 2.5}]", r"--samplers\[0\] \(ddim\) steps must be a positive integer, got 2\.5$"),
    ("[{sampler: ddim, steps: [2, 2]}]", r"--samplers\[0\] \(ddim\) gives steps 2 twice"),
    ("[{sampler: ddim, steps: 2}, {sampler: ddim, steps: [3, 2], sampler_kwargs: {eta: 0.5}}]",
     r"--samplers\[0\] and --samplers\[1\] \(ddim\) both give the folder tag 'ddim2'; give them distinct 'name's"),
    ("[{sampler: ddim, steps: 2}, {sampler: euler, steps: 2}]",
     r"--samplers\[1\] \(euler\): unknown sampler 'euler'; choose one of \["),
    ("[{sampler: ddim, steps: 2, name: 'a/b'}]", r"--samplers\[0\] \(ddim\): name 'a/b' tags folders"),
    ("[{sampler: ddim, steps: 2, sampler_kwargs: [0.5]}]", r"sampler_kwargs must be a mapping"),
    # the sampler against the model, by each chain's first job: the second chain's here
    ("[{sampler: ddim, steps: 2}, {sampler: ddim, steps: 3, sampler_kwargs: {power: 2}}]",
     r"--sampler_kwargs \{'power': 2\} do not fit sampler 'ddim'"),
    ("[{sampler: ddim, steps: 2}, {sampler: edm_heun, steps: 2}]", r"sampler 'edm_heun' needs the 'edm' schedule"),
])
def test_bad_samplers_one_line_and_nothing_written(checkpoint, tmp_path, refused, samplers, message):
    out = tmp_path / "out"
    refused(lambda: sweep_main(["--checkpoint", str(checkpoint), "--output", str(out), *CHAIN_SWEEP,
                                "--samplers", samplers]), message, out)


def test_rows_of_several_sampler_chains_are_curves_of_their_own():
    """Rows of several chains: a best row per chain, method and REG mode, each chain under its label (a diffusers
    scheduler by its short name, the options only where two chains would read the same)."""
    rows = [{"sampler": sampler, "steps": steps, "sampler_kwargs": kwargs, "method": "cfg", "reg": "none", "w": w,
             "ed": ed, "on": 0.9} for sampler, steps, kwargs, w, ed in (
        ("ddim", 2, "", 1, 0.3), ("ddim", 2, "", 2, 0.2), ("ddim", 2, "eta=0.5", 1, 0.1),
        ("diffusers:DPMSolverMultistepScheduler", 10, "use_karras_sigmas=True", 1, 0.4))]
    assert list(chain_labels(chains(rows)).values()) == ["ddim 2", "ddim 2 eta=0.5", "DPMSolverMultistep 10"]
    best = best_rows(rows, ("method", "reg", *CHAIN_COLUMNS), "ed")
    assert [row["ed"] for row in best.values()] == [0.2, 0.1, 0.4]
    rows = [{**r, "energy_distance": r["ed"], "on_shape": r["on"], "time_per_sample_ms": 1.0} for r in rows]
    lines = summary(rows, "energy_distance", "on_shape").splitlines()
    assert [line.split()[:4] for line in lines] == [
        ["sampler", "method", "reg", "best"], ["ddim", "2", "cfg", "none"], ["ddim", "2", "eta=0.5", "cfg"],
        ["DPMSolverMultistep", "10", "cfg", "none"]]
    assert len({len(line) for line in lines}) == 1  # the sampler column as wide as its longest label
    assert summary(rows[:2], "energy_distance", "on_shape").splitlines()[0].startswith("method")  # one chain


def test_summary_columns_stay_aligned_for_long_method_and_reg_names():
    rows = [{"method": method, "reg": reg, "w": 1.0, "fid": fid, "accuracy": 0.9, "time_per_sample_ms": 1.5}
            for method, reg, fid in (("cfg", "none", 5.0), ("cfg", "graph_free", 4.0),
                                     ("cfg_zero_star_long_name", "paper", 3.0))]
    lines = summary(rows, "fid", "accuracy").splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1  # every row as wide as the header
    w_end = lines[0].index("best w") + len("best w")  # the weights end under their header in every row
    assert all(line[w_end - 1] == "1" and line[w_end] == " " for line in lines[1:])
    assert lines[2].split()[:2] == ["cfg", "graph_free"] and lines[3].split()[:2] == ["cfg_zero_star_long_name",
                                                                                         "paper"]


def front_rows(source=None, num_samples=None, regs=("none", "paper", "vjp", "graph_free"), fid_shift=0.0):
    """``interval`` over w = 0, 1, 2 per REG mode: best FID at w = 1 (the lowest accuracy), the four best points
    bunched in the lower left corner, accuracy reaching 1.0 at w = 2."""
    return [{"source": source, "num_samples": num_samples, "method": "interval", "reg": reg, "w": w,
             "fid": fid + 0.05 * k + fid_shift, "accuracy": acc + 0.001 * k, "time_per_sample_ms": 2.0}
            for k, reg in enumerate(regs) for w, fid, acc in ((0, 6.0, 0.9), (1, 2.0, 0.8), (2, 4.0, 0.997))]


def w_label_boxes(fig):
    """Per axes: its box and the display boxes of its ``w=`` labels."""
    renderer = fig.canvas.get_renderer()
    return [(ax.get_window_extent(renderer), [t.get_window_extent(renderer) for t in ax.texts
                                                 if t.get_text().startswith("w=")]) for ax in fig.axes]


def test_fronts_figure_title_axes_legend_and_labels():
    """Titled by the run, axes span the data with a margin clipped at the metric's bounds (accuracy never above
    1), a legend of what is drawn only, ``w=`` labels inside their axes and apart, also once saved."""
    rows = front_rows()
    fig = fronts_figure(rows, "fid", "accuracy", title="run_a: 12 samples per setting")
    ax = fig.axes[0]
    assert fig.get_suptitle().splitlines()[0] == "run_a: 12 samples per setting"
    assert ax.get_ylim() == pytest.approx((0.8 - 0.06 * 0.2, 1.0))  # data 0.8 .. 1.0: the margin stops at 1
    assert ax.get_xlim() == pytest.approx((2.0 - 0.06 * 4.15, 6.15 + 0.06 * 4.15))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "Pareto front (all rows)", "REG none", "REG paper", "REG vjp", "REG graph_free"]
    front = next(line for line in ax.get_lines() if line.get_label() == "Pareto front (all rows)")
    assert front.get_marker() == "o"  # w = 1 and 2 of every mode (each mode: more FID for more accuracy); w = 0 not
    assert list(front.get_xdata()) == pytest.approx([2.0, 2.05, 2.1, 2.15, 4.0, 4.05, 4.1, 4.15])
    for _ in range(2):  # as laid out, then as saved (the layout runs again)
        for frame, boxes in w_label_boxes(fig):
            assert len(boxes) == 4
            assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
            assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[:i])
        fig.savefig(io.BytesIO(), format="png", dpi=100)
    assert axis_limits([0.02, 1.0], "fid") == pytest.approx((0.0, 1.0588))  # FID never below 0
    assert axis_limits([-1.0, 1.0], "kid") == pytest.approx((-1.12, 1.12))  # KID (unbiased) may be negative
    assert axis_limits([1.0, 100.0], "fid", log=True) == pytest.approx((10 ** -0.12, 10 ** 2.12))
    one = fronts_figure([{**rows[1], "accuracy": 1.0}], "fid", "accuracy")  # one row: a point on the front
    assert one.axes[0].get_ylim() == pytest.approx((0.94, 1.0))
    assert [t.get_text() for t in one.legends[0].get_texts()] == ["Pareto front (all rows)", "REG none"]


def test_merged_sweeps_are_curves_of_their_own_with_a_source_column():
    """Rows of two sweeps (500 and 400 samples) of the same method and REG mode: two curves, never one line
    through both; the summary and the Markdown table name the source and the sample count."""
    rows = front_rows("a", 500, regs=("none",)) + front_rows("b", 400, regs=("none",), fid_shift=0.5)
    fig = fronts_figure(rows, "fid", "accuracy")
    lines = {line.get_label(): list(line.get_xdata()) for line in fig.axes[0].get_lines()
             if not line.get_label().startswith("_")}
    assert lines == {"Pareto front (all rows)": [2.0, 4.0], "a, n=500, REG none": [6.0, 2.0, 4.0],
                     "b, n=400, REG none": [6.5, 2.5, 4.5]}
    assert summary(rows, "fid", "accuracy").splitlines() == [
        "source  samples  method    reg   best w  fid  accuracy  ms/sample",
        "a       500      interval  none       1    2       0.8          2",
        "b       400      interval  none       1  2.5       0.8          2"]
    table = markdown_table(rows, ["fid"]).splitlines()
    assert [table[i] for i in (0, 2, 5)] == [
        "| source | samples | method | reg | w | fid |", "| a | 500 | interval | none | 0 | 6 |",
        "| b | 400 | interval | none | 0 | 6.5 |"]
    assert source_names([Path("x/cfg/sweep.csv"), Path("y/auto/sweep.csv")]) == ["cfg", "auto"]
    assert source_names([Path("t/a.csv"), Path("t/b.csv")]) == ["a", "b"]  # one folder: the file names


def test_summary_aligns_long_reg_and_metric_names():
    """REG names up to 20 characters and metric names longer than their numbers: every cell of a text column
    starts under its header, every number ends under its header."""
    rows = [{"method": "cfg", "reg": reg, "w": w, "energy_distance": ed, "sliced_wasserstein": 12.3456789,
             "time_per_sample_ms": 1234.5} for reg, w, ed in (("none", 1, 0.5), ("graph_free_reuse", 2.5, 0.25),
                                                             ("adaptive", 0.125, 1e-5))]
    lines = summary(rows, "energy_distance", "sliced_wasserstein").splitlines()
    header = lines[0]
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    for name in ("method", "reg"):
        start = header.index(name)
        assert all(line[start] != " " and line[start - 1] == " " for line in lines[1:] if start)
    for name in ("best w", "energy_distance", "sliced_wasserstein", "ms/sample"):
        end = header.index(name) + len(name)
        assert all(line[end - 1] != " " and line[end:end + 1] in ("", " ") for line in lines[1:])
    assert lines[2].split() == ["cfg", "graph_free_reuse", "2.5", "0.25", "12.35", "1.23e+03"]


def test_every_reg_mode_has_a_line_style_of_its_own():
    from lightning_reg.metrics.fronts import REG_STYLES

    assert set(REG_STYLES) == set(REG_MODES)
    assert len({repr(style) for style in REG_STYLES.values()}) == len(REG_STYLES)


def test_shipped_guiders_sweep_builds_every_setting():
    """The guiders sweep (#26): each rule guider, CFG++ and CFG + SLG at two weights, REG none / paper, >= 2,000
    samples; every setting builds (make_guidance) and has a folder of its own."""
    config = Path(__file__).parents[1] / "configs" / "sweep_mnist_guiders.yaml"
    cfg = build_parser().parse_args(["--config", str(config)])
    settings = sweep_settings(cfg.methods, cfg.reg, cfg.convention, cfg.guidance)
    assert {s["method"] for s in settings} == {"cfg", "apg_mix", "fdg", "mambo_g", "tcfg", "cfgpp"}
    assert len(settings) == 28 and list(cfg.reg) == ["none", "paper"] and cfg.num_samples >= 2000
    assert sum("slg" in s for s in settings) == 4
