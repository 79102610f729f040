"""NF4 layers of fake tensors (lora/quant_shapes.py) against real NF4 quantization.

Proves: a fake NF4Linear holds the same tensors as a real one, one for one, in shape, dtype,
strides, bytes and device, the quant_state and its nested state2 included, with the same
settings and no storage shared within or between layers (a memory estimate counts storages);
building one leaves bitsandbytes' cached code tables alone; and a LoRALinear over it runs forward
and backward under the fake mode, fp32 and bf16 under autocast, on both LoRA paths, giving the
output and gradients of the real layer's shapes and dtypes.
"""

import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from lora.layer import LoRALinear
from lora.quant import NF4Linear, bnb
from lora.quant_shapes import fake_nf4_linear
from model import fused as model_fused

# (out, in, bias): in a multiple of 64, as bitsandbytes' CPU kernel needs. 96 * 320 weights make
# 480 absmaxes, not a multiple of the 256 of a second-level block, so its count is rounded up.
SHAPES = [(128, 256, True), (96, 320, False)]
DTYPES = [torch.float32, torch.bfloat16]


def real_and_fake(out_features, in_features, bias, dtype, fake_mode):
    """The NF4Linear of a random (out, in) linear, and the fake one of a meta linear of its shape."""
    real = NF4Linear(nn.Linear(in_features, out_features, bias=bias), dtype)
    fake = fake_nf4_linear(nn.Linear(in_features, out_features, bias=bias, device="meta"), dtype, fake_mode)
    return real, fake


def tensor_layout(t: torch.Tensor) -> tuple:
    """What a memory estimate sees of a tensor: (shape, dtype, strides, storage bytes, device)."""
    return tuple(t.shape), t.dtype, t.stride(), t.untyped_storage().nbytes(), t.device.type


def layout(layer: NF4Linear) -> dict:
    """name -> tensor_layout, or the value of a non-tensor setting, for the layer's parameters,
    the weight's Params4bit settings and its quant_state, recursively (state2 is a QuantState)."""
    found = {name: tensor_layout(p) for name, p in layer.named_parameters()}
    w = layer.weight
    found.update({f"weight.{k}": getattr(w, k) for k in ("blocksize", "compress_statistics", "quant_type",
                                                        "quant_storage", "bnb_quantized", "requires_grad")})

    def walk(state, prefix):
        for key, value in vars(state).items():
            if isinstance(value, bnb.functional.QuantState):
                walk(value, f"{prefix}{key}.")
            else:
                found[prefix + key] = tensor_layout(value) if isinstance(value, torch.Tensor) else value
    walk(w.quant_state, "weight.quant_state.")
    return found


def storages(layer: NF4Linear) -> list[int]:
    """The storage of every tensor of the layer (its parameters and quant_state), by identity."""
    tensors = list(layer.parameters())
    state = layer.weight.quant_state
    while state is not None:
        tensors += [t for t in vars(state).values() if isinstance(t, torch.Tensor)]
        state = state.state2
    return [t.untyped_storage()._cdata for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fake_layout_equals_real(shape, dtype):
    """Every tensor of the fake layer is a FakeTensor laid out as the real quantization's: what a
    memory estimate counts is then what training on the CPU would hold."""
    fake_mode = FakeTensorMode()
    real, fake = real_and_fake(*shape, dtype, fake_mode)
    assert type(fake) is NF4Linear
    assert layout(fake) == layout(real)
    assert all(isinstance(t, FakeTensor) for t in fake.parameters())
    # A second layer of each kind: each tensor has a storage of its own, fake as real.
    qmaps = dict(bnb.functional.name2qmap)  # filled by the real quantizations
    real2, fake2 = real_and_fake(*shape, dtype, fake_mode)
    for a, b in ((real, real2), (fake, fake2)):
        assert len(set(storages(a) + storages(b))) == len(storages(a) + storages(b))
    # The dynamic map bitsandbytes caches for real quantizations is neither replaced nor faked.
    assert bnb.functional.name2qmap.keys() == qmaps.keys() and qmaps
    assert all(bnb.functional.name2qmap[k] is v for k, v in qmaps.items())


def lora_step(layer: LoRALinear, x: torch.Tensor, dtype: torch.dtype) -> dict:
    """One forward (under bf16 autocast for a bf16 layer, as train.py runs one) and the backward
    of out.float().sum(); the shapes and dtypes of the output and of the gradients."""
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    tensors = {"out": out, "x.grad": x.grad, "A.grad": layer.lora_A.weight.grad, "B.grad": layer.lora_B.weight.grad}
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


@pytest.mark.parametrize("textbook", [False, True], ids=["fused", "textbook"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fake_lora_step_matches_real(shape, dtype, textbook):
    """A LoRALinear over a fake NF4 base trains under the fake mode (bitsandbytes' fake kernels
    stand in for its matmul and dequantization) with the real layer's output and gradients.

    LoRALinear makes A and B on its base's device, the CPU here, for real: it cannot be built
    under a fake mode, whose fake parameters nn.utils.skip_init cannot swap into place. They are
    converted after, as a memory estimate converts every parameter."""
    fake_mode = FakeTensorMode()
    real_base, fake_base = real_and_fake(*shape, dtype, fake_mode)
    real, fake = (LoRALinear(base, r=4, alpha=8, dropout=0.0) for base in (real_base, fake_base))
    for m in (fake.lora_A, fake.lora_B):
        m.weight = nn.Parameter(fake_mode.from_tensor(m.weight.detach()))
    x_shape = (2, 5, shape[1])
    with model_fused.textbook_path(textbook):
        expected = lora_step(real, torch.randn(x_shape, dtype=dtype, requires_grad=True), dtype)
        with fake_mode:
            x = torch.randn(x_shape, dtype=dtype, requires_grad=True)
            got = lora_step(fake, x, dtype)
    assert isinstance(x.grad, FakeTensor)
    assert got == expected
