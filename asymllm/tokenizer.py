"""A tokenizer ready for chat, the same way in training, evaluation and export: the chat
template chosen for it (asymllm.chat_templates), a pad token from its own vocabulary (never a new token); and the
chat template cut into what it writes around each message (`chat_turns`), from which the
token that ends an assistant turn (`end_token_ids`: every token a reply may end with) and
whether the template itself writes BOS are read.

    from asymllm.tokenizer import ensure_chat_template, ensure_pad_token
    logger.info(ensure_chat_template(tokenizer)); logger.info(ensure_pad_token(tokenizer))
    turns = chat_turns(tokenizer)   # TemplateShapeError when it is not a sequence of turns
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .chat_templates import TOKENIZER, ChatTemplateError, choose_chat_template, requested_text
from .data import DataError

logger = logging.getLogger(__name__)

# Tokens that exist in common vocabularies for padding (or are never part of chat data),
# in order of preference; when none is distinct from EOS, EOS itself pads (see ensure_pad_token).
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>")


def ensure_pad_token(tokenizer) -> str:
    """Give the tokenizer a pad token from its own vocabulary; returns what it did, for the log.

    Never adds a token: a new id would lie past the model's embeddings (IndexError at the
    first padded batch) unless they were resized, which also changes what gets saved.

    A token distinct from EOS is preferred (collators that mask padding *by id* would mask
    every EOS too, and the tuned model would never learn to stop: docs/design.md, trap 8). When the
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


def ensure_chat_template(tokenizer, requested: str | None = None, flag: str = "--chat_template") -> str:
    """Install the chat template `requested` names (asymllm.chat_templates: a name or a Jinja file;
    None: the tokenizer's own, or for a tokenizer without one the default chosen for its vocabulary).
    Returns the log line saying which and why; a marker that is not one token is warned about."""
    if tokenizer.eos_token is None:
        raise DataError("the tokenizer has no EOS token; give it one (tokenizer.eos_token = ...)")
    try:
        choice = choose_chat_template(tokenizer, requested, flag)
    except ChatTemplateError as error:
        raise DataError(str(error)) from None
    tokenizer.chat_template = choice.text
    for warning in choice.warnings:
        logger.warning(warning)
    return choice.line()


def use_trained_chat_template(tokenizer, requested: str | None, saved_by_training: bool,
                              flag: str = "--chat_template") -> str:
    """For eval, chat and export: a tokenizer saved beside the adapter carries the template the run
    trained with, and that one is used; a --chat_template that renders otherwise is refused (it
    would score or serve the model in a format it never saw). Any other tokenizer (a base model, an
    adapter saved without one) gets `requested` as training would have chosen it."""
    if saved_by_training and requested is not None:
        wanted = tokenizer.chat_template if requested == TOKENIZER else requested_text(requested)
        if wanted != tokenizer.chat_template:
            raise DataError(f"{flag} {requested}: the adapter was trained with another chat template (the one saved "
                            f"beside it, in its tokenizer files); leave {flag} out to use that one")
    line = ensure_chat_template(tokenizer, None if saved_by_training else requested, flag)
    return line.replace("(the tokenizer's own)", "(saved with the adapter: the one it trained with)") if saved_by_training else line


# ---------------------------------------------------------------------------------------
# The chat template as turns


class TemplateShapeError(ValueError):
    """The chat template is not a fixed text around each message (see chat_turns)."""


@dataclass(frozen=True)
class ChatTurns:
    """What a chat template writes: `bos` once first (the tokenizer's BOS, when the template
    writes it before anything else; else ""), `default_system` when the conversation has no
    system message, (prefix, suffix) around each system, user and assistant message, and
    `generation` (the generation prompt) after the last one."""
    bos: str
    default_system: str
    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        out = [self.bos]
        if messages and messages[0]["role"] == "system":
            out += [self.system[0], messages[0]["content"], self.system[1]]
            messages = messages[1:]
        else:
            out.append(self.default_system)
        for message in messages:
            prefix, suffix = self.user if message["role"] == "user" else self.assistant
            out += [prefix, message["content"], suffix]
        return "".join(out) + (self.generation if add_generation_prompt else "")


MARKS = ("SYSTEMxMARKx1", "USERxMARKx1", "ASSISTANTxMARKx1", "USERxMARKx2", "ASSISTANTxMARKx2", "USERxMARKx3")


