"""The ollama Modelfile of a GGUF export, and its check: the chat template the run trained with,
written in ollama's Go template language, and rendered back through that very text.

- TEMPLATE: asymllm.tokenizer.chat_turns cuts the chat template into the text it writes around
  each message; those pieces are placed in the Go template ollama's own library templates use
  (`.System` for the system messages, `range .Messages` for the turns, the generation prompt after
  a last message that is not the assistant's). A template that is not a fixed text around each
  message gets no TEMPLATE, and the Modelfile and the export log say it could not be translated.
- stop: the text that ends an assistant turn (e.g. `<|im_end|>`, or `</s>` for asymllm's default
  template) and EOS.
- BOS: ollama and llama.cpp tokenize the rendered prompt adding the special tokens the GGUF asks
  for (BOS when tokenizer.ggml.add_bos_token is true) and parsing special tokens in the text; so a
  BOS the template writes first is left out of TEMPLATE, and the GGUF says add_bos_token true
  exactly then (gguf_vocab: asymllm.tokenizer.template_writes_bos).
- check (`check_template`): the Go template is parsed and rendered here (`render`: exactly the
  subset written above, with ollama's data: `.System` all system messages joined, consecutive
  messages of one role merged) for a conversation with a system message and one without, each
  ending with a user message; tokenized, with BOS first when the GGUF adds it, the ids must be
  those of tokenizer.apply_chat_template(..., add_generation_prompt=True) tokenized as training
  and `asymllm chat` tokenize it. Where llama.cpp's Python binding is installed, its tokenization
  of the rendered prompt from the GGUF file must give the same ids too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ..tokenizer import TemplateShapeError, chat_turns
from .common import ExportError

HEADER = "# ollama create NAME -f Modelfile && ollama run NAME   (from this folder)"
CONVERSATIONS = (
    ("a conversation with a system message",
     [{"role": "system", "content": "You answer in one short sentence."}, {"role": "user", "content": "What is 12 + 30?"},
      {"role": "assistant", "content": "12 + 30 is 42."}, {"role": "user", "content": "And 7 times 6?"}]),
    ("one without a system message",
     [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
      {"role": "user", "content": "Another one, please."}]),
)


@dataclass
class OllamaTemplate:
    template: str | None            # the Go template; None when the chat template could not be translated
    stops: list[str] = field(default_factory=list)
    reason: str | None = None       # why there is no template


def ollama_template(tokenizer) -> OllamaTemplate:
    """The Modelfile's TEMPLATE and stop strings for the tokenizer's chat template."""
    eos = tokenizer.eos_token
    try:
        turns = chat_turns(tokenizer)
    except TemplateShapeError as error:
        return OllamaTemplate(None, _stops(eos), f"the chat template could not be translated into ollama's template "
                                                 f"language: {error}")
    pieces = [turns.default_system, *turns.system, *turns.user, *turns.assistant, turns.generation]
    unsafe = [p for p in pieces if "{{" in p or '"""' in p or not all(c.isprintable() or c in " \t\r\n" for c in p)]
    if unsafe:
        return OllamaTemplate(None, _stops(eos), f"the chat template could not be translated: it writes {unsafe[0]!r}, "
                                                 "which a Modelfile TEMPLATE cannot hold as text")
    (sys_pre, sys_suf), (user_pre, user_suf), (bot_pre, bot_suf) = turns.system, turns.user, turns.assistant
    default = "{{ else }}" + turns.default_system if turns.default_system else ""
    lines = ["{{- if .System }}" + sys_pre + "{{ .System }}" + sys_suf + default + "{{ end }}",
             "{{- range $i, $_ := .Messages }}",
             "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
             '{{- if eq .Role "user" }}' + user_pre + "{{ .Content }}" + user_suf + '{{ else if eq .Role "assistant" }}'
             + bot_pre + "{{ .Content }}" + ("{{ if not $last }}" + bot_suf + "{{ end }}" if bot_suf else "") + "{{ end }}"]
    if turns.generation:
        lines.append('{{- if and $last (ne .Role "assistant") }}' + turns.generation + "{{ end }}")
    lines.append("{{- end }}")
    return OllamaTemplate("\n".join(lines), _stops(bot_suf.strip(), eos))


def _stops(*texts: str | None) -> list[str]:
    return [t for i, t in enumerate(texts) if t and '"' not in t and "\n" not in t and t not in texts[:i]]


