"""Sub-command dispatch shared by `asymllm <command>` and `asymllm eval <task>`.

Each entry names a module and a function taking argv, so a command imports only what it
runs (`asymllm recipes` never imports torch)."""

from __future__ import annotations

import importlib
import sys

from .cli_args import closest


def dispatch(prog: str, noun: str, entries: dict[str, tuple[str, str, str]], argv: list[str]) -> None:
    """Run entries[argv[0]] = (module, function, help) with argv[1:]; help or a clear error otherwise."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog} <{noun}> [options]\n\n{noun}s:")
        for name, (_, _, help_text) in entries.items():
            print(f"  {name:10s} {help_text}")
        return
    name, rest = argv[0], argv[1:]
    if name not in entries:
        close = closest(name, entries)
        hint = f" (did you mean {close!r}?)" if close else ""
        sys.exit(f"{prog}: unknown {noun} {name!r}{hint}; {noun}s: {', '.join(entries)}")
    module, function, _ = entries[name]
    getattr(importlib.import_module(module), function)(rest)
