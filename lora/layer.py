"""LoRALinear: a frozen linear layer plus a trainable low-rank update (Hu et al. 2021, eq. 3).

    h = W0 x + b + (alpha / r) * B A dropout(x)

            x ───────────── W0 (out, in), b: frozen, maybe NF4 ────────────┐
            │                                                              (+)──> h
            └─ dropout ──> A (r, in) ──> B (out, r) ──> * scaling ─────────┘

A starts kaiming-uniform and B at zero, so a fresh layer computes exactly what the base layer did,
and training moves only A and B.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    """Replaces an `nn.Linear` (or, for QLoRA, an `NF4Linear` from quant.py) inside a model.

    It keeps the base layer's own `weight` and `bias` Parameters as its attributes, so the model's
    state-dict keys for the base stay `...q_proj.weight` (checkpoints load unchanged, tied weights
    stay tied, nothing is copied), and A and B live in the submodules `lora_A` and `lora_B`, whose
    keys `...q_proj.lora_A.weight` are PEFT's. A and B are created in float32 whatever the base
    dtype: their updates are tiny relative to their values, which bf16 would round away.

    For QLoRA `weight` is the bitsandbytes `Params4bit` of the quantized base: packed 4-bit codes
    with its `quant_state` (block absmaxes), and the matmul runs in `compute_dtype`.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", base.weight)  # (out, in); Params4bit when NF4
        self.register_parameter("bias", base.bias)  # (out,) or None
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        self.compute_dtype = getattr(base, "compute_dtype", None)  # NF4 only: dtype of the matmul
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        # Identity when p = 0: no mask drawn, no copy of x made.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        # kaiming_uniform(a=sqrt(5)) is nn.Linear's own init (U(-1/sqrt(in), 1/sqrt(in))); PEFT and
        # the LoRA reference code use it for A. B = 0 makes B A = 0 at the start of training.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def is_quantized(self) -> bool:
        return hasattr(self.weight, "quant_state")

    def base_forward(self, x):
        """The frozen layer alone: W0 x + b, in the base's dtype."""
        if not self.is_quantized:
            return F.linear(x, self.weight, self.bias)
        from .quant import nf4_linear  # bitsandbytes is imported only when NF4 is used
        return nf4_linear(x, self.weight, self.bias, self.compute_dtype)

    def forward(self, x):
        result = self.base_forward(x)  # (..., out)
        down = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))  # (..., r)
        # result + scaling * down B^T as one BLAS call (addmm) rather than a matmul, a scaling pass
        # and an addition pass over (..., out). Under autocast the matmuls run in bf16 and the
        # gradients land in the float32 A and B; without it (a bf16 base, float32 A and B) the sum
        # is formed in float32 before rounding to the base's dtype, as PEFT does.
        out = torch.addmm(result.reshape(-1, self.out_features).to(down.dtype), down.reshape(-1, down.shape[-1]),
                          self.lora_B.weight.t(), alpha=self.scaling)
        return out.view(result.shape).to(result.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"r={self.lora_A.out_features}, scaling={self.scaling:g}"
                + (", base=nf4" if self.is_quantized else ""))


def merge_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W' = W + scaling * B @ A in float32. W (out, in), A (r, in), B (out, r) -> (out, in) float32.

    Computed in float32 whatever the inputs' dtypes, so a bf16 W gets one rounding (when the caller
    casts W' back), not one per operation.
    """
    return W.float() + scaling * (B.float() @ A.float())
