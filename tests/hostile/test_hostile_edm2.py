"""Hostile EDM2 snapshots: pickles in the official layout (tests/edm2_files.py) whose metadata is shared through
the pickle memo into huge trees, whose modules are shared or nested without end, whose tensors repeat one value
by a stride of 0, that build object arrays through numpy's own ``__setstate__``, or whose fields have the wrong
type; and ``convert_edm2`` safetensors files with malformed metadata. Each goes through ``sample.py --format
edm2`` and must be one line before anything is written (``lightning_reg.io.edm2_pickle``, docs/security.md)."""

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from edm2_files import FIXTURES, Persistent, Pickled, module, read_tree, shared_tree, write_tree
from lightning_reg.io.edm2 import save_edm2_safetensors
from lightning_reg.models.edm2 import load_edm2

MAIN, GUIDE = FIXTURES / "edm2_official_tiny_main.pkl", FIXTURES / "edm2_official_tiny_guide.pkl"
RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's _reconstruct: the global numpy pickles every array with


def sample(attack, checkpoint, out, reference=GUIDE, *extra):
    """``sample.py`` on an EDM2 pair: ``checkpoint`` guided by ``reference`` (autoguidance), two samples."""
    guidance = {"method": "cfg", "scale": 2.0, "convention": "w2", "reg": "paper",
                "reference_checkpoint": str(reference)}
    return attack("sample", "--format", "edm2", "--checkpoint", checkpoint, "--guidance", json.dumps(guidance),
                  "--sampler", "edm_heun", "--steps", "2", "--num_samples", "2", "--batch_size", "2",
                  "--labels", "[1, 2]", "--output", out, *extra)


def submodule(tree: dict, path: str):
    """The module at ``path`` (``unet.enc``) of the network under ``ema``."""
    node = tree["ema"]
    for name in path.split("."):
        node = state_of(node)["_modules"][name]
    return node


def state_of(node) -> dict:
    return node.state if isinstance(node, Persistent) else vars(node)


def hostile(folder, edit, name: str = "main") -> str:
    """The fixture ``name`` changed by ``edit(tree)``, written as ``edm2-hostile-<name>.pkl`` in ``folder``."""
    tree = read_tree(name)
    edit(tree)
    return str(write_tree(tree, folder / f"edm2-hostile-{name}.pkl"))


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    """A tiny local VAE: the main fixture's latents decode through it before a guiding file is read."""
    from helpers import tiny_autoencoder

    folder = tmp_path_factory.mktemp("vae")
    tiny_autoencoder().save_pretrained(folder)
    return folder


def test_hostile_edm2_genuine_pair_samples(attack, vae, tmp_path):
    """The control: the genuine fixtures sample (exit 0) in the same harness."""
    outcome = sample(attack, MAIN, tmp_path / "out", GUIDE, "--vae", vae)
    assert outcome.code == 0, outcome.err
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["source"]["loss_kwargs"] == {"P_mean": -0.4, "P_std": 1.0, "sigma_data": 0.5}


# ------------------------------------------------------------------ sizes: a few bytes that expand without end
@pytest.mark.parametrize("owner, field", [("loss_fn", "loss_kwargs"), ("encoder", "encoder_kwargs"),
                                          ("ema", "init_kwargs")])
def test_hostile_edm2_kwargs_shared_through_the_memo(owner, field, attack, tmp_path):
    """One list referenced twice at each of 30 levels: ~400 bytes pickled, 2^30 values expanded (depth 20 wrote a
    248 MB meta.json after sampling)."""
    def edit(tree):
        tree[owner].state["_init_kwargs"]["P_mean"] = shared_tree(30)

    out = tmp_path / "out"
    sample(attack, hostile(tmp_path, edit), out).refused(rf"{field}\.P_mean\[0\].*holds more than 1,000 values", out)


