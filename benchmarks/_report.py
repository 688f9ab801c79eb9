"""The end of every benchmark: the markdown report printed, and written to --output when given."""

from __future__ import annotations


def emit(lines: list[str], output: str | None) -> None:
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if output:
        with open(output, "w") as f:
            f.write(text)
