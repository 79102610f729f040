"""LoRA / QLoRA fine-tuning of a Llama-family model: the command.

    python train.py                          # the embedded demo: SmolLM2-135M-Instruct, sample data
    python train.py --model deepseek-ai/deepseek-llm-7b-chat --data emollm.json \\
        --micro-batch-size 2 --grad-accum 8 --precision bf16 --grad-checkpointing
    python train.py --config run.toml --lr 1e-4   # a config file; flags win
    python train.py --eval-only --adapter runs/emollm --val-data test.json   # score only
    python train.py --estimate-memory --model meta-llama/Llama-3.1-8B --device cuda   # count, run nothing

The run itself reads top to bottom in training/loop.py (its phases in training/phases.py, one
optimizer step in training/step.py); the settings, checked before any work, in training/settings.py.
"""

import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from model.errors import run_command
from training import sweep
from training.estimate import estimate_command
from training.evaluate import evaluate_only
from training.loop import train
from training.flags import parse_config


def run(argv=None):
    cfg = parse_config(argv)
    if cfg.estimate_memory:
        estimate_command(cfg)
    elif cfg.eval_only:
        evaluate_only(cfg)
    elif cfg.sweep:
        sweep.run_sweep(cfg)  # one `python train.py` process per setting, then a table
    else:
        train(cfg)


@record  # under torchrun: an uncaught exception is reported by torchrun with its rank and traceback
def main(argv=None):
    """The boundary: bad input is one line and exit 2, a divergence exit 3, a second Ctrl-C exit 130."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    prog = f"train.py (rank {os.environ.get('RANK', '0')})" if several else "train.py"
    code = run_command(prog, run, argv, codes={FloatingPointError: 3})
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
