"""Checks of an export before it is published: merged logits against base + adapter through
peft (both in the output dtype, one model in memory at a time), and a re-saved adapter
loaded by peft with every tensor present."""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from ..adapters.files import ADAPTER_WEIGHTS
from ..run_record import read_json
from .common import DTYPE_NAMES, ExportError
from .files import write_adapter_folder
from .safetensors_io import BaseCheckpoint
from .source import AdapterSource


# fp32 check: merged and unmerged logits differ by rounding alone, which grows with the logits'
# size and the model's depth, so no fixed bound fits every model (SmolLM2-135M: 1.5e-4 at logits
# up to 38). The bound is a multiple of the rounding measured on this very model and adapter (peft's
# own merge_and_unload vs the same unmerged model), with a floor relative to max |logit| for when
# that happens to be ~0. A merge 1% off moves the logits by 1% of the adapter's effect instead
# (0.07 on SmolLM2 with B ~ N(0, 0.02^2): over 100x the bound).
FP32_NOISE_MULTIPLE = 4
FP32_RELATIVE_FLOOR = 16 * torch.finfo(torch.float32).eps   # x max |logit|
TIE_EPS = 4  # bf16/fp16 argmax check: reference top-two within 4 eps(dtype) x |top logit| is a tie


PROMPTS = ("What is the capital of France?", "Write a haiku about autumn leaves.",
           "Explain in one sentence why the sky is blue.")


@dataclass
class Verification:
    dtype: str
    prompts: int
    positions: int
    max_abs_diff: float
    argmax_mismatches: int
    rule: str
    passed: bool
    bound: float | None = None           # fp32: the largest max abs diff allowed
    noise_floor: float | None = None     # fp32: peft's own merge vs the unmerged model
    max_abs_logit: float | None = None   # fp32: of the unmerged reference

    def line(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"{verdict}: merged vs base + adapter (peft), {self.dtype}, {self.prompts} prompts, {self.positions} "
                f"positions: max abs logit diff {self.max_abs_diff:.3g}, argmax differs at {self.argmax_mismatches} "
                f"(near-ties not counted); rule: {self.rule}")


