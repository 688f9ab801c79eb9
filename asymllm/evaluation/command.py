"""`asymllm eval <task>`: one module per evaluation, each with its own `main(argv)`."""

from __future__ import annotations

import sys

from ..dispatch import dispatch

TASKS = {
    "mmlu": ("asymllm.evaluation.mmlu", "main", "MMLU accuracy, scored as lm-evaluation-harness does"),
    "alpaca": ("asymllm.evaluation.alpaca", "main", "alpaca-style generation, judged against references"),
    "report": ("asymllm.evaluation.report", "main", "one table and chart comparing evaluated runs"),
}


def main(argv=None) -> None:
    dispatch("asymllm eval", "task", TASKS, list(sys.argv[1:] if argv is None else argv))
