"""The fast pieces of the model, each with its gradient written out, and the switch to their twins.

Every piece here has a textbook twin in model/llama.py or model/loss.py, written op by op with
autograd deriving its gradient; tests/test_model.py and tests/test_loss.py prove each pair equal in
float64, forward and backward. The fast pieces run by default. Inside `textbook_path()` (train.py
and chat.py --textbook) the model, the LoRA layers
(lora/fused.py holds their fast piece) and the loss run on the twins instead, so a learner reads,
and a debugger hooks, every intermediate tensor.

    RMSNormFunction      RMSNorm with a four-pass backward                twin: llama.rms_norm
    RoPE / apply_rope    rotary embedding without a rotated copy of x     twin: llama.rope_rotate
    LinearCrossEntropy   lm_head and cross-entropy in chunks, no logits   twin: loss.textbook_loss_sum
    LinearTokenCrossEntropy   the same, per token (DPO's log-probs)       twin: loss.textbook_sequence_logps
    varlen attention     packed rows without a mask, one kernel call      twin: SDPA with the mask
    document_attention   packed rows without a mask, a call per document  twin: SDPA with the mask
    SharedInputLinear    q/k/v (and gate/up) of one input together        twin: each layer on its own

Cross entropy of logits z = h W^T against target y is  loss = logsumexp(z) - z_y,  and its gradient
is  d loss / d z = softmax(z) - onehot(y).  Since the loss is the last thing computed in a step,
LinearCrossEntropy forms that gradient in the forward pass, in place in the chunk's logits buffer,
and multiplies it into d loss / d h = (softmax(z) - onehot(y)) W  straight away. Each chunk of logits
is then dropped: backward only scales the stored (N, C) gradient by the incoming scalar. This costs
the same two matmuls as autograd would, without saving the logits for backward, recomputing them,
or running log_softmax's backward over them.

Where a debugger steps in one attention call of a LoRA model (every projection a LoRALinear),
file by file, in order. The fast path (the default):

    model/llama.py   Attention.forward(x)                       x (B, T, hidden)
    lora/layer.py    LoRALinear.forward_shared(x, (q_proj, k_proj, v_proj)): reached because
                     LoRALinear is a SharedInputLinear (below); it calls each layer's forward
                     instead when one is not a plain enabled LoRA layer (DoRA, adapter off)
    lora/fused.py    lora_forward -> LoRAGroup.forward: q, k, v with one matmul for the stacked
                     A's (forward_ops, op by op, for an NF4 base or a bf16 one outside autocast)
    model/fused.py   RoPE.forward (apply_rope) on q, then on k
    model/llama.py   the kernel: F.scaled_dot_product_attention (C++); on packed rows on a GPU
                     Attention.varlen_attention or document_attention
    lora/layer.py    o_proj: LoRALinear.forward -> lora/fused.py lora_forward -> LoRAGroup.forward
    backward         autograd calls o_proj's LoRAGroup.backward, SDPA's (C++), RoPE.backward
                     (q's and k's), then the q/k/v LoRAGroup.backward (with grad_checkpointing
                     the block's forward runs again first)

The textbook path (inside textbook_path()):

    model/llama.py   Attention.forward(x)
    lora/layer.py    LoRALinear.forward -> LoRALinear.textbook, for q_proj, k_proj, v_proj in
                     turn: base_forward, then the lora_A and lora_B modules (their hooks fire)
    model/llama.py   rope_rotate on q, then on k
    model/llama.py   attention(): scores, mask (Llama.attention_mask, built once in
                     Llama.hidden_states), softmax and the product with v, written out
    lora/layer.py    o_proj: LoRALinear.forward -> LoRALinear.textbook
    backward         autograd's own, through those ops: no Python of ours

A projection that is a plain nn.Linear runs its own forward on both paths; DoRA layers run
LoRALinear.dora_forward on both.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 2**26  # logits per chunk of LinearCrossEntropy (256 MiB in fp32)

_FAST = True


def enabled() -> bool:
    """Whether the fast pieces run (the default), rather than their textbook twins."""
    return _FAST


@contextmanager
def textbook_path(on: bool = True):
    """Inside the block the model, its LoRA layers and the loss run their textbook twins (on=False:
    the fast pieces); the previous choice comes back after."""
    global _FAST
    before, _FAST = _FAST, not on
    try:
        yield
    finally:
        _FAST = before


class RMSNormFunction(torch.autograd.Function):
    """weight * y, y = x / sqrt(mean(x^2) + eps), with its gradient written out.

    The forward normalises in float32 (or wider), casts back, then scales: the order transformers
    uses, which matters for agreement in bf16/fp16. With r = 1 / sqrt(mean(x^2) + eps) and the
    incoming gradient g, the gradient of x over the C features of a row is

        dy = g * weight,    dx = r * dy - x * r^3 * mean(dy * x)

    four passes over the activations where autograd, through pow, mean, rsqrt and two products,
    takes about eight. Only x and r (one number a row) are kept for backward.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 -> fp32; fp64 stays
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, r)
        return weight * (xf * r).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, weight, r = ctx.saved_tensors
        xf = x.to(r.dtype)
        dy = (g * weight).to(x.dtype).to(r.dtype)  # rounded to x's dtype, as autograd would
        coef = (dy * xf).mean(-1, keepdim=True) * r.pow(3)  # (..., 1)
        dx = (dy * r).addcmul_(xf, coef, value=-1).to(x.dtype)
        dweight = None
        if ctx.needs_input_grad[1]:
            dweight = (g * (xf * r).to(x.dtype)).sum(tuple(range(g.dim() - 1))).to(weight.dtype)
        return dx, dweight, None


