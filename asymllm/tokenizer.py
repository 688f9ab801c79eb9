"""A tokenizer ready for chat, the same way in training, evaluation and export: a chat
template when it has none, a pad token from its own vocabulary (never a new token).

    from asymllm.tokenizer import ensure_chat_template, ensure_pad_token
    logger.info(ensure_chat_template(tokenizer)); logger.info(ensure_pad_token(tokenizer))
"""

from __future__ import annotations

from .data import DataError

# ChatML with the tokenizer's EOS closing every turn: for tokenizers whose EOS is
# <|im_end|> this is exactly ChatML; for others (e.g. "</s>") assistant turns still end
# with EOS, so the tuned model stops where generation expects it to.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Tokens that exist in common vocabularies for padding (or are never part of chat data),
# in order of preference; when none is distinct from EOS, EOS itself pads (see ensure_pad_token).
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>")


def ensure_pad_token(tokenizer) -> str:
    """Give the tokenizer a pad token from its own vocabulary; returns what it did, for the log.

    Never adds a token: a new id would lie past the model's embeddings (IndexError at the
    first padded batch) unless they were resized, which also changes what gets saved.

    A token distinct from EOS is preferred (collators that mask padding *by id* would mask
    every EOS too, and the tuned model would never learn to stop: trap 8). When the
    vocabulary has none (GPT-2 style: bos = eos = unk), EOS pads, and that is safe here:
    our dataset carries its own `labels` column, and TRL's DataCollatorForLanguageModeling
    (what SFTTrainer uses for it) takes those labels as they are and pads them with -100 *by
    position*, padding only input_ids with the pad id; padding_free masks by position too
    (position_ids == 0). It never rebuilds labels from input_ids, so no EOS loses its loss
    (checked in tests/test_chat.py on the batches the trainer collates).
    """
    eos_id = tokenizer.eos_token_id
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != eos_id:
        return f"pad token: kept {tokenizer.pad_token!r} (id {tokenizer.pad_token_id}), distinct from EOS"
    vocab = tokenizer.get_vocab()
    avoid = {eos_id, tokenizer.bos_token_id}  # BOS starts sequences; a pad may be masked wherever it appears
    candidates = [*PAD_CANDIDATES, tokenizer.unk_token]
    for token in candidates:
        if token is not None and vocab.get(token) is not None and vocab[token] not in avoid:
            tokenizer.pad_token = token
            eos = tokenizer.eos_token
            return f"pad token: set to the existing {token!r} (id {vocab[token]}), distinct from EOS {eos!r}"
    fallback = next((t for t in (tokenizer.eos_token, tokenizer.unk_token) if t is not None and t in vocab), None)
    if fallback is None:
        raise DataError("the tokenizer has no pad, EOS or UNK token to pad with; set tokenizer.pad_token to a token of its vocabulary")
    tokenizer.pad_token = fallback
    return (
        f"pad token: no token distinct from EOS in the vocabulary; padding with the existing {fallback!r} "
        f"(id {tokenizer.pad_token_id}), which keeps EOS in the loss: labels mask padding by position (-100), not by id"
    )


def ensure_chat_template(tokenizer) -> str:
    """Keep the tokenizer's chat template, or install DEFAULT_CHAT_TEMPLATE; returns what it did."""
    if tokenizer.chat_template:
        return "chat template: kept the tokenizer's own"
    if tokenizer.eos_token is None:
        raise DataError(
            "the tokenizer has neither a chat template nor an EOS token; give it one (tokenizer.eos_token = ...)"
        )
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return (
        f"chat template: the tokenizer has none; installed the default ChatML-style one "
        f"(every turn ends with {tokenizer.eos_token!r})"
    )
