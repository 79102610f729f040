"""QLoRA storage (Dettmers et al. 2023): frozen linear weights as bitsandbytes NF4.

NF4 stores each weight as a 4-bit index into 16 levels placed at quantiles of a normal
distribution, scaled per block of 64 weights by the block's absmax. Double quantization stores those
absmaxes themselves in 8 bits (blocks of 256), saving about 0.4 bit per weight. Matmuls dequantize
on the fly to `compute_dtype`. bitsandbytes >= 0.45 runs all of this on the CPU too.

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

    bitsandbytes 0.50's native CPU kernel dequantizes row by row, and rows whose length is not a
    multiple of the block size come out wrong (a (64, 96) weight: 26% error instead of NF4's 9%).
    Llama-family widths are multiples of 64; the CUDA kernels have no such limit.
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
