"""Instruction sets for generation, and alpaca_eval's model-outputs JSON.

    from asymllm.evaluation.instructions import load_instructions, write_model_outputs
    items = load_instructions("alpaca_eval.json")        # or an alpaca .jsonl; default: the built-in held-out set
    write_model_outputs("out/model_outputs.json", items, outputs, generator="my-run")

Inputs are read with `asymllm.data.load_examples`, so a prompt is built exactly as in
training (alpaca `input` joined to the instruction with a blank line; chat files keep their
turns). Accepted: alpaca_eval's JSON (`instruction`, `output` = the reference, `dataset`,
`generator`), alpaca JSON/JSONL (`instruction`, `input`, `output`, any `task`), chat files.
A .json/.jsonl file of bare instructions (no `output` anywhere) is accepted too: then there
is no reference to judge against or to match exactly, only another run's outputs.

alpaca_eval matches a model's outputs to the reference by the `instruction` string; ours
is the last user turn (for alpaca data with an `input`: instruction + blank line + input).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..data import BUILTIN_HELDOUT, DataError, load_examples


class InstructionsError(ValueError):
    """An instruction or model-outputs file that cannot be used; the message names it."""


@dataclass
class Instruction:
    key: str  # stable id: a hash of the prompt messages, "#n" appended for the n-th repeat
    instruction: str  # the last user turn, the string alpaca_eval matches outputs on
    messages: list[dict]  # the prompt: everything before the response
    reference: str | None  # the dataset's output, if it has one
    group: str | None  # the record's `task` (built-in data) or `dataset` (alpaca_eval) field
    dataset: str  # alpaca_eval's `dataset` field of the written outputs


def load_instructions(source: str | None = None, split: str = "eval", limit: int | None = None) -> list[Instruction]:
    """The first `limit` (all if None) instructions of `source` (default: the built-in held-out set)."""
    source = os.fspath(source or BUILTIN_HELDOUT)
    try:
        examples, _ = load_examples(source, split=split)
        rows = [(e.prompt_messages, e.response, e.meta) for e in examples]
    except DataError:
        rows = _bare_instructions(source)
        if rows is None:
            raise
    if limit is not None:
        if limit < 1:
            raise InstructionsError(f"--limit must be a positive number of instructions, got {limit}")
        rows = rows[:limit]
    stem = Path(source).stem
    items, seen = [], {}
    for messages, reference, meta in rows:
        user_turns = [m["content"] for m in messages if m["role"] == "user"]
        if not user_turns:
            raise InstructionsError(f"{source}: a prompt without a user turn: {messages}")
        digest = hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
        seen[digest] = seen.get(digest, 0) + 1
        key = digest if seen[digest] == 1 else f"{digest}#{seen[digest]}"
        group = meta.get("task", meta.get("dataset"))
        items.append(Instruction(
            key=key, instruction=user_turns[-1], messages=messages, reference=reference,
            group=None if group is None else str(group), dataset=str(meta.get("dataset", meta.get("task", stem))),
        ))
    return items


def _bare_instructions(source: str) -> list[tuple] | None:
    """Rows of a .json/.jsonl file whose records all have an instruction and none an output; else None."""
    path = Path(source)
    if path.suffix.lower() not in (".json", ".jsonl") or not path.is_file():
        return None
    text = path.read_text(encoding="utf-8-sig")
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        try:
            records = [json.loads(line) for line in text.split("\n") if line.strip()]
        except json.JSONDecodeError:
            return None
    if not isinstance(records, list) or not records:
        return None
    rows = []
    for record in records:
        if not isinstance(record, dict) or "output" in record:
            return None
        instruction, extra = record.get("instruction"), record.get("input") or ""
        if not isinstance(instruction, str) or not instruction.strip():
            return None
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        meta = {k: v for k, v in record.items() if k not in ("instruction", "input", "system")}
        rows.append((messages + [{"role": "user", "content": user}], None, meta))
    return rows


def write_model_outputs(path: str, items: list[Instruction], outputs: dict[str, str], generator: str) -> str:
    """alpaca_eval's model-outputs JSON, [{instruction, output, generator, dataset}], in data order,
    for the items that have an output. Written atomically (a temporary file, then renamed)."""
    records = [
        {"instruction": item.instruction, "output": outputs[item.key], "generator": generator, "dataset": item.dataset}
        for item in items if item.key in outputs
    ]
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)
    return path


def read_model_outputs(path: str) -> tuple[dict[str, str], str | None]:
    """(instruction -> output, generator name) of an alpaca_eval model-outputs JSON; first output
    kept for a repeated instruction."""
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except FileNotFoundError:
        raise InstructionsError(f"--reference_outputs {path}: file not found") from None
    except json.JSONDecodeError as error:
        raise InstructionsError(f"--reference_outputs {path}: malformed JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise InstructionsError(f"--reference_outputs {path}: expected alpaca_eval's list of {{instruction, output}} objects")
    outputs, generators = {}, set()
    for number, record in enumerate(records):
        if not isinstance(record.get("instruction"), str) or not isinstance(record.get("output"), str):
            raise InstructionsError(f"--reference_outputs {path}[{number}]: needs string fields 'instruction' and 'output'")
        outputs.setdefault(record["instruction"], record["output"])
        if record.get("generator"):
            generators.add(str(record["generator"]))
    generator = generators.pop() if len(generators) == 1 else None
    return outputs, generator
