"""The tokenizer of a GGUF export, as llama.cpp's own converter (convert_hf_to_gguf.py,
`get_vocab_base` and `_set_vocab_gpt2`) writes it: every id of the model's vocabulary with its
token type, the BPE merges, the special token ids, whether BOS/EOS are added, the chat template,
and the pre-tokenizer name llama.cpp splits text with.

Only byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3) are converted here. llama.cpp
names a pre-tokenizer by the hash of one fixed text's token ids; the hashes of the tokenizers
this stack is used with are copied from its table, and a tokenizer whose pre-tokenizer is plain
GPT-2 byte-level (or SmolLM's: digits split one by one, then GPT-2) is recognised by its
structure. Anything else is refused with the hash, rather than written with a guess that
would make llama.cpp split text differently from the model's training.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from hashlib import sha256

from .common import ExportError

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
# gguf TokenType values
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None

    def add_to(self, writer) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def gguf_vocab(tokenizer, tokenizer_dir: str, vocab_size: int, pre_tokenizer: str | None = None) -> GGUFVocab:
    """The GGUF tokenizer fields of `tokenizer` (loaded from `tokenizer_dir`, a folder with its
    tokenizer.json) for a model of `vocab_size` ids; `pre_tokenizer` overrides the detection."""
    spec = _tokenizer_json(tokenizer_dir)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError(f"tokenizer {tokenizer_dir}: a {model.get('type')} tokenizer"
                          f"{' with byte fallback (sentencepiece style)' if model.get('byte_fallback') else ''}; "
                          "--format gguf converts byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3). For this one, "
                          "export --format hf and convert that folder with llama.cpp's convert_hf_to_gguf.py")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"tokenizer {tokenizer_dir} has token id {max(vocab.values())} but the model's vocab_size is "
                          f"{vocab_size}; it belongs to another model")
    tokens, types = _tokens_and_types(tokenizer, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a b", add_special_tokens=True)["input_ids"]
    special_ids = {kind: token_id for kind in ("bos", "eos", "unk", "pad")
                   if (token_id := getattr(tokenizer, f"{kind}_token_id", None)) is not None}
    return GGUFVocab(tokens, types, merges, pre_tokenizer or detect_pre_tokenizer(tokenizer, spec, tokenizer_dir),
                     special_ids,
                     add_bos=tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
                     add_eos=tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id],
                     chat_template=getattr(tokenizer, "chat_template", None))


def _tokens_and_types(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """As llama.cpp's get_vocab_base: ids without a token become [PAD<id>] (unused); added tokens
    are control when special or special-looking (<|...|>), else user-defined, spelled as the
    tokenizer decodes them."""
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            looks_special = token.startswith("<|") and token.endswith("|>")
            tokens.append(token)
            types.append(CONTROL if decoder[i].special or looks_special else USER_DEFINED)
        else:
            tokens.append(token)
            types.append(NORMAL)
    return tokens, types


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
