"""The tokenizer of a GGUF export, as llama.cpp's own converter (convert_hf_to_gguf.py,
`get_vocab_base` and `_set_vocab_gpt2`) writes it: every id of the model's vocabulary with its
token type, the BPE merges, the special token ids, whether BOS/EOS are added, the chat template,
and the pre-tokenizer name llama.cpp splits text with.

Two kinds of tokenizer.json are converted:
- byte-level BPE (GPT-2 style: SmolLM2, Llama 3) as llama.cpp's `gpt2` model. llama.cpp names
  the pre-tokenizer by the hash of one fixed text's token ids; the hashes of the tokenizers this
  stack is used with are copied from its table, and a tokenizer whose pre-tokenizer is plain
  GPT-2 byte-level (or SmolLM's: digits one by one, then GPT-2) is recognised by its structure.
  Anything else is refused with the hash, rather than written with a guess that would make
  llama.cpp split text differently from the model's training.
- sentencepiece-style BPE with byte fallback (Llama 2, Mistral 7B: `▁` for spaces, `<0xNN>`
  byte tokens) as llama.cpp's `llama` model. llama.cpp merges the adjacent pair whose token has
  the highest score, so each token's score is minus the rank of the merge that makes it: the
  merge order of tokenizer.json, which is what sentencepiece's scores encode. (llama.cpp's own
  converter reads them from tokenizer.model; without that file it writes -1000 for every token.)
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from hashlib import sha256

from ..tokenizer import template_writes_bos
from .common import ExportError

logger = logging.getLogger("asymllm.export")

# llama.cpp convert_hf_to_gguf.py get_vocab_base_pre(): its fixed text, and the entries of its
# hash table for the tokenizers of Llama- and Mistral-class models (sha256 of str(token ids)).
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 '
          '3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
KNOWN_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",   # Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",   # Smaug-Llama-3-70B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",      # SmolLM-135M
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",       # gpt2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",      # Mistral-Nemo
}
# Every tokenizer.ggml.pre value llama.cpp accepts (src/llama-vocab.cpp of llama-cpp-python 0.3.36):
# another name makes llama.cpp refuse the file, so --gguf_pre_tokenizer is checked against it.
LLAMA_CPP_PRE_TOKENIZERS = frozenset((
    "a.x-4.0 afmoe bailingmoe bailingmoe2 bloom chameleon chatglm-bpe codeshell cohere2moe command-r dbrx "
    "deepseek-coder deepseek-llm deepseek-r1-qwen deepseek-v3 default exaone exaone-moe exaone4 f2llmv2 falcon "
    "falcon-h1 falcon3 gemma4 gigachat glm4 glm5 gpt-2 gpt-4o gpt3-finnish granite-docling granite-embed-multi-311m "
    "granite-embed-multi-97m grok-2 hunyuan hunyuan-dense hy_v4 jais jais-2 jina-de jina-es jina-v1-en jina-v2-code "
    "jina-v2-de jina-v2-es jina-v5-nano joyai-llm kanana2 kimi-k2 kormo laguna lfm2 llada-moe llama-bpe llama-v3 llama3 "
    "llama4 megrez mellum mellum2 midm-2.0 minerva-7b minicpm5 minimax-m2 modern-bert mpt olmo phi-2 pixtral poro-chat "
    "qwen2 qwen35 refact roberta-bpe sarvam-moe seed-coder smaug-bpe smollm solar-open spark2_5 stablelm2 starcoder "
    "superbpe talkie tekken tiny_aya trillion ufakzeka viking whitespace youtu").split())
# Added tokens llama.cpp's converter treats as control even when not marked special (does_token_look_special).
LOOKS_SPECIAL = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")

# gguf TokenType values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class GGUFVocab:
    model: str                # llama.cpp's tokenizer model: gpt2 (byte-level BPE) or llama (sentencepiece style)
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    scores: list[float] | None = None     # llama: the merge priority of each token
    add_space_prefix: bool | None = None  # llama: a leading ▁ before the text, as the normalizer does

    def add_to(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        if self.model == "gpt2":  # a sentencepiece-style vocabulary is merged by its scores (llama.cpp writes no merges)
            writer.add_token_merges(self.merges)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def gguf_vocab(tokenizer, tokenizer_dir: str, config: dict, pre_tokenizer: str | None = None) -> GGUFVocab:
    """The GGUF tokenizer fields of `tokenizer` (loaded from `tokenizer_dir`, a folder with its
    tokenizer.json) for a model of `config` (its config.json); `pre_tokenizer` overrides the detection."""
    vocab_size = int(config["vocab_size"])
    if pre_tokenizer is not None and pre_tokenizer not in LLAMA_CPP_PRE_TOKENIZERS:
        raise ExportError(f"--gguf_pre_tokenizer {pre_tokenizer!r}: not a name llama.cpp knows; it would refuse the "
                          f"file. Known: {', '.join(sorted(LLAMA_CPP_PRE_TOKENIZERS))}")
    spec = _tokenizer_json(tokenizer_dir)
    model = spec.get("model") or {}
    decoder = (spec.get("decoder") or {}).get("type")
    byte_level = model.get("type") == "BPE" and not model.get("byte_fallback") and decoder == "ByteLevel"
    sentencepiece = model.get("type") == "BPE" and model.get("byte_fallback") and decoder == "Sequence"
    if not (byte_level or sentencepiece):
        raise ExportError(f"tokenizer {tokenizer_dir}: a {model.get('type')} tokenizer with a {decoder} decoder; "
                          "--format gguf converts byte-level BPE (SmolLM2, Llama 3) and sentencepiece-style BPE with byte "
                          "fallback (Llama 2, Mistral 7B). For this one, export --format hf and convert that folder with "
                          "llama.cpp's convert_hf_to_gguf.py")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"tokenizer {tokenizer_dir} has token id {max(vocab.values())} but the model's vocab_size is "
                          f"{vocab_size}; it belongs to another model")
    tokens, types = _tokens_and_types(tokenizer, vocab_size, sentencepiece)
    _check_unique(tokens, tokenizer_dir)
    merges = _merges(model.get("merges", []), tokenizer_dir)
    probe = tokenizer("a b", add_special_tokens=True)["input_ids"]
    special_ids = special_token_ids(tokenizer, config)
    if "eos" not in special_ids:
        raise ExportError(f"tokenizer {tokenizer_dir}: no end-of-sequence token (neither the tokenizer nor config.json "
                          "names one); llama.cpp would not know where a reply ends")
    # BOS as training saw it: first when the chat template writes it first (llama.cpp then adds it,
    # and strips the template's own), never from the tokenizer's post-processor, which training and
    # `asymllm chat` do not run (they tokenize the rendered template without special tokens)
    common = dict(special_ids=special_ids, chat_template=getattr(tokenizer, "chat_template", None),
                  add_bos=tokenizer.bos_token_id is not None and template_writes_bos(tokenizer),
                  add_eos=tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id])
    if sentencepiece:
        _check_merge_closure(tokens, types, merges, tokenizer_dir)
        if _prepend_scheme(spec) == "first":
            logger.warning("tokenizer %s puts no ▁ after a special token (Metaspace prepend_scheme 'first'); llama.cpp "
                           "does: text right after a special token (e.g. <s>[INST]) is tokenized differently there", tokenizer_dir)
        return GGUFVocab("llama", tokens, types, merges, pre_tokenizer or "default",
                         scores=merge_scores(tokens, types, merges), add_space_prefix=prepends_space(spec), **common)
    return GGUFVocab("gpt2", tokens, types, merges, pre_tokenizer or detect_pre_tokenizer(tokenizer, spec, tokenizer_dir),
                     **common)


def special_token_ids(tokenizer, config: dict) -> dict[str, int]:
    """bos, eos, unk, pad ids: the tokenizer's, else config.json's (as llama.cpp's SpecialVocab falls back)."""
    found = {}
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is None and isinstance(config.get(f"{kind}_token_id"), int):
            token_id = config[f"{kind}_token_id"]
        if token_id is not None:
            found[kind] = int(token_id)
    return found


def merge_scores(tokens: list[str], types: list[int], merges: list[str]) -> list[float]:
    """llama.cpp merges the adjacent pair whose token scores highest: each token made by a merge
    scores minus that merge's rank (the first one making it), so the order is tokenizer.json's.
    Tokens no merge makes (characters, bytes, specials) get -1000 and unused ids -10000, as in
    llama.cpp's converter: never preferred over a real merge."""
    rank = {}
    for i, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", "", 1), i)
    return [-float(rank[t]) if t in rank and kind == NORMAL else -10000.0 if kind == UNUSED else -1000.0
            for t, kind in zip(tokens, types)]


def _check_merge_closure(tokens: list[str], types: list[int], merges: list[str], where: str) -> None:
    """llama.cpp joins any adjacent pair whose concatenation is a token; a BPE joins only the pairs
    its merges list. They agree when every way of cutting a token into two tokens is a merge,
    as in tokenizer.json files made from a sentencepiece model (Llama 2, Mistral): else refused."""
    listed = set(merges)
    normal = {t for t, kind in zip(tokens, types) if kind == NORMAL}
    missing = [(t[:i], t[i:]) for t in normal for i in range(1, len(t))
               if t[:i] in normal and t[i:] in normal and f"{t[:i]} {t[i:]}" not in listed]
    if missing:
        a, b = missing[0]
        raise ExportError(f"tokenizer {where}: {len(missing)} pairs of tokens join into a token with no merge for them "
                          f"(e.g. {a!r} + {b!r}); llama.cpp would join them, this tokenizer does not, so the two would "
                          "tokenize differently. Convert the model's tokenizer.model with llama.cpp's convert_hf_to_gguf.py")


def _merges(raw: list, where: str) -> list[str]:
    """tokenizer.json merges ('a b' strings or [a, b] pairs) as GGUF writes them: 'a b'."""
    merges = []
    for merge in raw:
        parts = merge.split(" ", 1) if isinstance(merge, str) else list(merge)
        if len(parts) != 2 or any(" " in p for p in parts):
            raise ExportError(f"tokenizer {where}: merge {merge!r} has a space inside a token; GGUF cannot write it")
        merges.append(" ".join(parts))
    return merges


def _check_unique(tokens: list[str], where: str) -> None:
    seen = {}
    for i, token in enumerate(tokens):
        if token in seen:
            raise ExportError(f"tokenizer {where}: ids {seen[token]} and {i} are both spelled {token!r}; llama.cpp refuses "
                              "a vocabulary with a token twice")
        seen[token] = i


def _prepend_scheme(spec: dict) -> str | None:
    """'always' (Llama 2's Prepend normalizer, or Metaspace 'always'), 'first', or None (no ▁ prepended)."""
    parts = [spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}]
    steps = [step for part in parts for step in (part.get("normalizers") or part.get("pretokenizers") or [part])]
    if any(s.get("type") == "Prepend" and s.get("prepend") == "▁" for s in steps):
        return "always"
    schemes = [s.get("prepend_scheme", "always") for s in steps if s.get("type") == "Metaspace"]
    return schemes[0] if schemes and schemes[0] in ("always", "first") else None


