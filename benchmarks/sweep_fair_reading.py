"""The reading of the fair study (RESULTS.md, sweep_fair; the README's "Which recipe should I use?"),
computed from its committed result files only: nothing here trains or evaluates.

    python benchmarks/sweep_fair_reading.py

Prints, for the final phase (benchmarks/sweep_fair/sweep.csv): each configuration's mean ± std
over its seeds; each one paired by seed against LoRA r=16 (mean difference, Student-t 95%
interval, wins/ties/losses) in points of exact match and in held-out loss, and what each
interval rules out; the same without one named run (the outlier check); the check of `asym`
r=16 at 1e-3 (check_2ep/) and its pooling with the earlier 2-epoch sweep (sweep_smollm2_2ep.csv);
and the noise floor of one run's exact match on the held-out items.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from asymllm.sweep.compare import mean_interval, paired  # noqa: E402  (the sweep's own statistics)

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = ("hA_he_hB_zero", 16, 1e-3)
NAMES = {"hA_he_hB_zero": "lora", "A_rand_hB_zero": "asym"}
OUTLIER = (("A_rand_hB_zero", 16), 4)  # the run the reading asks about: (recipe, rank), seed
HELDOUT_ITEMS = 120


def rows(path: str, phase: str | None = None) -> list[dict]:
    with open(path) as f:
        found = [r for r in csv.DictReader(f) if phase is None or r.get("phase") == phase]
    typed = []
    for r in found:
        if r.get("diverged_at_step"):
            continue
        typed.append({"recipe": r["recipe"], "rank": int(r["rank"]), "lr": float(r["lr"]) if r.get("lr") else 1e-3,
                      "seed": int(r["seed"]), "trainable_params": int(r["trainable_params"]),
                      "train_loss": float(r["train_loss"]), "heldout_loss": float(r["heldout_loss"]),
                      "heldout_exact_match": float(r["heldout_exact_match"])})
    return typed


def name(key: tuple) -> str:
    recipe, rank, lr = key
    return f"{NAMES.get(recipe, recipe)} r={rank} lr={lr:g}"


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def table(results: list[dict]) -> None:
    print("| configuration | trainable params | seeds | exact match, % | held-out loss | train loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for key in dict.fromkeys((r["recipe"], r["rank"], r["lr"]) for r in results):
        group = [r for r in results if (r["recipe"], r["rank"], r["lr"]) == key]
        em = [100 * r["heldout_exact_match"] for r in group]
        loss = [r["heldout_loss"] for r in group]
        print(f"| {name(key)} | {group[0]['trainable_params']:,} | {len(group)} | {statistics.fmean(em):.1f} ± {spread(em):.1f} | "
              f"{statistics.fmean(loss):.3f} ± {spread(loss):.3f} | {statistics.fmean(r['train_loss'] for r in group):.3f} |")


def rules_out(low: float, high: float, unit: str, higher_is_better: bool) -> str:
    """What a 95% interval of (config - reference) excludes, in the reader's terms."""
    worse, better = (-low, high) if higher_is_better else (high, -low)
    parts = []
    if worse > 0:
        parts.append(f"worse by more than {worse:.{1 if unit == 'points' else 3}f} {unit}")
    else:
        parts.append(f"worse at all (it is better by at least {-worse:.{1 if unit == 'points' else 3}f} {unit})")
    if better > 0:
        parts.append(f"better by more than {better:.{1 if unit == 'points' else 3}f}")
    else:
        parts.append(f"better at all (worse by at least {-better:.{1 if unit == 'points' else 3}f})")
    return "rules out: " + "; ".join(parts)


def compare(results: list[dict], key: tuple, label: str = "") -> None:
    em = paired(results, key, REFERENCE, "heldout_exact_match")
    loss = paired(results, key, REFERENCE, "heldout_loss")
    if em is None:
        return
    print(f"- {name(key)}{label} minus {name(REFERENCE)}, {len(em.seeds)} seeds {em.seeds}:")
    print(f"  exact match {100 * em.mean:+.1f} points [{100 * em.low:+.1f}, {100 * em.high:+.1f}], w/t/l "
          f"{em.wins}/{em.ties}/{em.losses}; {rules_out(100 * em.low, 100 * em.high, 'points', True)}")
    print(f"  held-out loss {loss.mean:+.3f} [{loss.low:+.3f}, {loss.high:+.3f}], w/t/l {loss.wins}/{loss.ties}/{loss.losses}; "
          f"{rules_out(loss.low, loss.high, 'of loss', False)}")


def main() -> None:
    final = rows(os.path.join(HERE, "sweep_fair", "sweep.csv"), phase="final")
    print("## Final phase (benchmarks/sweep_fair/sweep.csv)\n")
    table(final)
    print("\n## Paired by seed against LoRA r=16 (Student-t 95%)\n")
    keys = [k for k in dict.fromkeys((r["recipe"], r["rank"], r["lr"]) for r in final) if k != REFERENCE]
    for key in keys:
        compare(final, key)
    (group, seed) = OUTLIER
    kept = [r for r in final if not ((r["recipe"], r["rank"]) == group and r["seed"] == seed)]
    print(f"\n## Without {NAMES.get(group[0], group[0])} r={group[1]} seed {seed} (and LoRA's seed {seed}, the pair)\n")
    for key in keys:
        if key[:2] == group:
            compare(kept, key, f" without seed {seed}")

    check = rows(os.path.join(HERE, "sweep_fair", "check_2ep", "sweep.csv"))
    earlier = rows(os.path.join(HERE, "sweep_smollm2_2ep.csv"))
    print("\n## asym r=16 at 1e-3 on the final seeds (check_2ep), and pooled with sweep_smollm2_2ep (seeds 0-2)\n")
    compare(check, ("A_rand_hB_zero", 16, 1e-3))
    compare(check + earlier, ("A_rand_hB_zero", 16, 1e-3), " (pooled)")

    reference_em = [r["heldout_exact_match"] for r in final if (r["recipe"], r["rank"], r["lr"]) == REFERENCE]
    p = statistics.fmean(reference_em)
    print(f"\n## Noise floor\n\nOne run's exact match on {HELDOUT_ITEMS} items at p = {100 * p:.1f}%: binomial standard "
          f"error {100 * math.sqrt(p * (1 - p) / HELDOUT_ITEMS):.1f} points; one item = {100 / HELDOUT_ITEMS:.2f} points; "
          f"LoRA's seed-to-seed std {100 * spread(reference_em):.1f} points; the 95% half-width of a 5-seed mean of "
          f"LoRA alone {100 * (mean_interval(reference_em)[2] - p):.1f} points.")


if __name__ == "__main__":
    main()
