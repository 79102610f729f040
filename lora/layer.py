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


class LoRADropout(nn.Dropout):
    """nn.Dropout with a cheaper mask on the CPU; on other devices, nn.Dropout itself.

    torch draws CPU Bernoulli samples one at a time from a single-threaded generator, about 4 ns
    each: with p > 0, dropout on the inputs of all seven LoRA layers of a block took a quarter of
    a CPU training step. Here one 64-bit draw gives the random bits of four elements: an element is
    dropped when its 16 bits, read as a signed integer, fall below -32768 + round(p * 2^16). So p is
    rounded to a multiple of 2^-16 (0.05 becomes 0.0500031), and kept elements are scaled by the
    exact 1 / P(keep), which keeps E[output] = x. The mask is a bool, 1 byte an element to keep for
    backward, not nn.Dropout's 4.
    """

    def forward(self, x):
        y, gain = self.unscaled(x)
        return y * gain if gain != 1.0 else y

    def unscaled(self, x) -> tuple[torch.Tensor, float]:
        """dropout(x) as (y, gain) with dropout(x) = gain * y: on the CPU, y is x with the dropped
        elements zeroed and the kept ones not yet scaled by 1 / P(keep).

        LoRALinear folds the gain into the alpha of its B matmul instead of scaling the (N, in)
        input: one pass over the input less, forward and backward.
        """
        if not self.training:
            return x, 1.0
        if x.device.type != "cpu":
            return super().forward(x), 1.0
        threshold = min(round(self.p * 2**16), 2**16 - 1)  # elements dropped per 2^16
        words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # all 64 bits
        bits = words.view(torch.int16)[:x.numel()].view(x.shape)  # 16 uniform random bits an element
        keep = bits >= threshold - 2**15
        return x * keep, 2**16 / (2**16 - threshold)


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
        self.lora_dropout = LoRADropout(dropout) if dropout > 0 else nn.Identity()
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

    @property
    def draws_dropout(self) -> bool:
        """Whether forward draws a dropout mask (p > 0, training mode)."""
        return isinstance(self.lora_dropout, nn.Dropout) and self.lora_dropout.training

    def base_forward(self, x):
        """The frozen layer alone: W0 x + b, in the base's dtype."""
        if not self.is_quantized:
            return F.linear(x, self.weight, self.bias)
        from .quant import nf4_linear  # bitsandbytes is imported only when NF4 is used
        return nf4_linear(x, self.weight, self.bias, self.compute_dtype)

    def forward(self, x):
        x2d = x.reshape(-1, self.in_features)  # (N, in): every matmul below is one 2-D BLAS call
        dropped, gain = self.dropout(x2d.to(self.lora_A.weight.dtype))  # dropout(x) = gain * dropped
        down = self.lora_A(dropped)  # (N, r)
        return self.add_update(self.base_forward(x2d), down, gain).view(*x.shape[:-1], self.out_features)

    def dropout(self, x) -> tuple[torch.Tensor, float]:
        """lora_dropout(x) as (y, gain), lora_dropout(x) = gain * y (see LoRADropout.unscaled)."""
        if isinstance(self.lora_dropout, LoRADropout):
            return self.lora_dropout.unscaled(x)
        return self.lora_dropout(x), 1.0

    def add_update(self, result, down, gain: float = 1.0):
        """result + gain * scaling * down B^T, in result's dtype: base output (N, out), down (N, r).

        The LoRA path is added into the base layer's fresh output buffer in place, by one BLAS call
        (addmm_), rather than by a matmul, a scaling pass and an addition pass over (N, out) (the
        out-of-place addmm would still copy the buffer). Autograd allows it: no backward needs the
        base layer's output. Under autocast the matmuls run in bf16 (B is cast as autocast would
        cast it) and the gradients land in the float32 A and B; without it (a bf16 base, float32 A
        and B) the sum is formed in float32 before rounding to the base's dtype, as PEFT does.
        """
        dtype = down.dtype  # float32; bf16 under autocast
        # B^T as a contiguous (r, out) copy: autograd then forms B's gradient as down^T @ grad, in
        # B^T's layout, which BLAS runs twice as fast as the transposed product it uses for a view.
        B_t = self.lora_B.weight.t().contiguous().to(dtype)
        out = result.to(dtype).addmm_(down, B_t, alpha=self.scaling * gain)
        return out.to(result.dtype)

    @staticmethod
    def forward_shared(x, layers):
        """[layer(x) for layer in layers] for layers that read the same x (q/k/v, gate/up).

        The down-projections x A_q^T, x A_k^T, x A_v^T are the column blocks of x [A_q; A_k; A_v]^T,
        so one matmul with the stacked A computes them all: a (N, 3r)-wide matmul runs nearer the
        machine's peak than three (N, r)-wide ones, and backward gets one input-gradient matmul
        instead of three and two additions. Autograd splits the stacked A's gradient back to each
        A. Only without dropout: each layer draws its own mask (as PEFT's do), so then, or when
        not every layer is a LoRALinear, the layers run one by one.
        """
        if not all(isinstance(m, LoRALinear) and not m.draws_dropout for m in layers):
            return [m(x) for m in layers]
        x2d = x.reshape(-1, x.shape[-1])  # (N, in)
        A = torch.cat([m.lora_A.weight for m in layers])  # (sum of r, in)
        down = F.linear(x2d.to(A.dtype), A)  # (N, sum of r)
        ranks = [m.lora_A.out_features for m in layers]
        return [m.add_update(m.base_forward(x2d), d).view(*x.shape[:-1], m.out_features)
                for m, d in zip(layers, down.split(ranks, dim=-1))]

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