def prepends_space(spec: dict) -> bool:
    """llama.cpp's add_space_prefix: whether the tokenizer puts ▁ before the text."""
    return _prepend_scheme(spec) is not None


def _tokens_and_types(tokenizer, vocab_size: int, sentencepiece: bool = False) -> tuple[list[str], list[int]]:
    """As llama.cpp's get_vocab_base: ids without a token become [PAD<id>] (unused); added tokens
    are control when special or special-looking (<|...|>), else user-defined, spelled as the
    tokenizer decodes them. Sentencepiece style, as its _set_vocab_sentencepiece: <0xNN> tokens
    are bytes, the unknown token unknown, tokens spelled as in the vocabulary."""
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif sentencepiece and (BYTE_TOKEN.fullmatch(token) or i == tokenizer.unk_token_id):
            tokens.append(token)
            types.append(BYTE if BYTE_TOKEN.fullmatch(token) else UNKNOWN)
        elif token in added:
            if not decoder[i].normalized and not sentencepiece:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            control = decoder[i].special or looks_special(token)
            if sentencepiece and not control:
                token = token.replace("▁", " ")  # llama.cpp matches user-defined tokens in the raw text
            tokens.append(token)
            types.append(CONTROL if control else USER_DEFINED)
        else:
            tokens.append(token)
            types.append(NORMAL)
    return tokens, types


