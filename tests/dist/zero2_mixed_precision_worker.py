"""One rank of a real DeepSpeed ZeRO-1/2 run in bf16 or fp16 on CPU (gloo), for tests/test_export_zero2.py.

transformers refuses bf16/fp16 + DeepSpeed without a GPU ("Your setup doesn't support
bf16/gpu"), so this goes through `deepspeed.initialize` itself, as the Trainer would:
LoRASYM adapter on asymllm.tiny's Llama (frozen rand A, trained B), a few steps, then
`save_checkpoint(..., exclude_frozen_parameters=True)` exactly as transformers calls it
for a peft model, into OUT/checkpoint-N/global_stepN/ with `latest`.

Rank 0 also writes what the forward pass really used, read from the module's parameters
after training (DeepSpeed casts every parameter, the frozen A included, to the training
dtype): OUT/trained_factors.pt, {peft file key: tensor}.

    torchrun --nproc_per_node 2 tests/dist/zero2_mixed_precision_worker.py MODEL_DIR OUT bf16 2   # precision, stage
"""

from __future__ import annotations

import os
import sys

import torch

RECIPE, SEED, R, ALPHA = "A_rand_hB_zero", 1234, 16, 32
STEPS, MICRO_BATCH, SEQ = 4, 2, 16


def main(model_dir: str, out_dir: str, precision: str, stage: str) -> None:
    import deepspeed
    from transformers import AutoModelForCausalLM

    from asymllm import LoRASYMConfig, get_lorasym_model
    from asymllm.distributed import finish_distributed
    from asymllm.adapters.recipe_file import write_recipe_file
    from asymllm.adapters.files import peft_file_key

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    model = get_lorasym_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                              LoRASYMConfig(recipe=RECIPE, r=R, lora_alpha=ALPHA, seed=SEED, lora_dropout=0.0))
    trainable = [p for p in model.parameters() if p.requires_grad]
    config = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": int(stage)}, precision: {"enabled": True}, "steps_per_print": 10**6}
    if precision == "fp16":
        config["fp16"].update(initial_scale_power=8, loss_scale_window=1000)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=config,
                                           optimizer=torch.optim.AdamW(trainable, lr=1e-2))
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as a sampler gives
    vocab = model.config.vocab_size
    for _ in range(STEPS):
        ids = torch.randint(0, vocab, (MICRO_BATCH, SEQ), generator=generator)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    checkpoint = os.path.join(out_dir, f"checkpoint-{STEPS}")
    engine.save_checkpoint(checkpoint, tag=f"global_step{STEPS}", exclude_frozen_parameters=True)
    if rank == 0:
        model.peft_config["default"].save_pretrained(checkpoint)   # adapter_config.json, as every checkpoint has
        write_recipe_file(checkpoint, model.lorasym_recipe, model.lorasym_seed)
        used = {peft_file_key(n): p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        torch.save(used, os.path.join(out_dir, "trained_factors.pt"))
    finish_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:5])
