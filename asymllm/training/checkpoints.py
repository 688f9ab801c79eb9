"""Complete checkpoints only: a completion marker written last, and `auto` that trusts nothing else.

A checkpoint-N/ folder is written by every rank (the adapter by rank 0, DeepSpeed shards and
RNG states by each), and a kill (SIGKILL, a lost node, the scheduler's time limit) can stop
that at any file. transformers' `get_last_checkpoint` takes the highest-numbered folder as
it is, so a half-written one would be resumed. Here, once every rank has written its part,
rank 0 writes `asymllm_checkpoint.json` (each file's size and sha256) under a temporary name
and renames it into place. `auto` then takes the newest folder with a marker, skipping (with a
warning) folders without one; a folder whose files no longer match its marker is refused with
the file named: its save finished, so the damage came later and must not be trained on.

The marker also carries the settings the checkpoint was made with (the run record's
`training_settings`, run_record.py): a resume under other settings raises StaleCheckpoint,
which `asymllm train` reports with exit code EXIT_STALE_CHECKPOINT (4), so that a sweep can
start that cell afresh. An incomplete save moved aside (incomplete-checkpoint-N) is removed
once a complete checkpoint of step N or later exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil

from ..run_record import RUN_RECORD, read_json
from .config import ConfigError

logger = logging.getLogger(__name__)

MARKER = "asymllm_checkpoint.json"
INCOMPLETE_PREFIX = "incomplete-"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_INCOMPLETE = re.compile(rf"^{INCOMPLETE_PREFIX}checkpoint-(\d+)(?:\.\d+)?$")
EXIT_STALE_CHECKPOINT = 4  # `asymllm train`'s exit code for StaleCheckpoint; 1 is any other error, 3 divergence, 128+N a signal


class IncompleteCheckpoint(ConfigError):
    """A checkpoint folder without a completion marker: its save did not finish."""


class StaleCheckpoint(ConfigError):
    """The checkpoint to resume was made with other training settings than this run's."""


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
    """Record every file of a finished checkpoint, and the settings it was made with (from the
    run record in its output folder; when there is none, those of a marker being rewritten);
    call once all ranks have written theirs. Then the incomplete saves it replaces go."""
    files = {rel: {"size": os.path.getsize(os.path.join(checkpoint_dir, rel)), "sha256": _sha256(os.path.join(checkpoint_dir, rel))}
             for rel in _files(checkpoint_dir)}
    path = os.path.join(checkpoint_dir, MARKER)
    settings = ((read_json(os.path.join(os.path.dirname(os.path.abspath(checkpoint_dir)), RUN_RECORD)) or {}).get("training_settings")
                or (read_json(path) or {}).get("training_settings"))
    with open(path + ".tmp", "w") as f:
        json.dump({"step": step, "files": files, **({"training_settings": settings} if settings else {})}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)  # atomic: a reader sees no marker or the whole marker
    remove_incomplete(os.path.dirname(os.path.abspath(checkpoint_dir)), up_to_step=step, because=f"{checkpoint_dir} is complete")
    return path


def remove_incomplete(output_dir: str, up_to_step: int | None, because: str) -> list[str]:
    """Delete the incomplete-checkpoint-N folders (half-written saves clear_for_save moved aside)
    with N <= up_to_step (None: all), each with a log line. Call only once a complete
    replacement exists: a complete checkpoint of step N or later, or the run's final adapter."""
    removed = []
    for name in sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []:
        match = _INCOMPLETE.match(name)
        if match and (up_to_step is None or int(match.group(1)) <= up_to_step) and os.path.isdir(os.path.join(output_dir, name)):
            shutil.rmtree(os.path.join(output_dir, name))
            removed.append(os.path.join(output_dir, name))
            logger.info("removed %s: %s", removed[-1], because)
    return removed


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


def recorded_training_settings(checkpoint_dir: str) -> dict | None:
    """The settings a checkpoint's marker records it was made with; None from an asymllm that recorded none."""
    return (read_json(os.path.join(checkpoint_dir, MARKER)) or {}).get("training_settings")


def setting_differences(made_with: dict, settings: dict) -> dict:
    """{flag: (the checkpoint's value, this run's)} for each flag both know whose values differ
    (a flag only one side knows, as after a transformers upgrade, cannot be compared)."""
    return {flag: (made_with[flag], value) for flag, value in settings.items()
            if flag in made_with and not _same(made_with[flag], value)}


def stale_message(checkpoint_dir: str, differ: dict) -> str:
    """One line (the sweep reads it): every differing setting, the checkpoint's value, this run's."""
    listed = "; ".join(f"{flag}: {shown(then)} in the checkpoint, {shown(now)} in this run" for flag, (then, now) in differ.items())
    message = (f"--resume_from_checkpoint {checkpoint_dir}: made with other settings than this run ({listed}); resume with "
               "the checkpoint's settings, or start afresh (--overwrite_output_dir, or another --output_dir)")
    return " ".join(message.split())


def _is_file_identity(value) -> bool:
    return isinstance(value, dict) and set(value) == {"path", "sha256"}


def _same(then, now) -> bool:
    """Files by content when both sides know it (the same data at another path is the same data), else by path or name."""
    if _is_file_identity(then) and _is_file_identity(now):
        return then["sha256"] == now["sha256"] if then["sha256"] and now["sha256"] else then["path"] == now["path"]
    return comparable(then) == comparable(now)


def comparable(value):
    if isinstance(value, (list, tuple, set, frozenset)):
        return frozenset(map(str, value))  # peft stores target_modules as a set: the order means nothing
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)  # lora_alpha 32 and 32.0 are one value
    return value


def shown(value) -> str:
    if _is_file_identity(value):
        return f"{value['path']} (sha256 {value['sha256'][:12]})" if value["sha256"] else str(value["path"])
    if isinstance(value, (list, tuple, set, frozenset)):
        return ",".join(sorted(map(str, value)))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return f"{value:g}" if isinstance(value, float) else str(value)


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