def verify_merged(merged_dir: str, base_dir: str, source: AdapterSource, dtype: torch.dtype) -> Verification:
    """Logits of the merged folder vs base + adapter through peft, both in `dtype`, on a few chat
    prompts; one model in memory at a time. fp32: max abs diff within `fp32_bound` (a multiple of
    the rounding measured with peft's own merge). bf16/fp16 (whose rounding makes logits differ by
    more than any fixed bound): the same argmax at every position, near-ties excepted
    (see _argmax_mismatches)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir) if os.path.isfile(
        os.path.join(merged_dir, "tokenizer_config.json")) else None
    batches = _prompt_ids(tokenizer, int(read_json(os.path.join(merged_dir, "config.json"))["vocab_size"]))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype).eval()
    merged_logits = _logits(merged, batches)
    del merged
    with contextlib.ExitStack() as stack:
        reference = _reference_model(base_dir, source, dtype, stack)
        reference_logits = _logits(reference, batches)
        if dtype == torch.float32:  # peft's merge of the same model, in place: the rounding a correct merge has
            peft_merged_logits = _logits(reference.merge_and_unload(safe_merge=True), batches)
        del reference
    diff = _max_abs_diff(merged_logits, reference_logits)
    positions = sum(m.shape[0] for m in merged_logits)
    mismatches, ties = _argmax_mismatches(merged_logits, reference_logits, dtype)
    if dtype == torch.float32:
        bound, floor, top, rule = fp32_bound(reference_logits, peft_merged_logits)
        result = Verification(DTYPE_NAMES[dtype], len(batches), positions, diff, mismatches, rule, diff <= bound,
                              bound, floor, top)
    else:
        rule = (f"same argmax at every position but near-ties ({ties} positions where the reference's own top two "
                f"logits are within {TIE_EPS} x eps({DTYPE_NAMES[dtype]}) x |top logit|)")
        result = Verification(DTYPE_NAMES[dtype], len(batches), positions, diff, mismatches, rule, mismatches == 0)
    # not logged here: `asymllm export` prints result.line() once, and a failure's ExportError carries it
    return result


def _reference_model(base_dir: str, source: AdapterSource, dtype: torch.dtype, stack: contextlib.ExitStack):
    """The base with the adapter applied through peft, unmerged: what an export must equal."""
    from transformers import AutoModelForCausalLM

    from ..adapters.files import load_lorasym_model

    adapter_dir = source.directory
    if source.rebuilt_from_shards:  # peft reads folders: write the rebuilt adapter to a scratch one
        adapter_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="asymllm-export-adapter-"))
        write_adapter_folder(adapter_dir, source.tensors, source.config, source.recipe, source.seed)
    return load_lorasym_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype), adapter_dir).eval()


def quantized_base_gap(base_dir: str, source: AdapterSource, base_quantization: dict, tokenizer) -> str:
    """For an adapter trained on a 4/8-bit base, merged into the full-precision base: how far that
    (base + adapter in fp32, what the export equals) is from what training ran (the quantized base
    + adapter, fp32 compute), on the verification prompts, measured: one line for the card and log."""
    from transformers import AutoModelForCausalLM

    from ..adapters.files import load_lorasym_model
    from ..quantization import Quantization

    quant = Quantization.from_record(base_quantization)
    batches = _prompt_ids(tokenizer, int(read_json(os.path.join(base_dir, "config.json"))["vocab_size"]))
    with contextlib.ExitStack() as stack:
        full = _logits(_reference_model(base_dir, source, torch.float32, stack), batches)
        adapter_dir = source.directory
        if source.rebuilt_from_shards:
            adapter_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="asymllm-export-adapter-"))
            write_adapter_folder(adapter_dir, source.tensors, source.config, source.recipe, source.seed)
        quantized = load_lorasym_model(AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=torch.float32, **quant.load_kwargs("float32", "cpu")), adapter_dir).eval()
        trained = _logits(quantized, batches)
    positions = sum(f.shape[0] for f in full)
    same = sum(int((f.argmax(-1) == t.argmax(-1)).sum()) for f, t in zip(full, trained))
    return (f"training used a {quant.describe('float32')} base; this export merges into the full-precision base, whose "
            f"logits with the adapter differ from the quantized base + adapter's by at most "
            f"{_max_abs_diff(full, trained):.3g} (max |logit| {max(f.abs().max().item() for f in full):.3g}), "
            f"same argmax at {same} of {positions} positions, on the {len(batches)} verification prompts")


def fp32_bound(reference: list[torch.Tensor], peft_merged: list[torch.Tensor]) -> tuple[float, float, float, str]:
    """(bound, noise floor, max |logit|, the rule in words) of the fp32 merged-vs-unmerged check."""
    floor = _max_abs_diff(peft_merged, reference)
    top = max(r.float().abs().max().item() for r in reference)
    bound = max(FP32_NOISE_MULTIPLE * floor, FP32_RELATIVE_FLOOR * top)
    rule = (f"max abs diff <= {bound:.3g} = max({FP32_NOISE_MULTIPLE} x {floor:.3g} (peft's own merge_and_unload vs "
            f"the same unmerged model), {FP32_RELATIVE_FLOOR:.2g} x max |logit| {top:.3g})")
    return bound, floor, top, rule


def _max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def _argmax_mismatches(merged: list[torch.Tensor], reference: list[torch.Tensor], dtype: torch.dtype) -> tuple[int, int]:
    """(positions whose argmax differs, not counting near-ties; near-ties excused). A near-tie:
    the reference's logits for its own choice and the merged model's are within TIE_EPS x eps x
    |top logit|, i.e. within rounding of each other, as in SmolLM2-135M in bf16, where logits near
    38 are spaced 0.25 apart and exact ties occur."""
    counted = excused = 0
    for m, r in zip(merged, reference):
        r = r.float()
        m_top, r_top = m.argmax(-1), r.argmax(-1)
        for i in torch.nonzero(m_top != r_top).flatten().tolist():
            margin = (r[i, r_top[i]] - r[i, m_top[i]]).item()
            tie = TIE_EPS * torch.finfo(dtype).eps * r[i, r_top[i]].abs().item() if dtype != torch.float32 else 0.0
            if margin <= tie:
                excused += 1
            else:
                counted += 1
    return counted, excused


def _prompt_ids(tokenizer, vocab_size: int) -> list[torch.Tensor]:
    if tokenizer is None:  # no tokenizer: fixed pseudo-random ids
        generator = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab_size, (1, 24), generator=generator) for _ in PROMPTS]
    return [tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"] for text in _prompt_texts(tokenizer)]


def _prompt_texts(tokenizer) -> list[str]:
    """PROMPTS as a user turn in the chat template, when the tokenizer has one."""
    if not getattr(tokenizer, "chat_template", None):
        return list(PROMPTS)
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in PROMPTS]


@torch.no_grad()
def _logits(model, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(input_ids=ids).logits[0] for ids in batches]


def verify_adapter_export(out_dir: str, source: AdapterSource, base: BaseCheckpoint | None,
                          dtype: torch.dtype | None) -> str:
    """The written adapter holds exactly the intended tensors; with the base at hand, peft loads it
    onto the base with every tensor present (asymllm.load_lorasym_model refuses missing keys)."""
    written = load_file(os.path.join(out_dir, ADAPTER_WEIGHTS))
    for key, value in source.tensors.items():
        expected = value.to(dtype) if dtype is not None and value.is_floating_point() else value
        if key not in written or not torch.equal(written[key], expected):
            raise ExportError(f"{out_dir}: {key} was not written as intended")
    line = f"passed: all {len(written)} tensors re-read bit-exact"
    if base is None:
        return line + " (base model not available: not loaded in peft)"
    from transformers import AutoModelForCausalLM

    from ..adapters.files import load_lorasym_model

    model_dtype = dtype or next(iter(source.tensors.values())).dtype
    model = load_lorasym_model(AutoModelForCausalLM.from_pretrained(base.directory, dtype=model_dtype), out_dir).eval()
    ids = _prompt_ids(None, int(base.config.get("vocab_size", 2)))[0]
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    change = (adapted.float() - plain.float()).abs().max().item()
    return line + f"; peft loads it on the base with every tensor present; it moves the logits by up to {change:.3g}"