def chat_turns(tokenizer) -> ChatTurns:
    """The tokenizer's chat template cut into turns, by rendering conversations of marker strings
    and cutting the text at the markers; then required to render a longer conversation, with and
    without a system message, exactly as the template does. TemplateShapeError (saying why) for a
    template that writes a message differently by its position (e.g. Llama 2's system prompt inside
    the first [INST]) or does not render one of these conversations."""
    s, u1, a1, u2, a2, u3 = ({"role": role, "content": mark} for role, mark in
                             zip(("system", "user", "assistant", "user", "assistant", "user"), MARKS))

    def render(messages, generation=False):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        except Exception as error:  # a template may raise anything (raise_exception, jinja errors)
            raise TemplateShapeError(f"it does not render a {'/'.join(m['role'] for m in messages)} conversation "
                                     f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None

    def cut(text: str, mark: str) -> tuple[str, str]:
        if text.count(mark) != 1:
            raise TemplateShapeError("it does not write each message's content once, as given")
        before, _, after = text.partition(mark)
        return before, after

    def after(text: str, start: str, what: str) -> str:
        if not text.startswith(start):
            raise TemplateShapeError(f"{what} changes what it writes for the messages before")
        return text[len(start):]

    one = render([u1])
    head, user_suffix = cut(one, MARKS[1])
    generation = after(render([u1], True), one, "the generation prompt")
    two = render([u1, a1])
    assistant_prefix, assistant_suffix = cut(after(two, one, "an assistant reply"), MARKS[2])
    user_prefix, rest = cut(after(render([u1, a1, u2]), two, "a second user message"), MARKS[3])
    if rest != user_suffix or not head.endswith(user_prefix):
        raise TemplateShapeError("it writes the first user message differently from later ones")
    preamble = head[:len(head) - len(user_prefix)]
    system_head, rest = cut(render([s, u1]), MARKS[0])
    middle, rest = cut(rest, MARKS[1])
    if rest != user_suffix or not middle.endswith(user_prefix):
        raise TemplateShapeError("it writes a user message after a system message differently")
    bos = tokenizer.bos_token or ""
    # the template writes BOS itself only if it comes before any turn (a turn header that is the
    # BOS token, as <|im_start|> is SmolLM2's, is not one)
    writes_bos = bool(bos) and preamble.startswith(bos) and system_head.startswith(bos) and bos not in user_prefix
    cut_bos = len(bos) if writes_bos else 0
    turns = ChatTurns(bos if writes_bos else "", preamble[cut_bos:], (system_head[cut_bos:], middle[:len(middle) - len(user_prefix)]),
                      (user_prefix, user_suffix), (assistant_prefix, assistant_suffix), generation)
    for conversation in ([s, u1, a1, u2, a2, u3], [u1, a1, u2, a2, u3]):
        if turns.render(conversation, True) != render(conversation, True):
            raise TemplateShapeError("it writes turns differently further into a conversation")
    return turns


def turn_end_token_id(tokenizer) -> int | None:
    """The special token that ends an assistant turn in the chat template (<|im_end|>, <|eot_id|>,
    <end_of_turn>, or EOS in asymllm's default template); None when the template has none."""
    try:
        suffix = chat_turns(tokenizer).assistant[1]
    except TemplateShapeError:
        return None
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return ids[0] if ids and ids[0] in special else None


def end_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every token that ends a reply: generation_config's EOS (an int or a list: instruct models list
    several, Gemma's <end_of_turn>, Phi-3's <|end|>), the tokenizer's EOS, and the token that ends an
    assistant turn in the chat template."""
    configured = getattr(generation_config, "eos_token_id", None)
    configured = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    ids = [*configured, tokenizer.eos_token_id, turn_end_token_id(tokenizer)]
    return [int(t) for i, t in enumerate(ids) if t is not None and t not in ids[:i]]


def template_writes_bos(tokenizer) -> bool:
    """Does the chat template put the tokenizer's BOS first, before any turn? That is what training
    saw: it tokenizes the rendered conversation without adding special tokens. For a template that
    is not a sequence of turns: whether it names bos_token and its rendering starts with it."""
    try:
        return bool(chat_turns(tokenizer).bos)
    except TemplateShapeError:
        pass
    bos = tokenizer.bos_token
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    except Exception:
        return False
    return bool(bos) and text.startswith(bos) and "bos_token" in str(tokenizer.chat_template)
