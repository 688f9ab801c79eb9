"""chat.py on offline tokenizers: padding a GPT-2-style vocabulary (bos = eos = unk, no pad)
without adding a token, and `--truncation_mode` honoured with the loss mask kept aligned."""

from __future__ import annotations

import json
import math

import pytest
from transformers import GenerationConfig, PreTrainedTokenizerFast

from asymllm.tokenizer import ensure_pad_token
from asymllm.training.tokenize import IGNORE_INDEX, tokenize_examples
from asymllm.data import DataError, Example
from asymllm.tiny import tiny_causal_lm, tiny_corpus, tiny_tokenizer

# ChatML's layout with the tokenizer's EOS ending every turn: a GPT-2-like vocabulary has no <|im_end|>
EOS_CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + eos_token + '\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

GPT2_EOS = "<|endoftext|>"  # GPT-2's only special token: BOS, EOS and UNK at once


def gpt2_like_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE whose one special token is bos = eos = unk, and no pad token: the
    case where no existing token is distinct from EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[GPT2_EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=GPT2_EOS, eos_token=GPT2_EOS, unk_token=GPT2_EOS,
                                   chat_template=EOS_CHATML, clean_up_tokenization_spaces=False,
                                   model_max_length=512)


@pytest.fixture(scope="module")
def gpt2_like_dir(tmp_path_factory) -> str:
    """A tiny Llama whose vocabulary is exactly the GPT-2-like tokenizer's: an added token would index past it."""
    tokenizer = gpt2_like_tokenizer()
    assert tokenizer.pad_token is None and len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}) == 1
    model = tiny_causal_lm("llama", seed=0, vocab_size=len(tokenizer))
    model.config.bos_token_id = model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = None
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    directory = str(tmp_path_factory.mktemp("gpt2_like") / "model")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def example(*turns: str, system: str | None = None, source: str = "test:1") -> Example:
    """turns alternate user, assistant."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]
    return Example(messages=messages, source=source)


# --- item 4: a vocabulary with no token to spare pads with EOS, which keeps its loss ------------------------------


def test_gpt2_like_tokenizer_pads_with_an_existing_token():
    tokenizer = gpt2_like_tokenizer()
    size = len(tokenizer)
    message = ensure_pad_token(tokenizer)
    assert len(tokenizer) == size  # nothing added: the model's embeddings fit every id
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert "EOS" in message and "by position" in message


def test_gpt2_like_tokenizer_trains_end_to_end(gpt2_like_dir, tmp_path):
    from asymllm.training.train import main

    result = main(["--model", gpt2_like_dir, "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
                   "--logging_steps", "1", "--save_strategy", "no", "--per_device_eval_batch_size", "64"])
    assert result["steps"] == 2 and math.isfinite(result["train_loss"]) and result["train_loss"] > 0


def test_eos_keeps_loss_in_the_batches_the_trainer_collates(gpt2_like_dir, tmp_path):
    """The collator SFTTrainer builds pads input_ids with pad (= EOS here) but labels with -100, by
    position: every response's closing EOS still carries loss, and no padding does."""
    from trl import SFTConfig
    from transformers import AutoModelForCausalLM

    from asymllm.data import BUILTIN_DATASET, load_examples
    from asymllm.training.train import load_tokenizer
    from asymllm.training.trainer import LorasymSFTTrainer

    tokenizer = load_tokenizer(gpt2_like_dir)
    eos = tokenizer.eos_token_id
    examples = load_examples(BUILTIN_DATASET)[0][:8]
    dataset, _ = tokenize_examples(examples, tokenizer, max_length=512)
    lengths = [len(ids) for ids in dataset["input_ids"]]
    assert len(set(lengths)) > 1  # the batch needs padding
    trainer = LorasymSFTTrainer(model=AutoModelForCausalLM.from_pretrained(gpt2_like_dir), train_dataset=dataset,
                                args=SFTConfig(output_dir=str(tmp_path), max_length=512, report_to="none", bf16=False),
                                processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(examples))])
    labels, input_ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    assert int((mask == 0).sum()) == sum(max(lengths) - n for n in lengths) > 0
    assert bool((input_ids[mask == 0] == eos).all()) and bool((labels[mask == 0] == IGNORE_INDEX).all())
    for row, n in enumerate(lengths):
        assert labels[row, :n].tolist() == dataset[row]["labels"]  # our response-only mask, as is
        assert (labels[row, :n] == eos).sum() == 1  # the response's closing EOS carries loss
    assert int(input_ids.max()) < trainer.model.get_input_embeddings().num_embeddings


