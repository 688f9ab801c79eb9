"""Append-only JSON Lines logs that make long evaluations resumable.

Each finished item is appended (and flushed to disk) as soon as it is made; a rerun reads
the log and skips the keys it holds. A run killed mid-write leaves at most one torn last
line, which is ignored. The settings that produced a log sit in a JSON file beside it: a
rerun with other settings refuses to mix its results with the old ones.

The settings file also holds the fingerprints of what was evaluated (asymllm.fingerprint:
the adapter's and model's files, not their paths): a folder that now holds another adapter
or model refuses its old results too, naming the file that changed.

    log = ResumeLog("out/generations.jsonl", settings={"max_new_tokens": 64, ...},
                    fingerprints={"model": model_fingerprint(m), "adapter": adapter_fingerprint(a)})
    todo = [item for item in items if item.key not in log.done]
    log.append([{"key": ..., "output": ...}])
"""

from __future__ import annotations

import json
import logging
import os

from ..fingerprint import fingerprint_changes

FINGERPRINTS = "fingerprints"  # the settings file's key for them; compared apart from the settings

logger = logging.getLogger(__name__)


class ResumeError(ValueError):
    """The output folder holds results made with other settings, or of another adapter or model."""


class ResumeLog:
    def __init__(self, path: str, settings: dict, overwrite: bool = False, fingerprints: dict | None = None):
        self.path = path
        self.settings_path = os.path.splitext(path)[0] + ".settings.json"
        self.done: dict[str, dict] = {}
        settings = json.loads(json.dumps(settings))  # as it will read back (tuples -> lists, ...)
        fingerprints = json.loads(json.dumps(fingerprints or {}))
        if overwrite:
            for stale in (path, self.settings_path):
                if os.path.exists(stale):
                    os.remove(stale)
        recorded = None
        if os.path.exists(self.settings_path):
            with open(self.settings_path) as f:
                old = json.load(f)
            recorded = old.pop(FINGERPRINTS, None)
            # A file without fingerprints is an older asymllm's, whose settings held paths:
            # what matters about its results is that nobody can tell what made them.
            changed = {} if recorded is None else {k: (old.get(k), settings.get(k)) for k in sorted(set(old) | set(settings))
                                                   if old.get(k) != settings.get(k)}
            if changed:
                detail = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
                raise ResumeError(
                    f"{path} holds results made with other settings ({detail}); use another --output_dir, "
                    f"or --overwrite to discard them"
                )
        if os.path.exists(path):
            self._read()
        if recorded is None or recorded != fingerprints:
            if self.done:
                self._check_fingerprints(recorded, fingerprints)
            # No results yet, or the same files (only a path or a note differs): record these.
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(self.settings_path, "w") as f:
                json.dump({**settings, FINGERPRINTS: fingerprints}, f, indent=2)
        if self.done:  # said only once they are known to be this model's and adapter's
            logger.info("%s: %d items already done, skipped", self.path, len(self.done))

    def _check_fingerprints(self, recorded: dict | None, fingerprints: dict) -> None:
        advice = "use --overwrite to discard them, or another --output_dir"
        if recorded is None and fingerprints:
            roles = " or ".join(fingerprints)
            raise ResumeError(f"{self.path} holds results with no record of what made them (written before asymllm "
                              f"fingerprinted adapters and models), so they may be another {roles}'s; {advice}")
        changes = fingerprint_changes(recorded or {}, fingerprints)
        if changes:
            detail = "; ".join(f"{role} {change}" for role, change in changes.items())
            raise ResumeError(f"{self.path} holds results of another {' and '.join(changes)} ({detail}); {advice}")

    def _read(self) -> None:
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        good = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number >= len(lines) - 1:  # the last line: a write the previous run did not finish
                    logger.warning("%s:%d: an unfinished line (the previous run stopped mid-write); dropped", self.path, number)
                    self._rewrite(good)
                    continue
                raise ResumeError(f"{self.path}:{number}: not JSON; the log is damaged (delete it, or use --overwrite)") from None
            good.append(line)
            self.done[record["key"]] = record

    def _rewrite(self, lines: list[str]) -> None:
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        os.replace(tmp, self.path)

    def append(self, records: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                self.done[record["key"]] = record
            f.flush()
            os.fsync(f.fileno())
