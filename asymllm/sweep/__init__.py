"""`asymllm sweep`: every recipe x rank x learning rate x seed through the normal training and
evaluation commands, one after another, resumable, then one table, one CSV and one plot.

    asymllm sweep --recipes lora,asym,a_only,A_V_hB_zero --ranks 16 --seeds 0,1,2 --output sweeps/smol
    asymllm sweep --configs lora:16,asym:16,asym:32 --learning_rates 1e-4,3e-4,1e-3,3e-3 \\
        --select_on validation --seeds 0,1 --selection_epochs 1 --final_seeds 3,4,5,6,7 --output sweeps/fair
    asymllm sweep ... --launcher "torchrun --nproc_per_node 8" -- --deepspeed ds_configs/zero3.json

With --select_on validation the learning rate of each recipe and rank is chosen on a
validation part of the *training* data (never the held-out set), then the chosen
configurations run with fresh seeds on the full training data and are scored on the held-out
set; both phases resume. Every configuration is compared with --reference seed by seed
(paired differences, a Student-t 95% interval, wins/ties/losses), at the same rank and at
equal trainable parameters.

    command.py   the command: flags, the phases in order
    cells.py     one cell: train + evaluate as separate processes, result.json, when to reuse it
    compare.py   paired statistics, learning-rate selection, equal-parameter pairs
    report.py    sweep.csv, sweep.md, sweep.png
"""

from .cells import plan  # noqa: F401  (the grid, for callers and tests)
from .command import main, parse_args  # noqa: F401
