"""Tiny Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 and Phi-3 models built from configs (random weights), a tiny byte-level BPE
tokenizer trained in-process, and both saved as a normal transformers folder: for tests,
demos and benchmarks on machines without a model hub.

    from asymllm.tiny import save_tiny_model
    path = save_tiny_model("/tmp/tiny")            # config + safetensors + tokenizer + generation_config
    AutoModelForCausalLM.from_pretrained(path); AutoTokenizer.from_pretrained(path)
"""

from __future__ import annotations

import os
import random

import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GenerationConfig, LlamaConfig, MistralConfig,
                          Phi3Config, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)

CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
           "gemma2": Gemma2Config, "gemma3": Gemma3TextConfig, "phi3": Phi3Config}
# Each family's own layout kept where it matters: Qwen2's q/k/v biases (its config default),
# Phi-3's fused qkv_proj and gate_up_proj; ids a config defaults past a tiny vocabulary cleared.
FAMILY_KWARGS = {"phi3": {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None},
                 "gemma2": {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None},
                 "gemma3": {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None}}

# Ids 0, 1, 2 in this order, as in SmolLM2's vocabulary. pad is deliberately not eos
# (docs/design.md, trap 8: a pad == eos tokenizer masks eos out of the loss).
PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]

# SmolLM2's ChatML format, without its default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_config(arch: str = "llama", vocab_size: int = 256, hidden_size: int = 64, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128, max_positions: int = 512,
                head_dim: int | None = None, tie_word_embeddings: bool = False):
    if arch not in CONFIGS:
        raise ValueError(f"arch must be one of {sorted(CONFIGS)}, got {arch!r}")
    return CONFIGS[arch](
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=tie_word_embeddings,
        **({"head_dim": head_dim} if head_dim else {}), **FAMILY_KWARGS.get(arch, {}),
    )


def tiny_causal_lm(arch: str = "llama", seed: int = 0, **config_kwargs) -> torch.nn.Module:
    """A randomly initialised causal LM, identical for identical arguments."""
    torch.manual_seed(seed)
    config = tiny_config(arch, **config_kwargs)
    attn = "eager" if arch == "gemma2" else "sdpa"  # Gemma 2 has no sdpa path (soft-capped attention logits)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.float().eval()


# ---------------------------------------------------------------------------------------
# Tokenizer


def tiny_corpus(lines: int = 400) -> list[str]:
    """A fixed English corpus: instructions, answers, numbers, dates, prices, code and
    punctuation. `random.Random(0)` makes it the same list on every machine and Python."""
    rng = random.Random(0)
    subjects = ["The model", "A student", "My neighbour", "The assistant", "Our team", "This recipe", "The cat",
                "Every adapter", "The teacher", "A small dog", "The river", "Your answer", "The machine"]
    verbs = ["reads", "writes", "explains", "answers", "trains", "computes", "finds", "describes", "learns",
             "builds", "checks", "summarises", "translates", "remembers"]
    objects = ["the question", "a long story", "three apples", "the weather report", "a short poem",
               "the training loss", "an old map", "every example", "the matrix B", "a random matrix A",
               "the first chapter", "two numbers", "the capital of France", "a list of words"]
    tails = ["quickly.", "with care.", "before lunch.", "in the morning.", "again and again.", "without errors!",
             "step by step.", "for the third time.", "because it must.", "(mostly).", "-- or so they say.",
             "at 10:45 a.m.", "on 2024-03-17.", "in 5 minutes?"]
    instructions = ["Explain why the sky is blue.", "Write a haiku about autumn.", "List three prime numbers.",
                    "What is 12 + 30?", "Summarise the text below.", "Translate 'good morning' into French.",
                    "Give me a name for a coffee shop.", "How do I sort a list in Python?",
                    "Describe a cat in one sentence.", "Why do leaves change colour?"]
    code = ["def add(a, b):\n    return a + b", "for i in range(10):\n    print(i ** 2)",
            "x = [1, 2, 3]; y = {'k': x}", "if (n % 2 == 0) { return n / 2; }", "SELECT name FROM users WHERE id = 7;",
            "path = \"/tmp/data.json\"", "assert len(items) >= 1, \"empty\""]
    out = []
    for i in range(lines):
        kind = i % 5
        if kind == 0:
            out.append(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(tails)}")
        elif kind == 1:
            out.append(rng.choice(instructions))
        elif kind == 2:
            n, m = rng.randint(0, 9999), rng.randint(1, 99)
            out.append(f"Item #{i}: {n} units at ${m}.{rng.randint(0, 99):02d} each; total = {n * m:,} (approx.) "
                       f"- ref {rng.choice('ABCDEFGHIJKLMNOPQRSTUVWXYZ')}{rng.randint(100, 999)}")
        elif kind == 3:
            out.append(rng.choice(code))
        else:
            words = rng.sample(objects + verbs + subjects, 4)
            out.append(f"Q: {words[0]}, {words[1]}; {words[2]} & {words[3]}? A: Yes -- \"{rng.choice(tails)}\" [{i}] <ok>")
    return out


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 / SmolLM2 style) trained here on `tiny_corpus()`: encodes any
    text, same vocabulary on every call. Specials: <|endoftext|> pad (0), <|im_start|> (1),
    <|im_end|> eos (2); ChatML chat template without a default system prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
    )
    tokenizer.train_from_iterator(tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False, model_max_length=512,
    )


