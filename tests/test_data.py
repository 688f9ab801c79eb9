"""The data layer: loading every layout from every file type, errors that name file:line and
field, skip counting, held-out splits, response-only loss masks with the real SmolLM2
tokenizer (tokenizer only: fast), and the shipped built-in dataset."""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
from pathlib import Path

import pytest

from asymllm.data import BUILTIN_DATASET, BUILTIN_HELDOUT, DataError, Example, load_examples, split_heldout
from asymllm.chat_templates import TEMPLATES
from asymllm.tokenizer import ensure_chat_template, ensure_pad_token
from asymllm.training.tokenize import IGNORE_INDEX, tokenize_examples

REPO = Path(__file__).resolve().parent.parent

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
]
ALPACA_MESSAGES = [
    [{"role": "user", "content": "Add the numbers.\n\n2 3"}, {"role": "assistant", "content": "5"}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
]
CHAT = [{"messages": messages} for messages in ALPACA_MESSAGES]
PROMPT_COMPLETION = [
    {"prompt": "Add the numbers.\n\n2 3", "completion": "5"},
    {"prompt": "Say hi.", "completion": "hi"},
]
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Add the numbers.\n\n2 3"}, {"from": "gpt", "value": "5"}]},
    {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
]
LAYOUTS = {"alpaca": ALPACA, "chat": CHAT, "prompt/completion": PROMPT_COMPLETION, "sharegpt": SHAREGPT}


def write(path: Path, records: list[dict]) -> Path:
    """records in the file type of path's suffix (chat messages as JSON text in CSV cells)."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    elif suffix == ".json":
        path.write_text(json.dumps(records, indent=2))
    elif suffix == ".csv":
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]))
            writer.writeheader()
            for record in records:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in record.items()})
    elif suffix == ".parquet":
        import datasets

        datasets.Dataset.from_list(records).to_parquet(str(path))
    else:
        raise ValueError(suffix)
    return path


# --- layouts x file types ---------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_loads_from_every_file_type(tmp_path, layout, suffix):
    path = write(tmp_path / f"data{suffix}", LAYOUTS[layout])
    examples, report = load_examples(str(path))
    assert [example.messages for example in examples] == ALPACA_MESSAGES
    assert report.n_read == report.n_kept == 2 and report.n_skipped == 0
    first_location = {".jsonl": f"{path}:1", ".csv": f"{path}:2", ".parquet": f"{path}[0]", ".json": f"{path}:2"}
    assert examples[0].source == first_location[suffix]


def test_conversational_prompt_completion_and_system(tmp_path):
    records = [
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"}],
            "completion": [{"role": "assistant", "content": "5"}],
        },
        {"prompt": "2 + 2?", "completion": "4", "system": "Be brief."},
    ]
    examples, _ = load_examples(str(write(tmp_path / "pc.jsonl", records)))
    assert examples[0].messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2 + 3?"},
        {"role": "assistant", "content": "5"},
    ]
    assert examples[1].messages[0] == {"role": "system", "content": "Be brief."}


def test_alpaca_extra_fields_kept_in_meta_and_helpers(tmp_path):
    path = write(tmp_path / "a.jsonl", [{**ALPACA[0], "task": "add", "id": 7}])
    (example,), _ = load_examples(str(path))
    assert example.meta == {"task": "add", "id": 7}
    assert example.response == "5" and example.prompt_messages == ALPACA_MESSAGES[0][:1]


def test_json_object_wrapper_and_jsonl_named_json(tmp_path):
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": ALPACA}, indent=2))
    examples, _ = load_examples(str(wrapped))
    assert [e.messages for e in examples] == ALPACA_MESSAGES
    assert examples[1].source == f"{wrapped}:9"  # where the second example's "{" is
    by_split = tmp_path / "split.json"
    by_split.write_text(json.dumps({"test": ALPACA[:1], "train": ALPACA}))
    assert len(load_examples(str(by_split), split="test")[0]) == 1
    lines = write(tmp_path / "lines.jsonl", ALPACA)
    named_json = tmp_path / "lines.json"
    named_json.write_text(lines.read_text())
    assert [e.messages for e in load_examples(str(named_json))[0]] == ALPACA_MESSAGES


def test_jsonl_line_separator_inside_a_string_is_not_a_line_break(tmp_path):
    record = {"instruction": "Copy this.", "output": "a\u2028b"}  # U+2028: str.splitlines() would split here
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n" + json.dumps(ALPACA[0]) + "\n", encoding="utf-8")
    examples, _ = load_examples(str(path))
    assert examples[0].response == "a\u2028b" and examples[1].source == f"{path}:2"


# --- errors name file, line and field -----------------------------------------------------


def lines_file(tmp_path, *lines: str, name="data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def error_of(source, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_examples(str(source), **kwargs)
    return str(info.value)


def test_malformed_json_line(tmp_path):
    path = lines_file(tmp_path, json.dumps(ALPACA[0]), json.dumps(ALPACA[1]), '{"instruction": "x", "output": ')
    assert error_of(path).startswith(f"{path}:3: malformed JSON")


def test_malformed_json_array(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]\n')
    assert error_of(path).startswith(f"{path}:3: malformed JSON")


def test_missing_field(tmp_path):
    path = lines_file(tmp_path, json.dumps(ALPACA[0]), json.dumps({"instruction": "Say hi."}))
    assert error_of(path) == f"{path}:2: missing field 'output'"


def test_missing_field_of_chat_and_prompt_completion(tmp_path):
    path = lines_file(tmp_path, json.dumps(CHAT[0]), json.dumps({"id": 3}))
    assert error_of(path) == f"{path}:2: missing field 'messages'"
    path = lines_file(tmp_path, json.dumps(PROMPT_COMPLETION[0]), json.dumps({"prompt": "x"}), name="pc.jsonl")
    assert error_of(path) == f"{path}:2: missing field 'completion'"
    turn = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}
    path = lines_file(tmp_path, json.dumps(turn), name="turn.jsonl")
    assert error_of(path) == f"{path}:1: missing field 'messages[1].content'"


def test_missing_field_in_json_array_names_its_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([ALPACA[0], {"instruction": "Say hi.", "input": ""}], indent=2))
    assert error_of(path) == f"{path}:7: missing field 'output'"


@pytest.mark.parametrize(
    "record, field",
    [
        ({"instruction": "Say hi.", "output": "  \n"}, "output"),
        ({"prompt": "Say hi.", "completion": ""}, "completion"),
        (
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},
            "messages[1].content",
        ),
    ],
)
def test_empty_response(tmp_path, record, field):
    path = lines_file(tmp_path, json.dumps(record))
    assert error_of(path) == f"{path}:1: field '{field}' is empty"


def test_empty_response_in_csv_names_the_row_line(tmp_path):
    path = lines_file(tmp_path, "instruction,input,output", "Say hi.,,hi", "Say bye.,,", name="data.csv")
    assert error_of(path) == f"{path}:3: field 'output' is empty"


@pytest.mark.parametrize(
    "name, text", [("e.jsonl", ""), ("e.json", "[]"), ("e.csv", ""), ("h.csv", "instruction,output\n")]
)
def test_empty_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert error_of(path) == f"{path}: no examples in it"


def test_unknown_and_ambiguous_layouts(tmp_path):
    path = lines_file(tmp_path, json.dumps({"question": "2+2?", "answer": "4"}))
    message = error_of(path)
    assert message.startswith(f"{path}:1: unknown layout") and "['answer', 'question']" in message
    assert "alpaca" in message and "chat" in message and "prompt/completion" in message and "sharegpt {conversations" in message
    both = lines_file(tmp_path, json.dumps({**ALPACA[0], **CHAT[0]}), name="both.jsonl")
    assert error_of(both).startswith(f"{both}:1: ambiguous layout, it has the fields of alpaca and chat")


def test_sharegpt_speakers_system_turns_and_extra_fields(tmp_path):
    records = [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye!"}]},
        {"system": "Answer with a number.", "conversations": [{"from": "user", "value": "2+2?"}, {"from": "assistant", "value": "4"}],
         "id": "q7"},
    ]
    examples, _ = load_examples(str(write(tmp_path / "sharegpt.jsonl", records)))
    assert examples[0].messages == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]
    assert examples[1].messages == [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "2+2?"},
                                    {"role": "assistant", "content": "4"}]
    assert examples[1].meta == {"id": "q7"}


def test_bad_sharegpt_records_name_the_file_line_and_value(tmp_path):
    good = json.dumps(SHAREGPT[0])
    unknown = json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bing", "value": "Yo"}]})
    path = lines_file(tmp_path, good, unknown)
    assert error_of(path) == (f"{path}:2: field 'conversations[1].from' is 'bing'; expected one of human, user, gpt, "
                              "assistant, system")
    ends_with_human = lines_file(tmp_path, json.dumps({"conversations": [{"from": "human", "value": "Hi"}]}), name="end.jsonl")
    assert error_of(ends_with_human).startswith(f"{ends_with_human}:1: field 'conversations' ends with a 'user' turn")
    empty_reply = lines_file(tmp_path, json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": " "}]}),
                             name="empty.jsonl")
    assert error_of(empty_reply) == f"{empty_reply}:1: field 'conversations[1].value' is empty"
    not_a_list = lines_file(tmp_path, json.dumps({"conversations": {"from": "human", "value": "Hi"}}), name="obj.jsonl")
    assert error_of(not_a_list) == f"{not_a_list}:1: field 'conversations' must be a non-empty list of {{from, value}} turns"


def test_a_sharegpt_file_trains(tmp_path):
    """Through `asymllm train` as a user runs it: the file is read as chat and the run saves an adapter."""
    from asymllm.tiny import save_tiny_model
    from asymllm.training.train import main

    data = write(tmp_path / "sharegpt.jsonl", SHAREGPT * 4)
    result = main(["--model", save_tiny_model(str(tmp_path / "model")), "--dataset", str(data), "--output_dir", str(tmp_path / "out"),
                   "--max_steps", "2", "--per_device_train_batch_size", "4", "--save_strategy", "no"])
    assert result["steps"] == 2 and (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_bad_conversations(tmp_path):
    ends_with_user = {"messages": [{"role": "user", "content": "Hi"}]}
    path = lines_file(tmp_path, json.dumps(ends_with_user))
    assert error_of(path).startswith(f"{path}:1: field 'messages' ends with a 'user' turn")
    bad_role = {"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    path = lines_file(tmp_path, json.dumps(bad_role), name="role.jsonl")
    assert error_of(path).startswith(f"{path}:1: field 'messages[0].role' is 'human'")
    not_text = lines_file(tmp_path, json.dumps({"instruction": "Add.", "output": 5}), name="num.jsonl")
    assert error_of(not_text) == f"{not_text}:1: field 'output' must be a string, got int"


def test_missing_file_and_unreachable_hub(tmp_path, monkeypatch):
    missing = tmp_path / "nope.jsonl"
    assert error_of(missing) == f"{missing}: file not found"
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    message = error_of("someone/some-dataset")
    assert message.startswith("someone/some-dataset: not a local file") and "hub unreachable" in message


def test_hub_rows_are_named_by_index(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_list(ALPACA))
    examples, _ = load_examples("someone/alpaca-like")
    assert [e.source for e in examples] == ["someone/alpaca-like[0]", "someone/alpaca-like[1]"]


# --- skips are counted, never silent ------------------------------------------------------------


def test_empty_records_skipped_and_counted_duplicates_kept(tmp_path):
    blank_fields = json.dumps({"instruction": "", "output": None})
    path = lines_file(tmp_path, json.dumps(ALPACA[0]), "", blank_fields, json.dumps(ALPACA[0]))
    examples, report = load_examples(str(path))
    assert len(examples) == 2 and report.n_read == 4 and report.n_kept == 2
    assert report.skipped == {"empty record (no field has a value)": [f"{path}:2", f"{path}:3"]}
    assert report.duplicates == [f"{path}:4 (= {path}:1)"]
    assert "2 skipped" in report.summary() and "1 exact duplicates (kept)" in report.summary()
    csv_path = lines_file(tmp_path, "instruction,input,output", ",,", "Say hi.,,hi", name="d.csv")
    examples, report = load_examples(str(csv_path))
    assert len(examples) == 1 and report.skipped == {"empty record (no field has a value)": [f"{csv_path}:2"]}


def test_split_heldout_is_deterministic_disjoint_and_ordered():
    examples = list(range(100))
    train, heldout = split_heldout(examples, 0.2, seed=3)
    assert (train, heldout) == split_heldout(examples, 0.2, seed=3)
    assert len(heldout) == 20 and sorted(train + heldout) == examples
    assert train == sorted(train) and heldout == sorted(heldout)
    assert split_heldout(examples, 0.2, seed=4)[1] != heldout
    assert split_heldout(examples, 0.0, seed=3) == (examples, [])
    with pytest.raises(DataError):
        split_heldout([1], 0.5, seed=0)


# --- tokenization with the real SmolLM2 tokenizer -------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from asymllm import builtin

    try:
        folder = builtin.builtin_model_dir()
    except builtin.BuiltinModelError as error:
        pytest.skip(str(error))
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture
def tokenizer(smollm2_tokenizer):
    return copy.deepcopy(smollm2_tokenizer)  # tests change the pad token and the template


def example(*turns: str, system: str | None = None, source: str = "test:1") -> Example:
    """turns alternate user, assistant."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]
    return Example(messages=messages, source=source)


def loss_spans(tokenizer, row) -> list[str]:
    """The decoded runs of consecutive loss-bearing tokens."""
    spans, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        assert label in (IGNORE_INDEX, token)
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans += [current] if current else []
    return [tokenizer.decode(span) for span in spans]


def test_loss_only_on_response_and_eos(tokenizer):
    dataset, report = tokenize_examples([example("Reverse: a b c", "c b a")], tokenizer, max_length=None)
    assert dataset.column_names == ["input_ids", "labels"]
    assert loss_spans(tokenizer, dataset[0]) == ["c b a<|im_end|>"]  # not the newline ChatML writes after it
    assert report.n_examples == 1 and report.n_loss_tokens == len(tokenizer("c b a")["input_ids"]) + 1
    # SmolLM2's template adds its default system prompt when there is none; it carries no loss.
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(dataset[0]["input_ids"])


def test_every_assistant_turn_gets_loss_and_no_user_turn(tokenizer):
    conversation = example("first question", "first answer", "second question", "second answer", system="Be brief.")
    dataset, _ = tokenize_examples([conversation], tokenizer, max_length=None)
    assert loss_spans(tokenizer, dataset[0]) == ["first answer<|im_end|>", "second answer<|im_end|>"]


def test_truncation_counted_and_fully_cut_responses_skipped(tokenizer):
    short = example("Say hi.", "hi", source="short:1")
    long_response = example("Say hi.", "hi there, how are you doing today", source="long:1")
    long_prompt = example("word " * 60, "ok", source="prompt:1")
    (short_ids,) = tokenize_examples([short], tokenizer, max_length=None)[0]["input_ids"]
    cut = len(short_ids)  # the short one fits exactly; the long response loses its end
    dataset, report = tokenize_examples([short, long_response, long_prompt], tokenizer, max_length=cut)
    assert report.n_examples == 2 and report.n_truncated == 1 and report.n_skipped == 1
    assert report.skipped == {f"every response token beyond max_length={cut}": ["prompt:1"]}
    assert dataset[0]["input_ids"] == short_ids and len(dataset[1]["input_ids"]) == cut
    assert loss_spans(tokenizer, dataset[1]) == ["hi there,"]  # kept start; its EOS was cut
    assert "1 truncated" in report.summary() and "1 skipped" in report.summary()
    with pytest.raises(DataError, match="no example left"):
        tokenize_examples([long_prompt], tokenizer, max_length=cut)


def test_pad_token_distinct_from_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the converted SmolLM2 ships pad == EOS (docs/design.md, trap 8)
    message = ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert "<|endoftext|>" in message and len(tokenizer) == 49152  # no token added
    assert "kept" in ensure_pad_token(tokenizer)


def test_a_base_whose_vocabulary_has_chatml_tokens_gets_chatml_ending_turns_with_im_end(tokenizer):
    tokenizer.chat_template = None
    tokenizer.eos_token = "<|endoftext|>"  # a base model's EOS: turns still end with <|im_end|>, the turn-end token
    assert "chatml, as its vocabulary has <|im_start|>, <|im_end|> as tokens" in ensure_chat_template(tokenizer)
    assert tokenizer.chat_template == TEMPLATES["chatml"]
    dataset, _ = tokenize_examples([example("q1", "a1", "q2", "a2")], tokenizer, max_length=None)
    assert loss_spans(tokenizer, dataset[0]) == ["a1<|im_end|>", "a2<|im_end|>"]
    assert ensure_chat_template(tokenizer) == "chat template: tokenizer (the tokenizer's own)"


def test_template_that_tokenises_differently_in_context_falls_back_to_offsets(tokenizer):
    # The generation prompt ends in a space, which merges with the response's first word
    # in context (" Hello"), so the prompt's ids are not a prefix of the whole (docs/design.md, trap 9).
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    dataset, report = tokenize_examples([example("Hi", "Hello")], tokenizer, max_length=None)
    assert report.n_offset_fallback == 1
    assert loss_spans(tokenizer, dataset[0]) == [" Hello<|im_end|>"]


def test_template_without_eos_or_unstable_prefix_is_an_error(tokenizer):
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    with pytest.raises(DataError, match="test:1: assistant turn 1 does not end with a token that ends a reply \\('<\\|im_end\\|>'\\)"):
        tokenize_examples([example("Hi", "Hello")], tokenizer, max_length=None)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}"
        "{% if loop.last %}{{ '[END]' }}{% endif %}{% endfor %}"
    )
    with pytest.raises(DataError, match="test:1: the chat template renders turn 1 differently"):
        tokenize_examples([example("q1", "a1", "q2", "a2")], tokenizer, max_length=None)


