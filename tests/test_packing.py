"""Packed (padding-free) batches must keep examples apart: docs/design.md, trap 7.

The core test runs the batch TRL's collator really makes through a tiny model and
compares each example's logits with the example run alone: it fails if attention crosses
examples. With sdpa and eager this holds because transformers' masking_utils turns the
restarting position_ids into a block-diagonal mask (find_packed_sequence_indices).
"""

import pytest
import torch
import torch.nn.functional as F

from asymllm.training import packing
from asymllm.training.packing import check_packing, packed_batch, packed_vs_separate, packing_is_exact
from asymllm.tiny import save_tiny_model, tiny_causal_lm

LENGTHS = (7, 3, 11, 5)


@pytest.fixture(autouse=True)
def one_thread():
    # tiny matrices: two threads on a busy 2-core machine make each matmul ~1000x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def examples():
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(3, 256, (n,), generator=generator) for n in LENGTHS]


def collate(examples):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    return collator([{"input_ids": x.tolist()} for x in examples])


def test_collator_batch_is_padding_free(examples):
    batch = collate(examples)
    assert "attention_mask" not in batch
    total = sum(LENGTHS)
    assert batch["input_ids"].shape == batch["position_ids"].shape == (1, total)
    assert batch["position_ids"][0].tolist() == [p for n in LENGTHS for p in range(n)]
    assert batch["cu_seq_lens_q"].tolist() == [0, 7, 10, 21, 26]
    starts = [0, 7, 10, 21]
    assert (batch["labels"][0, starts] == -100).all()  # no loss on predicting one example from the last


def test_packed_batch_mirrors_the_collator(examples):
    ours, trl = packed_batch(examples), collate(examples)
    for key, value in ours.items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(trl[key])), key


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_collator_packed_batch_equals_examples_alone(examples, attn, arch):
    model = tiny_causal_lm(arch, seed=0)
    model.set_attn_implementation(attn)
    batch = collate(examples)
    with torch.no_grad():
        # exactly what SFTTrainer.compute_loss passes: the whole collator batch, use_cache=False
        packed = model(**batch, use_cache=False)
        alone = [model(x[None], use_cache=False).logits[0] for x in examples]
        leaky = model(batch["input_ids"], use_cache=False).logits[0]  # one causal span: what a leak looks like

    reference = torch.cat(alone)
    torch.testing.assert_close(packed.logits[0], reference, atol=1e-5, rtol=0)
    assert (leaky - reference).abs().max() > 1e-2  # the comparison can see a leak

    # the packed loss is the token-weighted mean of the per-example losses
    losses = [F.cross_entropy(logits[:-1], x[1:], reduction="sum") for logits, x in zip(alone, examples)]
    expected = torch.stack(losses).sum() / sum(n - 1 for n in LENGTHS)
    torch.testing.assert_close(packed.loss, expected, atol=1e-5, rtol=0)


def test_sft_trainer_packed_step_is_exact(tmp_path):
    """The real path: SFTTrainer(packing=True) on a saved tiny model, its dataloader's batch,
    its compute_loss; each packed example's logits equal the example run alone."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    path = save_tiny_model(tmp_path / "model", num_layers=1)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: what is {i} + {i * 3}?"},
                          {"role": "assistant", "content": f"It is {i * 4}." + " Indeed." * (i % 4)}]}
            for i in range(8)]
    args = SFTConfig(output_dir=str(tmp_path / "out"), packing=True, max_length=128, per_device_train_batch_size=2,
                     report_to="none", use_cpu=True, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))

    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) >= 3  # several examples share the row
    model.eval()
    with torch.no_grad():
        _, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
        bounds = starts + [batch["input_ids"].shape[1]]
        for start, end in zip(bounds, bounds[1:]):
            alone = model(batch["input_ids"][:, start:end], use_cache=False).logits[0]
            torch.testing.assert_close(outputs.logits[0, start:end], alone, atol=1e-5, rtol=0)


def test_packing_is_exact_rule():
    for attn in ("sdpa", "eager"):
        exact, why = packing_is_exact(attn)
        assert exact, why
        assert "self-check" in why
    assert packing_is_exact("flash_attention_2")[0] and packing_is_exact("flash_attention_3")[0]
    assert packing_is_exact("flex_attention")[0]
    exact, why = packing_is_exact("no_such_attention")
    assert not exact and "could not check" in why


def test_self_check_measures_a_leak(examples):
    model = tiny_causal_lm("llama", seed=0)
    assert packed_vs_separate(model, examples) < 1e-5

    class NoPositions(torch.nn.Module):  # drops position_ids: one causal span over the row
        def forward(self, input_ids, position_ids=None, **kwargs):
            return model(input_ids, use_cache=False)

    assert packed_vs_separate(NoPositions(), examples) > 1e-2


def test_check_packing_lines():
    assert check_packing(False, "sdpa") == "packing: off (attention sdpa)"
    assert check_packing(True, "sdpa").startswith("packing: exact with attention sdpa")
    assert check_packing(True, "eager").startswith("packing: exact")
    assert check_packing(True, "flash_attention_2").startswith("packing: exact")
    assert check_packing(False, "sdpa", padding_free=True).startswith("padding_free: exact")


def test_check_packing_refuses_wrapped():
    with pytest.raises(ValueError, match="--packing_strategy bfd"):
        check_packing(True, "flash_attention_2", strategy="wrapped")


def test_check_packing_refuses_a_leaking_implementation(monkeypatch):
    monkeypatch.setattr(packing, "_self_check", lambda attn: 0.49)
    packing_is_exact.cache_clear()
    try:
        with pytest.raises(ValueError) as error:
            check_packing(True, "sdpa")
        message = str(error.value)
        assert "cross packed examples" in message and "0.49" in message
        assert "flash_attention_2" in message and "drop --packing" in message
        with pytest.raises(ValueError, match="drop --padding_free"):
            check_packing(False, "eager", padding_free=True)
    finally:
        packing_is_exact.cache_clear()
