"""Training entry point, thin on purpose: everything lives in asymllm.training.train.

    python launch/sft.py                                      # built-in default, one process
    torchrun --nproc_per_node 8 launch/sft.py --recipe A_rand_hB_zero    # DDP (no --deepspeed)
    accelerate launch --num_processes 8 launch/sft.py ...     # DDP too (without GPUs: add --multi_gpu)
    deepspeed --num_gpus 8 launch/sft.py --recipe A_rand_hB_zero --deepspeed ds_configs/zero3.json
    torchrun --nproc_per_node 8 launch/sft.py --config launch/run.example.yaml
    deepspeed --hostfile launch/hostfile.example launch/sft.py --deepspeed ds_configs/zero3.json ...
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, installed or not

from asymllm.training.train import main  # noqa: E402

if __name__ == "__main__":
    main()
