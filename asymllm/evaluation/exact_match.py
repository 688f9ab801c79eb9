"""Exact-match accuracy against reference outputs, overall and per task.

Meaningful where answers are short and unique (the built-in data: reverse the words, add
the numbers, ...); on open-ended data such as alpaca_eval it is near 0 and only a curiosity.
A match is `output.strip() == reference.strip()`. Groups are the records' `task` field
(built-in data), else their `dataset` field (alpaca_eval).

    exact_match(outputs, references, groups) -> {accuracy, n, n_correct, by_group: {g: {accuracy, n}}}
"""

from __future__ import annotations


def exact_match(outputs: list[str], references: list[str | None], groups: list[str | None]) -> dict | None:
    """None when no item has a reference; items without one are left out."""
    rows = [(o.strip() == r.strip(), g) for o, r, g in zip(outputs, references, groups) if r is not None]
    if not rows:
        return None
    by_group: dict[str, list[bool]] = {}
    for correct, group in rows:
        if group is not None:
            by_group.setdefault(group, []).append(correct)
    n_correct = sum(correct for correct, _ in rows)
    return {
        "accuracy": n_correct / len(rows),
        "n": len(rows),
        "n_correct": n_correct,
        "by_group": {g: {"accuracy": sum(c) / len(c), "n": len(c)} for g, c in sorted(by_group.items())},
    }
