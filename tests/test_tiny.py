"""The hub-free tiny model folder: tokenizer, chat template, save and load."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from asymllm.tiny import CHAT_TEMPLATE, save_tiny_model, tiny_corpus, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_tokenizer_is_deterministic(tokenizer):
    again = tiny_tokenizer()
    assert tokenizer.get_vocab() == again.get_vocab()
    assert tokenizer.backend_tokenizer.to_str() == again.backend_tokenizer.to_str()  # merges too
    assert tiny_corpus() == tiny_corpus()


def test_vocab_size_and_special_tokens(tokenizer):
    assert len(tokenizer) == 512
    assert len(tiny_tokenizer(300)) == 300
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token) == ("<|endoftext|>", "<|im_end|>", "<|im_start|>")
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # docs/design.md, trap 8


@pytest.mark.parametrize("text", [
    "Hello, world! 123",
    "  leading and trailing spaces  \n\ttabs and\r\nnewlines",
    "Héllo wörld, naïve café — «quotes» ½ ² ŷ",
    "中文 日本語 한국어 עברית العربية",
    "emoji 🤖👍🏽 and a zero byte \x00 and ~`!@#$%^&*()_+-=[]{}|;':\",./<>?",
])
def test_any_text_round_trips(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_ids(tokenizer):
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tokenizer.eos_token_id


def test_chat_template_is_chatml_without_system_prompt(tokenizer):
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}]
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n")
    assert tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be brief."}] + messages[:1]
    assert tokenizer.apply_chat_template(with_system, tokenize=False).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_saved_folder_loads_and_generates(tmp_path, tokenizer, arch):
    path = save_tiny_model(tmp_path / arch, arch=arch, seed=1, num_layers=1)
    assert path == str(tmp_path / arch)
    model = AutoModelForCausalLM.from_pretrained(path)
    loaded = AutoTokenizer.from_pretrained(path)

    assert model.config.model_type == arch and model.config.num_hidden_layers == 1
    assert model.config.vocab_size == len(loaded) == 512
    assert loaded.get_vocab() == tokenizer.get_vocab() and loaded.chat_template == CHAT_TEMPLATE
    assert (loaded.eos_token_id, loaded.pad_token_id) == (2, 0)
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (2, 0)
    assert (model.config.eos_token_id, model.config.pad_token_id) == (2, 0)

    prompt = loaded.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(loaded.decode(out[0]), str)


def test_same_seed_same_weights(tmp_path):
    a = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path / "a", seed=3))
    b = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path / "b", seed=3))
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