# --- the shipped built-in dataset -------------------------------------------------------------------

FAMILIES = {"reverse", "uppercase", "sort", "last", "add", "plural"}


def test_builtin_files_load_with_documented_sizes_and_disjoint_families():
    train, train_report = load_examples(BUILTIN_DATASET)
    heldout, heldout_report = load_examples(BUILTIN_HELDOUT)
    assert (len(train), len(heldout)) == (480, 120)
    assert train_report.n_skipped == heldout_report.n_skipped == 0 and not train_report.duplicates
    assert not {json.dumps(e.prompt_messages) for e in train} & {json.dumps(e.prompt_messages) for e in heldout}
    for part in (train, heldout):
        per_family = {family: sum(e.meta["task"] == family for e in part) for family in FAMILIES}
        assert set(per_family.values()) == {len(part) // len(FAMILIES)}, per_family
        assert all(len(e.response) <= 40 and e.response == e.response.strip() for e in part)


def test_builtin_files_match_their_generator():
    spec = importlib.util.spec_from_file_location("make_builtin_data", REPO / "benchmarks" / "make_builtin_data.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert generator.main(["--check"]) == 0, "run: python benchmarks/make_builtin_data.py"


def test_builtin_sequences_are_short_under_smollm2_template(tokenizer):
    ensure_pad_token(tokenizer)
    for path in (BUILTIN_DATASET, BUILTIN_HELDOUT):
        examples, _ = load_examples(path)
        _, report = tokenize_examples(examples, tokenizer, max_length=None)
        assert report.n_examples == len(examples) and report.max_tokens < 96 and report.n_skipped == 0


# --- --eval_split: held-out data from its own split, never the training split (asymllm train) ----
# (issue 10, item 3)

NAMED_SPLITS = {
    "train": [*ALPACA, {"instruction": "Say yes.", "output": "yes"}],
    "validation": [{"instruction": "Say no.", "output": "no"}, {"instruction": "Say maybe.", "output": "maybe"}],
    "test": [{"instruction": "Say bye.", "output": "bye"}],
}


@pytest.fixture(scope="module")
def tiny_chat_tokenizer():
    from asymllm.tiny import tiny_tokenizer

    return tiny_tokenizer()


def train_and_heldout_sizes(tokenizer, **flags) -> tuple[int, int]:
    """Examples asymllm train would train on and hold out, for these data flags."""
    from types import SimpleNamespace

    from asymllm.training.config import DataArguments
    from asymllm.training.train import load_data

    flags = {k: str(v) if isinstance(v, Path) else v for k, v in flags.items()}
    train_set, eval_set = load_data(DataArguments(**flags), tokenizer, SimpleNamespace(seed=0, max_length=64, truncation_mode="keep_start"))
    return len(train_set), 0 if eval_set is None else len(eval_set)


def test_eval_split_of_a_local_file_with_named_splits(tmp_path, tiny_chat_tokenizer):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(NAMED_SPLITS))
    assert train_and_heldout_sizes(tiny_chat_tokenizer, dataset=path, eval_dataset=path) == (3, 1)  # default: test
    assert train_and_heldout_sizes(tiny_chat_tokenizer, dataset=path, eval_dataset=path, eval_split="validation") == (3, 2)


def test_evaluating_on_the_training_split_is_refused(tmp_path, tiny_chat_tokenizer, monkeypatch):
    from asymllm.training.config import ConfigError

    path = tmp_path / "splits.json"
    path.write_text(json.dumps(NAMED_SPLITS))
    monkeypatch.chdir(tmp_path)  # the same file spelled two ways is still the same file
    with pytest.raises(ConfigError, match=r"--eval_dataset splits.json --eval_split train.*training data.*--dataset_split"):
        train_and_heldout_sizes(tiny_chat_tokenizer, dataset=path, eval_dataset="splits.json", eval_split="train")
    with pytest.raises(ConfigError, match=r"--eval_split test.*training data"):  # a hub name: refused before any download
        train_and_heldout_sizes(tiny_chat_tokenizer, dataset="someone/data", dataset_split="test", eval_dataset="someone/data")


@pytest.mark.parametrize("name, content", [
    ("data.jsonl", "".join(json.dumps(r) + "\n" for r in ALPACA)),
    ("data.json", json.dumps(ALPACA)),
    ("wrapped.json", json.dumps({"data": ALPACA, "test": ALPACA[:1]})),  # 'data' wins over the split name
])
def test_a_single_split_file_as_both_is_refused_with_a_pointer_to_eval_fraction(tmp_path, tiny_chat_tokenizer, name, content):
    from asymllm.training.config import ConfigError

    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError, match=r"no named splits.*--eval_fraction"):
        train_and_heldout_sizes(tiny_chat_tokenizer, dataset=path, eval_dataset=path)
