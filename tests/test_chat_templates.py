"""`--chat_template`: a name (chatml, llama3, llama2, mistral, alpaca, tokenizer) or a Jinja file;
the default for a base without a template chosen from its vocabulary; a warning for markers that
are not one token; one source of truth from training through eval, chat and both exports; and
`--train_on_inputs`."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
from gguf import GGUFReader
from transformers import AutoTokenizer

from asymllm.chat_templates import TEMPLATES, choose_chat_template
from asymllm.data import DataError, Example
from asymllm.evaluation.loading import EvalModelError, load_for_eval
from asymllm.export.command import ExportError, export
from asymllm.tiny import save_tiny_model, tiny_spm_tokenizer, tiny_tokenizer
from asymllm.tokenizer import chat_turns, end_token_ids, ensure_chat_template
from asymllm.training.tokenize import IGNORE_INDEX, tokenize_examples
from asymllm.training.train import main as train_main
from test_export_ollama import without_chat_template

LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def conversation(*turns: str, system: str | None = None) -> Example:
    roles = ["user", "assistant"] * len(turns)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": role, "content": text} for role, text in zip(roles, turns)]
    return Example(messages=messages, source="test:1")


def loss_text(tokenizer, row) -> list[str]:
    spans, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans, current = spans + [current], []
    return [tokenizer.decode(s) for s in spans + ([current] if current else [])]


def without_template(tokenizer):
    tokenizer.chat_template = None
    return tokenizer


def llama3_like_tokenizer():
    """A base tokenizer that has Llama 3's turn tokens and no template, EOS <|end_of_text|> as base Llama 3 has."""
    tokenizer = without_template(tiny_spm_tokenizer())
    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA3_TOKENS + ["<|end_of_text|>"]})
    tokenizer.bos_token, tokenizer.eos_token = "<|begin_of_text|>", "<|end_of_text|>"
    return tokenizer


def test_the_default_for_a_base_without_a_template_follows_its_vocabulary():
    chatml = choose_chat_template(without_template(tiny_tokenizer()))
    assert chatml.name == "chatml" and "vocabulary has <|im_start|>, <|im_end|> as tokens" in chatml.reason
    assert choose_chat_template(llama3_like_tokenizer()).name == "llama3"
    alpaca = choose_chat_template(without_template(tiny_spm_tokenizer()))
    assert alpaca.name == "alpaca" and "markers are plain text" in alpaca.reason and not alpaca.warnings
    own = choose_chat_template(tiny_tokenizer())
    assert own.name == "tokenizer" and own.reason == "the tokenizer's own"


@pytest.mark.parametrize("name, tokenizer, spans", [
    ("chatml", tiny_tokenizer, ["a1<|im_end|>", "a2<|im_end|>"]),
    ("llama3", llama3_like_tokenizer, ["a1<|eot_id|>", "a2<|eot_id|>"]),  # <|eot_id|> ends a turn; EOS is another token
    ("mistral", tiny_spm_tokenizer, ["a1</s>", "a2</s>"]),
    ("llama2", tiny_spm_tokenizer, ["a1 </s>", "a2 </s>"]),
    ("alpaca", tiny_spm_tokenizer, ["a1</s>", "a2</s>"]),
])
def test_each_named_template_trains_on_the_replies_and_the_token_that_ends_them(name, tokenizer, spans):
    tokenizer = tokenizer()
    assert "chat template: " + name in ensure_chat_template(tokenizer, name)
    assert tokenizer.chat_template == TEMPLATES[name]
    dataset, _ = tokenize_examples([conversation("q1", "a1", "q2", "a2", system="Be brief.")], tokenizer, max_length=None)
    assert [s.strip() for s in loss_text(tokenizer, dataset[0])] == [s.strip() for s in spans]
    if name != "llama2":  # Llama 2 writes the system prompt inside the first [INST]: not a fixed text per turn
        chat_turns(tokenizer)
    reply_end = tokenizer.convert_tokens_to_ids(spans[0].split("a1")[-1].strip())
    assert reply_end in end_token_ids(tokenizer)  # generation stops where training taught it to


def test_markers_that_are_not_one_token_are_named_in_a_warning_and_then_refused_clearly(caplog):
    tokenizer = tiny_spm_tokenizer()
    with caplog.at_level(logging.WARNING, logger="asymllm.tokenizer"):
        ensure_chat_template(tokenizer, "chatml")
    assert "chat template chatml: <|im_end|>, <|im_start|> are not one token of this tokenizer" in caplog.text
    assert "--chat_template alpaca needs no special tokens" in caplog.text
    with pytest.raises(DataError, match=r"test:1: assistant turn 1 does not end with a token that ends a reply.*--chat_template"):
        tokenize_examples([conversation("q1", "a1")], tokenizer, max_length=None)


def test_train_on_inputs_puts_loss_on_every_token():
    tokenizer = tiny_tokenizer()
    example = conversation("q1", "a1", system="Be brief.")
    responses, _ = tokenize_examples([example], tokenizer, max_length=None)
    everything, report = tokenize_examples([example], tokenizer, max_length=None, train_on_inputs=True)
    assert everything[0]["labels"] == everything[0]["input_ids"] == responses[0]["input_ids"]
    assert report.n_loss_tokens == report.n_tokens and IGNORE_INDEX in responses[0]["labels"]


