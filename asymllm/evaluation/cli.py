"""`asymllm eval <task>`: one module per evaluation, each with its own `main(argv)`."""

from __future__ import annotations

import difflib
import importlib
import sys

TASKS = {
    "mmlu": ("asymllm.evaluation.mmlu", "MMLU accuracy, scored as lm-evaluation-harness does"),
    "alpaca": ("asymllm.evaluation.alpaca", "alpaca-style generation, judged against references"),
    "report": ("asymllm.evaluation.report", "one table and chart comparing evaluated runs"),
}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: asymllm eval <task> [options]\n\ntasks:")
        for name, (_, help_text) in TASKS.items():
            print(f"  {name:8s} {help_text}")
        return
    task, rest = argv[0], argv[1:]
    if task not in TASKS:
        close = difflib.get_close_matches(task, TASKS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        sys.exit(f"asymllm eval: unknown task {task!r}{hint}; tasks: {', '.join(TASKS)}")
    importlib.import_module(TASKS[task][0]).main(rest)