def looks_special(token: str) -> bool:
    """llama.cpp's does_token_look_special."""
    return (token in LOOKS_SPECIAL or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">")))


def detect_pre_tokenizer(tokenizer, spec: dict, where: str) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE: by the hash of CHKTXT's ids
    (its own method), else by the tokenizer.json structure for plain GPT-2 or SmolLM splitting."""
    digest = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if digest in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[digest]
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [(s.get("type"), s.get("individual_digits"), s.get("use_regex", True), s.get("add_prefix_space", False))
             for s in steps]
    if kinds == [("ByteLevel", None, True, False)]:
        return "gpt-2"
    if kinds == [("Digits", True, True, False), ("ByteLevel", None, True, False)]:
        return "smollm"
    raise ExportError(f"tokenizer {where}: its pre-tokenizer is not one asymllm recognises (llama.cpp's hash of it is "
                      f"{digest}); pass --gguf_pre_tokenizer NAME with llama.cpp's name for it (see get_vocab_base_pre "
                      "in llama.cpp's convert_hf_to_gguf.py), or convert an --format hf export with that script")


def _tokenizer_json(directory: str) -> dict:
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise ExportError(f"tokenizer {directory}: no tokenizer.json (a fast tokenizer's file); --format gguf reads "
                          "the vocabulary and merges from it")
    with open(path, encoding="utf-8") as f:
        return json.load(f)
