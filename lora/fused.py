"""The fast path of the LoRA layers: what LoRALinear.forward and LoRALinear.forward_shared (which the
model's Attention and MLP call for q/k/v and gate/up) run unless model.fused.textbook_path() is on;
model/fused.py's docstring follows one attention call through it. Its textbook twin is
LoRALinear.textbook (lora/layer.py): base(x) + scaling * B A dropout(x), autograd deriving the
gradient; tests/test_lora.py proves them equal in float64 and under bf16/fp16 autocast.

    lora_forward(x, layers)   the LoRA layers that read one x (q/k/v, gate/up, or one layer alone):
                              LoRAGroup where it runs, else forward_ops, op by op
    LoRAGroup                 their forward and backward written out, in one compute dtype
    forward_ops, add_update   the op-by-op path (NF4 bases; a bf16 base outside autocast)

A layer with a frozen init adapter (lora/chain.py) gets its term s0 B0 A0 x added to its output
here, by autograd, on either path: LoRAGroup computes the trained LoRA alone.
"""

import torch
import torch.nn.functional as F


def lora_forward(x, layers) -> list[torch.Tensor]:
    """[layer(x) for layer in layers], for LoRALinear layers that read the same x (..., in).

    The down-projections x A_q^T, x A_k^T, x A_v^T are the column blocks of x [A_q; A_k; A_v]^T,
    so one matmul with the stacked A computes them all: a (N, 3r)-wide matmul runs nearer the
    machine's peak than three (N, r)-wide ones, and backward gets one input-gradient matmul
    instead of three. Without dropout, that is: with it each layer draws its own mask (as PEFT's
    do). LoRAGroup does all this with its backward written out, where it runs (see
    `LoRAGroup.dtype_for`); otherwise autograd derives the backward from the ops (`forward_ops`).
    """
    x2d = x.reshape(-1, x.shape[-1])  # (N, in): every matmul below is one 2-D BLAS call
    dtype = LoRAGroup.dtype_for(x2d, layers)
    if dtype is not None:
        keeps, gains = zip(*(m.dropout_mask(x2d) for m in layers))
        alphas = [m.scaling * gain for m, gain in zip(layers, gains)]
        weights = [t for m in layers for t in (m.weight, m.bias, m.lora_A.weight, m.lora_B.weight)]
        outs = LoRAGroup.apply(x2d, dtype, alphas, keeps, *weights)
        outs = [out if m.init_A is None else m.add_init(x2d, out) for m, out in zip(layers, outs)]
    elif len(layers) > 1 and not any(m.draws_dropout for m in layers):
        A = torch.cat([m.lora_A.weight for m in layers])  # (sum of r, in)
        x_lora = x2d if torch.is_autocast_enabled(x2d.device.type) else x2d.to(A.dtype)
        downs = F.linear(x_lora, A).split([m.lora_A.out_features for m in layers], dim=-1)
        outs = [forward_ops(m, x2d, down) for m, down in zip(layers, downs)]
    else:
        outs = [forward_ops(m, x2d) for m in layers]
    return [out.view(*x.shape[:-1], m.out_features) for m, out in zip(layers, outs)]


def forward_ops(layer, x2d, down=None):
    """One LoRALinear op by op, on x2d (N, in), with autograd deriving the backward: base(x) +
    scaling * B A dropout(x) (+ s0 B0 A0 x with an init adapter). `down` is x A^T when the caller
    has it already (no dropout)."""
    gain = 1.0
    if down is None:
        keep, gain = layer.dropout_mask(x2d)
        # A's dtype (float32) for a bf16 x outside autocast, so the update is formed in float32;
        # under autocast x stays as it is: autocast casts it to its dtype for the matmul anyway.
        autocast = torch.is_autocast_enabled(x2d.device.type)
        x_lora = x2d if autocast else x2d.to(layer.lora_A.weight.dtype)
        down = layer.lora_A(x_lora if keep is None else x_lora * keep)  # (N, r)
    base = layer.base_forward(x2d)  # (N, out)
    if layer.init_A is None:
        return add_update(layer, base, down, gain)
    # The init term joins the sum in the LoRA's dtype, so the output is rounded to the base's once.
    return add_update(layer, base.to(down.dtype) + layer.init_update(x2d), down, gain).to(base.dtype)


