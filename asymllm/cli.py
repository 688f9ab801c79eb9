"""The `asymllm` command: one sub-command per job, each in its own module.

    asymllm recipes            the grammar and the named aliases
    asymllm train [flags]      fine-tune with a LoRASYM adapter (see asymllm train --help)
    asymllm demo               a LoRASYM adapter on the built-in model, end to end
    asymllm eval <task>        mmlu, alpaca, report (see asymllm/evaluation/command.py)
    asymllm chat               talk to a tuned model (terminal, or --prompt for one reply)
"""

from __future__ import annotations

import sys

from .adapters.recipe import ALIASES, GRAMMAR, Recipe, describe
from .dispatch import dispatch

COMMANDS = {
    "recipes": ("asymllm.cli", "recipes_main", "list the recipe grammar and aliases"),
    "train": ("asymllm.training.train", "main", "supervised fine-tuning with a LoRASYM adapter (built-in default without flags)"),
    "eval": ("asymllm.evaluation.command", "main", "evaluate: mmlu, alpaca (generation + judge), report"),
    "sweep": ("asymllm.sweep", "main", "train + evaluate every recipe x rank x seed; table and plot"),
    "export": ("asymllm.export.command", "main", "merge an adapter into its base (plain transformers folder) or re-save it for serving"),
    "chat": ("asymllm.chat", "main", "talk to a tuned model: --adapter RUN/adapter or --model DIR; --prompt for one reply"),
    "demo": ("asymllm.demo", "main", "adapter demo on the built-in model"),
}


def recipes_main(argv=None) -> None:
    print("LoRASYM recipes\n")
    print("Grammar: " + GRAMMAR + ".\n")
    print("  init   A (r x d_in)                          B (d_out x r)")
    print("  V      top-r right singular vectors of W0     -")
    print("  U      -                                      top-r left singular vectors of W0")
    print("  rand   Haar-random orthonormal rows           Haar-random orthonormal columns")
    print("  he     kaiming_uniform_(a=sqrt(5))            kaiming_uniform_(a=sqrt(5))")
    print("  zero   zeros                                  zeros\n")
    print("Aliases:")
    for alias, name in ALIASES.items():
        print(f"  {alias:8s} {describe(Recipe.parse(name))}")


def main(argv=None) -> None:
    dispatch("asymllm", "command", COMMANDS, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
