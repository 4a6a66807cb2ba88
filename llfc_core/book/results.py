"""Result tables under results/<profile>/ and the manifest that says what produced them.

A chapter asks `load_or_compute(profile, table, hashes, compute, describe)`: a setting whose recorded
hash matches is read from the committed CSV, any other (or all, with recompute=True) is computed and
written back, and the manifest records what `describe` says of it (recipe, model keys, data copies,
seeds) beside the run's own commit, device and torch, and the minutes per chapter. This module knows
nothing of settings: the caller passes what is to be recorded.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import torch

from ..runtime import default_device, device_name, repo_root

TABLE_COLUMNS = {  # the documented columns come first, extras follow
    "lmc": ["setting", "replicate", "pair", "correction", "split", "alpha", "loss", "error"],
    "llfc": ["setting", "replicate", "pair", "correction", "layer", "depth", "alpha", "cos_dist", "cos_dist_baseline", "scale_c"],
    "conditions": ["setting", "replicate", "pair", "layer", "depth", "alpha", "dist_sigma", "dist_com", "dist_w", "dist_h"],
    "matching": ["setting", "replicate", "method", "layer", "depth", "dist_w", "dist_h", "dist_com"],
}


def results_dir(profile: str) -> Path:
    return Path(os.environ.get("LLFC_RESULTS", repo_root() / "results")) / profile


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo_root(), capture_output=True, text=True, timeout=10)
        # Only code counts as dirty: results being rewritten by this very run do not.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
                               cwd=repo_root(), capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_label() -> str:
    """The device as the manifest records it: 'cpu (AMD EPYC, 2 threads)' or the GPU's name."""
    device = default_device()
    if device.type == "cuda":
        return device_name(device)
    return f"{device.type} ({device_name(device)}, {torch.get_num_threads()} threads)"


def read_manifest(profile: str) -> dict:
    path = results_dir(profile) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {"profile": profile, "tables": {}, "chapters": {}}


def write_manifest(profile: str, manifest: dict) -> None:
    path = results_dir(profile) / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, path)


def order_columns(table: str, frame: pd.DataFrame) -> pd.DataFrame:
    first = [c for c in TABLE_COLUMNS.get(table, []) if c in frame.columns]
    return frame[first + [c for c in frame.columns if c not in first]]


