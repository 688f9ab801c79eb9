"""Alpaca-style evaluation entry point, thin on purpose: everything lives in asymllm.evaluation.alpaca.

    python eval/alpaca.py --adapter outputs/A_rand_hB_zero-r16-s42/adapter          # built-in held-out set
    python eval/alpaca.py --model DIR --data alpaca_eval.json --judge http://127.0.0.1:8000/v1 --judge_model NAME

Same as `asymllm eval alpaca ...`; see `python eval/alpaca.py --help`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, installed or not

from asymllm.evaluation.alpaca import main  # noqa: E402

if __name__ == "__main__":
    main()
