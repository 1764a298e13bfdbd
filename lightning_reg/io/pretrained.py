"""Third-party pretrained folders (diffusers pipelines and models, transformers CLIP folders) read as data and
loaded offline: the one place a library's ``from_pretrained`` is called (docs/security.md).

``check_folder`` vets a folder before any library reads it: its configs (``model_index.json``, ``*config.json``,
``*.index.json``) are plain data of bounded size (``plain_data``), nothing in it asks for code (a ``.py`` file,
an ``auto_map``), a shard index names files of the folder only, and the pickled weights ``from_pretrained``
would read (every ``.bin`` and the shards an index names, when the folder has no ``.safetensors``) hold tensors and
plain data only (``check_torch_weights``). ``load_pretrained`` then calls ``from_pretrained`` with local files only,
``use_safetensors`` when the folder has them, ``trust_remote_code=False`` (transformers), quietly: a failure is
one ``ConfigError`` line and nothing ever prompts on the terminal or goes to the network.
"""

from __future__ import annotations

import json
import re
import warnings
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

from lightning_reg.errors import ConfigError, does_not_exist, one_line
from lightning_reg.io.files import check_torch_weights
from lightning_reg.io.plain import plain_data

HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")
MAX_CONFIG_BYTES = 16 << 20
MAX_ENTRIES = 10_000  # files in one folder
CODE_KEYS = ("auto_map", "custom_pipelines")  # transformers' keys naming classes in the folder's own code


def local_folder(source: str, field: str, expected: str, cache_dir: str | None = None) -> Path:
    """A local folder, or the snapshot of a hub name already in the local Hugging Face cache (``cache_dir``,
    default the standard cache); never downloads. ``expected`` words what to give instead."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if not path.exists() and HUB_NAME.match(source) and not source.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(source, local_files_only=True, cache_dir=cache_dir))
        except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError and kin)
            raise ConfigError(f"{field} {source} is neither a folder nor in the local Hugging Face cache, and "
                              f"nothing is downloaded at run time: run `huggingface-cli download {source}` on a "
                              "machine with network and copy the cache here, or give a local folder") from None
    problem = "is a file" if path.exists() else does_not_exist(path)
    raise ConfigError(f"{field} {source} {problem}: give {expected}")


def read_config(path: Path, field: str) -> dict:
    """The JSON object in ``path`` as plain data of bounded size; anything else is one ConfigError."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{field} {path} is {size:,} bytes, more than a config's {MAX_CONFIG_BYTES:,}: refused")
    try:
        config = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:  # not JSON, not UTF-8, nested past the parser's stack
        raise ConfigError(f"{field} {path} is not valid JSON ({type(err).__name__}: {one_line(err, 200)})") from None
    config = plain_data(config, f"{field} {path}")
    if not isinstance(config, dict):
        raise ConfigError(f"{field} {path} holds a {type(config).__name__}, not a JSON object")
    return config


def is_config(path: Path) -> bool:
    return path.name == "model_index.json" or path.name.endswith(("config.json", ".index.json"))


def code_key(node, where: str = "") -> str | None:
    """Where in a config one of ``CODE_KEYS`` sits (``.a.auto_map``), or None."""
    if isinstance(node, dict):
        for key, value in node.items():
            found = f"{where}.{key}" if key in CODE_KEYS else code_key(value, f"{where}.{key}")
            if found:
                return found
    elif isinstance(node, list):
        return next((found for i, item in enumerate(node) if (found := code_key(item, f"{where}[{i}]"))), None)
    return None


def shard_names(index: dict, path: Path, field: str) -> set[str]:
    """The weight files a shard index (``*.index.json``) names; each must be a file name of its folder."""
    shards = index.get("weight_map", {})
    names = shards.values() if isinstance(shards, dict) else [shards]
    outside = [name for name in names if not isinstance(name, str) or Path(name).name != name or name in ("", "..")]
    if outside:
        raise ConfigError(f"{field} {path}: weight_map names {str(outside[0])[:80]!r}, not a file of its folder: "
                          "refused")
    return set(names)


def check_folder(folder: Path, field: str, what: str, weights: bool = True) -> dict[str, dict]:
    """Vet ``folder`` (see the module docstring; ``weights``: the pickled weights a loader would read too) and
    return its configs by file name. What fails is one ConfigError naming the file and the fix."""
    entries = list(islice(folder.iterdir(), MAX_ENTRIES + 1))
    if len(entries) > MAX_ENTRIES:
        raise ConfigError(f"{field} {folder} holds more than {MAX_ENTRIES:,} files: refused, not a {what}")
    code = sorted(p.name for p in entries if p.suffix == ".py")
    if code:
        raise ConfigError(f"{field} {folder} holds Python code ({', '.join(code[:3])}): a {what} is read as data and "
                          "code in it is never run; remove the code or use a folder without it")
    configs, pickles = {}, {p.name for p in entries if p.suffix == ".bin"}
    for path in sorted(p for p in entries if is_config(p) and p.is_file()):
        configs[path.name] = config = read_config(path, field)
        key = code_key(config)
        if key:
            raise ConfigError(f"{field} {path}: {key.lstrip('.')} names custom code of the folder, which is never "
                              f"run: remove the key, or use a {what} that needs none")
        if path.name.endswith(".index.json"):
            pickles |= {name for name in shard_names(config, path, field) if not name.endswith(".safetensors")}
    if weights and not any(p.suffix == ".safetensors" for p in entries):
        for name in sorted(pickles):
            check_torch_weights(folder / name, field, "torch weights file")
    return configs


def load_pretrained(cls, folder: Path, field: str, what: str, **options):
    """``cls.from_pretrained(folder)`` once ``check_folder`` passed: local files only, the ``.safetensors``
    weights when the folder has them (models), never the folder's code (transformers classes), quietly;
    a failure is ``<field> <folder> is not a loadable <what> (...)``."""
    from torch import nn

    is_model = issubclass(cls, nn.Module)
    check_folder(folder, field, what, weights=is_model)
    if is_model:
        options["use_safetensors"] = any(p.suffix == ".safetensors" for p in folder.iterdir())
    if cls.__module__.startswith("transformers."):
        options["trust_remote_code"] = False
    try:
        with quiet_loading():
            return cls.from_pretrained(str(folder), local_files_only=True, **options)
    except Exception as err:  # noqa: BLE001 - missing weights, another class, corrupt files ...
        raise ConfigError(f"{field} {folder} is not a loadable {what} ({type(err).__name__}: "
                          f"{one_line(err, 300)})") from None


@contextmanager
def quiet_loading():
    """The loaders' progress bars, log lines and warnings off while loading pretrained folders, so a failure is
    still one ``error:`` line; their settings are restored after."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    levels = hf_logging.get_verbosity(), diffusers_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity(hf_logging.CRITICAL)
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(levels[0])
        diffusers_logging.set_verbosity(levels[1])
        if bar:
            hf_logging.enable_progress_bar()
