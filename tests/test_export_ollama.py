"""The ollama Modelfile of `asymllm export --format gguf`: its TEMPLATE and stop tokens come from
the chat template the run trained with (for a base without a template, the one chosen for its
vocabulary: alpaca for a sentencepiece base, its reply ending with EOS), the GGUF's add_bos_token says whether training saw
a BOS, and the check after the export renders conversations through the Modelfile's own text and
requires the token ids training and `asymllm chat` use; it fails on a template that differs.

    pytest tests/test_export_ollama.py     # ~1 min on 2 cores
"""

from __future__ import annotations

import json
import logging
import os

import pytest
from gguf import GGUFReader
from transformers import AutoTokenizer

from asymllm.export.command import ExportError, export
from asymllm.tiny import save_tiny_model
from asymllm.chat_templates import TEMPLATES
from test_export import make_adapter

# SmolLM2-Instruct's template: a default system prompt when the conversation has none.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama 2's own: the system prompt inside the first [INST], BOS before every user turn.
LLAMA2_REAL_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
# What every Modelfile said before: ChatML, whatever the template ended its turns with.
OLD_CHATML = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
              '{{ end }}<|im_start|>assistant\n')


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def gguf_file(out) -> str:
    [name] = [f for f in os.listdir(out) if f.endswith(".gguf")]
    return os.path.join(out, name)


def without_chat_template(folder) -> str:
    os.remove(os.path.join(folder, "chat_template.jinja"))
    path = os.path.join(folder, "tokenizer_config.json")
    config = json.load(open(path))
    config.pop("chat_template", None)
    json.dump(config, open(path, "w"))
    assert not AutoTokenizer.from_pretrained(folder).chat_template
    return str(folder)


@pytest.fixture(scope="module")
def default_template_run(tmp_path_factory):
    """The issue's repro: a sentencepiece-style base without a chat template, trained 2 steps."""
    from asymllm.training.train import main as train

    root = tmp_path_factory.mktemp("spm-no-template")
    base = without_chat_template(save_tiny_model(root / "base", tokenizer="spm"))
    train(["--model", base, "--output_dir", str(root / "r"), "--max_steps", "2"])
    return base, str(root / "r" / "adapter")


def test_a_base_without_a_chat_template_gets_the_modelfile_of_the_default_template(default_template_run, tmp_path):
    base, adapter = default_template_run
    trained = AutoTokenizer.from_pretrained(adapter)  # saved beside the adapter by the run
    assert trained.chat_template == TEMPLATES["alpaca"]  # a sentencepiece vocabulary has no ChatML or Llama 3 tokens
    result = export(adapter=adapter, output=str(tmp_path / "g"), format="gguf", gguf_type="f32")
    modelfile = (tmp_path / "g" / "Modelfile").read_text()
    assert "<|im_start|>" not in modelfile and "<|im_end|>" not in modelfile
    assert "### Instruction:\n{{ .Content }}\n\n" in modelfile and "{{ .Content }}{{ if not $last }}</s>\n\n" in modelfile
    assert [line for line in modelfile.splitlines() if line.startswith("PARAMETER stop")] == ['PARAMETER stop "</s>"']
    assert "Modelfile TEMPLATE renders" in result.checked and "as the chat template does" in result.checked
    assert ("llama.cpp not installed here" in result.checked  # llama-cpp-python absent: said, not failed
            or "llama.cpp tokenizes them from the file to the same ids" in result.checked)
    reader = GGUFReader(gguf_file(tmp_path / "g"))
    assert field(reader, "tokenizer.chat_template") == TEMPLATES["alpaca"]
    # the template writes <s> first, as the sentencepiece base saw every document start; training saw it
    first = trained(trained.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False),
                    add_special_tokens=False)["input_ids"][0]
    assert first == trained.bos_token_id and field(reader, "tokenizer.ggml.add_bos_token") is True
    from asymllm.export.ollama import render

    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    # ollama writes BOS itself (add_bos_token), so the TEMPLATE leaves it out
    assert trained.bos_token + render(template, messages) == trained.apply_chat_template(messages, tokenize=False,
                                                                                        add_generation_prompt=True)