def test_hostile_edm2_dict_tree_shared_through_the_memo_in_the_reference(attack, vae, tmp_path):
    def edit(tree):
        node = {"leaf": 1.0}
        for _ in range(25):
            node = {"a": node, "b": node}
        tree["encoder"].state["_init_kwargs"]["raw_mean"] = node

    out = tmp_path / "out"
    sample(attack, MAIN, out, hostile(tmp_path, edit, "guide"), "--vae", vae).refused(
        r"--guidance\.reference_checkpoint: .*encoder_kwargs\.raw_mean\.a\.a.*holds more than 1,000 values", out)


def test_hostile_edm2_self_referencing_loss_kwargs(attack, tmp_path):
    """A list holding itself: it failed only after all sampling was done (no meta.json written)."""
    def edit(tree):
        loop = [1.0]
        loop.append(loop)
        tree["loss_fn"].state["_init_kwargs"]["P_std"] = loop

    out = tmp_path / "out"
    sample(attack, hostile(tmp_path, edit), out).refused(r"loss_kwargs\.P_std\[1\]: contains itself", out)


def test_hostile_edm2_class_name_shared_through_the_memo(attack, tmp_path):
    def edit(tree):
        tree["loss_fn"].meta["class_name"] = shared_tree(40)

    out = tmp_path / "out"
    sample(attack, hostile(tmp_path, edit), out).refused(r"class_name is a list, not a name", out)


def test_hostile_edm2_shared_module_tree(attack, tmp_path):
    """One module referenced eight times at each of 10 levels: 10^9 modules to walk (each level doubled the load
    time when shared twice)."""
    def edit(tree):
        node = module({"_parameters": {"w": torch.nn.Parameter(torch.zeros(1))}})
        for _ in range(10):
            node = module({"_modules": {name: node for name in "abcdefgh"}})
        state_of(tree["ema"])["_modules"]["extra"] = node

    out = tmp_path / "out"
    sample(attack, hostile(tmp_path, edit), out).refused(r"ema module 'extra\.a\.a.*reached a second time", out)


def test_hostile_edm2_one_parameter_table_in_many_modules(attack, tmp_path):
    """10,000 modules sharing one table of 10,000 empty slots: 10^8 slots to walk from a 300 kB file."""
    def edit(tree):
        table = dict.fromkeys(f"p{i}" for i in range(10_000))
        state_of(tree["ema"])["_modules"].update({f"m{i}": module({"_parameters": table}) for i in range(10_000)})

    out = tmp_path / "out"
    sample(attack, hostile(tmp_path, edit), out).refused(r"more than 20,000 modules and tensor slots", out)


def test_hostile_edm2_modules_nested_without_end(attack, tmp_path):
    def edit(tree):
        node = module()
        for _ in range(100):
            node = module({"_modules": {"m": node}})
        state_of(tree["ema"])["_modules"]["deep"] = node

    out = tmp_path / "out"
    sample(attack, hostile(tmp_path, edit), out).refused(r"ema module 'deep(\.m)+' is nested deeper than 16", out)


@pytest.mark.parametrize("name, field", [("main", "--checkpoint"), ("guide", r"--guidance\.reference_checkpoint")])
def test_hostile_edm2_stride_zero_scale(name, field, attack, vae, tmp_path):
    """10^9 values over a one-value storage: a MemoryError traceback (or the OOM killer at 22 GB) before."""
    def edit(tree):
        tree["encoder"].state["scale"] = torch.tensor([0.5]).expand(10 ** 9)

    out = tmp_path / "out"
    checkpoint, reference = (hostile(tmp_path, edit), GUIDE) if name == "main" else (MAIN, hostile(tmp_path, edit,
                                                                                                    name))
    sample(attack, checkpoint, out, reference, "--vae", vae).refused(
        rf"{field}: .*latent_scale is a view of 1,000,000,000 values over a storage of 1 ", out)


def test_hostile_edm2_stride_zero_weight(attack, tmp_path):
    def edit(tree):
        state_of(submodule(tree, "unet.out_conv"))["_parameters"]["weight"] = torch.nn.Parameter(
            torch.zeros(1, dtype=torch.float16).expand(4, 16, 3, 3))

    out = tmp_path / "out"
    sample(attack, hostile(tmp_path, edit), out).refused(
        r"state_dict\['unet\.out_conv\.weight'\] is a view of 576 values over a storage of 1 ", out)


