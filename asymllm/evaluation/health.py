"""Reference-free health figures of a set of generations: no judge, no reference needed.

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
