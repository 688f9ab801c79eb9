"""`asymllm export`: fold a LoRASYM adapter into its base and write a plain transformers model.

    asymllm export --adapter OUT/adapter --output merged/                 # base from adapter_config.json
    asymllm export --adapter OUT/checkpoint-500 --output merged/ --dtype bf16 --max_shard_size 2GB
    asymllm export --adapter OUT/adapter --output served/ --adapter_only  # peft adapter for vLLM/TGI
    asymllm export --adapter OUT/adapter --output merged/ --tokenizer ORIGINAL_MODEL/   # base has no tokenizer files
    asymllm export --adapter OUT --output gguf/ --format gguf --gguf_type q8_0   # one .gguf for llama.cpp / ollama
    asymllm export --adapter OUT/adapter --output full/ --format peft     # a plain peft adapter, also from a compact one

The merged folder (config, safetensors shards + index, tokenizer with its chat template,
generation config, README.md model card) loads with `AutoModelForCausalLM.from_pretrained(DIR)`
with neither asymllm nor peft installed. Its weights are W = W0 + s * B @ A, s = lora_alpha / r
(lora_alpha / sqrt(r) with rsLoRA), computed in fp32 one tensor at a time, then cast.

How, in order (nothing is written before step 4):
1. the adapter: a saved adapter folder, a run folder (its adapter/), or a checkpoint-N/ folder;
   from a checkpoint whose adapter file is missing or incomplete, rebuilt from the DeepSpeed
   ZeRO shards (asymllm.export.zero_checkpoint);
2. the base: --base, else the adapter's base_model_name_or_path; only safetensors headers read;
3. the plan: every adapter tensor matched to a base weight, shapes checked (an adapter for
   another base is refused here), scale per module; the tokenizer: --tokenizer's, else the
   adapter folder's, else the base's, loaded and checked; a merged export whose sources have no
   tokenizer files is refused (a model that cannot be prompted is not what `from_pretrained`
   users expect) unless --tokenizer names one, or --tokenizer none declines it;
4. stream: each output shard's header is known from the base headers, so tensors are read
   (plain reads, not a memory map), merged and written one at a time; peak memory is a few
   tensors beyond the process itself, whatever the model or shard size
   (benchmarks/export_memory.py);
5. verify (default; --no-verify skips): logits of the merged folder against base + adapter
   through peft, both in the output dtype, one model in memory at a time (fp32: within 4x the
   rounding of peft's own merge of the same model; bf16/fp16: the same argmax; export_verify);
6. publish: everything is written to a hidden folder beside --output and renamed into place
   only after verification, so a failed export leaves no folder behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..adapters.files import AdapterFileError
from ..adapters.recipe import RecipeError
from ..builtin import _make_readable
from ..cli_args import ArgumentParser
from ..data import DataError
from ..tokenizer import use_trained_chat_template
from .common import DTYPE_NAMES, DTYPES, ExportError, write_text
from .files import NO_TOKENIZER, choose_tokenizer, save_tokenizer, write_adapter_folder, write_config_files
from .gguf_file import GGUF_TYPES, check_architecture, plan_tensors, write_gguf
from .gguf_verify import verify_gguf
from .gguf_vocab import gguf_vocab
from .merge_plan import plan_merge, plan_shards, write_merged_weights
from .model_card import gguf_card, model_card
from .ollama import check_template, ollama_modelfile, ollama_template
from .safetensors_io import BaseCheckpoint
from .source import find_adapter_dir, read_adapter, resolve_base
from .verify import Verification, quantized_base_gap, verify_adapter_export, verify_merged
from .zero_checkpoint import ZeroCheckpointError

logger = logging.getLogger("asymllm.export")


@dataclass
class ExportArgs:
    adapter: str
    output: str
    base: str | None = None
    dtype: str | None = None          # bf16 | fp16 | fp32; default: the base's dtype (adapter-only: as saved)
    max_shard_size: str = "5GB"
    verify: bool = True
    overwrite: bool = False
    adapter_only: bool = False
    tokenizer: str | None = None      # folder to take the tokenizer from, or "none"; default: the adapter's, else the base's
    format: str = "hf"                # hf: a transformers folder; gguf: one .gguf file (+ Modelfile, README.md)
    gguf_type: str = "f16"            # f16 | bf16 | f32 | q8_0
    gguf_pre_tokenizer: str | None = None  # llama.cpp pre-tokenizer name, when asymllm does not recognise it
    chat_template: str | None = None  # for a tokenizer not saved with the adapter (a name or Jinja file); else the adapter's


@dataclass
class ExportResult:
    output: str
    dtype: str
    files: list[str]
    total_bytes: int
    merged_modules: int
    source: str
    verification: Verification | None   # the merged export's logits check
    checked: str | None                 # what was verified, in one line (both kinds of export)
    seconds: float


# ---------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> ExportArgs:
    parser = ArgumentParser(prog="asymllm export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="adapter folder, run folder (uses its adapter/), or checkpoint-N/")
    parser.add_argument("--output", required=True, help="folder to write; refused if it exists and is not empty")
    parser.add_argument("--base", help="base model folder or name (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: the base's; adapter-only: as saved)")
    parser.add_argument("--max_shard_size", "--max-shard-size", default="5GB", help="e.g. 5GB, 500MB, 2GiB (default 5GB)")
    parser.add_argument("--no-verify", "--no_verify", dest="verify", action="store_false",
                        help="skip the logits check of merged vs base + adapter")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output (only after success)")
    parser.add_argument("--adapter_only", "--adapter-only", action="store_true",
                        help="write the adapter alone in peft format (frozen factors included) for multi-LoRA serving")
    parser.add_argument("--tokenizer", metavar="PATH|none",
                        help="folder to take the tokenizer from (default: the adapter's, else the base model's; a base "
                             f"without tokenizer files is refused), or '{NO_TOKENIZER}' to export without one")
    parser.add_argument("--chat_template", help="chat template when the tokenizer is not the one saved with the adapter: "
                        "chatml, llama3, llama2, mistral, alpaca, tokenizer or a Jinja file (default: as training "
                        "chooses; the adapter's own is always used)")
    gguf = parser.add_argument_group("--format gguf: one file for llama.cpp and ollama")
    gguf.add_argument("--format", choices=["hf", "gguf", "peft"], default="hf",
                      help="hf: a transformers folder (default); gguf: the merged model as one .gguf file named after "
                           "the run, with its tokenizer and chat template, an ollama Modelfile and a README.md; peft: the "
                           "adapter alone as a plain peft folder, every factor a tensor (= --adapter_only; also from a "
                           "compact --save_frozen_as seed adapter)")
    gguf.add_argument("--gguf_type", choices=list(GGUF_TYPES), default="f16",
                      help="weights in the .gguf file (default f16); norms stay f32, as llama.cpp keeps them")
    gguf.add_argument("--gguf_pre_tokenizer", metavar="NAME",
                      help="llama.cpp's pre-tokenizer name for a tokenizer asymllm does not recognise (e.g. llama-bpe)")
    args = parser.parse_args(argv)
    if args.format == "gguf":
        given = [flag for flag, value in (("--dtype", args.dtype), ("--adapter_only", args.adapter_only),
                                          ("--max_shard_size", args.max_shard_size != "5GB")) if value]
        if given:
            parser.error(f"{', '.join(given)}: not for --format gguf (its weights type is --gguf_type)")
    elif args.format == "peft":
        args.adapter_only = True
    if args.format != "gguf" and (args.gguf_type != "f16" or args.gguf_pre_tokenizer):
        parser.error("--gguf_type and --gguf_pre_tokenizer are for --format gguf")
    return ExportArgs(**vars(args))


def main(argv: list[str] | None = None) -> ExportResult:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(format="[asymllm export] %(message)s", level=logging.INFO)
    try:
        result = export(**vars(args))
    except (ExportError, AdapterFileError, ZeroCheckpointError, RecipeError) as error:
        raise SystemExit(f"asymllm export: error: {error}") from None
    print(f"wrote {result.output}: {len(result.files)} files, {result.total_bytes / 1e9:.3f} GB of weights in "
          f"{result.dtype}, {result.merged_modules} modules merged, {result.seconds:.1f} s", flush=True)
    if result.checked:
        print(f"verification {result.checked}", flush=True)
    return result


def export(adapter: str, output: str, base: str | None = None, dtype: str | None = None,
           max_shard_size: str | int = "5GB", verify: bool = True, overwrite: bool = False,
           adapter_only: bool = False, tokenizer: str | None = None, format: str = "hf", gguf_type: str = "f16",
           gguf_pre_tokenizer: str | None = None, chat_template: str | None = None) -> ExportResult:
    """Merge (or, with adapter_only, re-save) an adapter; see the module docstring for the steps."""
    if format == "gguf":
        return export_gguf(adapter, output, base, gguf_type, verify, overwrite, tokenizer, gguf_pre_tokenizer, chat_template)
    if format not in ("hf", "peft"):
        raise ExportError(f"--format {format!r}: choose one of hf, gguf, peft")
    adapter_only = adapter_only or format == "peft"
    start = time.perf_counter()
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    adapter_dir = find_adapter_dir(adapter)
    base_dir = resolve_base(base, adapter_dir, required=not adapter_only)
    check_output(output, overwrite, [adapter, adapter_dir, base_dir])
    base_ckpt = BaseCheckpoint.open(base_dir) if base_dir else None
    source = read_adapter(adapter_dir, base_ckpt, base)
    plan = plan_merge(source, base_ckpt) if base_ckpt else None
    shipped_tokenizer = choose_tokenizer(  # an adapter folder needs no tokenizer; a merged model does
        tokenizer, [("--adapter folder", adapter_dir)] + ([] if adapter_only else [("base model folder", base_dir)]),
        base_ckpt.config.get("vocab_size") if base_ckpt else None, required=not adapter_only)
    if shipped_tokenizer is not None:
        logger.info(trained_template(shipped_tokenizer, chat_template, adapter_dir))
    # every refusal happens before this line
    if adapter_only:
        out_dtype = DTYPES[dtype] if dtype else None
        with staging(output, overwrite) as tmp:
            files = write_adapter_folder(tmp, source.tensors, source.config, source.recipe, source.seed, out_dtype,
                                         base_name=base or source.config.get("base_model_name_or_path"))
            files += save_tokenizer(shipped_tokenizer, tmp)
            line = verify_adapter_export(tmp, source, base_ckpt, out_dtype) if verify else None
            write_text(tmp, "README.md", model_card(source, base_ckpt, plan, out_dtype, line, adapter_only=True, output=output))
        total = sum(t.numel() * (out_dtype or t.dtype).itemsize for t in source.tensors.values())
        return ExportResult(output, DTYPE_NAMES.get(out_dtype, "as saved"), files + ["README.md"], total, 0,
                            source.description, None, line, time.perf_counter() - start)

    out_dtype = DTYPES[dtype] if dtype else base_ckpt.dtype()
    layout = plan_shards(base_ckpt, out_dtype, shard_bytes)
    check_disk_space(output, layout.total_bytes)
    with staging(output, overwrite) as tmp:
        files = write_merged_weights(tmp, base_ckpt, plan, out_dtype, layout)
        files += write_config_files(tmp, base_ckpt, out_dtype)
        files += save_tokenizer(shipped_tokenizer, tmp)
        check = None
        if verify:
            check = verify_merged(tmp, base_dir, source, out_dtype)
            if not check.passed:
                raise ExportError(f"verification {check.line()}; nothing written (--no-verify skips the check)")
        checked = check and with_quantized_gap(check.line(), base_dir, source, shipped_tokenizer)
        write_text(tmp, "README.md", model_card(source, base_ckpt, plan, out_dtype, checked, adapter_only=False, output=output))
    return ExportResult(output, DTYPE_NAMES[out_dtype], files + ["README.md"], layout.total_bytes, len(plan.deltas),
                        source.description, check, checked, time.perf_counter() - start)


def export_gguf(adapter: str, output: str, base: str | None, gguf_type: str, verify: bool, overwrite: bool,
                tokenizer: str | None, pre_tokenizer: str | None, chat_template: str | None = None) -> ExportResult:
    """The merged model as one .gguf file in `output`, with an ollama Modelfile and a README.md;
    the same steps as the HF export: every refusal first, then write, verify, publish."""
    start = time.perf_counter()
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"--gguf_type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    adapter_dir = find_adapter_dir(adapter)
    base_dir = resolve_base(base, adapter_dir)
    check_output(output, overwrite, [adapter, adapter_dir, base_dir])
    base_ckpt = BaseCheckpoint.open(base_dir)
    check_architecture(base_ckpt.config, f"base model {base_dir}")
    source = read_adapter(adapter_dir, base_ckpt, base)
    plan = plan_merge(source, base_ckpt)
    if tokenizer is not None and tokenizer.lower() == NO_TOKENIZER:
        raise ExportError("--tokenizer none: a GGUF file carries its tokenizer; llama.cpp and ollama cannot run one "
                          "without it (pass --tokenizer PATH, or leave it out to use the adapter's or the base's)")
    shipped = choose_tokenizer(tokenizer, [("--adapter folder", adapter_dir), ("base model folder", base_dir)],
                               base_ckpt.config.get("vocab_size"), required=True)
    logger.info(trained_template(shipped, chat_template, adapter_dir))
    ollama = ollama_template(shipped)
    if ollama.template is None:
        logger.warning("ollama Modelfile: %s; it is written without a TEMPLATE", ollama.reason)
    tensors = plan_tensors(base_ckpt, gguf_type)
    total = sum(t.nbytes for t in tensors)
    check_disk_space(output, total)
    name = run_name(source)
    file_name = f"{name}-{gguf_type}.gguf"
    with tempfile.TemporaryDirectory(prefix="asymllm-gguf-tokenizer-") as scratch:
        save_tokenizer(shipped, scratch)  # tokenizer.json in its current layout, reloaded and checked
        vocab = gguf_vocab(shipped, scratch, base_ckpt.config, pre_tokenizer)
    # every refusal happens before this line
    with staging(output, overwrite) as tmp:
        write_gguf(os.path.join(tmp, file_name), base_ckpt, plan, tensors, vocab, gguf_type, name)
        checked = None
        if verify:
            check = verify_gguf(os.path.join(tmp, file_name), base_dir, source, gguf_type, shipped, vocab.model,
                                base_ckpt, plan, tensors)
            if not check.passed:
                raise ExportError(f"verification {check.line()}; nothing written (--no-verify skips the check)")
            checked = check.line() + "; " + (
                check_template(ollama.template, shipped, vocab.add_bos, os.path.join(tmp, file_name))
                if ollama.template is not None else f"the Modelfile has no TEMPLATE ({ollama.reason})")
            checked = with_quantized_gap(checked, base_dir, source, shipped)
        write_text(tmp, "Modelfile", ollama_modelfile(file_name, ollama))
        write_text(tmp, "README.md", gguf_card(source, base_ckpt, gguf_type, file_name, name, checked,
                                               os.path.abspath(output)))
    logger.info("wrote %s: %d tensors, %.3f GB, %s", file_name, len(tensors), total / 1e9, gguf_type)
    return ExportResult(output, gguf_type, [file_name, "Modelfile", "README.md"], total, len(plan.deltas),
                        source.description, None, checked, time.perf_counter() - start)


def with_quantized_gap(checked: str, base_dir: str, source, tokenizer) -> str:
    """The verification line, and for a run trained on a 4/8-bit base (its run record says so) how far
    the export, merged into the full-precision base, is from the quantized base + adapter it trained on."""
    from ..run_record import RUN_RECORD, read_json

    run = read_json(os.path.join(source.run_dir, RUN_RECORD)) if source.run_dir else None
    if not run or not run.get("base_quantization"):
        return checked
    gap = quantized_base_gap(base_dir, source, run["base_quantization"], tokenizer)
    logger.info(gap)
    return f"{checked}; {gap}"


def trained_template(tokenizer, chat_template: str | None, adapter_dir: str) -> str:
    """The chat template the export ships: the one saved with the adapter by its training run, else
    --chat_template (or training's default choice) on the base's or --tokenizer's tokenizer."""
    saved = os.path.realpath(tokenizer.name_or_path) == os.path.realpath(adapter_dir)
    try:
        return use_trained_chat_template(tokenizer, chat_template, saved_by_training=saved)
    except DataError as error:
        raise ExportError(str(error)) from None


def run_name(source) -> str:
    """What the .gguf file is named after: the run folder (with the checkpoint, when one was
    exported), else the adapter folder."""
    folder = os.path.abspath(source.directory)
    parent, leaf = os.path.split(folder)
    if source.run_dir:
        name = _named_folder(source.run_dir) + ("" if leaf == "adapter" else f"-{leaf}")
    else:
        name = _named_folder(parent) if leaf == "adapter" else leaf
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def _named_folder(folder: str) -> str:
    """The folder's name, or its parent's when the name says nothing (a sweep cell's train/)."""
    name = os.path.basename(os.path.abspath(folder))
    return os.path.basename(os.path.dirname(os.path.abspath(folder))) if name in GENERIC_NAMES else name


GENERIC_NAMES = ("train", "output", "outputs", "run", "adapter")


# ---------------------------------------------------------------------------------------
# The output folder: checked first, written beside, renamed into place last


def check_output(output: str, overwrite: bool, sources: list[str | None]) -> None:
    if os.path.exists(output) and not os.path.isdir(output):
        raise ExportError(f"--output {output} exists and is not a folder")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise ExportError(f"--output {output} exists and is not empty; pass --overwrite to replace it "
                          "(it is replaced only after the export succeeds)")
    out = os.path.realpath(output)
    for source in filter(None, sources):
        src = os.path.realpath(source)
        if out == src or src.startswith(out + os.sep) or out.startswith(src + os.sep):
            raise ExportError(f"--output {output} overlaps an input ({source}); write the export elsewhere")


def check_disk_space(output: str, nbytes: int) -> None:
    parent = os.path.dirname(os.path.abspath(output))
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    free = shutil.disk_usage(parent).free
    if free < nbytes * 1.02 + 50e6:
        raise ExportError(f"--output {output}: the export needs about {nbytes / 1e9:.2f} GB, {free / 1e9:.2f} GB free")


@contextlib.contextmanager
def staging(output: str, overwrite: bool):
    """Yield a hidden folder beside `output`; on success it becomes `output` (an old one is
    removed only then), on any failure it is removed."""
    output = os.path.abspath(output)
    parent, name = os.path.split(output)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".export-tmp", dir=parent)
    try:
        yield tmp
        _make_readable(Path(tmp))
        if os.path.exists(output):
            old = tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=parent)
            os.replace(output, os.path.join(old, name))
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s", output)


def parse_size(value: str | int) -> int:
    """'5GB' -> 5e9, '500MB', '2GiB', or a number of bytes (transformers' convention: GB = 1e9)."""
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(value), flags=re.IGNORECASE)
        if not match:
            raise ExportError(f"--max_shard_size {value!r}: expected a size like 5GB, 500MB, 2GiB or a byte count")
        unit = (match.group(2) or "B").upper()
        power = "BKMGT".index(unit[0]) if unit != "B" else 0
        size = int(float(match.group(1)) * ((1024 if "I" in unit else 1000) ** power))
    if size <= 0:
        raise ExportError(f"--max_shard_size {value!r}: must be positive")
    return size


if __name__ == "__main__":
    main()
