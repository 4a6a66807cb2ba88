"""A content-addressed cache: config -> hash -> folder with safetensors tensors and JSON metadata.

Nothing here unpickles: tensors are read with safetensors, metadata with json, tables as CSV. Every
write goes to a temporary folder that is renamed into place, so a killed run leaves no half entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .runtime import cache_root



class CacheError(RuntimeError):
    """A cache entry is corrupt or does not match what was asked for; the message says how to fix it."""


def config_hash(config: dict, version: int = 1) -> str:
    """The key of an artefact: its configuration and the version of the code that makes it. Each kind of
    artefact has its own version (models: `train.MODEL_VERSION`, permutations: `book.pairs.PERMS_VERSION`,
    each table: its `book.tables.Producer.version`, sweep cells: `book.width.CELL_VERSION`), so bumping
    one recomputes that artefact and nothing it does not depend on. (Before versions were per artefact
    one global version 1 keyed everything; version 1 hashes are unchanged.)"""
    blob = json.dumps({"config": config, "code_version": version}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def entry_dir(kind: str, key: str, root: Path | None = None) -> Path:
    return Path(root or cache_root()) / kind / key


def write_entry(folder: Path, tensors: dict[str, dict[str, torch.Tensor]], meta: dict,
                texts: dict[str, str] | None = None) -> None:
    """Atomically create `folder` holding `<name>.safetensors` per tensor group, text files and meta.json."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        for name, group in tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, str(tmp / f"{name}.safetensors"))
        for name, text in (texts or {}).items():
            (tmp / name).write_text(text)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_entry(folder: Path, names: tuple[str, ...]) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Read the tensor groups `names` and meta.json, turning any damage into a CacheError."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        groups = {n: load_file(str(folder / f"{n}.safetensors")) for n in names}
    except (OSError, ValueError, SafetensorError) as e:
        raise CacheError(f"cache entry {folder} is unreadable ({type(e).__name__}: {e}); "
                         f"delete that folder and it will be recomputed.") from e
    return groups, meta


def has_entry(folder: Path) -> bool:
    return (folder / "meta.json").exists()


def remove_entry(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------- models in the cache
def check_state_shapes(model: torch.nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Compare a loaded state with a model; name the first tensor that does not fit."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CacheError(f"{origin} does not fit {type(model).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CacheError(f"{origin}: tensor {k!r} has shape {tuple(state[k].shape)}, "
                             f"the model expects {tuple(v.shape)}")


def save_model(folder: Path, model: torch.nn.Module, meta: dict) -> None:
    write_entry(folder, {"weights": model.state_dict()}, {"model": model.config, **meta})


def load_model(folder: Path, device=None) -> tuple[torch.nn.Module, dict]:
    from .models import build_model

    groups, meta = read_entry(folder, ("weights",))
    if "model" not in meta:
        raise CacheError(f"{folder / 'meta.json'} has no model config; delete {folder} to retrain")
    model = build_model(meta["model"])
    check_state_shapes(model, groups["weights"], str(folder / "weights.safetensors"))
    model.load_state_dict(groups["weights"])
    return model.to(device or "cpu").eval(), meta


# -------------------------------------------------------------------------------- tensors and tables
def get_or_compute_tensors(kind: str, config: dict, compute, root: Path | None = None,
                           version: int = 1) -> dict[str, torch.Tensor]:
    """Tensors (e.g. permutations) cached by (config, version); `compute()` returns a dict of tensors."""
    folder = entry_dir(kind, config_hash(config, version), root)
    if has_entry(folder):
        return read_entry(folder, ("tensors",))[0]["tensors"]
    tensors = compute()
    write_entry(folder, {"tensors": tensors}, {"config": config})
    return tensors


def get_or_compute_frame(kind: str, config: dict, compute, root: Path | None = None, version: int = 1):
    """A pandas DataFrame cached as CSV by (config, version); `compute()` returns the frame."""
    import pandas as pd

    folder = entry_dir(kind, config_hash(config, version), root)
    if has_entry(folder) and (folder / "table.csv").exists():
        return pd.read_csv(folder / "table.csv")
    frame = compute()
    write_entry(folder, {}, {"config": config}, texts={"table.csv": frame.to_csv(index=False)})
    return frame


def read_frames(kind: str, config: dict, root: Path | None = None) -> dict | None:
    """The named frames cached under config (`write_frames`), or None when there is no entry."""
    import pandas as pd

    folder = entry_dir(kind, config_hash(config), root)
    if not has_entry(folder):
        return None
    try:
        names = json.loads((folder / "meta.json").read_text())["frames"]
        return {name: pd.read_csv(folder / f"{name}.csv") for name in names}
    except (OSError, ValueError, KeyError) as e:
        raise CacheError(f"cache entry {folder} is unreadable ({type(e).__name__}: {e}); "
                         f"delete that folder and it will be recomputed.") from e


def write_frames(kind: str, config: dict, frames: dict, root: Path | None = None) -> None:
    """Cache several named frames (CSV) under one config, atomically."""
    write_entry(entry_dir(kind, config_hash(config), root), {}, {"config": config, "frames": list(frames)},
                texts={f"{name}.csv": frame.to_csv(index=False) for name, frame in frames.items()})