def ollama_modelfile(file_name: str, made: OllamaTemplate) -> str:
    if made.template is not None:
        lines = [HEADER, f"FROM ./{file_name}",
                 "# TEMPLATE: the chat template the model was trained with, in ollama's Go template syntax",
                 f'TEMPLATE """{made.template}"""']
    else:
        reason = " ".join(made.reason.split())
        lines = [HEADER, f"FROM ./{file_name}",
                 f"# no TEMPLATE: {reason}. ollama then picks the library template closest to the file's chat "
                 "template, which may not be the one the model was trained with: write one by hand"]
    return "\n".join(lines + [f'PARAMETER stop "{stop}"' for stop in made.stops]) + "\n"


def check_template(template: str, tokenizer, add_bos: bool, gguf_path: str | None = None) -> str:
    """Raise ExportError unless `template` (Go, as in the Modelfile), rendered and tokenized with a
    BOS first when `add_bos` (the GGUF's add_bos_token), gives the chat template's token ids for
    CONVERSATIONS; `gguf_path`: also through llama.cpp, where its Python binding is installed.
    Returns what was checked, in one line."""
    bos = tokenizer.bos_token_id
    rendered, wanted = [], []
    for label, messages in CONVERSATIONS:
        text = render(template, messages)
        want = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]
        got = ([bos] if add_bos and bos is not None else []) + tokenizer(text, add_special_tokens=False)["input_ids"]
        if got != want:
            raise ExportError(f"verification FAILED: the Modelfile TEMPLATE renders {label} differently from the chat "
                              f"template the model was trained with: {_difference(tokenizer, got, want, add_bos)}; "
                              "nothing written")
        rendered.append(text)
        wanted.append(want)
    line = (f"the Modelfile TEMPLATE renders {len(CONVERSATIONS)} conversations (with a system message and without a "
            f"system message, each with the generation prompt) to the same token ids as the chat template does "
            f"({'BOS from add_bos_token, as llama.cpp and ollama add it' if add_bos else 'no BOS, as in training'})")
    tokens = _llama_cpp_tokens(gguf_path, rendered) if gguf_path else None
    if tokens is None:
        return line + "; llama.cpp not installed here: its tokenization of the prompts not checked"
    for (label, _), got, want in zip(CONVERSATIONS, tokens, wanted):
        if got != want:
            raise ExportError(f"verification FAILED: llama.cpp tokenizes the Modelfile's rendering of {label} from the GGUF "
                              f"file differently: {_difference(tokenizer, got, want, add_bos)}; nothing written")
    return line + "; llama.cpp tokenizes them from the file to the same ids"


def _difference(tokenizer, got: list[int], want: list[int], add_bos: bool) -> str:
    bos = tokenizer.bos_token_id
    i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    shown = lambda ids: repr(tokenizer.decode(ids[max(0, i - 3):i + 4])) if i < len(ids) else "the end"  # noqa: E731
    note = ""
    if add_bos and want[:1] != [bos]:
        note = "; the GGUF says add_bos_token true, so llama.cpp and ollama put a BOS first that training never saw"
    elif got[:2] == [bos, bos]:
        note = "; the TEMPLATE writes a BOS and llama.cpp adds one too (add_bos_token true)"
    elif not add_bos and want[:1] == [bos] and got[:1] != [bos]:
        note = "; training saw a BOS first, which neither the TEMPLATE nor add_bos_token gives"
    return (f"{len(got)} tokens instead of {len(want)}, first difference at token {i}: {shown(got)} where the chat "
            f"template has {shown(want)}{note}")


def _llama_cpp_tokens(gguf_path: str, texts: list[str]) -> list[list[int]] | None:
    """Each text as llama.cpp (llama-cpp-python) tokenizes a prompt from the file: the special tokens
    the file asks for added, special tokens in the text parsed (as ollama's runner does); None when
    it is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=gguf_path, vocab_only=True, verbose=False)
    return [llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) for text in texts]


# ---------------------------------------------------------------------------------------
# Go's text/template, the subset ollama_template writes: text; {{ .F }} {{ $.F }} {{ $v }};
# if / else if / else / end; range [$i, $e :=] over a list; $v := ...; the functions eq, ne,
# not, and, or, len, slice; string and integer literals; "{{- " and " -}}" trimming.

ACTION = re.compile(r"\{\{(- )?(.*?)( -)?\}\}", re.S)
WORDS = re.compile(r'\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+')


def render(template: str, messages: list[dict]) -> str:
    """`template` executed as ollama's template.Execute does for a chat request of `messages`."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    collated = []
    for m in messages:  # ollama's collate: consecutive messages of one role (but tool) become one
        if collated and collated[-1]["Role"] == m["role"] and m["role"] != "tool":
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    data = {"System": system, "Messages": collated, "Tools": None, "Response": "", "Think": False}
    nodes, _, end = _parse(_lex(template), 0)
    if end is not None:
        raise ValueError(f"unexpected {{{{ {end} }}}} in the template")
    out: list[str] = []
    _execute(nodes, data, {"$": data}, out)
    return "".join(out)


