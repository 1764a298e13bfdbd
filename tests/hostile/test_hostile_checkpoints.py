"""Hostile Lightning checkpoints: files that pass ``weights_only`` (plain data) but whose hyperparameters name
code, or sizes, or shapes that are not what they claim. Rebuilding a model from a checkpoint must import no name
the file gives and build nothing bigger than its weights (``module.module_from_checkpoint``, docs/security.md)."""

import copy
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PAYLOAD_MARKER, payload_pickle, sample_args

# A module whose import has a side effect: what an attacker hopes a class_path will import.
EVIL_MODULE = f"open(__file__.rsplit('/', 2)[0] + '/{PAYLOAD_MARKER}', 'w')\nclass Net:\n    pass\n"


def hostile(genuine, folder, name: str, edit) -> str:
    """A copy of the genuine checkpoint changed by ``edit(checkpoint)``, saved as plain data (``torch.save``)."""
    checkpoint = copy.deepcopy(torch.load(genuine, weights_only=True))
    edit(checkpoint)
    path = folder / name
    torch.save(checkpoint, path)
    return str(path)


def set_hparam(*keys, value):
    def edit(checkpoint):
        node = checkpoint["hyper_parameters"]
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return edit


def test_hostile_genuine_checkpoint_samples(attack, genuine, tmp_path):
    """The control: the genuine file samples (exit 0) in the same harness."""
    outcome = attack("sample", *sample_args(genuine, tmp_path / "out"))
    assert outcome.code == 0, outcome.err
    assert np.load(tmp_path / "out" / "samples.npz")["arr_0"].shape == (4, 2)


def test_hostile_class_path_whose_constructor_loads_a_pickle(attack, genuine, tmp_path):
    """The attack of the issue: torch-fidelity's Inception constructor ``torch.load``s (no weights_only) a path
    the file gives; pointed at a payload pickle, loading the checkpoint ran the payload."""
    (tmp_path / "weights.pth").write_bytes(payload_pickle(tmp_path))
    net = {"class_path": "torch_fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3",
           "init_args": {"name": "x", "features_list": ["2048"],
                         "feature_extractor_weights_path": str(tmp_path / "weights.pth")}}
    evil = hostile(genuine, tmp_path, "evil.ckpt", set_hparam("net", value=net))
    outcome = attack("sample", *sample_args(evil, tmp_path / "out"))
    outcome.refused(r"--checkpoint .*evil\.ckpt is not a loadable ConditionalDiffusion checkpoint: "
                    r"hyper_parameters\.net\.class_path 'torch_fidelity\..*' is not a net this project builds",
                    tmp_path / "out")


def test_hostile_class_path_through_the_reference_checkpoint(attack, genuine, tmp_path):
    (tmp_path / "weights.pth").write_bytes(payload_pickle(tmp_path))
    net = {"class_path": "torch_fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3",
           "init_args": {"name": "x", "features_list": ["2048"],
                         "feature_extractor_weights_path": str(tmp_path / "weights.pth")}}
    evil = hostile(genuine, tmp_path, "evil.ckpt", set_hparam("net", value=net))
    guidance = f"{{method: autoguidance, scale: 1, reference_checkpoint: {evil}}}"
    outcome = attack("sample", *sample_args(genuine, tmp_path / "out", "--guidance", guidance))
    outcome.refused(r"reference_checkpoint.*evil\.ckpt is not a loadable .*is not a net this project builds",
                    tmp_path / "out")


def test_hostile_class_path_through_sweep(attack, genuine, tmp_path):
    evil = hostile(genuine, tmp_path, "evil.ckpt", set_hparam("net", "class_path", value="evil_module.Net"))
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "evil_module.py").write_text(EVIL_MODULE)
    outcome = attack("sweep", "--checkpoint", evil, "--output", tmp_path / "out", "--num_samples", "4", "--steps",
                     "2", "--methods", "[{method: cfg, weights: [1]}]", "--distribution", "toy2d",
                     sys_path=[tmp_path / "lib"])
    outcome.refused(r"evil\.ckpt is not a loadable .*'evil_module\.Net' is not a net", tmp_path / "out")