@pytest.fixture(scope="module")
def spm_base(tmp_path_factory):
    """A sentencepiece-style base (Llama 2 / Mistral style) without a chat template."""
    return without_chat_template(save_tiny_model(tmp_path_factory.mktemp("spm") / "base", tokenizer="spm"))


@pytest.fixture(scope="module")
def mistral_run(spm_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("mistral") / "run"
    train_main(["--model", spm_base, "--output_dir", str(out), "--max_steps", "2", "--chat_template", "mistral",
                "--train_on_inputs", "--logging_steps", "1"])
    return out


def test_one_template_from_training_through_eval_chat_and_both_exports(mistral_run, spm_base, tmp_path):
    adapter = str(mistral_run / "adapter")
    want = TEMPLATES["mistral"]
    record = json.loads((mistral_run / "asymllm_run.json").read_text())
    assert record["chat_template"]["sha256"] == hashlib.sha256(want.encode()).hexdigest()
    assert record["chat_template"]["chosen"] == "chat template: mistral (--chat_template mistral)"
    assert record["training_settings"]["--chat_template"]["value"] == "mistral"
    assert record["training_settings"]["--train_on_inputs"] is True
    assert AutoTokenizer.from_pretrained(adapter).chat_template == want
    for checkpoint in mistral_run.glob("checkpoint-*"):
        assert AutoTokenizer.from_pretrained(checkpoint).chat_template == want
    _, tokenizer, _ = load_for_eval(adapter=adapter)  # eval and chat load through here
    assert tokenizer.chat_template == want
    with pytest.raises(EvalModelError, match="--chat_template alpaca: the adapter was trained with another chat template"):
        load_for_eval(adapter=adapter, chat_template="alpaca")
    _, tokenizer, _ = load_for_eval(adapter=adapter, chat_template="mistral")  # the same one: fine
    export(adapter=adapter, output=str(tmp_path / "hf"), dtype="fp32")
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").chat_template == want
    export(adapter=adapter, output=str(tmp_path / "gguf"), format="gguf", gguf_type="f32")
    reader = GGUFReader(next((tmp_path / "gguf").glob("*.gguf")))
    field = reader.fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == want
    modelfile = (tmp_path / "gguf" / "Modelfile").read_text()
    assert "[INST] {{ .Content }} [/INST]" in modelfile and 'PARAMETER stop "</s>"' in modelfile
    with pytest.raises(ExportError, match="--chat_template chatml: the adapter was trained with another"):
        export(adapter=adapter, output=str(tmp_path / "refused"), chat_template="chatml")


def test_train_on_inputs_is_what_the_run_trained_with(mistral_run):
    log = (mistral_run / "asymllm_run.json").read_text()
    assert '"train_on_inputs": true' in log


def test_a_base_model_evaluated_alone_takes_the_flag(spm_base):
    _, tokenizer, _ = load_for_eval(model=spm_base, chat_template="llama2")
    assert tokenizer.chat_template == TEMPLATES["llama2"]
    _, tokenizer, _ = load_for_eval(model=spm_base)  # as training would choose for it
    assert tokenizer.chat_template == TEMPLATES["alpaca"]


def test_a_jinja_file_and_trls_chat_template_path_are_the_same_flag(spm_base, tmp_path):
    jinja = tmp_path / "mine.jinja"
    jinja.write_text(TEMPLATES["alpaca"].replace("### Response:", "### Answer:"))
    for flag in ("--chat_template", "--chat_template_path"):
        out = tmp_path / flag.strip("-")
        train_main(["--model", spm_base, "--output_dir", str(out), "--max_steps", "1", flag, str(jinja)])
        assert AutoTokenizer.from_pretrained(out / "adapter").chat_template == jinja.read_text()
        record = json.loads((out / "asymllm_run.json").read_text())
        assert record["training_settings"]["--chat_template"]["sha256"] == hashlib.sha256(jinja.read_bytes()).hexdigest()


@pytest.mark.parametrize("flags, message", [
    (["--chat_template", "chatml2"], "--chat_template chatml2: neither a template name (chatml, llama3, llama2, mistral, "
                                     "alpaca, tokenizer) nor a Jinja file"),
    (["--chat_template_path", "/tmp"], "--chat_template_path /tmp: asymllm takes a Jinja file (.jinja, .j2) here"),
    (["--chat_template", "alpaca", "--chat_template_path", "x.jinja"], "--chat_template alpaca and --chat_template_path x.jinja: give one"),
    (["--chat_template", "tokenizer"], "--chat_template tokenizer: this tokenizer has no chat template of its own"),
])
def test_a_bad_chat_template_flag_is_one_line_naming_it(spm_base, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as error:
        train_main(["--model", spm_base, "--output_dir", str(tmp_path / "out"), "--max_steps", "1", *flags])
    assert message in str(error.value) and str(error.value).startswith("asymllm train: error: ")
    assert not (tmp_path / "out" / "adapter").exists()