def _lex(template: str) -> list[tuple[str, str]]:
    """Text and actions, alternating; "{{- " trims the whitespace before, " -}}" the whitespace after."""
    items, pos, trim_next = [], 0, False
    for match in ACTION.finditer(template):
        text = template[pos:match.start()]
        text = text.lstrip(" \t\r\n") if trim_next else text
        items += [("text", text.rstrip(" \t\r\n") if match.group(1) else text), ("action", match.group(2).strip())]
        trim_next, pos = bool(match.group(3)), match.end()
    tail = template[pos:]
    return items + [("text", tail.lstrip(" \t\r\n") if trim_next else tail)]


def _parse(items, i):
    """Nodes from items[i:] up to an {{ end }} or {{ else ... }}: (nodes, next index, that action)."""
    nodes = []
    while i < len(items):
        kind, body = items[i]
        i += 1
        if kind == "text":
            nodes.append(("text", body))
        elif body == "end" or body == "else" or body.startswith("else if "):
            return nodes, i, body
        elif body.startswith("if "):
            branches, condition, rest = [], body[3:], []
            while True:
                block, i, stop = _parse(items, i)
                branches.append((condition, block))
                if stop is not None and stop.startswith("else if "):
                    condition = stop[len("else if "):]
                    continue
                if stop == "else":
                    rest, i, stop = _parse(items, i)
                break
            if stop != "end":
                raise ValueError("{{ if }} without {{ end }}")
            nodes.append(("if", branches, rest))
        elif body.startswith("range "):
            head = body[len("range "):]
            names, _, expr = head.rpartition(":=") if ":=" in head else ("", "", head)
            block, i, stop = _parse(items, i)
            if stop != "end":
                raise ValueError("{{ range }} without {{ end }}")
            nodes.append(("range", [n.strip() for n in names.split(",") if n.strip()], expr, block))
        elif re.match(r"\$\w+\s*:=", body):
            name, _, expr = body.partition("=")
            nodes.append(("set", name.rstrip(":").strip(), expr))
        else:
            nodes.append(("output", body))
    return nodes, i, None


def _execute(nodes, dot, scope: dict, out: list[str]) -> None:
    scope = dict(scope)  # variables set inside a block are gone at its end
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "output":
            out.append(_text(_eval(node[1], dot, scope)))
        elif node[0] == "set":
            scope[node[1]] = _eval(node[2], dot, scope)
        elif node[0] == "if":
            for condition, block in node[1]:
                if _truth(_eval(condition, dot, scope)):
                    _execute(block, dot, scope, out)
                    break
            else:
                _execute(node[2], dot, scope, out)
        elif node[0] == "range":
            for index, element in enumerate(_eval(node[2], dot, scope) or []):
                inner = dict(scope)
                inner.update(zip(node[1], (index, element)) if len(node[1]) == 2 else zip(node[1], (element,)))
                _execute(node[3], element, inner, out)


FUNCTIONS = {
    "eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "not": lambda a: not _truth(a),
    "and": lambda *a: next((x for x in a if not _truth(x)), a[-1]), "or": lambda *a: next((x for x in a if _truth(x)), a[-1]),
    "len": len, "slice": lambda x, start=0, stop=None: x[start:stop],
}


def _eval(expr: str, dot, scope: dict):
    words = WORDS.findall(expr)
    value, end = _command(words, 0, dot, scope)
    if end != len(words):
        raise ValueError(f"cannot evaluate {expr!r}")
    return value


def _command(words, i, dot, scope):
    """A function call (name and arguments up to a closing parenthesis) or one operand."""
    if words[i] in FUNCTIONS:
        name, args, i = words[i], [], i + 1
        while i < len(words) and words[i] != ")":
            arg, i = _operand(words, i, dot, scope)
            args.append(arg)
        return FUNCTIONS[name](*args), i
    return _operand(words, i, dot, scope)


def _operand(words, i, dot, scope):
    word = words[i]
    if word == "(":
        value, i = _command(words, i + 1, dot, scope)
        if i >= len(words) or words[i] != ")":
            raise ValueError("unclosed (")
        return value, i + 1
    if word.startswith('"'):
        return json.loads(word), i + 1
    if re.fullmatch(r"-?\d+", word):
        return int(word), i + 1
    if word in ("true", "false"):
        return word == "true", i + 1
    head, *fields = word.split(".")
    value = dot if head == "" else scope[head]
    for name in filter(None, fields):
        value = value.get(name) if isinstance(value, dict) else None
    return value, i + 1


def _truth(value) -> bool:
    return bool(value) if value is not None else False


def _text(value) -> str:
    if value is None:
        return "<no value>"
    return ("true" if value else "false") if isinstance(value, bool) else str(value)
