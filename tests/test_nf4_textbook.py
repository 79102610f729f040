"""NF4's textbook twin (lora/quant.py: NF4_LEVELS, textbook_dequantize) against bitsandbytes.

Proves: NF4_LEVELS are normal quantiles, derived again here bit for bit, and are bitsandbytes'
table; textbook_dequantize returns what bitsandbytes' dequantize_4bit returns, bit for bit, for
float32, bfloat16 and float16 weights, with and without double quantization, on shapes that take
each of bitsandbytes' three CPU dequantization paths, sizes that are not multiples of the block
sizes included; the same on the weights nf4_loader makes, whose NF4Linear forward is F.linear with
the textbook weight; and, for the one layout where they differ (rows a multiple of 16 but not of
64, on an AVX-512 CPU), that bitsandbytes reads the wrong block's absmax there, exactly as its
kernel's indexing predicts, while the textbook stays within NF4's rounding.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora.quant import (BLOCKSIZE, NF4_LEVELS, NF4Linear, bnb, dequantize, nf4_loader, textbook_dequantize,
                        unpack_nibbles)

FP32_EPS = torch.finfo(torch.float32).eps
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# bitsandbytes 0.50's CPU dequantize_4bit picks its path by the row length (in_features):
#   a multiple of 16, on an AVX-512 CPU: vectorised C++, blocks numbered per row
#   even otherwise (or no AVX-512):     scalar C++, blocks over the flattened weight
#   odd:                                torch code (which bitsandbytes compiles; slower to start)
SHAPES = [
    (96, 320),  # the vectorised path; 480 absmaxes: one second-level block of 256, one of 224
    (40, 100),  # the scalar path; 4000 weights: 62 blocks of 64 and a last one of 32
    (3, 77),    # the torch path; 231 weights: 3 blocks and one of 39, an odd count (half a byte left)
]


def gaussian(shape, dtype, seed=0):
    """Weights like a checkpoint's: N(0, 0.02^2), made in float32 and cast."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def quantize(weight, double_quant):
    return bnb.functional.quantize_4bit(weight, blocksize=BLOCKSIZE, compress_statistics=double_quant,
                                        quant_type="nf4")


def test_nf4_levels_are_normal_quantiles():
    # The steps of bitsandbytes' create_normal_map, in its precisions: probabilities in float32,
    # Φ⁻¹ in float64 (scipy's norm.ppf there), cast to float32, then divided by the largest.
    p_end = 0.9677083
    positive = torch.special.ndtri(torch.linspace(p_end, 0.5, 9)[:-1].double())  # 8 levels > 0
    negative = -torch.special.ndtri(torch.linspace(p_end, 0.5, 8)[:-1].double())  # 7 levels < 0
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    levels = levels / levels.max()
    assert torch.equal(levels, NF4_LEVELS)
    assert torch.equal(NF4_LEVELS, bnb.functional.get_4bit_type("nf4", device="cpu"))
    # The comment's reading of p_end; 5e-8: p_end is written with 7 decimals.
    assert abs(p_end - ((1 - 1 / 30) + (1 - 1 / 32)) / 2) < 5e-8


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax-fp32", "double-quant"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_textbook_equals_bitsandbytes(shape, dtype, double_quant):
    weight = gaussian(shape, dtype)
    packed, state = quantize(weight, double_quant)
    assert state.nested == double_quant
    got = textbook_dequantize(packed, state)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got, bnb.functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_textbook_on_nf4_loader_weights(dtype):
    """On the NF4 weight model.load gets from nf4_loader: the textbook weight is lora.quant.dequantize's
    bit for bit, and the layer's forward is F.linear with it: bitsandbytes' CPU matmul_4bit (0.50)
    dequantizes to the compute dtype and calls F.linear, so a change there fails here."""
    torch.manual_seed(0)
    layer = nf4_loader(dtype)("model.layers.0.self_attn.q_proj", nn.Linear(320, 96))
    assert isinstance(layer, NF4Linear) and layer.weight.quant_state.nested  # double quantization
    W = textbook_dequantize(layer.weight.data, layer.weight.quant_state)  # (96, 320)
    assert W.dtype == dtype and torch.equal(W, dequantize(layer.weight))
    x = torch.randn(5, 320).to(dtype).requires_grad_()  # as in training: x needs a gradient
    assert torch.equal(layer(x), F.linear(x, W, layer.bias.to(dtype)))


def test_bitsandbytes_numbers_blocks_per_row_on_avx512():
    """(64, 96): rows a multiple of 16 but not of 64, the layers check_nf4 refuses on the CPU.

    quantize_4bit numbers blocks over the flattened weight, so weight [r, c] has the absmax of
    block (96 r + c) // 64. bitsandbytes' AVX-512 kernel reads absmax[r * (96 // 64) + c // 64]:
    row 0 right, most later rows scaled by a neighbouring block's absmax. Elsewhere (no AVX-512)
    its scalar path agrees with the textbook."""
    out_features, in_features = 64, 96
    weight = gaussian((out_features, in_features), torch.float32)
    packed, state = quantize(weight, double_quant=False)
    textbook, theirs = textbook_dequantize(packed, state), bnb.functional.dequantize_4bit(packed, state)
    rows, cols = torch.meshgrid(torch.arange(out_features), torch.arange(in_features), indexing="ij")
    flat_block = (rows * in_features + cols) // BLOCKSIZE  # (64, 96): the block each weight is in
    row_block = rows * (in_features // BLOCKSIZE) + cols // BLOCKSIZE  # the one the AVX-512 path reads
    levels = NF4_LEVELS[unpack_nibbles(packed)].view(out_features, in_features)
    assert torch.equal(textbook, levels * state.absmax[flat_block])

    # NF4 rounds a weight to the nearest level times its block's absmax: it is off by at most half
    # the widest gap between levels, times that absmax, plus 4 float32 roundings, each at most eps
    # times the absmax in the weight's units (1 / absmax, the weight times it, the midpoint
    # between two levels, level * absmax).
    absmax = state.absmax[flat_block]
    bound = absmax * (NF4_LEVELS.diff().max() / 2 + 4 * FP32_EPS)
    assert ((textbook - weight).abs() <= bound).all()

    if torch.backends.cpu.get_cpu_capability() != "AVX512":  # torch's reading of the CPU; the kernel's is cpuid's
        assert torch.equal(theirs, textbook)
        return
    assert torch.equal(theirs, levels * state.absmax[row_block])
    assert torch.equal(theirs[0], textbook[0]) and not ((theirs - weight).abs() <= bound).all()
