"""Batched generation through the model's chat template, as training renders prompts.

    from asymllm.evaluation.generation import GenerationSettings, generate
    for done in generate(model, tokenizer, items, GenerationSettings(max_new_tokens=256)):
        ...   # a list of {key, output, n_tokens, stopped} per batch, as each batch finishes

Prompts: `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`, encoded
without special tokens (the template writes any BOS itself), exactly as asymllm.training.tokenize does
in training; SmolLM2's template injects its default system prompt there as it does here.
Batches are left-padded (new tokens then start at the same position in every row) and
`generate` gets the tokenizer's eos_token_id and pad_token_id explicitly, so decoding stops
at the token training taught the model to end its turn with.

Per output: the text up to the first EOS (special tokens dropped, whitespace stripped), its
length in tokens (EOS not counted), and whether it stopped with EOS before max_new_tokens.
Items are batched longest prompt first (less padding; a batch that does not fit in memory
fails at once, not an hour in). Sampling is seeded once per call: sampled outputs repeat for
the same batch size and the same set of items left to do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import torch

from ..tokenizer import end_token_ids, ensure_chat_template
from .instructions import Instruction


class GenerationError(ValueError):
    pass


@dataclass
class GenerationSettings:
    max_new_tokens: int = 512
    do_sample: bool = False  # greedy by default
    temperature: float = 0.7  # sampling only
    top_p: float = 1.0  # sampling only
    seed: int = 0
    batch_size: int = 8

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"--max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise GenerationError(f"--batch_size must be at least 1, got {self.batch_size}")
        if self.do_sample and self.temperature <= 0:
            raise GenerationError(f"--temperature must be positive when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"--top_p must be in (0, 1], got {self.top_p}")

    def resume_key(self) -> dict:
        """The settings that change outputs (batch size does not, up to numerics)."""
        settings = asdict(self)
        settings.pop("batch_size")
        if not self.do_sample:
            for unused in ("temperature", "top_p", "seed"):
                settings.pop(unused)
        return settings


def prepare_tokenizer(tokenizer) -> str:
    """Chat template as in training (kept, or the default installed); a pad token for left padding."""
    note = ensure_chat_template(tokenizer)
    if tokenizer.eos_token_id is None:
        raise GenerationError("the tokenizer has no EOS token: generation would never know where a reply ends")
    if tokenizer.pad_token_id is None:  # padding is masked out; any id in the vocabulary will do
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return note


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def generate(model, tokenizer, items: list[Instruction], settings: GenerationSettings) -> Iterator[list[dict]]:
    """Yield, batch by batch, [{key, output, n_tokens, stopped}] for `items`."""
    settings.validate()
    prepare_tokenizer(tokenizer)
    prompts = {item.key: encode_prompt(tokenizer, item.messages) for item in items}
    order = sorted(items, key=lambda item: -len(prompts[item.key]))
    torch.manual_seed(settings.seed)
    sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p} if settings.do_sample else {"do_sample": False}
    device = next(model.parameters()).device
    ends = end_token_ids(tokenizer, model.generation_config)  # a list: replacing the config's own EOS list loses its others
    for start in range(0, len(order), settings.batch_size):
        batch = order[start:start + settings.batch_size]
        padded = tokenizer.pad({"input_ids": [prompts[item.key] for item in batch]}, padding=True, return_tensors="pt")
        input_ids, attention_mask = padded["input_ids"].to(device), padded["attention_mask"].to(device)
        with torch.inference_mode():
            sequences = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=settings.max_new_tokens,
                eos_token_id=ends, pad_token_id=tokenizer.pad_token_id, **sampling,
            )
        new_tokens = sequences[:, input_ids.shape[1]:].tolist()  # (batch, <= max_new_tokens)
        yield [dict(key=item.key, **decode(tokenizer, row, ends)) for item, row in zip(batch, new_tokens)]


def decode(tokenizer, new_tokens: list[int], ends: list[int] | None = None) -> dict:
    """The reply up to the first end token (`ends`, default the tokenizer's EOS); whatever follows
    it in the batch is padding."""
    ends = set(ends or [tokenizer.eos_token_id])
    end = next((i for i, token in enumerate(new_tokens) if token in ends), None)
    stopped = end is not None
    content = new_tokens[:end] if stopped else new_tokens
    text = tokenizer.decode(content, skip_special_tokens=True).strip()
    return {"output": text, "n_tokens": len(content), "stopped": stopped}