def add_update(layer, result, down, gain: float = 1.0):
    """result + gain * scaling * down B^T, in result's dtype: base output (N, out), down (N, r).

    The LoRA path is added into the base layer's fresh output buffer in place, by one BLAS call
    (addmm_), rather than by a matmul, a scaling pass and an addition pass over (N, out) (the
    out-of-place addmm would still copy the buffer). Autograd allows it: no backward needs the
    base layer's output. Under autocast the matmuls run in bf16 (B is cast as autocast would
    cast it) and the gradients land in the float32 A and B; without it (a bf16 base, float32 A
    and B) the sum is formed in float32 before rounding to the base's dtype, as PEFT does.
    The dropout gain 1 / P(keep) rides in alpha too, rather than in a pass over the input.
    """
    dtype = down.dtype  # float32; bf16 under autocast
    # B^T as a contiguous (r, out) copy: autograd then forms B's gradient as down^T @ grad, in
    # B^T's layout, which BLAS runs faster than the transposed product it uses for a view.
    B_t = layer.lora_B.weight.t().contiguous().to(dtype)
    out = result.to(dtype).addmm_(down, B_t, alpha=layer.scaling * gain)
    return out.to(result.dtype)


class LoRAGroup(torch.autograd.Function):
    """Forward and backward, written out, of LoRA layers i = 1..n that read the same x (N, in):

        out_i = x W_i^T + b_i + alpha_i (x_i A_i^T) B_i^T,   x_i = x * keep_i (dropout) or x,
        alpha_i = scaling_i / P(keep)

    backward, with g_i the gradient of out_i and down_i = x_i A_i^T:

        d down_i = alpha_i g_i B_i          dB_i = alpha_i g_i^T down_i      dA_i = d down_i^T x_i
        dx = sum_i g_i W_i + sum_i (d down_i A_i) * keep_i

    Autograd, running the layers op by op, forms each term of dx as its own (N, in) tensor and adds
    them in separate passes; here BLAS accumulates them into one buffer (addmm_, beta = 1). Without
    dropout the A are stacked, so the down-projections, the A gradients and their dx term are one
    matmul each. With dropout it keeps x and the bool masks, not each layer's masked copy of x, and
    forms x * keep_i again in backward: 3 bytes an element less per layer, for one pass.

    Every matmul runs in one compute dtype, `dtype`: under autocast the autocast dtype (bf16 or
    fp16), so x, W and b are cast to it as autocast would cast them (a no-op for a bf16 model) and
    the float32 masters A and B are cast once a step; dA and dB are formed in it, as autocast's
    matmuls form them, and land in float32 (the scaling alpha_i applied there, not rounded to bf16
    first). The op-by-op path under autocast instead casts x to float32 for the LoRA branch and
    autocast casts it back, a round trip of every activation.
    """

    @staticmethod
    def dtype_for(x, layers) -> torch.dtype | None:
        """The dtype the group computes in for x and these layers, or None where it does not run
        (NF4 bases; float64 under autocast, which autocast leaves alone; mixed dtypes without it)."""
        if any(m.is_quantized for m in layers):
            return None
        tensors = [x] + [t for m in layers for t in (m.weight, m.lora_A.weight, m.lora_B.weight)]
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            return dtype if all(t.dtype in (dtype, torch.float32) for t in tensors) else None
        return x.dtype if all(t.dtype == x.dtype for t in tensors) else None

    @staticmethod
    def forward(ctx, x, dtype, alphas, keeps, *weights):  # weights: W_1, b_1, A_1, B_1, W_2, ...
        ctx.x_dtype = x.dtype  # dx, dA and dB go back in their inputs' dtypes
        ctx.A_dtypes, ctx.B_dtypes = [A.dtype for A in weights[2::4]], [B.dtype for B in weights[3::4]]
        x, *weights = [None if t is None else t.to(dtype) for t in (x, *weights)]  # no-ops in one dtype
        Ws, bs, As, Bs = weights[0::4], weights[1::4], weights[2::4], weights[3::4]
        ranks = [A.shape[0] for A in As]
        if all(keep is None for keep in keeps):
            downs = torch.mm(x, cat(As).t()).split(ranks, dim=1)  # (N, r_i) each
        else:
            downs = [torch.mm(x if keep is None else x * keep, A.t()) for keep, A in zip(keeps, As)]
        # The LoRA term first, into a fresh buffer; the base matmul then adds onto it (beta = 1)
        # while it computes, instead of the thin LoRA matmul reading and writing all of it again.
        outs = [torch.mm(down, B.t() * alpha) if b is None else torch.addmm(b, down, B.t(), alpha=alpha)
                for down, B, b, alpha in zip(downs, Bs, bs, alphas)]
        for out, W in zip(outs, Ws):
            out.addmm_(x, W.t())
        ctx.alphas, ctx.ranks = alphas, ranks
        ctx.save_for_backward(x, *keeps, *Ws, *As, *Bs, *downs)  # x, W, A, B in the compute dtype
        return tuple(outs)

    @staticmethod
    def backward(ctx, *gs):
        n, saved = len(gs), ctx.saved_tensors  # read once: checkpointing allows no second unpack
        x, keeps = saved[0], saved[1:1 + n]
        Ws, As, Bs, downs = [saved[1 + n * k:1 + n * (k + 1)] for k in range(1, 5)]
        gs = [g.to(x.dtype) for g in gs]
        needs_x, needs = ctx.needs_input_grad[0], ctx.needs_input_grad[4:]
        needs_A, needs_B = any(needs[2::4]), any(needs[3::4])
        dAs, dBs, dx = [None] * n, [None] * n, None
        if needs_B:
            # down^T g is (r, out): the layout BLAS runs fastest; B's gradient is its transpose.
            dBs = [torch.mm(down.t(), g).to(dtype).mul_(alpha).t()
                   for down, g, alpha, dtype in zip(downs, gs, ctx.alphas, ctx.B_dtypes)]
        if needs_A or needs_x:
            d_downs = [torch.mm(g, B).mul_(alpha) for g, B, alpha in zip(gs, Bs, ctx.alphas)]  # (N, r_i)
            if all(keep is None for keep in keeps):
                d_down = cat(d_downs, dim=1)  # (N, sum of r)
                if needs_A:
                    dAs = torch.mm(d_down.t(), x).split(ctx.ranks)
                if needs_x:
                    dx = torch.mm(d_down, cat(As))
            else:
                if needs_A:
                    dAs = [torch.mm(d.t(), x if keep is None else x * keep) for d, keep in zip(d_downs, keeps)]
                if needs_x:  # sum_i (d down_i A_i) * keep_i
                    dx = torch.zeros_like(x)
                    for d, A, keep in zip(d_downs, As, keeps):
                        if keep is None:
                            dx.addmm_(d, A)
                        else:
                            dx.addcmul_(torch.mm(d, A), keep)
            if needs_A:
                dAs = [dA.to(dtype) for dA, dtype in zip(dAs, ctx.A_dtypes)]
        if needs_x:  # the base layers' terms, accumulated by the big matmuls as they run (beta = 1)
            for g, W in zip(gs, Ws):
                dx.addmm_(g, W)
            dx = dx.to(ctx.x_dtype)
        per_layer = [(None, None, dA, dB) for dA, dB in zip(dAs, dBs)]
        return dx, None, None, None, *[grad for grads in per_layer for grad in grads]


def cat(tensors, dim=0):
    """torch.cat, without the copy when there is one tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)
