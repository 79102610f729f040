"""LoRALinear: a frozen linear layer plus a trainable low-rank update (Hu et al. 2021, eq. 3).

    h = W0 x + b + (alpha / r) * B A dropout(x)

            x ───────────── W0 (out, in), b: frozen, maybe NF4 ────────────┐
            │                                                              (+)──> h
            └─ dropout ──> A (r, in) ──> B (out, r) ──> * scaling ─────────┘

A starts kaiming-uniform and B at zero, so a fresh layer computes exactly what the base layer did,
and training moves only A and B.

DoRA (Liu et al. 2024, eq. 5) splits the adapted weight into a direction and a trained magnitude m
(out,), one per output row, that starts at the row norms of W0:

    W' = m * (W0 + (alpha / r) B A) / ||W0 + (alpha / r) B A||_row

An init adapter (lora/chain.py) is a second, frozen LoRA (A0, B0, scaling s0) that the layer
computes beside the trained one: the model a run starts from is base + that adapter, unmerged.

    h = W0 x + b + s0 B0 A0 x + (alpha / r) B A dropout(x)
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import fused as model_fused

from . import fused


class LoRADropout(nn.Dropout):
    """nn.Dropout whose mask LoRALinear can keep as a bool tensor, with a cheaper mask on the CPU.

    torch draws CPU Bernoulli samples one at a time from a single-threaded generator, so with
    p > 0 the masks of a block's seven LoRA inputs cost a large share of a CPU training step
    (bench/train_speed.py measures it). Here one 64-bit draw gives the random bits of four elements: an element is
    dropped when its 16 bits, read as a signed integer, fall below -32768 + round(p * 2^16). So p is
    rounded to a multiple of 2^-16 (0.05 becomes 0.0500031), and kept elements are scaled by the
    exact 1 / P(keep), which keeps E[output] = x. On other devices, and under torch.compile, the
    mask is rand >= p.
    """

    def forward(self, x):
        if not self.training:
            return x
        keep, gain = self.mask(x)
        return x * keep * gain

    def mask(self, x) -> tuple[torch.Tensor, float]:
        """A fresh mask for x: (keep, gain) with dropout(x) = x * keep * gain, keep a bool tensor
        of x's shape (1 byte an element, where the masked copy would take 4) and gain = 1 / P(keep).
        """
        if x.device.type != "cpu" or torch.compiler.is_compiling():  # torch.compile cannot trace random_
            return torch.rand_like(x) >= self.p, 1 / (1 - self.p)
        threshold = min(round(self.p * 2**16), 2**16 - 1)  # elements dropped per 2^16
        words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # all 64 bits
        bits = words.view(torch.int16)[:x.numel()].view(x.shape)  # 16 uniform random bits an element
        return bits >= threshold - 2**15, 2**16 / (2**16 - threshold)


class LoRALinear(nn.Module, model_fused.SharedInputLinear):
    """Replaces an `nn.Linear` (or, for QLoRA, an `NF4Linear` from quant.py) inside a model.

    It keeps the base layer's own `weight` and `bias` Parameters as its attributes, so the model's
    state-dict keys for the base stay `...q_proj.weight` (checkpoints load unchanged, tied weights
    stay tied, nothing is copied), and A and B live in the submodules `lora_A` and `lora_B`, whose
    keys `...q_proj.lora_A.weight` are PEFT's. A and B are created in float32 whatever the base
    dtype: their updates are tiny relative to their values, which bf16 would round away.

    For QLoRA `weight` is the bitsandbytes `Params4bit` of the quantized base: packed 4-bit codes
    with its `quant_state` (block absmaxes), and the matmul runs in `compute_dtype`.

    `forward` is the formula; `textbook` computes it module by module, and lora/fused.py computes it
    fast (the layers of one input together, the backward written out): the default, proven equal
    to the textbook in tests/test_lora.py. Being a model.fused.SharedInputLinear is how the model
    reaches that group: its Attention and MLP call `forward_shared` with q/k/v and gate/up. DoRA
    layers (dora=True) run `dora_forward`, op by op, on both paths: there is no fused DoRA yet.
    A frozen init adapter (`init_A`, `init_B`, `init_scaling`; lora/chain.py attaches it) adds
    `init_update` on every path; DoRA layers take none.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dora: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", base.weight)  # (out, in); Params4bit when NF4
        self.register_parameter("bias", base.bias)  # (out,) or None
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        self.compute_dtype = getattr(base, "compute_dtype", None)  # NF4 only: dtype of the matmul
        device = base.weight.device
        # skip_init: no draws for nn.Linear's own init, which reset_lora_parameters replaces; the
        # layer's random numbers are then A's alone (FSDP, initialising shards, draws the same).
        linear = lambda n_in, n_out: nn.utils.skip_init(nn.Linear, n_in, n_out, bias=False, device=device,
                                                        dtype=torch.float32)
        self.lora_A, self.lora_B = linear(self.in_features, r), linear(r, self.out_features)
        # Identity when p = 0: no mask drawn, no copy of x made.
        self.lora_dropout = LoRADropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.use_dora = dora
        if dora:  # m (out,), float32; PEFT's name, so the adapter's key is PEFT's too
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, device=device))
        self.enabled = True  # False: the base layer alone (lora.adapter_disabled)
        # PiSSA (lora/pissa.py): the start (A0, B0), which saving converts the adapter against
        self.register_buffer("pissa_A0", None, persistent=False)
        self.register_buffer("pissa_B0", None, persistent=False)
        # The frozen init adapter (lora/chain.py): A0 (r0, in), B0 (out, r0) and its own scaling s0.
        # Buffers, not Parameters: never trained, never in the state dict (the adapter is saved
        # stacked with A and B instead); they follow the model's .to(device).
        self.register_buffer("init_A", None, persistent=False)
        self.register_buffer("init_B", None, persistent=False)
        self.init_scaling = 0.0
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        init_lora_weights(self.lora_A.weight, self.lora_B.weight)
        if self.use_dora and not self.weight.is_meta:  # FSDP initialises its shards after loading
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(self.weight_norm())  # = ||W0||_row, as B = 0

    def dense_weight(self) -> torch.Tensor:
        """W0 (out, in) as a dense tensor: the NF4 base dequantized."""
        if not self.is_quantized:
            return self.weight
        from .quant import dequantize
        return dequantize(self.weight)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W0 + scaling B A||_row (out,), in float32: DoRA's denominator, a constant to autograd."""
        return merge_weight(self.dense_weight(), self.lora_A.weight, self.lora_B.weight, self.scaling).norm(dim=1)

    @property
    def is_quantized(self) -> bool:
        return hasattr(self.weight, "quant_state")

    @property
    def draws_dropout(self) -> bool:
        """Whether forward draws a dropout mask (p > 0, training mode)."""
        return isinstance(self.lora_dropout, nn.Dropout) and self.lora_dropout.training

    def dropout_mask(self, x) -> tuple[torch.Tensor | None, float]:
        """(keep, gain) with lora_dropout(x) = x * keep * gain; (None, 1.0) when nothing is dropped."""
        return self.lora_dropout.mask(x) if self.draws_dropout else (None, 1.0)

    def base_forward(self, x, bias: bool = True):
        """The frozen layer alone: W0 x + b (or W0 x), in the base's dtype."""
        b = self.bias if bias else None
        if not self.is_quantized:
            return F.linear(x, self.weight, b)
        from .quant import nf4_linear  # bitsandbytes is imported only when NF4 is used
        return nf4_linear(x, self.weight, b, self.compute_dtype)

    def forward(self, x):
        """h = W0 x + b + (alpha / r) B A dropout(x) (Hu et al. 2021, eq. 3).

        By default the same sum comes from lora/fused.py, which computes the LoRA layers of one
        input (q/k/v, gate/up) together with their backward written out; under
        model.fused.textbook_path() (train.py --textbook) it is `textbook`, below. With an init
        adapter its term s0 B0 A0 x is added on every path, disabled included: adapter_disabled
        switches off the trained LoRA, not the model the run started from."""
        if not self.enabled:
            base = self.base_forward(x)
            return base if self.init_A is None else self.add_init(x, base)
        if self.use_dora:
            return self.dora_forward(x)
        if model_fused.enabled():
            return fused.lora_forward(x, [self])[0]
        return self.textbook(x)

    def textbook(self, x):
        """The formula module by module, autograd deriving the backward. A hook on `self.lora_A`
        sees A dropout(x). A and B are float32: outside autocast x is cast to it, and the sum is
        rounded to the base's dtype once."""
        x_lora = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(self.lora_dropout(x_lora))) * self.scaling  # (..., out)
        if self.init_A is not None:
            update = update + self.init_update(x)  # + s0 B0 A0 x, before the one rounding
        base = self.base_forward(x)  # W0 x + b, (..., out)
        return (base.to(update.dtype) + update).to(base.dtype)

    def init_update(self, x):
        """s0 B0 A0 x (..., out): the frozen init adapter's term, without dropout (it is part of the
        model the run starts from, not of what it trains). The LoRA update's dtypes: A0 and B0 are
        float32; outside autocast x is cast to it, under autocast the matmuls run in its dtype.
        x gets its gradient through this term too; A0 and B0 are buffers and get none."""
        x_lora = x if torch.is_autocast_enabled(x.device.type) else x.to(self.init_A.dtype)
        return F.linear(F.linear(x_lora, self.init_A), self.init_B) * self.init_scaling

    def add_init(self, x, out):
        """out + s0 B0 A0 x, summed in the init term's dtype and rounded once to out's dtype."""
        update = self.init_update(x)
        return (out.to(update.dtype) + update).to(out.dtype)

    def dora_forward(self, x):
        """DoRA (Liu et al. 2024, eq. 5), with the norm n = ||W0 + s B A||_row a constant in backward
        (detached, as the paper's section 4.3 suggests and PEFT does), s = alpha / r:

            h = (m / n) * (W0 x + s B A x) + b                                 without dropout
            h = W0 x + b + (m / n - 1) * W0 x_d + (m / n) * s B A x_d          x_d = dropout(x)

        The second is PEFT's form with dropout: the base path keeps the undropped x, the DoRA
        rescaling and the LoRA path read x_d. m gets its gradient through m / n; A and B through
        the LoRA path only."""
        x_lora = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.weight.dtype)
        x_d = self.lora_dropout(x_lora)
        scale = self.lora_magnitude_vector / self.weight_norm()  # m / n, (out,)
        update = self.lora_B(self.lora_A(x_d)) * self.scaling  # s B A x_d, (..., out)
        base = self.base_forward(x)  # W0 x + b
        if x_d is x_lora:  # nothing dropped: W0 x_d is the base output without its bias
            direction = base if self.bias is None else base - self.bias
        else:
            direction = self.base_forward(x_d.to(base.dtype), bias=False)
        out = base.to(update.dtype) + (scale - 1) * direction.to(update.dtype) + scale * update
        return out.to(base.dtype)

    @staticmethod
    def forward_shared(x, layers):
        """[layer(x) for layer in layers] for layers that read the same x: the model's Attention and
        MLP call this on the fast path for q/k/v and gate/up (model.fused.SharedInputLinear), and
        lora/fused.py computes them together. A group with a layer that is not a plain enabled LoRA
        layer (DoRA, adapter off, an nn.Linear beside it) runs each layer's forward instead."""
        if not all(isinstance(m, LoRALinear) and m.enabled and not m.use_dora for m in layers):
            return [m(x) for m in layers]
        return fused.lora_forward(x, layers)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"r={self.lora_A.out_features}, scaling={self.scaling:g}"
                + (", dora" if self.use_dora else "") + (", base=nf4" if self.is_quantized else "")
                + ("" if self.init_A is None else
                   f", init_adapter=(r={self.init_A.shape[0]}, scaling={self.init_scaling:g})"))


def init_lora_weights(A: torch.Tensor, B: torch.Tensor):
    """LoRA's initialisation, in place: A (r, in) kaiming-uniform(a=sqrt(5)), which is nn.Linear's
    own init, U(-1/sqrt(in), 1/sqrt(in)), as PEFT and the LoRA reference code use for A; B (out, r)
    zeros, so that B A = 0 at the start of training."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(B)


def merge_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                 magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """W' = W + scaling * B @ A in float32. W (out, in), A (r, in), B (out, r) -> (out, in) float32.
    With DoRA's magnitude m (out,): W' = m * (W + scaling B A) / ||W + scaling B A||_row.

    Computed in float32 whatever the inputs' dtypes, so a bf16 W gets one rounding (when the caller
    casts W' back), not one per operation.
    """
    merged = W.float() + scaling * (B.float() @ A.float())
    if magnitude is None:
        return merged
    return merged * (magnitude.float() / merged.norm(dim=1))[:, None]
