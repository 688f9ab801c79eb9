"""Is packed training exact with this attention implementation? (docs/design.md, trap 7)

TRL's SFTTrainer with packing=True (strategy "bfd", the default) packs several examples
into one row with no attention mask ("padding-free"); the collator emits, for examples of
n1, n2, ... tokens:

    input_ids     [1, n1+n2+...]   the examples back to back
    position_ids  [1, n1+n2+...]   [0..n1-1, 0..n2-1, ...]   (restart at 0 per example)
    cu_seq_lens_q/k, max_length_q/k, seq_idx                 (for varlen kernels)
    labels        the first token of each example set to -100
    (no attention_mask)

Packing is exact when every token attends only to earlier tokens *of its own example*.
- flash_attention_2/3/4 run the varlen kernel on cu_seq_lens: exact by construction.
- sdpa / eager get a block-diagonal causal mask only if transformers' masking_utils reads
  the restarts in position_ids (`find_packed_sequence_indices`; 5.24 does),
  and only when the forward has no cache: `use_cache=False`, which SFTTrainer.compute_loss
  sets. With the config's default use_cache=True a DynamicCache exists, the detection is
  skipped and attention crosses examples (measured: logits off by 0.49 on a tiny Llama).
  Rather than trust a version number, `packing_is_exact` runs that packed batch through a
  tiny Llama once per process and compares with each example run alone.
- packing_strategy "wrapped" cuts a stream of examples into rows with ordinary position
  ids: attention crosses examples with every implementation.
"""

from __future__ import annotations

import functools

import torch

FLASH = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
TOLERANCE = 1e-4  # fp32 tiny model: an exact mask gives ~2e-7, a leaking one ~0.5
EXAMPLE_LENGTHS = (5, 3, 6)


class PackingError(ValueError):
    """Packing asked for where attention would cross examples."""


def packed_batch(examples: list[torch.Tensor]) -> dict:
    """The model inputs TRL's DataCollatorForLanguageModeling(padding_free=True) makes from
    these 1-D token tensors (tests/test_packing.py checks it against the real collator)."""
    lengths = torch.tensor([len(x) for x in examples])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
    return {
        "input_ids": torch.cat(examples)[None],                                    # [1, total]
        "position_ids": torch.cat([torch.arange(n) for n in lengths.tolist()])[None],  # [1, total]
        "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,                                  # [len(examples) + 1]
        "max_length_q": int(lengths.max()), "max_length_k": int(lengths.max()),
    }


def packed_vs_separate(model: torch.nn.Module, examples: list[torch.Tensor]) -> float:
    """Max |logit difference| between the examples packed padding-free in one row (as
    SFTTrainer runs them: use_cache=False) and each example run alone."""
    with torch.no_grad():
        packed = model(**packed_batch(examples), use_cache=False).logits[0]           # [total, vocab]
        alone = torch.cat([model(x[None], use_cache=False).logits[0] for x in examples])
    return (packed - alone).abs().max().item()


@functools.lru_cache(maxsize=None)
def packing_is_exact(attn_implementation: str) -> tuple[bool, str]:
    """(exact, why) for padding-free packing with this attention implementation, in the
    installed transformers. sdpa/eager (and other CPU-runnable ones) are measured once per
    process on a tiny Llama (~10 ms); the result applies to models whose attention mask
    comes from transformers.masking_utils (Llama, Mistral, Qwen2, ... — not remote code)."""
    import transformers

    version = f"transformers {transformers.__version__}"
    if attn_implementation in FLASH or "flash" in attn_implementation:  # also kernels-hub flash kernels
        return True, f"{attn_implementation} runs its varlen kernel on the collator's cu_seq_lens"
    if attn_implementation == "flex_attention":
        # Same mask factory as sdpa (packed detection from position_ids), as a BlockMask.
        # Measured equal (2e-7) but not re-run here: flex compiles, ~40 s on a CPU.
        exact, why = packing_is_exact("sdpa")
        return exact, f"flex_attention builds the same packed mask as sdpa ({why})"
    try:
        diff = _self_check(attn_implementation)
    except Exception as error:  # noqa: BLE001 - an implementation we cannot run here is not known to be exact
        return False, f"could not check {attn_implementation!r} packing on this machine ({type(error).__name__}: {error})"
    if diff <= TOLERANCE:
        return True, (f"{version} builds a block-diagonal mask from the restarting position_ids "
                      f"(self-check: packed vs separate logits differ by {diff:.1e})")
    return False, (f"{version} with {attn_implementation!r} lets attention cross packed examples "
                   f"(self-check: packed vs separate logits differ by {diff:.2g})")


def _self_check(attn_implementation: str) -> float:
    from transformers import AutoModelForCausalLM

    from ..tiny import tiny_config

    generator = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()  # a [14, 32] model runs 1000x faster on one thread than on two busy ones
    config = tiny_config("llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=64)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).float().eval()
    examples = [torch.randint(0, 64, (n,), generator=generator) for n in EXAMPLE_LENGTHS]
    torch.set_num_threads(1)
    try:
        return packed_vs_separate(model, examples)
    finally:
        torch.set_num_threads(threads)


def check_packing(packing: bool, attn_implementation: str, *, strategy: str = "bfd", padding_free: bool = False) -> str:
    """A log line when packed (or padding-free) batches keep examples apart; ValueError
    saying what to change when attention would cross examples. Arguments as in SFTConfig:
    packing, packing_strategy, padding_free; the model's attn_implementation."""
    if not packing and not padding_free:
        return f"packing: off (attention {attn_implementation})"
    if packing and strategy == "wrapped":
        raise PackingError(
            "--packing_strategy wrapped cuts a stream of examples into rows with one attention span, so every "
            "example attends to the ones before it in its row; use --packing_strategy bfd (the default: "
            "padding-free rows, examples kept apart) or drop --packing"
        )
    mode = "packing" if packing else "padding_free"
    exact, why = packing_is_exact(attn_implementation)
    if exact:
        return f"{mode}: exact with attention {attn_implementation}: {why}"
    raise PackingError(
        f"--{mode} with --attn_implementation {attn_implementation} would let attention cross packed examples: "
        f"{why}. Install flash-attn and use --attn_implementation flash_attention_2 (GPU), or use "
        f"--attn_implementation sdpa or eager with a transformers whose masking_utils detects packed position_ids "
        f"(find_packed_sequence_indices; 5.24 does), "
        f"or drop --{mode}"
    )
