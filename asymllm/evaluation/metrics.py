"""Figures of a set of generations without a judge: exact match against references, and
reference-free health figures (no reference needed).

Exact match: meaningful where answers are short and unique (the built-in data: reverse the
words, add the numbers, ...); on open-ended data such as alpaca_eval it is near 0 and only a curiosity.
A match is `output.strip() == reference.strip()`. Groups are the records' `task` field
(built-in data), else their `dataset` field (alpaca_eval).

    exact_match(outputs, references, groups) -> {accuracy, n, n_correct, by_group: {g: {accuracy, n}}}

Health:

    health_figures(outputs, n_tokens, stopped) ->
        {n, mean_length_chars, mean_length_tokens, eos_share, truncated_share, repetition_rate}

- eos_share: the share of outputs that ended with EOS before max_new_tokens. A tuned model
  far below its base here never learned to stop: a training bug (the EOS masked out of the
  loss, pad == eos), not a decoding setting.
- repetition_rate: the mean, over outputs, of the share of word 4-grams that repeat an
  earlier 4-gram of the same output (1 - distinct / total; 0 for outputs under 4 words).
  Loops ("The answer is 5. The answer is 5. ...") push it towards 1.
- lengths in characters (what alpaca_eval reports and length-controls on) and in tokens.
"""

from __future__ import annotations

REPETITION_N = 4


def repetition_rate(text: str, n: int = REPETITION_N) -> float:
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def health_figures(outputs: list[str], n_tokens: list[int], stopped: list[bool]) -> dict:
    n = len(outputs)
    if not n:
        return {"n": 0}
    return {
        "n": n,
        "mean_length_chars": sum(len(o) for o in outputs) / n,
        "mean_length_tokens": sum(n_tokens) / n,
        "eos_share": sum(bool(s) for s in stopped) / n,
        "truncated_share": sum(not s for s in stopped) / n,
        "repetition_rate": sum(repetition_rate(o) for o in outputs) / n,
    }


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
