"""Instruction data: load, validate and normalise it into conversations (`Example`s).

    from asymllm.data import load_examples, split_heldout
    examples, skips = load_examples("my_data.jsonl")       # or .json .csv .parquet, a folder, a hub name
    train, heldout = split_heldout(examples, fraction=0.05, seed=42)
    # into token ids with response-only labels: asymllm.training.tokenize.tokenize_examples

Accepted layouts, detected per file from its first example (other fields are kept in
`Example.meta` and otherwise ignored):

    alpaca             {"instruction": "Add the numbers.", "input": "2 3", "output": "5"}
                       `input` and `system` optional; the user turn is the instruction,
                       then a blank line and the input when there is one
    chat               {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
                       roles system / user / assistant; it must end with an assistant turn
    prompt/completion  {"prompt": "2 + 3?", "completion": "5"}   (strings: one user and one assistant turn;
                       `system` optional) or lists of messages like `messages` above
    sharegpt           {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
                       `from` human / gpt / system (user and assistant too); a top-level
                       `system` optional; it must end with a gpt (assistant) turn

Files (.jsonl, .json, .csv, .parquet, a hub dataset or a local dataset folder) and the
locations in messages (`file:LINE`, `name[ROW]`): asymllm.records.

Errors vs skips. A `DataError` (naming location and field) for: malformed JSON, a
missing or non-string required field, an empty response (output / completion / any
assistant turn, blank or whitespace), an empty user turn or instruction, an unknown role,
a conversation not ending with an assistant turn, an unknown or ambiguous layout, and a
file with no examples. Skipped and counted in the `SkipReport`: records with no value in
any field (blank JSONL lines, empty CSV rows, all-null parquet rows) - padding, not
examples. Counted and kept: exact duplicates.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from .records import DataError, read_records  # DataError is the data API's one error, raised by the readers too

logger = logging.getLogger(__name__)

_DATA_DIR = Path(__file__).resolve().parent / "data"
# The built-in dataset (alpaca JSON Lines, written by benchmarks/make_builtin_data.py):
# 480 train and 120 held-out examples, 6 task families with short exact-match answers;
# each record's "task" field (the family) ends up in Example.meta["task"].
BUILTIN_DATASET = str(_DATA_DIR / "builtin_instructions.jsonl")
BUILTIN_HELDOUT = str(_DATA_DIR / "builtin_instructions_heldout.jsonl")

# layout -> fields it requires; detection looks for these on the first example.
LAYOUTS = {"alpaca": ("instruction", "output"), "chat": ("messages",), "prompt/completion": ("prompt", "completion"),
           "sharegpt": ("conversations",)}
ACCEPTED = (
    "accepted layouts: alpaca {instruction, input (optional), output}; chat {messages: [{role, content}, ...]}; "
    "prompt/completion {prompt, completion} (strings or lists of messages); "
    "sharegpt {conversations: [{from: human|gpt|system, value}, ...]}"
)
EMPTY_RECORD = "empty record (no field has a value)"
ROLES = ("system", "user", "assistant")
# ShareGPT's speaker names (`from`), and the chat roles they are
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Example:
    """One conversation, normalised: roles in ROLES, ending with an assistant turn."""

    messages: list[dict]
    source: str  # "file:line" for text files, "name[row]" for parquet and hub datasets
    meta: dict = field(default_factory=dict)  # the record's other fields (e.g. the built-in data's "task")

    @property
    def prompt_messages(self) -> list[dict]:
        """Everything before the final response: what a generation is conditioned on."""
        return self.messages[:-1]

    @property
    def response(self) -> str:
        """The final assistant turn's content: the reference answer."""
        return self.messages[-1]["content"]


@dataclass
class SkipReport:
    """What load_examples read, skipped (with where) and noticed; `summary()` for the log."""

    source: str
    n_read: int = 0  # records, skipped ones included
    n_kept: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> locations
    duplicates: list[str] = field(default_factory=list)  # locations of exact repeats (kept)

    @property
    def n_skipped(self) -> int:
        return sum(len(locations) for locations in self.skipped.values())

    def skip(self, reason: str, location: str) -> None:
        self.skipped.setdefault(reason, []).append(location)

    def summary(self) -> str:
        line = (
            f"{self.source}: {self.n_read} records read, {self.n_kept} examples kept, {self.n_skipped} skipped, "
            f"{len(self.duplicates)} exact duplicates (kept)"
        )
        for reason, locations in self.skipped.items():
            line += f"; skipped {len(locations)} {reason}: {_sample(locations)}"
        if self.duplicates:
            line += f"; duplicates at {_sample(self.duplicates)}"
        return line


def _sample(items: list[str], shown: int = 3) -> str:
    return ", ".join(items[:shown]) + (", ..." if len(items) > shown else "")


def load_examples(source: str, split: str = "train") -> tuple[list[Example], SkipReport]:
    """Every example of `source` as a normalised conversation, and what was skipped."""
    source = os.fspath(source)
    report = SkipReport(source)
    layout, examples, seen = None, [], {}
    for location, record in read_records(source, split):
        report.n_read += 1
        if record is None or not any(_has_value(value) for value in record.values()):
            report.skip(EMPTY_RECORD, location)
            continue
        layout = layout or _detect_layout(record, location)
        example = _to_example(layout, record, location)
        key = json.dumps(example.messages, sort_keys=True)
        if key in seen:
            report.duplicates.append(f"{location} (= {seen[key]})")
        else:
            seen[key] = location
        examples.append(example)
    if not examples:
        detail = f" ({report.n_skipped} empty records)" if report.n_read else ""
        raise DataError(f"{source}: no examples in it{detail}")
    report.n_kept = len(examples)
    if report.n_skipped:  # the caller logs the summary; a skip is also a warning here, so none goes unseen
        logger.warning(report.summary())
    return examples, report


