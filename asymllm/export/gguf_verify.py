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
  TIE_EPS x the type's rounding step x |top logit| is a near-tie and not counted (stated in the
  line), but at most one generated position in MAX_NEAR_TIES may be one;
- every tensor of the file, dequantized, within its type's rounding of the fp32 merged weight
  (f32: equal; f16/bf16: half a unit in the last place; q8_0: half a step of its block, plus the
  f16 rounding of the block's scale), and the model's settings as transformers reads them from
  the file equal to config.json's: what a few prompts could miss (one tensor, eps, rope theta).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from .common import ExportError
from .source import AdapterSource
from .verify import PROMPTS, TIE_EPS, _logits, _max_abs_diff, _prompt_ids, _prompt_texts, _reference_model, fp32_bound

GREEDY_TOKENS = 16
MAX_NEAR_TIES = 10
# Texts whose tokens must come back the same. No digits (transformers rebuilds no digit-splitting
# pre-tokenizer from a file, llama.cpp does) and no leading space (transformers' sentencepiece
# rebuild adds no ▁ before one, Llama 2's tokenizer and llama.cpp do): measured, RESULTS.md gguf_llama_cpp.
TOKENIZER_PROBES = ("two  spaces,\ta tab and\nnew lines; naïve café, Ünïcödé 🦙 -- end.", "x")
CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "rms_norm_eps", "max_position_embeddings", "vocab_size", "head_dim", "tie_word_embeddings")
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
                tokenizer_model: str = "gpt2", base=None, plan=None, tensors=None) -> GGUFCheck:
    """`base`, `plan`, `tensors` (the BaseCheckpoint, MergePlan and planned GGUFTensors): with
    them every tensor of the file is compared with its merged weight too."""
    folder, name = os.path.split(path)
    texts = [*PROMPTS, *TOKENIZER_PROBES] + ([] if tokenizer_model == "llama" else _prompt_texts(tokenizer))
    described = ("the prompts and probes without the chat template (sentencepiece style: see gguf_verify)"
                 if tokenizer_model == "llama" else "the prompts (chat template included) and probes")
    tokenizer_ok = _tokenizer_reads_back(folder, name, tokenizer, texts)
    if tensors is not None:
        _check_tensors(path, base, plan, tensors)
    prompts = _prompt_ids(tokenizer, 0)
    with contextlib.ExitStack() as stack:
        reference = _reference_model(base_dir, source, torch.float32, stack)
        sequences = [_greedy(reference, ids) for ids in prompts]
        reference_logits = _logits(reference, sequences)
        peft_merged = _logits(reference.merge_and_unload(safe_merge=True), sequences) if gguf_type == "f32" else None
        del reference
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    if base is not None:
        _check_settings(model.config, base.config, path)
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
                f"{TIE_EPS} x {STEP[gguf_type]:.3g} ({gguf_type}'s step) x |top logit|; at most 1 in {MAX_NEAR_TIES})")
        passed = mismatches == 0 and ties * MAX_NEAR_TIES <= generated
    if tensors is not None:
        rule += "; every tensor within its type's rounding of the merged weight, the settings as config.json's"
    return GGUFCheck(gguf_type, len(prompts), positions, generated, diff, mismatches, ties, tokenizer_ok, rule,
                     passed and tokenizer_ok, described)