def load_or_compute(profile: str, table: str, hashes: dict[str, str], compute, describe, *,
                    recompute: bool = False) -> pd.DataFrame:
    """Rows of `table` for the settings named in `hashes` ({name: configuration hash}), reusing committed
    rows whose hash is unchanged. `compute(name)` returns a missing setting's rows; `describe(name)`
    returns {"setting": {...}, "data": {data set: source}, "seeds": {...}} for the manifest."""
    path = results_dir(profile) / f"{table}.csv"
    manifest = read_manifest(profile)
    recorded = manifest.setdefault("tables", {}).setdefault(table, {})
    old = pd.read_csv(path) if path.exists() else None
    frames, computed, seconds = [], [], {}
    for name, h in hashes.items():
        if not recompute and old is not None and recorded.get(name) == h and (old.setting == name).any():
            frames.append(old[old.setting == name])
            continue
        start = time.time()
        frames.append(compute(name))
        seconds[name] = time.time() - start
        recorded[name] = h
        computed.append(name)
    frame = order_columns(table, pd.concat(frames, ignore_index=True))
    frame.attrs["computed"] = computed  # which settings this call computed (the rest were read)
    if computed:
        replace_rows(path, frame, old)
        manifest.update({"profile": profile, "commit": git_commit(), "device": device_label(),
                         "torch": torch.__version__, "updated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
        for name in computed:
            record = describe(name)
            # minutes computing this table's rows of the setting (training included, where it happened; a pass
            # shared with another table counts where it ran first)
            minutes = manifest.setdefault("minutes", {}).setdefault(name, {})
            minutes[table] = round(seconds[name] / 60, 2)
            # which code on which machine made these rows: a book computed in parts says so per part
            made = manifest.setdefault("made_by", {}).setdefault(name, {})
            made[table] = {"commit": git_commit(), "device": device_label(), "minutes": minutes[table],
                           "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            manifest.setdefault("settings", {})[name] = record["setting"]
            manifest.setdefault("data", {}).update(record["data"])
            manifest.setdefault("seeds", {}).update(record["seeds"])
        write_manifest(profile, manifest)
    return frame


def replace_rows(path: Path, frame: pd.DataFrame, old: pd.DataFrame | None = None) -> None:
    """Write `frame` into the table at `path` in place of the rows of its settings, keeping every other
    setting's (`old`: the table as already read, else read here)."""
    if old is None and path.exists():
        old = pd.read_csv(path)
    merged = frame if old is None else pd.concat([old[~old.setting.isin(frame.setting.unique())], frame],
                                                 ignore_index=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    merged.to_csv(path, index=False, float_format="%.6g")


def share(source: str, target: str, name: str, hashes: dict[str, str]) -> list[str]:
    """Copy one setting's committed rows from results/<source>/ to results/<target>/ for every table in
    `hashes` ({table: the target's hash of that setting}) whose source record has exactly that hash: the
    same computation, so a later run of the target reads them instead of recomputing (issue #22: the cpu
    profile's MLP settings are the paper's). The target's manifest records what was copied from where,
    with the source's commit, device and minutes. Returns the tables copied; a table whose hash differs
    is left alone."""
    src_manifest, dst_manifest = read_manifest(source), read_manifest(target)
    copied = []
    for table, h in hashes.items():
        if src_manifest.get("tables", {}).get(table, {}).get(name) != h:
            continue
        rows = pd.read_csv(results_dir(source) / f"{table}.csv")
        replace_rows(results_dir(target) / f"{table}.csv", rows[rows.setting == name])
        dst_manifest.setdefault("tables", {}).setdefault(table, {})[name] = h
        for key in ("minutes", "made_by"):
            if table in src_manifest.get(key, {}).get(name, {}):
                dst_manifest.setdefault(key, {}).setdefault(name, {})[table] = src_manifest[key][name][table]
        copied.append(table)
    if copied:
        dst_manifest["profile"] = target
        dst_manifest.setdefault("settings", {})[name] = src_manifest["settings"][name]
        for key in ("data", "seeds"):
            dst_manifest.setdefault(key, {}).update(src_manifest.get(key, {}))
        dst_manifest.setdefault("shared_from", {})[name] = {
            "profile": source, "tables": copied,
            "note": f"computed by the {source} profile (same configuration hash); see made_by for commit and device"}
        write_manifest(target, dst_manifest)
        _share_deviations(source, target, name)
    return copied


def _share_deviations(source: str, target: str, name: str) -> None:
    """The source's explained deviations of setting `name` go with its rows: the same rows fail the same
    claims, and `claims.review` would otherwise call them unexplained in the target. The target's own
    entries for that setting are replaced, every other setting's kept."""
    src, dst = results_dir(source) / "deviations.json", results_dir(target) / "deviations.json"
    rows = [r for r in json.loads(src.read_text())["deviations"] if r["setting"] == name] if src.exists() else []
    book = json.loads(dst.read_text()) if dst.exists() else {
        "profile": target, "note": f"Explained deviations, (claim, setting, pair) -> why. Shared settings' "
                                   f"entries are copied with their rows (results.share) from the profile that "
                                   f"computed them."}
    book["deviations"] = [r for r in book.get("deviations", []) if r["setting"] != name] + rows
    dst.write_text(json.dumps(book, indent=1) + "\n")


def record_chapter_time(profile: str, chapter: str, minutes: float) -> None:
    manifest = read_manifest(profile)
    manifest.setdefault("chapters", {})[chapter] = {"minutes": round(minutes, 2), "commit": git_commit(),
                                                   "device": device_label()}
    write_manifest(profile, manifest)
