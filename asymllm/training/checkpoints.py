"""Complete checkpoints only: a completion marker written last, and `auto` that trusts nothing else.

A checkpoint-N/ folder is written by every rank (the adapter by rank 0, DeepSpeed shards and
RNG states by each), and a kill (SIGKILL, a lost node, the scheduler's time limit) can stop
that at any file. transformers' `get_last_checkpoint` takes the highest-numbered folder as
it is, so a half-written one would be resumed. Here, once every rank has written its part,
rank 0 writes `asymllm_checkpoint.json` (each file's size and sha256) under a temporary name
and renames it into place. `auto` then takes the newest folder with a marker, skipping (with a
warning) folders without one; a folder whose files no longer match its marker is refused with
the file named: its save finished, so the damage came later and must not be trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil

from .config import ConfigError

logger = logging.getLogger(__name__)

MARKER = "asymllm_checkpoint.json"
INCOMPLETE_PREFIX = "incomplete-"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class IncompleteCheckpoint(ConfigError):
    """A checkpoint folder without a completion marker: its save did not finish."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(checkpoint_dir: str) -> list[str]:
    found = []
    for root, _, names in os.walk(checkpoint_dir):
        found += [os.path.relpath(os.path.join(root, n), checkpoint_dir) for n in names if n != MARKER and not n.startswith(".")]
    return sorted(found)


def write_marker(checkpoint_dir: str, step: int) -> str:
    """Record every file of a finished checkpoint; call once all ranks have written theirs."""
    files = {rel: {"size": os.path.getsize(os.path.join(checkpoint_dir, rel)), "sha256": _sha256(os.path.join(checkpoint_dir, rel))}
             for rel in _files(checkpoint_dir)}
    path = os.path.join(checkpoint_dir, MARKER)
    with open(path + ".tmp", "w") as f:
        json.dump({"step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)  # atomic: a reader sees no marker or the whole marker
    return path


def check_complete(checkpoint_dir: str) -> None:
    """Raise IncompleteCheckpoint (no marker) or ConfigError naming the damaged file."""
    path = os.path.join(checkpoint_dir, MARKER)
    if not os.path.isfile(path):
        raise IncompleteCheckpoint(f"{checkpoint_dir} has no {MARKER}: its save did not finish (killed or preempted while "
                                   "writing), or an asymllm without completion markers wrote it")
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (ValueError, KeyError) as error:
        raise ConfigError(f"{path}: unreadable completion marker ({error})") from None
    for rel, expected in files.items():
        file = os.path.join(checkpoint_dir, rel)
        if not os.path.isfile(file):
            raise ConfigError(f"{file} is missing from a checkpoint that was saved complete; resume from another checkpoint")
        size = os.path.getsize(file)
        if size != expected["size"] or _sha256(file) != expected["sha256"]:
            change = f"{expected['size']} bytes when saved, {size} now" if size != expected["size"] else "its sha256 changed since it was saved"
            raise ConfigError(f"{file} is damaged ({change}); resume from another checkpoint "
                              "(--resume_from_checkpoint PATH) or restore the file")


def checkpoint_steps(output_dir: str) -> list[tuple[int, str]]:
    """(step, folder) of every checkpoint-N in output_dir, newest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, name)) for name in os.listdir(output_dir)
             if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return sorted(found, reverse=True)


def latest_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint whose save finished; incomplete ones skipped with a warning."""
    for _, folder in checkpoint_steps(output_dir):
        try:
            check_complete(folder)
        except IncompleteCheckpoint as why:
            logger.warning("resume auto: skipped an incomplete checkpoint: %s", why)
            continue
        return folder
    return None


def last_good_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint, without warnings: for messages after a failure."""
    for _, folder in checkpoint_steps(output_dir):
        if os.path.isfile(os.path.join(folder, MARKER)):
            return folder
    return None


def clear_for_save(checkpoint_dir: str) -> None:
    """Before a save into an existing checkpoint-N (a resumed run reaching the step an earlier,
    interrupted run died in): an incomplete folder is moved aside, never mixed with the new
    files; a complete one is replaced, as the Trainer would overwrite it. Rank 0 only."""
    if not os.path.isdir(checkpoint_dir):
        return
    if not os.path.isfile(os.path.join(checkpoint_dir, MARKER)):
        parent, name = os.path.split(checkpoint_dir)
        aside, n = os.path.join(parent, INCOMPLETE_PREFIX + name), 1
        while os.path.exists(aside):
            n += 1
            aside = os.path.join(parent, f"{INCOMPLETE_PREFIX}{name}.{n}")
        os.rename(checkpoint_dir, aside)
        logger.warning("%s was an incomplete save of an earlier attempt: moved to %s", checkpoint_dir, aside)
    else:
        shutil.rmtree(checkpoint_dir)