def _tokenizer_reads_back(folder: str, name: str, tokenizer, texts: list[str]) -> bool:
    """The same ids for every text; with special tokens added, the BOS (and EOS) the file says to add:
    gguf_vocab writes add_bos_token as training saw BOS (the chat template's), not as the tokenizer's
    post-processor adds it."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    fields = GGUFReader(os.path.join(folder, name)).fields
    add = {k: bool(fields[f"tokenizer.ggml.add_{k}_token"].contents()) for k in ("bos", "eos")}
    read_back = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if getattr(read_back, "chat_template", None) != getattr(tokenizer, "chat_template", None):
        return False
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        added = [tokenizer.bos_token_id] * add["bos"] + ids + [tokenizer.eos_token_id] * add["eos"]
        if read_back(text, add_special_tokens=False)["input_ids"] != ids or read_back(text)["input_ids"] != added:
            return False
    return True


def _check_settings(read: object, config: dict, path: str) -> None:
    """The model's settings as transformers reads them from the file must be config.json's."""
    from .gguf_file import rope_parameters

    expected = {key: config.get(key) for key in CONFIG_FIELDS}
    expected["head_dim"] = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    expected["num_key_value_heads"] = config.get("num_key_value_heads") or config["num_attention_heads"]
    expected["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
    got = {key: getattr(read, key, None) for key in CONFIG_FIELDS}
    theta = (getattr(read, "rope_parameters", None) or {}).get("rope_theta", getattr(read, "rope_theta", None))
    expected["rope_theta"], got["rope_theta"] = rope_parameters(config).get("rope_theta") or 10000.0, theta
    wrong = [f"{k} {got[k]!r} (config.json: {v!r})" for k, v in expected.items()
             if not (v == got[k] or (isinstance(v, float) and got[k] is not None and abs(got[k] - v) <= 1e-6 * abs(v)))]
    if wrong:
        raise ExportError(f"verification FAILED: {path} reads back with {', '.join(wrong)}; nothing written")


def _check_tensors(path: str, base, plan, tensors) -> None:
    """Each tensor of the file, dequantized, against the fp32 merged weight it was made from."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from .gguf_file import permute
    from .merge_plan import merged_tensor
    from .safetensors_io import BaseReader

    stored = {t.name: t for t in GGUFReader(path).tensors}
    if sorted(stored) != sorted(t.name for t in tensors):
        raise ExportError(f"verification FAILED: {path} holds tensors {sorted(set(stored) ^ {t.name for t in tensors})} "
                          "other than planned; nothing written")
    with BaseReader(base) as reader:
        for t in tensors:
            want = merged_tensor(t.key, reader.read(t.key), plan, torch.float32)
            want = (permute(want, t.permute_heads) if t.permute_heads is not None else want).numpy()
            got = dequantize(np.asarray(stored[t.name].data), stored[t.name].tensor_type).reshape(want.shape)
            error, bound = np.abs(got - want), _rounding_bound(want, t.qtype)
            if not (error <= bound).all():
                worst = np.unravel_index(np.argmax(error - bound), want.shape)
                raise ExportError(f"verification FAILED: tensor {t.name} ({t.key}) in {path} is {error[worst]:.3g} off the "
                                  f"merged weight at {tuple(int(i) for i in worst)} (its {t.qtype.name} rounding allows "
                                  f"{bound[worst]:.3g}); nothing written")


def _rounding_bound(x, qtype):
    """How far a correctly stored value of type `qtype` may be from x: per element."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    magnitude = np.abs(x)
    if qtype == Q.F32:
        return np.zeros_like(x)
    if qtype == Q.F16:
        return magnitude * 2.0 ** -11 + 2.0 ** -25       # half an ulp; subnormals below 2^-14
    if qtype == Q.BF16:
        return magnitude * 2.0 ** -8 + 2.0 ** -133
    if qtype == Q.Q8_0:  # q = round(x / d), d = max|block| / 127 stored as f16: |d16 q - x| <= d/2 + 127 |d16 - d|,
        # |d16 - d| <= 2^-11 d, or 2^-25 where d is an f16 subnormal (a block of weights below 0.008)
        d = magnitude.reshape(-1, 32).max(axis=1, keepdims=True) / 127
        bound = d * (0.5 + 127 * 2.0 ** -11) * 1.001 + 127 * 2.0 ** -25
        return np.broadcast_to(bound, (d.shape[0], 32)).reshape(x.shape)
    raise ValueError(f"no rounding bound for {qtype}")


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