class RoPE(torch.autograd.Function):
    """Rotary embedding: x * cos + rotate_half(x) * sin, where rotate_half(x) = cat(-x2, x1) for the
    halves x1, x2 of each head (as transformers rotates). x (B, n_heads, T, head_dim); cos, sin
    (B, 1, T, head_dim).

    Written out per half, the output is  (x1 cos1 - x2 sin1, x2 cos2 + x1 sin2):  one multiplication
    and two in-place multiply-adds, with no rotated copy of x, no negated copy, no sum of two full
    products. The rotation is linear in x, so its gradient is the transposed rotation:
    dx = (g1 cos1 + g2 sin2, g2 cos2 - g1 sin1). Only cos and sin are kept for backward.
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        h = x.shape[-1] // 2
        return rotate(x, cos, sin[..., :h], sin[..., h:], sign=1)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        h = g.shape[-1] // 2
        return rotate(g, cos, sin[..., h:], sin[..., :h], sign=-1), None, None


def rotate(x, cos, sin_a, sin_b, sign: int):
    """(x1 cos1 - sign x2 sin_a, x2 cos2 + sign x1 sin_b) for the halves x1, x2 of the last dimension."""
    h = x.shape[-1] // 2
    out = x * cos
    out[..., :h].addcmul_(x[..., h:], sin_a, value=-sign)
    out[..., h:].addcmul_(x[..., :h], sin_b, value=sign)
    return out


apply_rope = RoPE.apply


def cross_entropy_chunks(hidden, weight, targets, rows: int, with_grad: bool):
    """Yield (start, losses (n,), d loss_i / d z_i (n, vocab) or None) for each chunk of `rows`
    rows of hidden (N, C) against weight (vocab, C) and targets (N,). The losses are in float32
    (float64 for float64 inputs); the gradient, softmax(z) - onehot(y), in hidden's dtype (what
    autograd's matmul would see), formed in place in the chunk's logits buffer."""
    wide = torch.promote_types(hidden.dtype, torch.float32)  # the loss is taken in fp32 or wider
    for start in range(0, hidden.shape[0], rows):
        h, y = hidden[start:start + rows], targets[start:start + rows]  # (n, C), (n,)
        logits = F.linear(h, weight).to(wide)  # (n, vocab)
        target_logit = logits.gather(1, y[:, None]).squeeze(1)  # (n,)
        # logsumexp, in place: z - max, exp, sum (the buffer ends up holding exp(z - max))
        peak = logits.amax(dim=-1, keepdim=True)  # (n, 1)
        sum_exp = logits.sub_(peak).exp_().sum(dim=-1, keepdim=True)  # (n, 1)
        losses = peak.squeeze(1) + sum_exp.squeeze(1).log() - target_logit  # (n,): lse - z_y
        grad = None
        if with_grad:
            grad = logits.div_(sum_exp)  # softmax(z), in place
            grad[torch.arange(len(y), device=y.device), y] -= 1  # - onehot(y)
            grad = grad.to(h.dtype)
        yield start, losses, grad


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i cross_entropy(hidden_i @ weight^T, targets_i), with its gradients formed chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows: int):
        # hidden (N, C), weight (vocab, C), targets (N,) -> fp32 scalar (fp64 for fp64 inputs)
        need_h, need_w = ctx.needs_input_grad[:2]
        wide = torch.promote_types(hidden.dtype, torch.float32)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=wide) if need_w else None
        total = hidden.new_zeros((), dtype=wide)
        for start, losses, grad in cross_entropy_chunks(hidden, weight, targets, rows, need_h or need_w):
            total += losses.sum()
            if need_h:
                grad_h[start:start + rows] = grad @ weight  # (n, C)
            if need_w:
                grad_w += (grad.t() @ hidden[start:start + rows]).to(wide)  # (vocab, C)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_total.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_total).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None


class LinearTokenCrossEntropy(torch.autograd.Function):
    """[cross_entropy(hidden_i @ weight^T, targets_i) for each i] (N,), without the logits: the
    per-token losses a sequence log-probability sums (DPO). As in LinearCrossEntropy each token's
    d loss_i / d h_i = (softmax(z_i) - onehot(y_i)) W is formed in forward; backward scales row i
    by the incoming g_i. The weight's gradient would need every chunk's logits again (it sums
    g_i-weighted outer products), so weight must be frozen here: lm_head is, in LoRA training
    (a LoRA on lm_head goes through its module: model.loss.head_is_plain)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows: int):
        if ctx.needs_input_grad[1]:
            raise ValueError("LinearTokenCrossEntropy needs a frozen weight (lm_head)")
        wide = torch.promote_types(hidden.dtype, torch.float32)
        need_h = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        out = hidden.new_empty(hidden.shape[0], dtype=wide)
        for start, losses, grad in cross_entropy_chunks(hidden, weight, targets, rows, need_h):
            out[start:start + rows] = losses
            if need_h:
                grad_h[start:start + rows] = grad @ weight  # (n, C)
        ctx.save_for_backward(grad_h)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype)[:, None], None, None, None


class SharedInputLinear:
    """A linear layer class whose layers that read the same input (q/k/v, gate/up) can compute
    their outputs together. The model's hook for LoRA's fused group: model/ imports nothing of
    lora/, so LoRALinear subclasses this and overrides `forward_shared`; on the fast path
    Attention and MLP call it when their first projection is one of these, and call each
    projection on its own otherwise (plain nn.Linear) and on the textbook path."""

    @staticmethod
    def forward_shared(x, layers) -> list[torch.Tensor]:
        """[layer(x) for layer in layers]: the outputs of `layers`, which all read x (..., in)."""
        return [layer(x) for layer in layers]