def test_hostile_edm2_array_declaring_more_values_than_its_bytes(attack, tmp_path):
    def edit(tree):
        dtype = Pickled(np.dtype, "f4", False, True, state=(3, "<", None, None, None, -1, -1, 0))
        tree["encoder"].state["scale"] = Pickled(RECONSTRUCT, np.ndarray, (0,), b"b",
                                                 state=(1, (10 ** 9,), dtype, False, b"\0" * 16))

    out = tmp_path / "out"
    sample(attack, hostile(tmp_path, edit), out).refused(r"is not a readable EDM2 snapshot \(ValueError: cannot "
                                                         r"reshape array of size 4", out)


# ------------------------------------------------------------------ object arrays: numpy's own __setstate__
def test_hostile_edm2_object_array_by_calling_ndarray(attack, tmp_path):
    def edit(tree):
        tree["encoder"].state["scale"] = Pickled(np.ndarray, (4,), "O")

    out = tmp_path / "out"
    sample(attack, hostile(tmp_path, edit), out).refused(r"calls numpy\.ndarray itself", out)


def test_hostile_edm2_float_dtype_flagged_as_object_holds_objects(attack, tmp_path):
    """numpy takes dtype flags from the pickle: a float64 dtype flagged as holding objects builds an array of
    object pointers from a list (what numpy's ``ndarray.__setstate__`` does with such a dtype)."""
    def edit(tree):
        flagged = Pickled(np.dtype, "f8", False, True, state=(3, "|", None, None, None, -1, -1, 63))
        tree["encoder"].state["scale"] = Pickled(RECONSTRUCT, np.ndarray, (0,), b"b",
                                                 state=(1, (2,), flagged, False, [tree["loss_fn"], "x"]))

    out = tmp_path / "out"
    sample(attack, hostile(tmp_path, edit), out).refused(r"a numpy array's pickled state is not a numeric array's",
                                                         out)


def test_hostile_edm2_float_dtype_given_object_fields(attack, tmp_path):
    def edit(tree):
        fields = Pickled(np.dtype, "f8", False, True, state=(3, "|", None, ("a",), {"a": ("x", 0)}, 8, 8, 63))
        tree["encoder"].state["scale"] = Pickled(RECONSTRUCT, np.ndarray, (0,), b"b",
                                                 state=(1, (1,), fields, False, b"\0" * 8))

    out = tmp_path / "out"
    sample(attack, hostile(tmp_path, edit), out).refused(r"numpy dtype's pickled state is not that of a numeric", out)


# ------------------------------------------------------------------ wrong types: one line, no traceback
def set_parameter(value):
    def edit(tree):
        state_of(submodule(tree, "unet.out_conv"))["_parameters"]["weight"] = value
    return edit


def set_state(owner: str, key: str, value):
    def edit(tree):
        tree[owner].state[key] = value
    return edit


def set_kwarg(key: str, value):
    def edit(tree):
        tree["ema"].state["_init_kwargs"][key] = value
    return edit


def set_top(key: str, value):
    def edit(tree):
        tree[key] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (set_parameter("weights"), r"state_dict\['unet\.out_conv\.weight'\] is a str, not a floating-point tensor"),
    (set_parameter(torch.zeros(4, 16, 3, 3, dtype=torch.int64)), r"is a torch\.int64 tensor, not a floating-point"),
    (set_state("ema", "_init_kwargs", [["img_resolution", 8]]), r"init_kwargs is a list, not a dict"),
    (set_state("encoder", "scale", "0.5"), r"latent_scale is a str, not numbers"),
    (set_state("encoder", "bias", np.array([0.0, np.nan, 0.0, 0.0], np.float32)), r"latent_bias must be finite"),
    (set_state("encoder", "scale", np.ones(100, np.float32)), r"latent_scale holds 100 values; at most 64"),
    (set_state("ema", "_modules", [1, 2]), r"ema network: .* are a dict, a dict, a list, a set; expected three"),
    (set_state("ema", "_non_persistent_buffers_set", ["x"]), r"are a dict, a dict, a dict, a list; expected .* a set"),
    (set_kwarg("num_blocks", 10 ** 9), r"2 levels of 1,000,000,000 blocks, more blocks than the file holds tensors"),
    (set_kwarg("channels_per_head", 0), r"do not fit EDM2Precond \(integer division or modulo by zero\)"),
    (set_kwarg("img_resolution", float("inf")), r"init_kwargs\.img_resolution: is inf, not a finite number"),
    (set_top("loss_fn", "EDM2Loss"), r"'loss_fn' is a str, not a pickled network object"),
])
def test_hostile_edm2_wrong_types(edit, message, attack, tmp_path):
    out = tmp_path / "out"
    sample(attack, hostile(tmp_path, edit), out).refused(message, out)