@pytest.mark.parametrize("field", ["net", "schedule"])
def test_hostile_class_path_naming_a_module_with_import_side_effects(attack, genuine, tmp_path, field):
    """A module on the path whose import runs code: named by ``net`` or ``schedule``, it is never imported."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "evil_module.py").write_text(EVIL_MODULE)
    evil = hostile(genuine, tmp_path, "evil.ckpt", set_hparam(field, "class_path", value="evil_module.Net"))
    outcome = attack("sample", *sample_args(evil, tmp_path / "out"), sys_path=[tmp_path / "lib"])
    outcome.refused(rf"hyper_parameters\.{field}\.class_path 'evil_module\.Net' is not a {field} this project "
                    r"builds from a file \(nothing was imported\); accepted: \[", tmp_path / "out")


def test_hostile_class_path_of_a_standard_module(attack, genuine, tmp_path):
    """``this.Zen``: importing ``this`` prints the Zen of Python; the name is refused before any import."""
    evil = hostile(genuine, tmp_path, "evil.ckpt", set_hparam("net", "class_path", value="this.Zen"))
    outcome = attack("sample", *sample_args(evil, tmp_path / "out"))
    outcome.refused(r"'this\.Zen' is not a net", tmp_path / "out")
    assert "Beautiful is better" not in outcome.out


def test_hostile_instantiator_is_never_imported(attack, genuine, tmp_path):
    """Lightning's ``_instantiator`` hyperparameter names a function it imports; ours ignores it."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "evil_module.py").write_text(EVIL_MODULE)
    evil = hostile(genuine, tmp_path, "evil.ckpt", set_hparam("_instantiator", value="evil_module.Net"))
    outcome = attack("sample", *sample_args(evil, tmp_path / "out"), sys_path=[tmp_path / "lib"])
    assert outcome.code == 0, outcome.err
    outcome.no_payload_ran()


def test_hostile_init_from_in_the_hyperparameters(attack, genuine, tmp_path):
    """``init_from`` names a file to read: a checkpoint may not set it (a run's own checkpoints never do)."""
    (tmp_path / "weights.pth").write_bytes(payload_pickle(tmp_path))
    evil = hostile(genuine, tmp_path, "evil.ckpt", set_hparam("init_from", value=str(tmp_path / "weights.pth")))
    attack("sample", *sample_args(evil, tmp_path / "out")).refused(
        r"hyper_parameters hold 'init_from', not an argument a checkpoint may set", tmp_path / "out")


@pytest.mark.parametrize("key, value, message", [
    ("unknown", 3, r"ToyMLP takes no argument 'unknown'; it takes \["),
    ("hidden", "16", r"init_args\.hidden: '16' is not a valid int for ToyMLP"),
    ("hidden", 16.5, r"init_args\.hidden: '16\.5' is not a valid int"),
    ("x_scale", [1, 2], r"init_args\.x_scale: '\[1, 2\]' is not a valid float"),
    ("blocks", 10 ** 9, r"init_args\.blocks: '1000000000' is not a valid int for ToyMLP \(integers at most"),
    ("hidden", 1 << 40, r"init_args\.hidden: .* is not a valid int"),
    ("hidden", 17, r"its weights do not fit the network .*shapes: net\.x_proj\.weight"),
    ("num_classes", 300, r"its weights do not fit the network .*net\.y_embed\.weight \(3, 16\) \(needs \(301, 16\)\)"),
])
def test_hostile_backbone_arguments(attack, genuine, tmp_path, key, value, message):
    """Arguments are type-checked and bounded by the weights: a file cannot ask for a billion blocks."""
    evil = hostile(genuine, tmp_path, "evil.ckpt", set_hparam("net", "init_args", key, value=value))
    outcome = attack("sample", *sample_args(evil, tmp_path / "out"), memory_mib=768, timeout_s=30)
    outcome.refused(message, tmp_path / "out")


@pytest.mark.parametrize("edit, message", [
    (set_hparam("schedule", "init_args", "num_timesteps", value=10 ** 10),
     r"num_timesteps must be a positive integer of at most 1,000,000"),
    (set_hparam("schedule", "init_args", "betas", value=7), r"schedule\.init_args\.betas: '7' is not a valid str"),
    (set_hparam("lr", value="fast"), r"hyper_parameters\.lr: 'fast' is not a valid float"),
    (set_hparam("net", value="lightning_reg.models.mlp.ToyMLP"), r"hyper_parameters\.net is not \{class_path, "),
    (set_hparam("net", "init_args", value=[1, 2]), r"init_args: is a list, not a mapping"),
], ids=["timesteps", "betas", "lr", "net-string", "init-args-list"])
def test_hostile_other_hyperparameters(attack, genuine, tmp_path, edit, message):
    evil = hostile(genuine, tmp_path, "evil.ckpt", edit)
    attack("sample", *sample_args(evil, tmp_path / "out"), memory_mib=768, timeout_s=30).refused(
        message, tmp_path / "out")


def shared_tree(depth: int):
    """One list referenced twice at each level: ``depth`` levels pickle small and expand to ``2**depth`` leaves."""
    node = [0]
    for _ in range(depth):
        node = [node, node]
    return node


def self_reference():
    node = {}
    node["self"] = node
    return node


