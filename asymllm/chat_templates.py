"""Which chat template a run uses: a name (`chatml`, `llama3`, `llama2`, `mistral`, `alpaca`,
`tokenizer` = the tokenizer's own) or a Jinja file, as axolotl's `chat_template:` and
LLaMA-Factory's `template:` take them; by default the tokenizer's own, and for a base model
without one, the template whose markers its vocabulary already has (see `default_for`).

    choice = choose_chat_template(tokenizer, "llama3")   # ChatTemplateError for an unknown name or file
    tokenizer.chat_template = choice.text; log(choice.line()); [log(w) for w in choice.warnings]

Training installs the choice on the tokenizer it saves beside every checkpoint and the final
adapter; evaluation, chat and both export formats read the template from there, so a run is
served with the template it trained with (one source of truth).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field

# `bos_token` is written only where the tokenizer has one (jinja would print "None").
BOS = "{% if bos_token %}{{ bos_token }}{% endif %}"

TEMPLATES = {
    # ChatML as Qwen and SmolLM2 write it; <|im_end|> ends every turn
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    # Llama 3's header format; <|eot_id|> ends every turn
    "llama3": (BOS + "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
               "message['content'] + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    # Llama 2 chat: the system prompt inside the first [INST], every exchange its own BOS ... EOS
    "llama2": ("{% if messages[0]['role'] == 'system' %}{% set system = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}"
               "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
               "{% for message in messages %}{% if message['role'] == 'user' %}"
               "{% if bos_token %}{{ bos_token }}{% endif %}{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
               "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"),
    # Mistral 7B instruct v0.1/v0.2: [INST] ... [/INST] reply EOS. Mistral's own has no system role; here a
    # system prompt comes first, before the first [INST], so every turn is a fixed text (ollama can serve it)
    "mistral": (BOS + "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
                "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
                "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"),
    # Alpaca's plain-text sections; EOS ends the response. Nothing in it needs a special token
    "alpaca": (BOS + "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
               "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
               "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"),
}
TOKENIZER = "tokenizer"  # the tokenizer's own template
NAMES = (*TEMPLATES, TOKENIZER)

# Markers a template means as one token each: <|im_start|>, <|eot_id|>, <start_of_turn>, </s>. Llama 2's
# [INST] and <<SYS>> are text by design (its tokenizer has no such tokens), so they are not checked.
MARKER = re.compile(r"<\|[A-Za-z0-9_]+\|>|(?<!<)</?[A-Za-z][A-Za-z0-9_]*>(?!>)")


class ChatTemplateError(ValueError):
    """--chat_template names no template, or a file that cannot be read."""


@dataclass(frozen=True)
class ChatTemplateChoice:
    name: str  # a name of NAMES, or the Jinja file's path
    text: str
    reason: str
    warnings: list[str] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def line(self) -> str:
        return f"chat template: {self.name} ({self.reason})"

    def record(self) -> dict:
        """What the run record keeps of it."""
        return {"name": self.name, "sha256": self.sha256, "reason": self.reason}


def check_chat_template_flag(value: str | None, flag: str = "--chat_template") -> None:
    """Refuse an unknown name or a missing file before anything loads."""
    if value is None or value in NAMES:
        return
    if not os.path.isfile(value):
        raise ChatTemplateError(f"{flag} {value}: neither a template name ({', '.join(NAMES)}) nor a Jinja file")


def requested_text(value: str | None) -> str | None:
    """The template text a name or file stands for, without a tokenizer (None: the tokenizer decides)."""
    if value is None or value == TOKENIZER:
        return None
    if value in TEMPLATES:
        return TEMPLATES[value]
    return _read(value)


def choose_chat_template(tokenizer, requested: str | None = None, flag: str = "--chat_template") -> ChatTemplateChoice:
    """The template to use with `tokenizer`, with the reason and a warning for every marker that is
    not one token of its vocabulary (such a marker is learned as several text pieces, and a turn that
    ends in one cannot stop generation)."""
    check_chat_template_flag(requested, flag)
    own = getattr(tokenizer, "chat_template", None) or None
    if requested == TOKENIZER:
        if not own:
            raise ChatTemplateError(f"{flag} {TOKENIZER}: this tokenizer has no chat template of its own; name one of "
                                    f"{', '.join(TEMPLATES)} or a Jinja file")
        choice = ChatTemplateChoice("tokenizer", own, f"the tokenizer's own, as {flag} {TOKENIZER} asks")
    elif requested in TEMPLATES:
        choice = ChatTemplateChoice(requested, TEMPLATES[requested], f"{flag} {requested}")
    elif requested is not None:
        choice = ChatTemplateChoice(requested, _read(requested), f"{flag}: the Jinja file")
    elif own:
        choice = ChatTemplateChoice("tokenizer", own, "the tokenizer's own")
    else:
        name, reason = default_for(tokenizer)
        choice = ChatTemplateChoice(name, TEMPLATES[name], f"the tokenizer has none; {reason}")
    return ChatTemplateChoice(choice.name, choice.text, choice.reason, split_marker_warnings(tokenizer, choice))


def default_for(tokenizer) -> tuple[str, str]:
    """(name, why) for a tokenizer without a template: the format whose turn markers are already
    single tokens of its vocabulary (ChatML's, then Llama 3's: base Llama 3 ships them), else
    alpaca, whose markers are plain text a base model reads as text, with EOS ending the reply as
    it ended the base's documents. ChatML on a tokenizer without its tokens (Llama 2, Mistral
    base) would cut <|im_start|> into meaningless pieces."""
    for name, markers in (("chatml", ("<|im_start|>", "<|im_end|>")),
                          ("llama3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))):
        if all(_is_one_token(tokenizer, marker) for marker in markers):
            return name, f"{name}, as its vocabulary has {', '.join(markers)} as tokens"
    return "alpaca", ("alpaca, whose markers are plain text: the vocabulary has neither ChatML's nor Llama 3's turn tokens "
                      f"(--chat_template chooses another: {', '.join(NAMES)})")


def split_marker_warnings(tokenizer, choice: ChatTemplateChoice) -> list[str]:
    split = sorted({m for m in MARKER.findall(choice.text) if not _is_one_token(tokenizer, m)})
    if not split:
        return []
    return [f"chat template {choice.name}: {', '.join(split)} {'is' if len(split) == 1 else 'are'} not one token of this "
            "tokenizer; each is learned as several text pieces, and a reply that ends in one cannot stop generation "
            f"(--chat_template alpaca needs no special tokens; the tokenizer's own tokens: {', '.join(_specials(tokenizer))})"]


def _is_one_token(tokenizer, text: str) -> bool:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1


def _specials(tokenizer) -> list[str]:
    return sorted(set(tokenizer.all_special_tokens))[:8]


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ChatTemplateError(f"--chat_template {path}: cannot read it ({error})") from None
    if not text.strip():
        raise ChatTemplateError(f"--chat_template {path}: the file is empty")
    return text
