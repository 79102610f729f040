"""NF4 layers made of fake tensors: QLoRA's memory layout without its memory, for memory estimates.

A memory estimate runs the real training step under torch's FakeTensorMode, on a model whose
tensors have shapes, dtypes and devices but no data. NF4Linear cannot be built that way: it
quantizes real weights, and bitsandbytes' Params4bit refuses to wrap a fake tensor. Here the
quantized layout is built directly. bitsandbytes registers fake kernels for its ops
(bitsandbytes/_ops.py), so its quantize ops run under the fake mode and give the packed weight's
and the absmaxes' shapes themselves; the rest repeats `bnb.functional.quantize_4bit` with
NF4Linear's settings (nf4, blocks of 64, double quantization):

    weight                (out * in / 2, 1) uint8    two 4-bit codes a byte
    quant_state.absmax    (out * in / 64,) uint8     each block's absmax, itself quantized ...
    quant_state.offset    () float32                 ... after subtracting their mean ...
    state2.absmax         (⌈out * in / 64 / 256⌉,) f32 ... in blocks of 256, by their own absmax
    quant_state.code      (16,) float32              the NF4 levels
    state2.code           (256,) float32             the 8-bit dynamic map of the absmaxes

tests/test_quant_shapes.py proves every tensor equal in shape, dtype and bytes to a real
quantization's, so a change of layout in bitsandbytes fails there.
"""

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from .quant import BLOCKSIZE, NF4Linear, bnb  # bnb from .quant, which quiets its import first

ABSMAX_BLOCKSIZE = 256  # absmaxes per second-level absmax: quantize_4bit's fixed choice


def fake_nf4_linear(linear: nn.Linear, compute_dtype: torch.dtype, fake_mode) -> NF4Linear:
    """The NF4Linear that NF4Linear(linear, compute_dtype) would be, made of fake tensors of
    `fake_mode` on the CPU (or on linear's fake device, when its weight is fake already).

    `linear` is on the meta device (or fake): only its shapes are read. The weight is a fake tensor
    flagged as a Parameter (as nn.Parameter flags any tensor subclass) and given Params4bit's
    attributes; quant_state is the one that nf4_linear, bnb.matmul_4bit and LoRALinear read.
    """
    device = linear.weight.device if isinstance(linear.weight, FakeTensor) else torch.device("cpu")
    with fake_mode:
        # NF4Linear quantizes the weight cast to the compute dtype.
        weight = torch.empty(linear.weight.shape, dtype=compute_dtype, device=device)
        packed, state = fake_quantize_nf4(weight, fake_mode)
        param = nn.Parameter(packed, requires_grad=False)  # a FakeTensor, flagged _is_param
    for name, value in dict(quant_state=state, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4",
                            quant_storage=torch.uint8, bnb_quantized=True, module=None).items():
        setattr(param, name, value)
    with unset_fake_temporarily():  # NF4Linear detaches linear's bias, which a fake mode refuses on meta
        layer = NF4Linear(linear, compute_dtype, weight=param)
    if layer.bias is not None and not isinstance(layer.bias, FakeTensor):  # meta: a fake one instead
        with fake_mode:
            bias = torch.empty(linear.bias.shape, dtype=linear.bias.dtype, device=device)
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def fake_quantize_nf4(weight: torch.Tensor, fake_mode):
    """bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    for a fake `weight` (out, in), called under `fake_mode`: (packed codes, QuantState), all fake.

    quantize_4bit itself cannot run here: its second level reads bitsandbytes' cached dynamic map,
    a real tensor that the fake mode refuses (or, if the cache is empty, caches a fake one that
    would break every later real quantization). The code tables are built for real, without the
    fake mode, and converted; each layer gets its own, as each real quantization makes new ones.
    """
    packed, absmax = torch.ops.bitsandbytes.quantize_4bit.default(weight, BLOCKSIZE, "nf4", torch.uint8)
    with unset_fake_temporarily():
        nf4_code = bnb.functional.get_4bit_type("nf4", device="cpu")  # (16,) float32
        dynamic_code = bnb.functional.create_dynamic_map()  # (256,) float32
    nf4_code = fake_mode.from_tensor(nf4_code).to(weight.device)
    dynamic_code = fake_mode.from_tensor(dynamic_code).to(weight.device)
    offset = absmax.mean()  # () float32
    qabsmax, absmax2 = torch.ops.bitsandbytes.quantize_blockwise.default(absmax - offset, dynamic_code,
                                                                         ABSMAX_BLOCKSIZE)
    state2 = bnb.functional.QuantState(absmax=absmax2, code=dynamic_code, blocksize=ABSMAX_BLOCKSIZE,
                                       dtype=absmax.dtype)
    state = bnb.functional.QuantState(absmax=qabsmax, shape=weight.shape, dtype=weight.dtype, blocksize=BLOCKSIZE,
                                      code=nf4_code, quant_type="nf4", offset=offset, state2=state2)
    return packed, state
