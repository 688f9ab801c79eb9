"""Quantized bases (issue 28): a full-precision base vs 4-bit NF4 vs 8-bit, measured in one run.

Run from the repository root (about 40 minutes on 2 CPU cores; each part's results are kept in
WORKDIR, so an interrupted run resumes where it stopped):

    python benchmarks/qlora.py [--parts default,peer,1b] [--workdir DIR] [--output FILE]

Parts:
- default: the built-in default run (SmolLM2-135M-Instruct, A_rand_hB_zero r=16, the built-in
  data, 2 epochs = 120 steps of batch 8, max length 512) with the base in fp32, NF4 (double
  quantization, fp32 compute) and 8-bit: peak RSS during training, the base's weights in memory
  (`get_memory_footprint`), loss tokens/s over steps 4-120, the held-out loss the run ends with,
  and exact match on the built-in held-out set (`asymllm eval alpaca`, greedy, 64 new tokens),
  evaluated on the base the run trained on;
- peer: asymllm A_rand_hB_zero vs TRL SFTTrainer + peft LoRA (r=16) on the same NF4 base, the same
  model, data and SFTConfig values (benchmarks/_train_worker.py): 3 untimed + 20 timed steps,
  tokens/s and peak RSS ratios, 2 runs each, alternating;
- 1b: one training step (batch 1, 256 tokens) of a Llama of about 1.0B parameters built from its
  config (random weights, no download; SmolLM2's tokenizer), fp32 vs NF4: peak RSS of the step.

Every run is a fresh subprocess with its own memory accounting (VmHWM, reset at train begin).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from train_throughput import free_port, git_state, summarise_run  # noqa: E402

WORKER = os.path.join(REPO, "benchmarks", "_train_worker.py")
QUANTS = ("none", "nf4", "int8")
LABEL = {"none": "fp32 base", "nf4": "NF4 base (4-bit)", "int8": "8-bit base"}
EVAL_FLAGS = {"none": [], "nf4": ["--load_in_4bit", "--use_bnb_nested_quant"], "int8": ["--load_in_8bit"]}
ENV = dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
           PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="default,peer,1b")
    p.add_argument("--workdir", default=os.path.join(REPO, "outputs", "bench-qlora"))
    p.add_argument("--output", help="also write the report (markdown) here")
    return p.parse_args(argv)


def run(command: list[str], log: str, timeout: int = 3600) -> None:
    with open(log, "w") as f:
        rc = subprocess.run(command, cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    if rc != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed ({rc}); log {log}:\n{open(log).read()[-4000:]}")


def worker(out: str, variant: str, quant: str, model: str, dataset: str, warmup: int, steps: int, batch: int = 8,
           extra: str = "") -> dict:
    """One training run through benchmarks/_train_worker.py (cached in `out`); its summary."""
    result = os.path.join(out, "rank0.json")
    if not os.path.isfile(result):
        os.makedirs(out, exist_ok=True)
        run([sys.executable, WORKER, "--variant", variant, "--model", model, "--dataset", dataset, "--batch", str(batch),
             "--threads", "2", "--warmup", str(warmup), "--steps", str(steps), "--quant", quant, "--out", out,
             "--extra", extra], os.path.join(out, "log.txt"))
    with open(result) as f:
        rank = json.load(f)
    summary = summarise_run([rank], rank["wall_seconds"], None, warmup, steps)
    summary["footprint_mib"] = rank["model_footprint_bytes"] / 2**20
    return summary


def part_default(workdir: str, model: str) -> dict:
    from asymllm.data import BUILTIN_DATASET, BUILTIN_HELDOUT

    results = {}
    for quant in QUANTS:
        out = os.path.join(workdir, f"default-{quant}")
        results[quant] = worker(out, "asymllm", quant, model, BUILTIN_DATASET, warmup=3, steps=117,
                                extra=f"--eval_dataset {BUILTIN_HELDOUT}")
        with open(os.path.join(out, "run", "metrics.json")) as f:
            results[quant]["eval_loss"] = json.load(f)["eval_loss"]
        summary_file = os.path.join(out, "eval", "alpaca_results.json")
        if not os.path.isfile(summary_file):
            run([sys.executable, "-m", "asymllm.cli", "eval", "alpaca", "--adapter", os.path.join(out, "run", "adapter"),
                 "--max_new_tokens", "64", "--batch_size", "40", "--no_progress", "--output_dir", os.path.join(out, "eval"),
                 *EVAL_FLAGS[quant]], os.path.join(out, "eval.log"))
        results[quant]["exact_match"] = _exact_match(os.path.join(out, "eval"))
        results[quant]["correct"] = _correct_by_item(os.path.join(out, "eval"))
    for quant in QUANTS[1:]:
        results[quant]["paired_vs_fp32"] = paired_difference(results["none"]["correct"], results[quant]["correct"])
    return results


def _correct_by_item(folder: str) -> dict[str, bool]:
    """{item key: exact match} of one evaluation, from its generations and the built-in references."""
    from asymllm.evaluation.instructions import load_instructions

    references = {item.key: item.reference for item in load_instructions(None)}
    with open(os.path.join(folder, "generations.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["key"]: r["output"].strip() == references[r["key"]].strip() for r in records}


def paired_difference(base: dict[str, bool], other: dict[str, bool]) -> dict:
    """Exact match of `other` minus `base` on the same items: mean, Student-t 95% interval, discordant items."""
    keys = sorted(set(base) & set(other))
    diffs = [int(other[k]) - int(base[k]) for k in keys]
    n, mean = len(diffs), statistics.fmean(diffs)
    half = 1.98 * statistics.stdev(diffs) / n ** 0.5 if n > 1 else float("nan")  # t(0.975, ~119 df)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half,
            "only_base": sum(d < 0 for d in diffs), "only_other": sum(d > 0 for d in diffs)}


def _exact_match(folder: str) -> dict:
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json") and name not in ("model_outputs.json",):
            with open(os.path.join(folder, name)) as f:
                data = json.load(f)
            if isinstance(data, dict) and data.get("exact_match"):
                return data["exact_match"]
    raise SystemExit(f"no exact-match summary in {folder}")


def part_peer(workdir: str, model: str) -> dict:
    from asymllm.data import BUILTIN_DATASET

    runs = {"asymllm": [], "peer": []}
    for repeat in range(2):
        order = ("asymllm", "peer") if repeat % 2 == 0 else ("peer", "asymllm")
        for variant in order:
            runs[variant].append(worker(os.path.join(workdir, f"peer-{variant}-{repeat}"), variant, "nf4", model,
                                        BUILTIN_DATASET, warmup=3, steps=20))
    return {v: {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                "peak_train_mib": statistics.median(r["peak_train_mib"] for r in rs),
                "trainable": rs[0]["trainable"], "runs": [round(r["tokens_per_s"], 1) for r in rs]}
            for v, rs in runs.items()}


def one_billion_model(workdir: str, tokenizer_from: str) -> str:
    """A Llama of about 1.0B parameters (TinyLlama's widths, 18 layers, SmolLM2's vocabulary), random, saved in fp32."""
    folder = os.path.join(workdir, "llama-1b")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5632, num_hidden_layers=18,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    model.save_pretrained(folder, max_shard_size="1GB")
    tokenizer.save_pretrained(folder)
    return folder


def part_1b(workdir: str, model: str) -> dict:
    from asymllm.data import BUILTIN_DATASET

    big = one_billion_model(workdir, model)
    return {quant: worker(os.path.join(workdir, f"1b-{quant}"), "asymllm", quant, big, BUILTIN_DATASET, warmup=1, steps=1,
                          batch=1, extra="--max_length 256") for quant in ("none", "nf4")}


def _paired(r: dict) -> str:
    p = r.get("paired_vs_fp32")
    if not p:
        return ""
    return (f"; vs fp32 {100 * p['mean']:+.1f} points [{100 * p['low']:+.1f}, {100 * p['high']:+.1f}], "
            f"{p['only_base']} items right only on fp32, {p['only_other']} only here")


def report(results: dict, seconds: float) -> str:
    import torch
    import transformers

    import bitsandbytes
    import peft
    import trl

    lines = [f"- run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, transformers "
             f"{transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}, bitsandbytes "
             f"{bitsandbytes.__version__}, {os.cpu_count()} CPUs; {git_state()}; {seconds / 60:.1f} min", ""]
    if "default" in results:
        d = results["default"]
        base = d["none"]
        lines += ["| built-in default, 120 steps | peak RSS training (MiB) | model in memory (MiB) | loss tokens/s | "
                  "held-out loss | exact match (held-out, n) |", "|---|---|---|---|---|---|"]
        for q in QUANTS:
            r = d[q]
            em = r["exact_match"]
            lines.append(f"| {LABEL[q]} | {r['peak_train_mib']:.0f} ({r['peak_train_mib'] / base['peak_train_mib']:.2f}x) | "
                         f"{r['footprint_mib']:.0f} ({r['footprint_mib'] / base['footprint_mib']:.2f}x) | "
                         f"{r['tokens_per_s']:.0f} ({r['tokens_per_s'] / base['tokens_per_s']:.2f}x) | {r['eval_loss']:.4f} | "
                         f"{100 * em['accuracy']:.1f}% ({em['n_correct']}/{em['n']}){_paired(r)} |")
        lines.append("")
    if "peer" in results:
        p = results["peer"]
        a, t = p["asymllm"], p["peer"]
        lines += ["| NF4 base, 20 timed steps, 2 runs each | loss tokens/s (runs) | peak RSS training (MiB) | trainable |",
                  "|---|---|---|---|",
                  f"| asymllm A_rand_hB_zero | {a['tokens_per_s']:.0f} ({', '.join(map(str, a['runs']))}) | {a['peak_train_mib']:.0f} | {a['trainable']:,} |",
                  f"| TRL SFTTrainer + peft LoRA | {t['tokens_per_s']:.0f} ({', '.join(map(str, t['runs']))}) | {t['peak_train_mib']:.0f} | {t['trainable']:,} |",
                  f"| ratio asymllm / peer | {a['tokens_per_s'] / t['tokens_per_s']:.3f}x | {a['peak_train_mib'] / t['peak_train_mib']:.3f}x | |", ""]
    if "1b" in results:
        b = results["1b"]
        lines += ["| ~1.0B Llama, one step, batch 1 (built-in data, max length 256) | peak RSS training (MiB) | model in memory (MiB) | "
                  "peak RSS before training (MiB) | step s |", "|---|---|---|---|---|"]
        for q in ("none", "nf4"):
            r = b[q]
            lines.append(f"| {LABEL[q]} | {r['peak_train_mib']:.0f} ({r['peak_train_mib'] / b['none']['peak_train_mib']:.3f}x) | "
                         f"{r['footprint_mib']:.0f} ({r['footprint_mib'] / b['none']['footprint_mib']:.3f}x) | "
                         f"{r['peak_load_mib']:.0f} | {r['seconds']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from asymllm.builtin import resolve_model

    model = resolve_model(None)
    os.makedirs(args.workdir, exist_ok=True)
    start = time.perf_counter()
    parts = {"default": part_default, "peer": part_peer, "1b": part_1b}
    results = {}
    for name in args.parts.split(","):
        results[name] = parts[name](args.workdir, model)
        for run_result in (results[name].values() if name == "default" else []):
            run_result.pop("correct", None)  # per item: in WORKDIR, not in the summary
        with open(os.path.join(args.workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
    text = report(results, time.perf_counter() - start)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