# --- item 11: --truncation_mode ------------------------------------------------------------------------------------


def test_keep_end_keeps_the_last_tokens_with_their_labels():
    tokenizer = tiny_tokenizer()
    conversation = example("first question here", "first answer", "second question", "second answer", system="Be brief.")
    (full,) = tokenize_examples([conversation], tokenizer, max_length=None)[0]
    cut = len(full["input_ids"]) - 6
    start_set, start_report = tokenize_examples([conversation], tokenizer, max_length=cut, truncation_mode="keep_start")
    end_set, end_report = tokenize_examples([conversation], tokenizer, max_length=cut, truncation_mode="keep_end")
    assert start_set[0]["input_ids"] == full["input_ids"][:cut]
    assert end_set[0]["input_ids"] == full["input_ids"][-cut:] != start_set[0]["input_ids"]
    assert end_set[0]["labels"] == full["labels"][-cut:]  # the mask moves with its tokens
    assert end_set[0]["labels"][-2:] == [tokenizer.eos_token_id, IGNORE_INDEX]  # the final EOS kept, with loss
    assert start_report.n_truncated == end_report.n_truncated == 1
    assert "1 truncated at max_length" in end_report.summary() and "keep_end" in end_report.summary()


def test_keep_end_skips_and_counts_examples_left_without_loss():
    tokenizer = tiny_tokenizer()
    short, other = example("Say hi.", "hi", source="short:1"), example("q", "ok", source="q:1")
    dataset, report = tokenize_examples([short], tokenizer, max_length=2, truncation_mode="keep_end")
    assert dataset[0]["labels"] == [tokenizer.eos_token_id, IGNORE_INDEX] and report.n_truncated == 1
    # One token left: ChatML's newline after the final EOS, which carries no loss (never generated).
    with pytest.raises(DataError, match=r"2 skipped; every response token before the last max_length=1 tokens "
                                        r"\(--truncation_mode keep_end\): short:1, q:1"):
        tokenize_examples([short, other], tokenizer, max_length=1, truncation_mode="keep_end")


def test_unknown_truncation_mode_names_the_flag_and_the_choices():
    with pytest.raises(DataError, match=r"--truncation_mode keep_middle: .*keep_start, keep_end"):
        tokenize_examples([example("q", "a")], tiny_tokenizer(), max_length=8, truncation_mode="keep_middle")


def test_truncation_mode_flag_reaches_the_tokenized_training_data(tmp_path):
    """`--truncation_mode keep_end` on the command line: train.load_data passes it through."""
    from asymllm.training.config import parse_train_args
    from asymllm.training.train import load_data

    conversation = example("first question here", "first answer", "second question", "second answer")
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": conversation.messages}) + "\n")
    tokenizer = tiny_tokenizer()
    (full,) = tokenize_examples([conversation], tokenizer, max_length=None)[0]["input_ids"]
    cut = len(full) - 6
    _, _, data_args, sft_config = parse_train_args(["--dataset", str(data), "--max_length", str(cut),
                                                    "--truncation_mode", "keep_end"])
    train_set, _ = load_data(data_args, tokenizer, sft_config)
    assert train_set[0]["input_ids"] == full[-cut:]
