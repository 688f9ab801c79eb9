"""`asymllm export --format gguf` on SmolLM2-135M with a trained adapter, then the files run in
llama.cpp itself: does llama.cpp tokenize as the model's tokenizer does, and is its greedy reply
the one transformers gives?

For each --gguf_type: the export (seconds, file size, its own verification line), then, in the
interpreter given by --llama_cpp_python (one where `pip install llama-cpp-python` built llama.cpp;
not a project dependency: it compiles llama.cpp, ~20 min on 2 cores), the file is loaded by
llama.cpp and
- PROBES (chat prompts, digits, emoji, code) are tokenized by llama.cpp (special tokens parsed)
  and compared id for id with the HF tokenizer;
- each chat prompt's greedy continuation (argmax over llama.cpp's logits, GREEDY tokens) is
  compared with transformers' greedy continuation of base + adapter (peft, fp32).

    . .venv/bin/activate
    bash run.sh train --max_steps 40 --learning_rate 3e-3 --output_dir outputs/gguf_demo   # or any run
    python benchmarks/gguf_llama_cpp.py --adapter outputs/gguf_demo --llama_cpp_python /tmp/lcpvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GREEDY = 24
QUESTIONS = ("What is the capital of France?", "Reverse the word 'planet'.", "Give me three colours, comma-separated.")
PROBES = ("What is 12 + 30? Write a haiku about autumn leaves, in 2024.", "def add(a, b):\n    return a + b  # 🦙",
          "  leading spaces, tabs\tand\nnewlines; prices $3.50 and 1,000,000 items.")

# Run in the llama.cpp interpreter: tokens of each text, and each prompt's greedy continuation.
LLAMA_CPP_CHILD = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
job = json.load(open(sys.argv[1]))
llm = Llama(model_path=job["model"], n_ctx=1024, n_threads=2, logits_all=True, verbose=False)
out = {"tokens": [llm.tokenize(t.encode(), add_bos=False, special=True) for t in job["texts"]], "greedy": []}
for ids in job["prompts"]:
    llm.reset()
    llm.eval(ids)
    reply = []
    for _ in range(job["n"]):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        reply.append(token)
        if token == job["eos"]:
            break
        llm.eval([token])
    out["greedy"].append(reply)
json.dump(out, open(sys.argv[2], "w"))
"""


def transformers_greedy(base_dir: str, adapter_dir: str, prompts: list[list[int]], eos: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    from asymllm.adapters.files import load_lorasym_model

    model = load_lorasym_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir).eval()
    replies = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=GREEDY, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos)
            replies.append(out[0, len(ids):].tolist())
    return replies


def run_llama_cpp(python: str, model: str, texts: list[str], prompts: list[list[int]], eos: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        job, result, child = (os.path.join(scratch, n) for n in ("job.json", "out.json", "child.py"))
        json.dump({"model": model, "texts": texts, "prompts": prompts, "n": GREEDY, "eos": eos}, open(job, "w"))
        open(child, "w").write(LLAMA_CPP_CHILD)
        subprocess.run([python, child, job, result], check=True)
        return json.load(open(result))


def same_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="a run folder or adapter folder on the built-in SmolLM2")
    parser.add_argument("--types", default="f32,f16,bf16,q8_0")
    parser.add_argument("--llama_cpp_python", help="python with llama_cpp importable (else only the export is measured)")
    parser.add_argument("--workdir", default=os.path.join(REPO, "outputs", "gguf_llama_cpp"))
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from asymllm.export.command import export
    from asymllm.export.source import find_adapter_dir, resolve_base

    adapter_dir = find_adapter_dir(args.adapter)
    base_dir = resolve_base(None, adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if os.path.isfile(os.path.join(adapter_dir, "tokenizer.json"))
                                              else base_dir)
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in QUESTIONS]
    texts = [*chats, *PROBES]
    hf_tokens = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    prompts = hf_tokens[:len(chats)]
    eos = tokenizer.eos_token_id
    reference = transformers_greedy(base_dir, adapter_dir, prompts, eos)
    print(f"adapter {adapter_dir}; base {base_dir}; transformers greedy replies:")
    for q, r in zip(QUESTIONS, reference):
        print(f"  {q!r} -> {tokenizer.decode(r, skip_special_tokens=True)!r}")
    rows = []
    for gguf_type in args.types.split(","):
        out = os.path.join(args.workdir, gguf_type)
        start = time.perf_counter()
        result = export(adapter=args.adapter, output=out, format="gguf", gguf_type=gguf_type, overwrite=True)
        seconds = time.perf_counter() - start
        path = os.path.join(out, result.files[0])
        row = {"type": gguf_type, "MB": os.path.getsize(path) / 1e6, "export_s": seconds, "check": result.checked}
        if args.llama_cpp_python:
            got = run_llama_cpp(args.llama_cpp_python, path, texts, prompts, eos)
            row["tokens_equal"] = sum(a == b for a, b in zip(got["tokens"], hf_tokens))
            row["greedy_equal"] = sum(a == b for a, b in zip(got["greedy"], reference))
            row["greedy_prefix"] = [same_prefix(a, b) for a, b in zip(got["greedy"], reference)]
            row["llama_cpp_replies"] = [tokenizer.decode(g, skip_special_tokens=True) for g in got["greedy"]]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    lengths = [len(r) for r in reference]
    print(f"| gguf_type | file MB | export s (incl. check) | texts tokenized as HF ({len(texts)}) | "
          f"greedy replies equal to transformers' ({len(prompts)}) | equal leading tokens per reply (transformers' "
          f"replies: {lengths} tokens, {GREEDY} at most) |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['type']} | {r['MB']:.1f} | {r['export_s']:.1f} | {r.get('tokens_equal', '-')} | "
              f"{r.get('greedy_equal', '-')} | {r.get('greedy_prefix', '-')} |")
    print()
    for r in rows:
        print(f"{r['type']}: verification {r['check']}")


if __name__ == "__main__":
    main()