def test_hostile_edm2_persistent_object_rebuilt_after_creation(attack, tmp_path):
    """``BUILD`` on a network object would replace its class name and state after they were checked."""
    def edit(tree):
        tree["loss_fn"] = Persistent(tree["loss_fn"].meta, build={"class_name": shared_tree(40)})

    out = tmp_path / "out"
    sample(attack, hostile(tmp_path, edit), out).refused(r"rebuilds a persistent object after creating it", out)


def test_hostile_edm2_persistent_id_shared_through_the_memo(attack, tmp_path):
    path = tmp_path / "edm2-pid.pkl"
    path.write_bytes(pickle.dumps(shared_tree(40), protocol=2)[:-1] + b"Q.")  # the tree, BINPERSID, STOP
    out = tmp_path / "out"
    sample(attack, path, out).refused(r"refusing a persistent id \(a list\)", out)


# ------------------------------------------------------------------ convert_edm2 safetensors metadata
def safetensors_with(folder, edit_metadata) -> str:
    """The main fixture as ``convert_edm2`` writes it, its metadata changed by ``edit_metadata(dict)`` (the
    JSON string under ``edm2_snapshot`` decoded into the dict)."""
    genuine = save_edm2_safetensors(load_edm2(MAIN)[1], folder / "genuine.safetensors")
    with safe_open(genuine, "pt") as f:
        metadata = {"edm2_snapshot": json.loads(f.metadata()["edm2_snapshot"])}
    edit_metadata(metadata)
    path = folder / "edm2-hostile.safetensors"
    save_file(load_file(genuine), path, metadata={k: v if isinstance(v, str) else json.dumps(v)
                                                  for k, v in metadata.items()})
    return str(path)


def drop_field(meta):
    del meta["edm2_snapshot"]["loss_kwargs"]


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("edm2_snapshot"), r"no 'edm2_snapshot' metadata"),
    (lambda m: m.update(edm2_snapshot=[1, 2]), r"must be a JSON object of the keys .*, got list"),
    (lambda m: m["edm2_snapshot"].update(extra=1), r"must be a JSON object of the keys .*'extra'"),
    (drop_field, r"must be a JSON object of the keys .*loss_kwargs'\], got \['class_name'"),
    (lambda m: m.update(edm2_snapshot="{not json"), r"Expecting property name"),
    (lambda m: m.update(edm2_snapshot="[" * 100_000 + "]" * 100_000), r"RecursionError|recursion"),
    (lambda m: m.update(edm2_snapshot=" " * 2_000_000), r"has 2,000,000 characters; at most 1,000,000 are read"),
    (lambda m: m["edm2_snapshot"].update(init_kwargs=[]), r"init_kwargs is a list, not a dict"),
    (lambda m: m["edm2_snapshot"].update(latent_scale="0.5"), r"latent_scale is a str, not numbers"),
    (lambda m: m["edm2_snapshot"].update(class_name={"a": 1}), r"class_name is a dict, not a name"),
])
def test_hostile_edm2_safetensors_metadata(edit, message, attack, tmp_path):
    out = tmp_path / "out"
    sample(attack, safetensors_with(tmp_path, edit), out).refused(
        rf"is not an EDM2 safetensors file written by convert_edm2 \(.*{message}", out)
