"""Training entry point, thin on purpose: everything lives in asymllm.train.

    python launch/sft.py                                      # built-in default, one process
    deepspeed --num_gpus 8 launch/sft.py --recipe A_rand_hB_zero --deepspeed ds_configs/zero3.json
    torchrun --nproc_per_node 8 launch/sft.py --config run.yaml
    deepspeed --hostfile launch/hostfile.example launch/sft.py --deepspeed ds_configs/zero3.json ...
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, installed or not

from asymllm.train import main  # noqa: E402

if __name__ == "__main__":
    main()
