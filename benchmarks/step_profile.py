"""Where one training step's time goes: peft LoRA vs asymllm A_rand_hB_zero on SmolLM2 (issue 29).

Run from the repository root:

    python benchmarks/step_profile.py

The model alone, outside any Trainer: the built-in SmolLM2-135M-Instruct, float32, batch 8 x 50
random tokens (the built-in data's length), zero_grad + forward with labels + backward + AdamW,
adapters r=16 on the 7 projections; 3 warm-up steps, the mean of 5 timed steps, then the
torch.profiler share of the top operators over 3 more. Compare the step times with
train_throughput's, whose Trainer steps carry the same model step plus what the Trainer and
TRL do per step.
"""
import torch, time
from torch.profiler import profile, ProfilerActivity
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
from asymllm import LoRASYMConfig, get_lorasym_model
from asymllm.builtin import resolve_model
torch.set_num_threads(2)
T = ["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]
ids = torch.randint(0, 49152, (8, 50), generator=torch.Generator().manual_seed(0))
for name in ["lora", "asym"]:
    m = AutoModelForCausalLM.from_pretrained(resolve_model(None), attn_implementation="sdpa").train()
    m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules=T, task_type="CAUSAL_LM")) if name == "lora" else get_lorasym_model(m, LoRASYMConfig(recipe="A_rand_hB_zero", r=16, target_modules=T))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    def step():
        opt.zero_grad(); m(input_ids=ids, labels=ids).loss.backward(); opt.step()
    for _ in range(3): step()
    t = time.perf_counter()
    for _ in range(5): step()
    print(name, "step s", (time.perf_counter() - t) / 5)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(3): step()
    tot = sum(e.self_cpu_time_total for e in p.key_averages())
    for e in sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]:
        print(f"   {e.key[:50]:50s} {100*e.self_cpu_time_total/tot:5.1f}%")