@pytest.mark.parametrize("value, message", [
    (shared_tree(40), r"nested deeper than 32 levels"),
    ({f"k{i}": shared_tree(16) for i in range(4)}, r"holds more than 100,000 values"),
    (self_reference(), r"contains itself"),
], ids=["memo-tree", "wide-memo-tree", "cycle"])
def test_hostile_hyperparameters_that_expand(attack, genuine, tmp_path, value, message):
    """A few hundred bytes whose references expand to billions of values: refused within the budget."""
    evil = hostile(genuine, tmp_path, "evil.ckpt", set_hparam("net", "init_args", "x_scale", value=value))
    attack("sample", *sample_args(evil, tmp_path / "out"), memory_mib=768, timeout_s=30).refused(
        message, tmp_path / "out")


def test_hostile_hyperparameters_not_a_mapping(attack, genuine, tmp_path):
    evil = hostile(genuine, tmp_path, "evil.ckpt", lambda c: c.__setitem__("hyper_parameters", [1, 2]))
    attack("sample", *sample_args(evil, tmp_path / "out")).refused(r"do not name the backbone", tmp_path / "out")


def test_hostile_state_dict_entries_that_are_not_tensors(attack, genuine, tmp_path):
    evil = hostile(genuine, tmp_path, "evil.ckpt", lambda c: c["state_dict"].__setitem__("net.x_proj.weight", "x"))
    attack("sample", *sample_args(evil, tmp_path / "out")).refused(r"\['net\.x_proj\.weight'\] are not tensors",
                                                                   tmp_path / "out")


@pytest.mark.parametrize("entry, args", [
    ("sample", ["--checkpoint", "{evil}", "--output", "{out}"]),
    ("train", ["fit", "--config", "configs/toy2d.yaml", "--ckpt_path", "{evil}",
               "--trainer.default_root_dir", "{out}", "--trainer.logger", "false"]),
    ("train", ["fit", "--config", "configs/toy2d.yaml", "--model.init_from", "{evil}",
               "--trainer.default_root_dir", "{out}", "--trainer.logger", "false"]),
], ids=["sample", "train-ckpt-path", "train-init-from"])
def test_hostile_pickle_payload_checkpoint(attack, tmp_path, entry, args):
    """A checkpoint that is a pickle with code (what ``torch.load`` without ``weights_only`` would run)."""
    evil = tmp_path / "evil.ckpt"
    with zipfile.ZipFile(evil, "w") as archive:  # torch.save's layout: archive/data.pkl holding the payload
        archive.writestr("archive/data.pkl", payload_pickle(tmp_path))
        archive.writestr("archive/version", "3\n")
    root = Path(__file__).resolve().parents[2]
    argv = [a.format(evil=evil, out=tmp_path / "out") for a in args]
    outcome = attack(entry, *argv, cwd=root if entry == "train" else None)
    outcome.refused(r"evil\.ckpt (holds pickled objects other than tensors|is not a)", tmp_path / "out")
    assert not (root / PAYLOAD_MARKER).exists() and not (tmp_path / PAYLOAD_MARKER).exists()


@pytest.mark.parametrize("arch, message", [
    ({"widths": [10 ** 6, 10 ** 6]}, r"widths: '\[1000000, 1000000\]' is not a valid tuple\[int, \.\.\.\]"),
    ({"widths": [300, 300]}, r"its arguments do not build a DigitClassifier \(ValueError: num_channels \(300\)"),
    ({"widths": [304, 304]}, r"its weights do not fit the DigitClassifier"),
    ({"widths": [16, 32], "evil": 1}, r"DigitClassifier takes no argument 'evil'"),
    ({"num_classes": "10"}, r"num_classes: '10' is not a valid int"),
    ([1, 2], r"is a list, not a mapping"),
], ids=["huge", "indivisible", "large", "unknown", "type", "list"])
def test_hostile_classifier_checkpoint(attack, tmp_path, arch, message):
    """``--feature_network``: the digits classifier's architecture entry is data too (typed, bounded)."""
    from lightning_reg.metrics.classifier import ARCH_KEY, DigitClassifier
    from lightning_reg.sampling.writer import save_npz

    torch.manual_seed(0)
    net = DigitClassifier()
    evil = tmp_path / "clf.ckpt"
    torch.save({ARCH_KEY: arch, "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, evil)
    images = np.zeros((4, 16, 16, 1), np.uint8)
    with open(tmp_path / "s.npz", "wb") as f:
        save_npz(f, arr_0=images, labels=np.zeros(4, np.int64))
    outcome = attack("evaluate", "--samples", tmp_path / "s.npz", "--reference", tmp_path / "s.npz",
                     "--feature_network", evil, "--metrics", "[accuracy]", "--output", tmp_path / "out.json",
                     memory_mib=768, timeout_s=30)
    outcome.refused(rf"clf\.ckpt is not a digits-classifier checkpoint .*{message}", tmp_path / "out.json")
