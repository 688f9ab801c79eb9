"""Append-only JSON Lines logs that make long evaluations resumable.

Each finished item is appended (and flushed to disk) as soon as it is made; a rerun reads
the log and skips the keys it holds. A run killed mid-write leaves at most one torn last
line, which is ignored. The settings that produced a log sit in a JSON file beside it: a
rerun with other settings refuses to mix its results with the old ones.

    log = ResumeLog("out/generations.jsonl", settings={"max_new_tokens": 64, ...})
    todo = [item for item in items if item.key not in log.done]
    log.append([{"key": ..., "output": ...}])
"""

from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger(__name__)


class ResumeError(ValueError):
    """The output folder holds results made with other settings."""


class ResumeLog:
    def __init__(self, path: str, settings: dict, overwrite: bool = False):
        self.path = path
        self.settings_path = os.path.splitext(path)[0] + ".settings.json"
        self.done: dict[str, dict] = {}
        settings = json.loads(json.dumps(settings))  # as it will read back (tuples -> lists, ...)
        if overwrite:
            for stale in (path, self.settings_path):
                if os.path.exists(stale):
                    os.remove(stale)
        if os.path.exists(self.settings_path):
            with open(self.settings_path) as f:
                old = json.load(f)
            changed = {k: (old.get(k), settings.get(k)) for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)}
            if changed:
                detail = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
                raise ResumeError(
                    f"{path} holds results made with other settings ({detail}); use another --output_dir, "
                    f"or --overwrite to discard them"
                )
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(self.settings_path, "w") as f:
                json.dump(settings, f, indent=2)
        if os.path.exists(path):
            self._read()

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
        if self.done:
            logger.info("%s: %d items already done, skipped", self.path, len(self.done))

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