def split_heldout(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, heldout): a seeded random `fraction` held out, both keeping the input order."""
    if not 0 <= fraction < 1:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return list(examples), []
    n_heldout = max(1, round(len(examples) * fraction))
    if n_heldout >= len(examples):
        raise DataError(f"cannot hold out {fraction:.0%} of {len(examples)} examples and keep any to train on")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_heldout])
    train = [example for i, example in enumerate(examples) if i not in held]
    return train, [example for i, example in enumerate(examples) if i in held]


def _has_value(value) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, (list, tuple, dict)):
        return bool(value)
    return value is not None


# --- records into conversations ----------------------------------------------------------


def _detect_layout(record: dict, location: str) -> str:
    """The layout whose required fields the first example has (all of them, else some of them)."""
    keys = set(record)
    complete = [name for name, fields in LAYOUTS.items() if keys >= set(fields)]
    partial = [name for name, fields in LAYOUTS.items() if keys & set(fields)]
    candidates = complete or partial
    if len(candidates) == 1:
        return candidates[0]
    found = f"fields found at {location}: {sorted(keys)}"
    if candidates:
        both = " and ".join(candidates)
        raise DataError(f"{location}: ambiguous layout, it has the fields of {both}; {found}; {ACCEPTED}")
    raise DataError(f"{location}: unknown layout; {found}; {ACCEPTED}")


def _to_example(layout: str, record: dict, location: str) -> Example:
    if layout == "alpaca":
        instruction = _text(record, "instruction", location, required=True)
        extra = _text(record, "input", location, required=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        output = _text(record, "output", location, required=True)
        messages = _with_system(record, location, [_turn("user", user), _turn("assistant", output)])
        used = ("instruction", "input", "output", "system")
    elif layout == "chat":
        if record.get("messages") is None:
            raise DataError(f"{location}: missing field 'messages'")
        messages = _messages(_json_cell(record["messages"], location, "messages"), location, "messages")
        used = ("messages",)
    elif layout == "prompt/completion":
        messages = _side(record, "prompt", "user", location) + _side(record, "completion", "assistant", location)
        if isinstance(record.get("prompt"), str):
            messages = _with_system(record, location, messages)
        used = ("prompt", "completion", "system")
    elif layout == "sharegpt":
        if record.get("conversations") is None:
            raise DataError(f"{location}: missing field 'conversations'")
        turns = _sharegpt_turns(_json_cell(record["conversations"], location, "conversations"), location)
        messages = turns if turns[0]["role"] == "system" else _with_system(record, location, turns)
        used = ("conversations", "system")
    else:
        raise AssertionError(f"unhandled layout {layout!r}")
    _check_conversation(messages, location, {"prompt/completion": "completion", "sharegpt": "conversations"}.get(layout, "messages"))
    meta = {key: value for key, value in record.items() if key not in used}
    return Example(messages=messages, source=location, meta=meta)


def _text(record: dict, name: str, location: str, required: bool, label: str | None = None) -> str:
    """record[name] as a string; `label` is the field's name in messages (default `name`)."""
    label = label or name
    value = record.get(name)
    if value is None:
        if required:
            raise DataError(f"{location}: missing field '{label}'")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{location}: field '{label}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{location}: field '{label}' is empty")
    return value


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _with_system(record: dict, location: str, messages: list[dict]) -> list[dict]:
    system = _text(record, "system", location, required=False)
    return [_turn("system", system), *messages] if system.strip() else messages


def _side(record: dict, name: str, role: str, location: str) -> list[dict]:
    """A prompt/completion field: a string is one turn of `role`, a list is messages."""
    value = record.get(name)
    if isinstance(value, (list, tuple)):
        return _messages(value, location, name)
    return [_turn(role, _text(record, name, location, required=True))]


def _json_cell(value, location: str, name: str):
    """CSV cells are strings: a `messages` cell holds JSON."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise DataError(f"{location}: field '{name}' is not valid JSON ({error.msg}, column {error.colno})") from None


def _messages(value, location: str, name: str) -> list[dict]:
    return _turns(value, location, name, {role: role for role in ROLES}, "role", "content", "messages")


def _sharegpt_turns(value, location: str) -> list[dict]:
    """ShareGPT's [{from, value}, ...] as chat messages."""
    return _turns(value, location, "conversations", SHAREGPT_ROLES, "from", "value", "turns")


def _turns(value, location: str, name: str, roles: dict, speaker: str, text: str, noun: str) -> list[dict]:
    """A list of {speaker: ..., text: ...} objects as chat messages; `roles` maps speakers to roles."""
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{location}: field '{name}' must be a non-empty list of {{{speaker}, {text}}} {noun}")
    messages = []
    for k, turn in enumerate(value):
        here = f"{name}[{k}]"
        if not isinstance(turn, dict):
            raise DataError(f"{location}: field '{here}' must be an object with '{speaker}' and '{text}'")
        who = turn.get(speaker)
        if who not in roles:
            raise DataError(f"{location}: field '{here}.{speaker}' is {who!r}; expected one of {', '.join(roles)}")
        role = roles[who]
        messages.append(_turn(role, _text(turn, text, location, required=role != "system", label=f"{here}.{text}")))
    return messages


def _check_conversation(messages: list[dict], location: str, name: str) -> None:
    last = messages[-1]["role"]
    if last != "assistant":
        raise DataError(
            f"{location}: field '{name}' ends with a {last!r} turn; "
            f"a conversation must end with the assistant's response"
        )
