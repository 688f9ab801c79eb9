"""Fingerprints: what a result measured, not where it lived.

A path says nothing about what is in it: train twice into one folder and the second
adapter sits where the first did. Every evaluation result (and every sweep cell) records a
fingerprint of the files it came from, and a rerun compares them before reusing anything.

- An adapter folder: the sha256 of adapter_model.safetensors, and of the content of
  adapter_config.json and lorasym.json (when present; keys and set-valued lists sorted).
- A base or merged model folder: its config.json and, per weight file (*.safetensors,
  *.bin, *.gguf), name, size and sha256. A weight file over WHOLE_HASH_LIMIT bytes is not
  read whole (a 7B model is 15 GB, read on every rerun): its record is size + mtime +
  sha256 of its first and last MiB, marked "hashed": "partial".
- A hub name that is not a local folder: its snapshot in the local Hugging Face cache when
  there is one (no network), else the name alone (marked by a "note").

    found = {"model": model_fingerprint(path_or_name), "adapter": adapter_fingerprint(folder)}
    fingerprint_changes(recorded, found)     # [] when both measured the same files
    fingerprint_record(found)                # {"id": ..., "model": ..., "adapter": ...} for a result file

Only the standard library at import time; nothing here loads a model.
"""

from __future__ import annotations

import hashlib
import json
import os

MIB = 1 << 20
WHOLE_HASH_LIMIT = 64 * MIB  # larger weight files: size + mtime + sha256 of the first and last MiB
EDGE_BYTES = MIB
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
NAME_ONLY_NOTE = "not a local folder and not in the local Hugging Face cache: identified by its name alone"


# --- files ---------------------------------------------------------------------------------


def file_record(path: str, whole_limit: int | None = None) -> dict:
    """{size, sha256} of a file; over `whole_limit` bytes, the sha256 of its first and last
    MiB only, with its mtime (a rewrite of the middle alone would otherwise go unseen)."""
    size = os.path.getsize(path)
    if whole_limit is None or size <= whole_limit:
        return {"size": size, "sha256": _sha256(path)}
    return {"size": size, "mtime_ns": os.stat(path).st_mtime_ns, "sha256": _edges_sha256(path), "hashed": "partial"}


# peft writes these from Python sets, in an order that changes from process to process
# (string hashing is randomised): the same adapter saved twice must not look like another.
SET_VALUED_KEYS = ("target_modules", "modules_to_save", "exclude_modules")


def json_record(path: str) -> dict:
    """{sha256} of a JSON file's content, not its bytes (so no size either): keys sorted,
    set-valued lists sorted, whitespace ignored."""
    with open(path, encoding="utf-8") as f:
        content = json.load(f)
    if isinstance(content, dict):
        content = {k: sorted(v) if k in SET_VALUED_KEYS and isinstance(v, list) else v for k, v in content.items()}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    return {"sha256": hashlib.sha256(canonical).hexdigest(), "hashed": "json content"}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def _edges_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(EDGE_BYTES))
        f.seek(-EDGE_BYTES, os.SEEK_END)
        digest.update(f.read(EDGE_BYTES))
    return digest.hexdigest()


# --- adapters and models -------------------------------------------------------------------


def adapter_fingerprint(folder: str) -> dict:
    """The adapter's files, hashed whole (adapters are small next to their models)."""
    from .adapters.compact import COMPACT_WEIGHTS, FROZEN_RECORD
    from .adapters.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from .adapters.recipe_file import RECIPE_FILE

    files = {name: (json_record if name.endswith(".json") else file_record)(os.path.join(folder, name))
             for name in (ADAPTER_WEIGHTS, COMPACT_WEIGHTS, FROZEN_RECORD, ADAPTER_CONFIG, RECIPE_FILE)
             if os.path.isfile(os.path.join(folder, name))}  # lorasym.json is optional (a plain peft adapter)
    return _with_id({"path": os.path.abspath(folder), "files": files})


def model_fingerprint(name_or_path: str | None) -> dict:
    """A model folder's config and weight files; a hub name through the local HF cache, else
    the name alone. None is the built-in default, fingerprinted in the folder it resolves to."""
    from . import builtin

    name = name_or_path or builtin.DEFAULT_MODEL
    folder = builtin.resolve_model(name_or_path)  # the built-in default resolves to a local folder
    if not os.path.isdir(folder):
        folder = builtin.hub_cache_snapshot(name)  # cache only, never the network
    if folder is None:
        return _with_id({"name": name, "path": None, "files": {}, "note": NAME_ONLY_NOTE})
    return _with_id({"name": name, "path": os.path.abspath(folder), "files": model_files(folder)})


def model_files(folder: str) -> dict[str, dict]:
    files = {}
    if os.path.isfile(os.path.join(folder, "config.json")):
        files["config.json"] = file_record(os.path.join(folder, "config.json"))
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(WEIGHT_SUFFIXES) and os.path.isfile(path):
            files[name] = file_record(path, whole_limit=WHOLE_HASH_LIMIT)
    return files


# --- comparing -----------------------------------------------------------------------------


def identity(fingerprint: dict | None):
    """The part that says what was measured: the files, or the name when no file is known.
    The path is left out: the same files at another path are the same model."""
    if fingerprint is None:
        return None
    return {"files": fingerprint["files"]} if fingerprint.get("files") else {"name": fingerprint.get("name")}


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def _with_id(fingerprint: dict) -> dict:
    """The fingerprint with a short digest of its identity first: two records, one glance."""
    return {"id": _digest(identity(fingerprint)), **fingerprint}


def fingerprint_record(found: dict[str, dict]) -> dict:
    """What a result file carries: {"id": one digest of every role, role: fingerprint, ...}."""
    return {"id": _digest({role: identity(value) for role, value in found.items()}), **found}


def fingerprint_changes(recorded: dict[str, dict | None], found: dict[str, dict | None]) -> dict[str, str]:
    """{role: what changed} between two {role: fingerprint} maps; {} when they measured the same."""
    changes = {}
    for role in sorted(set(recorded) | set(found)):
        then, now = recorded.get(role), found.get(role)
        if then is None or now is None:
            if then is not now:
                changes[role] = f"{_label(then)} then, {_label(now)} now"
        elif not then.get("files") or not now.get("files"):
            # Known by name on one side only (e.g. not yet downloaded then): the name is all
            # that can be compared.
            if then.get("name") != now.get("name"):
                changes[role] = f"{then.get('name')} then, {now.get('name')} now"
        else:
            files = [_file_change(name, then["files"].get(name), now["files"].get(name))
                     for name in sorted(set(then["files"]) | set(now["files"]))
                     if then["files"].get(name) != now["files"].get(name)]
            if files:
                changes[role] = f"{now.get('path')}: " + ", ".join(files)
    return changes


def _label(fingerprint: dict | None) -> str:
    return "none" if fingerprint is None else str(fingerprint.get("path") or fingerprint.get("name"))


def _file_change(name: str, then: dict | None, now: dict | None) -> str:
    if then is None:
        return f"{name} added"
    if now is None:
        return f"{name} removed"
    if then.get("sha256") != now.get("sha256"):
        return f"{name} changed (sha256 {then['sha256'][:10]} then, {now['sha256'][:10]} now)"
    return f"{name} changed (size or mtime: {then.get('size')} bytes then, {now.get('size')} now)"
