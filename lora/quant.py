"""QLoRA storage (Dettmers et al. 2023): frozen linear weights as bitsandbytes NF4.

NF4 stores each weight as a 4-bit index into 16 levels placed at quantiles of a normal
distribution, scaled per block of 64 weights by the block's absmax. Double quantization stores those
absmaxes themselves in 8 bits (blocks of 256): 8/64 + 32/(64*256) bits of constants per weight
instead of 32/64. Matmuls dequantize on the fly to `compute_dtype`. bitsandbytes >= 0.45 runs all
of this on the CPU too.

`textbook_dequantize` is the textbook twin of bitsandbytes' dequantization: the same numbers from
the NF4 table and the quant_state, op by op in plain torch (tests/test_nf4_textbook.py proves them
equal bit for bit). The layout it reads, for an (out, in) weight:

    weight                (⌈out * in / 2⌉, 1) uint8  two 4-bit codes a byte, the first in the high nibble
    quant_state.absmax    (⌈out * in / 64⌉,) uint8   each block's absmax, itself quantized ...
    quant_state.offset    () float32                 ... after subtracting their mean ...
    state2.absmax         (⌈out * in / 64 / 256⌉,) f32 ... in blocks of 256, by their own absmax
    state2.code           (256,) float32             the 8-bit map those absmaxes index
    quant_state.code      (16,) float32              the NF4 levels: NF4_LEVELS below

Without double quantization quant_state.absmax holds the float32 absmaxes and there is no state2.
The blocks run over the flattened weight, so one may straddle two rows.

Imported only when NF4 is asked for: bitsandbytes takes seconds to import.
"""

import logging

import torch
import torch.nn as nn

# On CPUs with AVX512-BF16 bitsandbytes tries an optional fused kernel from the `kernels` package
# (downloaded from a model hub) and logs a warning when it is missing; its built-in CPU kernels
# are used instead, so the warning is noise here.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
import bitsandbytes as bnb  # noqa: E402

from .config import LoRAError  # noqa: E402

BLOCKSIZE = 64  # weights per absmax: bitsandbytes' 4-bit default, the QLoRA paper's choice


def nf4_loader(compute_dtype: torch.dtype):
    """The `replace_linear` of model.load.load_model for QLoRA: every linear but lm_head becomes an
    NF4Linear as soon as its weights are read, so the full-precision model never exists whole."""
    def replace(name: str, linear: nn.Linear) -> nn.Module:
        if name == "lm_head":
            return linear
        check_nf4_layer(name, linear)
        return NF4Linear(linear, compute_dtype)
    return replace


def check_nf4(model: nn.Module, names: list[str]):
    """Refuse layers bitsandbytes cannot hold in NF4 correctly, before any is quantized.

    quantize_4bit numbers the blocks of 64 over the flattened weight, so a block may straddle two
    rows. bitsandbytes 0.50's AVX-512 CPU kernel for dequantize_4bit (taken when in_features is a
    multiple of 16) numbers them row by row instead, absmax[row * (in // 64) + col // 64], which is
    the same block only when in_features is a multiple of 64; otherwise every row after the first
    is scaled by the wrong absmaxes, an error far beyond NF4's rounding (test_nf4_textbook.py shows
    it against textbook_dequantize). Llama-family widths are multiples of 64; the CUDA kernels
    have no such limit.
    """
    for name in names:
        check_nf4_layer(name, model.get_submodule(name))


def check_nf4_layer(name: str, layer: nn.Module):
    if layer.weight.device.type == "cpu" and layer.in_features % BLOCKSIZE:
        raise LoRAError(f"{name}: NF4 on the CPU needs in_features divisible by {BLOCKSIZE} "
                        f"(it has {layer.in_features}; bitsandbytes {bnb.__version__} "
                        "dequantizes such rows wrongly there)")


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4; the bias stays unquantized.

    `weight` is a bitsandbytes Params4bit: packed 4-bit codes, (out * in / 2, 1) uint8, with the
    block absmaxes in its `quant_state`. We call `bnb.matmul_4bit` ourselves rather than use
    `bnb.nn.Linear4bit`: on CPUs with AVX512-BF16, its first eval forward under no_grad repacks
    the weight in place into a bf16 inference layout, and every later training forward then
    passes no gradient to its input (bitsandbytes 0.50: silently; with a bias it raises).
    """

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype, weight: nn.Parameter | None = None):
        """`weight`: the NF4 weight when it is made elsewhere (quant_shapes.fake_nf4_linear makes
        one of fake tensors, for memory estimates); by default, `linear.weight` quantized here."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        if weight is None:
            # Params4bit quantizes when moved to a real device. Quantize the weight as the compute
            # dtype sees it, so that dequantization gives back that dtype.
            weight = bnb.nn.Params4bit(linear.weight.detach().to(compute_dtype), requires_grad=False,
                                       compress_statistics=True, quant_type="nf4").to(linear.weight.device)
        self.weight = weight
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x):
        return nf4_linear(x, self.weight, self.bias, self.compute_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4, "
                f"compute_dtype={self.compute_dtype}")


