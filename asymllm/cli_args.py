"""argparse for asymllm's commands: a mistyped flag is one line naming it and the closest known flag.

    $ asymllm export --adapter RUN --ouput merged
    asymllm export: error: unknown flag --ouput (did you mean --output?)

Plain argparse would instead say that --output is required (its check comes first) and print
the usage block above it. `closest` and `unknown_flags` are the pieces, for parsers that are not
built here (`asymllm train`'s TrlParser, the sub-command names in dispatch)."""

from __future__ import annotations

import argparse
import difflib
import sys


def closest(word: str, options) -> str | None:
    """The option most like `word` (difflib's ratio, cutoff 0.6), or None."""
    match = difflib.get_close_matches(word, list(options), n=1)
    return match[0] if match else None


def unknown_flags(argv: list[str], known: list[str], allow_abbrev: bool = True) -> list[str]:
    """The `--flags` in argv that name no known option. A unique-or-not prefix of a known flag is
    left to argparse (it accepts abbreviations and reports ambiguous ones); so is everything after a
    bare `--` (passed through, as `asymllm sweep` does to `asymllm train`), and a token with a space
    in it, which argparse reads as a value (`--eval_flags "--limit 60"`)."""
    unknown = []
    for arg in argv:
        if arg == "--":
            break
        if not arg.startswith("--") or " " in arg:
            continue
        name = arg.split("=", 1)[0]
        if name in known or (allow_abbrev and any(flag.startswith(name) for flag in known)):
            continue
        unknown.append(name)
    return unknown


def did_you_mean(flags: list[str], known: list[str]) -> str:
    """'--ouput (did you mean --output?)' for each flag, comma-separated."""
    parts = []
    for flag in flags:
        match = closest(flag, known)
        parts.append(f"{flag} (did you mean {match}?)" if match else flag)
    return ", ".join(parts)


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose failures name an unknown flag first, in one line, with the
    closest known flag (or, without a close one, the flags there are)."""

    def parse_known_args(self, args=None, namespace=None):
        self._asymllm_argv = list(sys.argv[1:] if args is None else args)  # error() needs what was given
        return super().parse_known_args(args, namespace)

    def error(self, message):
        known = self.known_flags()
        unknown = unknown_flags(getattr(self, "_asymllm_argv", []), known, self.allow_abbrev)
        # "argument --x: expected one argument" with a `--y` right after it: --y was meant as a
        # value, and argparse's own message (use --x=--y) is the right one.
        if unknown and "expected" not in message:
            noun = "flag" if len(unknown) == 1 else "flags"
            hint = did_you_mean(unknown, known)
            if all(closest(flag, known) is None for flag in unknown):
                hint += f"; flags: {', '.join(self.listed_flags())}"
            self.exit(2, f"{self.prog}: error: unknown {noun} {hint}\n")
        super().error(message)

    def known_flags(self) -> list[str]:
        return [option for action in self._actions for option in action.option_strings]

    def listed_flags(self) -> list[str]:
        """Each documented option once, by its first long name."""
        names = []
        for action in self._actions:
            long = [o for o in action.option_strings if o.startswith("--")]
            if long and action.help is not argparse.SUPPRESS:
                names.append(long[0])
        return names