CHATML_MODELFILE = '''# ollama create NAME -f Modelfile && ollama run NAME   (from this folder)
FROM ./my-run-f32.gguf
# TEMPLATE: the chat template the model was trained with, in ollama's Go template syntax
TEMPLATE """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""
PARAMETER stop "<|im_end|>"
'''

LLAMA2_TEMPLATE = '''TEMPLATE """{{- if .System }}{{ .System }}</s>{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}[INST] {{ .Content }} [/INST]{{ else if eq .Role "assistant" }}{{ .Content }}{{ if not $last }}</s>{{ end }}{{ end }}
{{- end }}"""'''


def test_chatml_and_llama2_templates_give_their_own_modelfiles(tmp_path):
    """The tiny default (ChatML, BOS <|im_start|> only as a turn header: no add_bos) and the tiny
    sentencepiece one ([INST], the template writes <s> first: add_bos, and the TEMPLATE leaves it out)."""
    base = save_tiny_model(tmp_path / "bpe")
    result = export(adapter=make_adapter(base, tmp_path / "my-run" / "adapter"), output=str(tmp_path / "chatml"),
                    format="gguf", gguf_type="f32")
    assert (tmp_path / "chatml" / "Modelfile").read_text() == CHATML_MODELFILE
    assert "Modelfile TEMPLATE renders" in result.checked
    assert field(GGUFReader(gguf_file(tmp_path / "chatml")), "tokenizer.ggml.add_bos_token") is False

    base = save_tiny_model(tmp_path / "spm", tokenizer="spm")
    result = export(adapter=make_adapter(base, tmp_path / "spm-run" / "adapter"), output=str(tmp_path / "llama2"),
                    format="gguf", gguf_type="f32")
    modelfile = (tmp_path / "llama2" / "Modelfile").read_text()
    assert LLAMA2_TEMPLATE in modelfile and 'PARAMETER stop "</s>"' in modelfile and "<s>" not in modelfile
    assert "Modelfile TEMPLATE renders" in result.checked and "BOS from add_bos_token" in result.checked
    assert field(GGUFReader(gguf_file(tmp_path / "llama2")), "tokenizer.ggml.add_bos_token") is True


def test_a_default_system_prompt_is_written_when_the_conversation_has_none(tmp_path):
    from asymllm.export.ollama import check_template, ollama_template

    tokenizer = AutoTokenizer.from_pretrained(save_tiny_model(tmp_path / "bpe"))
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    made = ollama_template(tokenizer)
    assert "{{ else }}<|im_start|>system\nYou are a helpful AI assistant named SmolLM" in made.template
    assert "without a system message" in check_template(made.template, tokenizer, add_bos=False)


def test_the_check_fails_when_the_modelfile_template_is_not_the_chat_template(default_template_run):
    """A ChatML Modelfile against the alpaca template the run trained with; a BOS the template writes, left out."""
    from asymllm.export.ollama import check_template, ollama_template

    _, adapter = default_template_run
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    good = ollama_template(tokenizer).template
    check_template(good, tokenizer, add_bos=True)
    with pytest.raises(ExportError, match=r"verification FAILED: the Modelfile TEMPLATE renders .* differently from the "
                                          r"chat template the model was trained with: .* first difference at token"):
        check_template(OLD_CHATML, tokenizer, add_bos=True)
    with pytest.raises(ExportError, match=r"verification FAILED: .* BOS"):  # training saw a BOS that llama.cpp would not give
        check_template(good, tokenizer, add_bos=False)


def test_a_template_that_cannot_be_translated_is_said_not_guessed(tmp_path, caplog):
    base = save_tiny_model(tmp_path / "spm", tokenizer="spm")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = LLAMA2_REAL_TEMPLATE
    tokenizer.save_pretrained(base)
    caplog.set_level(logging.INFO, logger="asymllm.export")
    export(adapter=make_adapter(base, tmp_path / "run" / "adapter"), output=str(tmp_path / "out"), format="gguf",
           gguf_type="f32")
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert 'TEMPLATE """' not in modelfile and 'PARAMETER stop "</s>"' in modelfile
    assert "could not be translated" in modelfile and "could not be translated" in caplog.text
    # the template writes <s> itself before every user turn: llama.cpp adds one BOS and strips the template's first
    assert field(GGUFReader(gguf_file(tmp_path / "out")), "tokenizer.ggml.add_bos_token") is True
