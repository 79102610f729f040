"""NF4's rounding: the relative error of a dequantised weight, ||deq(W) - W|| / ||W||, for Gaussian
weights, from bitsandbytes' dequantize_4bit beside lora/quant.py's textbook_dequantize.

    python bench/nf4_error.py [--seeds 5]

Blocks of 64 with double quantisation (what --quantize nf4 stores), W ~ N(0, 1) in float32. The
(64, 96) row shows bitsandbytes' AVX-512 CPU kernel on an input width that is a multiple of 16 but
not of 64 (which --quantize nf4 refuses); on other CPUs the two columns agree there too.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora.quant import bnb, textbook_dequantize  # noqa: E402
from model.errors import at_least  # noqa: E402

SHAPES = [(64, 128), (4096, 4096), (64, 96)]


def errors(shape, seed: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    w = torch.randn(shape)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    rel = lambda d: ((d - w).norm() / w.norm()).item()
    return rel(bnb.functional.dequantize_4bit(packed, state)), rel(textbook_dequantize(packed, state))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=at_least(1), default=5)
    args = p.parse_args(argv)
    print(f"{'shape':>14}  {'bitsandbytes':>16}  {'textbook':>16}   (relative error, min-max over {args.seeds} seeds)")
    for shape in SHAPES:
        by_bnb, by_textbook = zip(*[errors(shape, seed) for seed in range(args.seeds)])
        span = lambda xs: f"{min(xs):.1%}-{max(xs):.1%}"
        print(f"{str(shape):>14}  {span(by_bnb):>16}  {span(by_textbook):>16}")


if __name__ == "__main__":
    main()