# Llama 2's [INST] format, for the sentencepiece-style tokenizer.
LLAMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def tiny_spm_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A sentencepiece-style BPE as Llama 2 and Mistral 7B ship it in tokenizer.json: spaces
    as ▁ (a Prepend + Replace normalizer, no pre-tokenizer), byte fallback to <0x00>..<0xFF>
    (ids 3-258), <unk> <s> </s> (0, 1, 2), BOS added; trained here on `tiny_corpus()` within
    words, as sentencepiece trains."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))])
    tokenizer.train_from_iterator(tiny_corpus(), trainer=trainer)
    # As transformers' converter of a sentencepiece model writes them: every cut of a token into
    # two tokens is a merge, ranked by the token's id (the trainer's order). The trainer's own
    # merges are fewer; llama.cpp, which joins any pair that makes a token, needs them all.
    vocab = {t: i for t, i in tokenizer.get_vocab().items()}
    pieces = sorted((i, t) for t, i in vocab.items() if i > 258)  # not <unk> <s> </s> or the byte tokens
    merges = [(t[:k], t[k:]) for _, t in pieces for k in range(1, len(t))
              if vocab.get(t[:k], 0) > 258 and vocab.get(t[k:], 0) > 258]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    # Llama 2's layout: the normalizer makes the ▁, no pre-tokenizer (merges never cross words)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   chat_template=LLAMA2_CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
                                   model_max_length=512)


def save_tiny_model(directory: str | os.PathLike, arch: str = "llama", seed: int = 0, tokenizer: str = "bpe",
                    **config_kwargs) -> str:
    """Write a tiny causal LM + `tiny_tokenizer()` (tokenizer="spm": `tiny_spm_tokenizer()`) +
    generation_config (eos, and pad when the tokenizer has one) to `directory`, loadable with
    AutoModelForCausalLM / AutoTokenizer. A `vocab_size` keyword sizes the tokenizer; the model's
    vocabulary is len(tokenizer)."""
    if tokenizer not in ("bpe", "spm"):
        raise ValueError(f"tokenizer must be 'bpe' or 'spm', got {tokenizer!r}")
    make = tiny_tokenizer if tokenizer == "bpe" else tiny_spm_tokenizer
    tokenizer = make(config_kwargs.pop("vocab_size", 512 if make is tiny_tokenizer else 600))
    # extra_vocab: ids beyond the tokenizer's, as models padded to a round vocabulary have
    model = tiny_causal_lm(arch, seed=seed, vocab_size=len(tokenizer) + config_kwargs.pop("extra_vocab", 0), **config_kwargs)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    for name, value in ids.items():
        setattr(model.config, name, value)
    model.generation_config = GenerationConfig(**ids)
    directory = os.fspath(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def randomize_lora_B(model, std: float, seed: int) -> None:
    """Set every adapter's B to N(0, std^2) noise, as if trained: with B = 0 (its init) an
    adapter changes nothing, so tests and benchmarks of merge, export and evaluation would
    pass whether or not the adapter is applied."""
    from .adapters.model import lora_layers

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            weight = layer.lora_B["default"].weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * std)