def nf4_linear(x, weight, bias, compute_dtype):
    """x (..., in) @ dequant(weight).T + bias, computed in compute_dtype, returned in x's dtype."""
    if bias is not None:
        bias = bias.to(compute_dtype)
    # weight.t(): the orientation Linear4bit has always passed (newer bitsandbytes accepts both).
    out = bnb.matmul_4bit(x.to(compute_dtype), weight.t(), quant_state=weight.quant_state, bias=bias)
    return out.to(x.dtype)


def dequantize(weight) -> torch.Tensor:
    """The (out, in) weight an NF4 Params4bit stands for, in its quantization dtype."""
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)


# --------------------------------------------------------------------------- the textbook twin

# The 16 NF4 levels, code -> value: quantiles of N(0, 1) normalised to [-1, 1] (Dettmers et al.
# 2023, QLoRA, section 3, "4-bit NormalFloat"). Asymmetric so that 0 is exact: 8 positive levels
# Φ⁻¹(p) at 8 probabilities p evenly spaced from 0.9677083 down to 0.5 (0.5 itself left out), 7
# negative ones -Φ⁻¹(p) at 7 such probabilities, and 0; all divided by the largest. The ends stop
# short of p = 1, where Φ⁻¹ is infinite, at 0.9677083 ≈ ((1 - 1/30) + (1 - 1/32)) / 2. These are
# bitsandbytes' numbers (functional.get_4bit_type("nf4"), made by its create_normal_map);
# tests/test_nf4_textbook.py derives them again with torch.special.ndtri, bit for bit.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])  # (16,) float32


def textbook_dequantize(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """The weight an NF4 tensor stands for, op by op: what bnb.functional.dequantize_4bit returns.

    QLoRA (Dettmers et al. 2023) dequantizes block by block (section 2, eq. 2):

        dequant(c, X^q) = X^q / c,    c = 1 / absmax for a data type on [-1, 1]

    here W = NF4_LEVELS[code] * absmax of the code's block of 64. With double quantization the
    absmaxes are dequantized first, the same way (section 3, eq. 6):

        doubleDequant(c1, c2, W^NF4) = dequant(dequant(c1, c2), W^NF4)

    c2 being the 8-bit absmaxes (blocks of 256; their mean was subtracted before quantizing, so
    it is added back) and c1 the float32 absmaxes of those blocks. Every product is taken in
    float32 and the result cast once to the quant_state's dtype: the order of bitsandbytes'
    kernels, which makes the result theirs bit for bit (bf16 or fp16 products would round twice).
    `packed` is the uint8 Params4bit data, (⌈n / 2⌉, 1) for n weights. Only the fields of
    bitsandbytes' QuantState are read; nothing of bitsandbytes is called.
    """
    if quant_state.quant_type != "nf4":
        raise LoRAError(f"textbook_dequantize reads NF4 only, not {quant_state.quant_type}")
    n = torch.Size(quant_state.shape).numel()
    absmax = quant_state.absmax  # (⌈n / 64⌉,) float32, or uint8 codes with double quantization
    if quant_state.state2 is not None:
        state2 = quant_state.state2
        # c2: 8-bit codes into state2.code, 256 float32 values in [-1, 1] (the paper names
        # 8-bit floats; bitsandbytes uses its dynamic map, functional.create_dynamic_map),
        # scaled per block of 256 by c1 = state2.absmax; then the mean comes back.
        absmax = scale_blocks(state2.code[absmax.long()], state2.absmax, state2.blocksize)
        absmax = absmax + quant_state.offset  # (⌈n / 64⌉,) float32
    codes = unpack_nibbles(packed)[:n]  # (n,) int64; an odd n pads the last byte's low nibble
    values = NF4_LEVELS.to(packed.device)[codes]  # (n,) float32 in [-1, 1]
    weight = scale_blocks(values, absmax, quant_state.blocksize)  # (n,) float32
    return weight.to(quant_state.dtype).reshape(quant_state.shape)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(m, 1) or (m,) uint8 -> (2m,) int64 codes in 0..15: each byte's high nibble first, as
    quantize_4bit packs them (byte = code[2i] << 4 | code[2i + 1])."""
    byte = packed.reshape(-1)
    return torch.stack([byte >> 4, byte & 0x0F], dim=1).reshape(-1).long()  # (m, 2) -> (2m,)


def scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """(n,) values in [-1, 1] times their block's absmax: values[i] * absmax[i // blocksize].

    The blocks run over the flattened tensor, across rows; the last one may be short (n not a
    multiple of blocksize), which the zero padding covers."""
    n = values.numel()
    blocks = torch.nn.functional.pad(values, (0, -n % blocksize)).view(-1, blocksize)  # (⌈n / bs⌉, bs)
    return (blocks * absmax.view(-1, 1)).reshape(-1)[:n]
