"""EDM2 snapshot files (docs/edm2.md): the safetensors form ``convert_edm2`` writes, and the one reader of either
form, ``read_edm2_snapshot`` (an official ``edm2-*.pkl`` through the safe unpickler of ``edm2_pickle``, or its
safetensors file, which involves no pickle at all).

Snapshots only: the weights and the fields of an ``EDM2Snapshot`` as data. Building the network from them is the
model's business (``models.edm2.edm2_from_snapshot``); the ``edm2`` model source (``sources.edm2``) joins the two.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lightning_reg.errors import ConfigError, one_line
from lightning_reg.io.edm2_pickle import EDM2FileError, EDM2Snapshot, read_edm2_pickle
from lightning_reg.io.files import atomic_path

SNAPSHOT_FIELDS = ("class_name", "init_kwargs", "encoder", "encoder_kwargs", "latent_scale", "latent_bias",
                   "loss_kwargs")
METADATA_KEY = "edm2_snapshot"  # the safetensors metadata entry of the fields, as JSON
MAX_METADATA_CHARS = 1_000_000


def snapshot_metadata(snapshot: EDM2Snapshot) -> dict:
    """Every field of ``snapshot`` but its weights, as JSON-ready data."""
    meta = {k: getattr(snapshot, k) for k in SNAPSHOT_FIELDS}
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in meta.items()}


def save_edm2_safetensors(snapshot: EDM2Snapshot, path: str | Path) -> Path:
    """Write ``snapshot`` as safetensors (weights as stored; the other fields as JSON metadata), atomically."""
    path = Path(path)
    meta = snapshot_metadata(snapshot)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in snapshot.state_dict.items()}, tmp,
                  metadata={METADATA_KEY: json.dumps(meta)})
    return path


def read_edm2_safetensors(path: str | Path) -> EDM2Snapshot:
    """An ``EDM2Snapshot`` from ``save_edm2_safetensors``'s file (no pickle involved); its metadata must be one
    JSON object of exactly ``SNAPSHOT_FIELDS``, checked as the pickle reader's fields are (``EDM2Snapshot``)."""
    try:
        with safe_open(path, "pt") as f:
            header = (f.metadata() or {}).get(METADATA_KEY)
            if header is None:
                raise ValueError(f"no '{METADATA_KEY}' metadata")
            if len(header) > MAX_METADATA_CHARS:
                raise ValueError(f"its '{METADATA_KEY}' metadata has {len(header):,} characters; at most "
                                 f"{MAX_METADATA_CHARS:,} are read")
            meta = json.loads(header)
            if not isinstance(meta, dict) or sorted(meta) != sorted(SNAPSHOT_FIELDS):
                keys = [k[:40] for k in sorted(meta)[:12]] if isinstance(meta, dict) else type(meta).__name__
                raise ValueError(f"its '{METADATA_KEY}' metadata must be a JSON object of the keys "
                                 f"{list(SNAPSHOT_FIELDS)}, got {keys}")
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
        return EDM2Snapshot(state_dict=state_dict, **meta)
    except (OSError, ValueError, RecursionError, SafetensorError) as err:
        raise ConfigError(f"{path} is not an EDM2 safetensors file written by convert_edm2 ({one_line(err)})") from None


def read_official_snapshot(path: str | Path) -> EDM2Snapshot:
    """The snapshot of an official ``edm2-*.pkl``, read without running its code; a bad file is one ConfigError
    line."""
    try:
        return read_edm2_pickle(path)
    except EDM2FileError as err:
        raise ConfigError(str(err)) from None


def read_edm2_snapshot(path: str | Path) -> EDM2Snapshot:
    """The snapshot of an official ``edm2-*.pkl`` (``read_official_snapshot``) or of its safetensors file (by the
    suffix ``.safetensors``); a bad file is one ConfigError line."""
    path = Path(path)
    return read_edm2_safetensors(path) if path.suffix == ".safetensors" else read_official_snapshot(path)
