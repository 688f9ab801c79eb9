"""What a sweep shows: sweep.csv (one row per run), sweep.md (the selection, the runs, the
paired comparisons against the reference recipe, at equal rank and at equal trainable
parameters) and sweep.png (metric against trainable parameters)."""

from __future__ import annotations

import csv
import math
import os
import statistics

from ..data import BUILTIN_DATASET, BUILTIN_HELDOUT
from .compare import DIRECTION, Paired, config_key, equal_parameter_references, paired

COLUMNS = ["phase", "recipe", "rank", "lr", "lora_alpha", "seed", "trainable_params", "train_loss", "heldout_loss",
           "heldout_exact_match", "mmlu", "wall_s", "diverged_at_step"]
COMPARED = ("heldout_exact_match", "heldout_loss")


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: _value(r, k) for k in COLUMNS} for r in rows)


def _value(result: dict, column: str):
    if column == "diverged_at_step":
        return (result.get("diverged") or {}).get("step", "?") if result.get("diverged") else None
    return result.get(column)


def write_markdown(path: str, final: list[dict], reference: str, selection: list[dict] | None = None,
                   chosen: dict | None = None, select_metric: str | None = None, split: dict | None = None,
                   edges: dict | None = None, scored_on: dict | None = None) -> None:
    scored_on = scored_on or {}
    lines = []
    if selection is not None:
        lines += [f"## Selection: the learning rate of each recipe and rank, on validation ({select_metric})", "",
                  f"Validation: {split['validation']} of the {split['validation'] + split['train']} training examples "
                  f"of {_data_name(split['source'])} (seed {split['seed']}); trained on the other {split['train']}. The held-out "
                  "set is not used here.", *scored_line("Selection", scored_on.get("selection")), ""]
        lines += config_table(selection, mark=chosen)
        lines += edge_note(edges or {}, chosen)
        lines += ["", "## Final: the selected learning rates, fresh seeds, full training data, the held-out set", ""]
    lines += [*scored_line("Held-out numbers", scored_on.get("final")), ""] if scored_on.get("final") else []
    lines += config_table(final)
    found = comparisons(final, reference, matched_lr=selection is None)
    for title, pairs in found:
        lines += ["", title, ""] + paired_table(pairs)
    lines += multiplicity_note(found, matched_lr=selection is None)
    lines += ["", "Every run:", "", *run_table(final)]
    lines += reuse_note([*(selection or []), *final])
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _data_name(source: str, quoted: bool = False) -> str:
    """The built-in data by name (its path is of whichever checkout ran the sweep)."""
    for path, name in ((BUILTIN_DATASET, "the built-in training data"), (BUILTIN_HELDOUT, "the built-in held-out set")):
        if source == path or source.endswith(os.path.join("asymllm", "data", os.path.basename(path))):
            return f"{name} (`asymllm/data/{os.path.basename(path)}`)" if quoted else name
    return f"`{source}`" if quoted else source


def scored_line(what: str, scored: dict | None) -> list[str]:
    """Which file a phase's numbers were scored on, and its sha256."""
    if not scored or not scored.get("file"):
        return []
    sha = f" (sha256 {scored['sha256']})" if scored.get("sha256") else " (not a local file: no sha256)"
    return [f"{what} scored on {_data_name(scored['file'], quoted=True)}{sha}."]


def edge_note(edges: dict, chosen: dict | None) -> list[str]:
    """A selected rate at the end of the rates tried says nothing about the rates beyond it."""
    if not edges:
        return []
    items = [f"{recipe} r={rank} selected {chosen[recipe, rank]:g}, the {side} rate it tried"
             for (recipe, rank), side in edges.items()]
    return ["", f"**At the edge of the grid**: {'; '.join(items)}. Its best rate may lie beyond the grid, and the final "
            "comparison may under-tune it; `--extend_grid` runs the next rates in that direction until the choice is interior."]


def multiplicity_note(found: list, matched_lr: bool) -> list[str]:
    """Each interval is 95% on its own: among many comparisons some exclude 0 by chance."""
    count = sum(len(pairs) for _, pairs in found)
    if count < 2:
        return []
    matched = (" Configurations are compared with the reference at the same learning rate only (grid mode): "
               "comparing each rate with every other would multiply the comparisons further.") if matched_lr else ""
    return ["", f"{count} comparisons, each with its own 95% interval, none adjusted for the others: by chance alone "
            f"about {count / 20:.1f} of them would exclude 0 where there is no difference.{matched}"]


def reuse_note(results: list[dict]) -> list[str]:
    """Numbers whose adapter is no longer there to re-check are said to be so."""
    reused = [r for r in results if r.get("reused_without_adapter")]
    if not reused:
        return []
    return ["", f"{len(reused)} of these {len(results)} runs were reused without their adapter (--reuse_without_adapter): "
            "their result.json is of these settings; the adapter fingerprint it records could not be checked again."]


