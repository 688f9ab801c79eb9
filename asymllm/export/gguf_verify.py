"""The check of a GGUF export before it is published: the file read back by transformers' GGUF
loader (`from_pretrained(folder, gguf_file=...)`, which undoes llama.cpp's q/k permutation and
dequantizes) against the base + adapter through peft in fp32, on the verification prompts and
the reference's own greedy continuation of each.

- tokenizer: the one transformers rebuilds from the file must encode every prompt (chat
  template included) to the ids the model's tokenizer gives, and carry the same chat template.
  For a sentencepiece-style vocabulary the templated prompts are left out: transformers
  rebuilds it with Metaspace(prepend_scheme="first"), which puts no ▁ after a special token,
  where the model's own tokenizer and llama.cpp do (measured: benchmarks/RESULTS.md gguf_llama_cpp);
- f32: every logit within the fp32 bound of the HF export (a multiple of peft's own merge rounding);
- f16, bf16, q8_0: the same greedy tokens; a position whose reference top two logits lie within
  TIE_EPS x the type's rounding step x |top logit| is a near-tie and not counted (stated in the line).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from .source import AdapterSource
from .verify import PROMPTS, TIE_EPS, _logits, _max_abs_diff, _prompt_ids, _prompt_texts, _reference_model, fp32_bound

GREEDY_TOKENS = 16
# Relative rounding step of a stored weight: f16 and bf16 their eps; q8_0 one level of 255 across a
# block of 32 (scale = max |w| / 127).
STEP = {"f16": 2.0 ** -10, "bf16": 2.0 ** -7, "q8_0": 1.0 / 127}


@dataclass
class GGUFCheck:
    gguf_type: str
    prompts: int
    positions: int
    generated: int
    max_abs_diff: float
    mismatches: int
    near_ties: int
    tokenizer_ok: bool
    rule: str
    passed: bool
    tokenizer_texts: str = "the prompts"

    def line(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"{verdict}: the GGUF file read back by transformers vs base + adapter (peft, fp32), {self.gguf_type}, "
                f"{self.prompts} prompts, {self.positions} positions ({self.generated} greedy tokens): max abs logit diff "
                f"{self.max_abs_diff:.3g}, greedy token differs at {self.mismatches} (near-ties not counted: "
                f"{self.near_ties}); tokenizer from the file {'encodes ' + self.tokenizer_texts + ' as the model' + chr(39) + 's does' if self.tokenizer_ok else 'DIFFERS on ' + self.tokenizer_texts}; "
                f"rule: {self.rule}")


def verify_gguf(path: str, base_dir: str, source: AdapterSource, gguf_type: str, tokenizer,
                tokenizer_model: str = "gpt2") -> GGUFCheck:
    folder, name = os.path.split(path)
    texts = list(PROMPTS) if tokenizer_model == "llama" else [*PROMPTS, *_prompt_texts(tokenizer)]
    described = ("the prompts without the chat template (sentencepiece style: see gguf_verify)"
                 if tokenizer_model == "llama" else "the prompts, chat template included")
    tokenizer_ok = _tokenizer_reads_back(folder, name, tokenizer, texts)
    prompts = _prompt_ids(tokenizer, 0)
    with contextlib.ExitStack() as stack:
        reference = _reference_model(base_dir, source, torch.float32, stack)
        sequences = [_greedy(reference, ids) for ids in prompts]
        reference_logits = _logits(reference, sequences)
        peft_merged = _logits(reference.merge_and_unload(safe_merge=True), sequences) if gguf_type == "f32" else None
        del reference
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    logits = _logits(model, sequences)
    del model
    diff = _max_abs_diff(logits, reference_logits)
    mismatches, ties, generated = _greedy_mismatches(logits, reference_logits, sequences, prompts, gguf_type)
    positions = sum(s.shape[1] for s in sequences)
    if gguf_type == "f32":
        bound, _, _, rule = fp32_bound(reference_logits, peft_merged)
        passed = diff <= bound and mismatches == 0
    else:
        rule = (f"the same greedy token at every generated position but near-ties (the reference's top two within "
                f"{TIE_EPS} x {STEP[gguf_type]:.3g} ({gguf_type}'s step) x |top logit|)")
        passed = mismatches == 0
    return GGUFCheck(gguf_type, len(prompts), positions, generated, diff, mismatches, ties, tokenizer_ok, rule,
                     passed and tokenizer_ok, described)


def _tokenizer_reads_back(folder: str, name: str, tokenizer, texts: list[str]) -> bool:
    from transformers import AutoTokenizer

    read_back = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if getattr(read_back, "chat_template", None) != getattr(tokenizer, "chat_template", None):
        return False
    return all(read_back(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
               for text in texts)


@torch.no_grad()
def _greedy(model, ids: torch.Tensor) -> torch.Tensor:
    """The prompt and the model's greedy continuation (GREEDY_TOKENS, or fewer if it ends)."""
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY_TOKENS,
                          do_sample=False, pad_token_id=model.config.eos_token_id or 0)


def _greedy_mismatches(logits, reference, sequences, prompts, gguf_type: str) -> tuple[int, int, int]:
    """(positions whose argmax is not the reference's greedy token, near-ties excused, generated tokens)."""
    step = STEP.get(gguf_type, 0.0)
    counted = excused = generated = 0
    for got, ref, seq, prompt in zip(logits, reference, sequences, prompts):
        for i in range(prompt.shape[1] - 1, seq.shape[1] - 1):
            generated += 1
            want, chosen = seq[0, i + 1].item(), got[i].argmax().item()
            if chosen == want:
                continue
            margin = (ref[i, want] - ref[i, chosen]).item()
            if margin <= TIE_EPS * step * ref[i, want].abs().item():
                excused += 1
            else:
                counted += 1
    return counted, excused, generated
