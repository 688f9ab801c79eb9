"""`asymllm eval report RUN_DIR...`: one markdown table and one bar chart comparing runs.

    asymllm eval report outputs/eval/base outputs/eval/lora outputs/eval/A_rand_hB_zero --output_dir outputs/eval/report

Each RUN_DIR is an evaluation output folder holding mmlu.json (`asymllm eval mmlu`) and/or
alpaca_summary.json (`asymllm eval alpaca`); a figure a run lacks reads "not run", in the table
and on the chart, where every bar carries its value (so a measured 0 reads 0.0). Writes
report.md (run, MMLU micro ± its standard error, win rate ± standard error, LC win rate, exact match, mean output
length, stopped-with-EOS share, with each run's judge and reference listed under the table:
win rates against different references or judges do not compare) and report.png (grouped
bars, percent, one group per metric, one bar per run; win rates with their standard error).
A run is named by its folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

from ..cli_args import ArgumentParser

logger = logging.getLogger("asymllm.eval.report")

# (label in the chart, key in a run's row, key of its error bar)
CHART_METRICS = [("MMLU micro", "mmlu_micro", "mmlu_micro_se"), ("win rate", "win_rate", "win_rate_se"),
                 ("LC win rate", "lc_win_rate", "lc_win_rate_se"), ("exact match", "exact_match", None)]


# A figure a run lacks (its evaluation was not run, or ran without a judge or references). It must
# read differently from a measured 0: on the chart both would be a bar of no height.
NOT_RUN = "not run"


class ReportError(ValueError):
    pass


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="asymllm eval report", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="evaluation output folders")
    parser.add_argument("--output_dir", default=os.path.join("outputs", "eval", "report"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(format="[asymllm eval] %(message)s", level=logging.INFO)
    try:
        rows = [read_run(run) for run in args.runs]
    except ReportError as error:
        raise SystemExit(f"asymllm eval report: error: {error}") from None
    os.makedirs(args.output_dir, exist_ok=True)
    markdown = report_markdown(rows)
    md_path = os.path.join(args.output_dir, "report.md")
    with open(md_path, "w") as f:
        f.write(markdown)
    png_path = plot_report(rows, os.path.join(args.output_dir, "report.png"))
    print(markdown, flush=True)
    logger.info("wrote %s and %s", md_path, png_path)
    return {"rows": rows, "markdown": md_path, "chart": png_path}


def read_run(run_dir: str) -> dict:
    """One table row: figures in percent (None where the run lacks them)."""
    if not os.path.isdir(run_dir):
        raise ReportError(f"{run_dir}: no such folder")
    mmlu, alpaca = _read_json(run_dir, "mmlu.json"), _read_json(run_dir, "alpaca_summary.json")
    if mmlu is None and alpaca is None:
        raise ReportError(f"{run_dir}: holds neither mmlu.json nor alpaca_summary.json; evaluate it first")
    row = {"run": os.path.basename(os.path.normpath(run_dir)), "dir": run_dir}
    mmlu = mmlu or {}  # asymllm eval mmlu writes fractions: micro, micro_stderr
    row["mmlu_micro"] = None if not _number(mmlu.get("micro")) else mmlu["micro"] * 100
    row["mmlu_micro_se"] = None if not _number(mmlu.get("micro_stderr")) else mmlu["micro_stderr"] * 100
    row["mmlu_n"] = mmlu.get("n")
    alpaca = alpaca or {}
    judge, health, em = alpaca.get("judge") or {}, alpaca.get("health") or {}, alpaca.get("exact_match") or {}
    row.update({
        "win_rate": judge.get("win_rate"), "win_rate_se": judge.get("standard_error"),
        "lc_win_rate": judge.get("length_controlled_win_rate"), "lc_win_rate_se": judge.get("lc_standard_error"),
        "judge": judge.get("judge"), "reference": judge.get("reference"),
        "exact_match": None if em.get("accuracy") is None else em["accuracy"] * 100,
        "mean_length": health.get("mean_length_chars"),
        "eos_share": None if health.get("eos_share") is None else health["eos_share"] * 100,
    })
    return row


def _read_json(run_dir: str, name: str) -> dict | None:
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}: malformed JSON ({error.msg}, line {error.lineno})") from None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _pct(value, se=None) -> str:
    if not _number(value):
        return NOT_RUN
    return f"{value:.1f}" + (f" ± {se:.1f}" if _number(se) else "")


def report_markdown(rows: list[dict]) -> str:
    lines = ["| run | MMLU micro (%) | win rate (%) | LC win rate (%) | exact match (%) | mean length (chars) | stopped with EOS (%) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {_pct(r['mmlu_micro'], r['mmlu_micro_se'])} | {_pct(r['win_rate'], r['win_rate_se'])} | "
                     f"{_pct(r['lc_win_rate'], r['lc_win_rate_se'])} | {_pct(r['exact_match'])} | "
                     f"{_pct(r['mean_length'])} | {_pct(r['eos_share'])} |")
    judged = [r for r in rows if r["judge"]]
    if judged:
        lines += ["", "Judged by:"] + [f"- {r['run']}: {r['judge']} against {r['reference']}" for r in judged]
        if len({(r["judge"], r["reference"]) for r in judged}) > 1:
            lines.append("- (judges or references differ: those win rates do not compare)")
    lines += ["", "LC win rate: asymllm's logistic length control (asymllm/evaluation/winrate.py), "
                  "in the spirit of alpaca_eval's length_controlled_v1, not equal to it.",
              f"{NOT_RUN}: the run has no such figure (that evaluation was not run on it, or ran without a judge "
              "or references); 0.0 is a measured zero."]
    return "\n".join(lines) + "\n"


def plot_report(rows: list[dict], path: str) -> str:
    import matplotlib.pyplot as plt

    fig = draw_report(rows)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_report(rows: list[dict]):
    """The chart as a matplotlib Figure (plot_report saves it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in CHART_METRICS if any(_number(r[m[1]]) for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(metrics) * max(2, len(rows)) / 2), 4))
    width = 0.8 / len(rows)
    for k, row in enumerate(rows):
        xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(metrics))]
        values = [row[key] if _number(row[key]) else math.nan for _, key, _ in metrics]
        errors = [row[err] if err and _number(row[err]) else 0.0 for _, _, err in metrics]
        ax.bar(xs, values, width, yerr=errors, capsize=3, label=row["run"])
        for x, value, error in zip(xs, values, errors):
            _label_bar(ax, x, value, error)
    ax.set_xticks(range(len(metrics)), [label for label, _, _ in metrics])
    ax.set_ylabel("%")
    ax.set_ylim(0, 115)  # room for the labels over bars near 100
    ax.set_yticks(range(0, 101, 20))
    ax.axhline(50, color="grey", lw=0.5, ls=":")  # a win rate's tie; not a line for MMLU or exact match
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _label_bar(ax, x: float, value: float, error: float) -> None:
    """Every bar's figure over it, and NOT_RUN in grey italics where the run has none: a zero bar
    and a missing one both have no height, so only the label tells them apart."""
    if math.isnan(value):
        ax.text(x, 1, NOT_RUN, rotation=90, ha="center", va="bottom", fontsize="x-small", color="grey", style="italic")
    else:
        ax.text(x, value + error + 1, f"{value:.1f}", rotation=90, ha="center", va="bottom", fontsize="x-small")