def config_table(results: list[dict], mark: dict | None = None) -> list[str]:
    """Mean ± sample std over seeds per configuration; `mark`: (recipe, rank) -> selected lr."""
    lines = ["| recipe | rank | lr | trainable params | runs | held-out exact match | held-out loss |"
             + (" selected |" if mark else ""), "|---|---:|---:|---:|---:|---:|---:|" + ("---|" if mark else "")]
    for key, group in groups(results).items():
        recipe, rank, lr = key
        diverged = sum(bool(g.get("diverged")) for g in group)
        runs = f"{len(group)} ({diverged} diverged)" if diverged else str(len(group))
        params = next((g["trainable_params"] for g in group if g.get("trainable_params")), None)
        row = (f"| {recipe} | {rank} | {_cell(lr)} | {_cell(params)} | {runs} | "
               f"{mean_std([g.get('heldout_exact_match') for g in group])} | {mean_std([g.get('heldout_loss') for g in group])} |")
        if mark:
            row += " **yes** |" if mark.get((recipe, rank)) == lr else " |"
        lines.append(row)
    return lines


def comparisons(results: list[dict], reference: str, matched_lr: bool = False) -> list[tuple[str, list[Paired]]]:
    """Pairs against the reference at the same rank and at equal parameters; `matched_lr` (grid
    mode, where every configuration ran every rate): only at the same learning rate."""
    keys = list(groups(results))
    same_rank = [(k, r) for k in keys for r in keys if k[0] != reference and r[0] == reference and r[1] == k[1]]
    equal_size = equal_parameter_references(results, reference)
    if matched_lr:
        same_rank, equal_size = ([(k, r) for k, r in pairs if k[2] == r[2]] for pairs in (same_rank, equal_size))
    out = []
    for title, pairs in ((f"Paired against {reference} at the same rank (config minus reference, per seed)", same_rank),
                         (f"Paired against {reference} with trainable parameters within 5%", equal_size)):
        found = [p for k, r in pairs for m in COMPARED if (p := paired(results, k, r, m)) is not None]
        if found:
            out.append((title, found))
    return out


def paired_table(pairs: list[Paired]) -> list[str]:
    lines = ["| config | reference | metric | seeds | mean difference [95% CI] | wins/ties/losses | reading |",
             "|---|---|---|---:|---:|---:|---|"]
    for p in pairs:
        interval = f"[{p.low:+.4f}, {p.high:+.4f}]" if not math.isnan(p.low) else "[-]"
        better = "higher" if DIRECTION[p.metric] > 0 else "lower"
        lines.append(f"| {_config(p.config)} | {_config(p.reference)} | {p.metric} ({better} is better) | {len(p.seeds)} | "
                     f"{p.mean:+.4f} {interval} | {p.wins}/{p.ties}/{p.losses} | {p.verdict} |")
    return lines


def run_table(results: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return lines + ["| " + " | ".join(_cell(_value(r, k)) for k in COLUMNS) + " |" for r in results]


def _config(key: tuple) -> str:
    recipe, rank, lr = key
    return f"{recipe} r={rank}" + (f" lr={lr:g}" if lr is not None else "")


def groups(results: list[dict]) -> dict:
    """config -> its runs; configurations of one recipe and rank together, by learning rate (a rate
    added by --extend_grid sits beside the others, not at the end)."""
    found: dict = {}
    for r in results:
        found.setdefault(config_key(r), []).append(r)
    first = {key[:2]: i for i, key in reversed(list(enumerate(found)))}
    return dict(sorted(found.items(), key=lambda item: (first[item[0][:2]], item[0][2] is not None, item[0][2] or 0)))


def mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}" if abs(value) < 1e-2 else f"{value:.4f}"
    if isinstance(value, int) and value > 9999:
        return f"{value:,}"
    return str(value)


def plot(results: list[dict], path: str) -> None:
    """Held-out metric against trainable parameters: one dot per run, mean ± std per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "heldout_exact_match" if any(r.get("heldout_exact_match") is not None for r in results) else "heldout_loss"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, group in groups(results).items():
        xs = [g["trainable_params"] for g in group if g.get(metric) is not None and g.get("trainable_params")]
        ys = [g[metric] for g in group if g.get(metric) is not None and g.get("trainable_params")]
        if not ys:
            continue
        dots = ax.scatter(xs, ys, alpha=0.5, s=18)
        spread = statistics.stdev(ys) if len(ys) > 1 else 0.0
        ax.errorbar([statistics.mean(xs)], [statistics.mean(ys)], yerr=[spread], fmt="o", ms=8, capsize=5,
                    color=dots.get_facecolor()[0], label=_config(key))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(output: str, final: list[dict], reference: str, **selection) -> None:
    os.makedirs(output, exist_ok=True)
    write_csv([*(selection.get("selection") or []), *final], os.path.join(output, "sweep.csv"))
    write_markdown(os.path.join(output, "sweep.md"), final, reference, **selection)
    plot(final, os.path.join(output, "sweep.png"))
