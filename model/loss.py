"""The causal language-modelling loss, computed without materialising the full logits.

Labels align with input_ids (the Hugging Face convention): the logits at position t predict
labels[t + 1], and positions labelled -100 carry no loss. Only the trained positions go through
lm_head at all, and they go in chunks of at most CHUNK_ELEMENTS fp32 logits, so (B, T, vocab)
logits never exist.

Cross entropy of logits z = h W^T against target y is  loss = logsumexp(z) - z_y,  and its gradient
is  d loss / d z = softmax(z) - onehot(y).  Since the loss is the last thing computed in a step,
LinearCrossEntropy forms that gradient in the forward pass, in place in the chunk's logits buffer,
and multiplies it into d loss / d h = (softmax(z) - onehot(y)) W  straight away. Each chunk of logits
is then dropped: backward only scales the stored (N, C) gradient by the incoming scalar. This costs
the same two matmuls as autograd would, without saving the logits for backward, recomputing them,
or running log_softmax's backward over them.
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**26  # 64M logits, 256 MB in fp32, per chunk


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i cross_entropy(hidden_i @ weight^T, targets_i), with its gradients formed chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows: int):
        # hidden (N, C), weight (vocab, C), targets (N,) -> fp32 scalar
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], rows):
            h, y = hidden[start:start + rows], targets[start:start + rows]  # (n, C), (n,)
            logits = F.linear(h, weight).float()  # (n, vocab): the loss is always taken in fp32
            target_logit = logits.gather(1, y[:, None]).squeeze(1)  # (n,)
            # logsumexp, in place: z - max, exp, sum (the buffer ends up holding exp(z - max))
            peak = logits.amax(dim=-1, keepdim=True)  # (n, 1)
            sum_exp = logits.sub_(peak).exp_().sum(dim=-1, keepdim=True)  # (n, 1)
            lse = peak.squeeze(1) + sum_exp.squeeze(1).log()  # (n,)
            total += (lse - target_logit).sum()
            if need_h or need_w:
                grad = logits.div_(sum_exp)  # softmax(z), in place
                grad[torch.arange(len(y), device=y.device), y] -= 1  # - onehot(y)
                grad = grad.to(h.dtype)  # the dtype autograd's matmul would see
                if need_h:
                    grad_h[start:start + rows] = grad @ weight  # (n, C)
                if need_w:
                    grad_w += (grad.t() @ h).float()  # (vocab, C)
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


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat positions b * T + t of the (B, T) grid whose next token is trained (labels[b, t+1] is
    not -100): where the loss reads hidden states. Finding them takes a nonzero(), which on a GPU
    makes the host wait for the device: the training loop computes them on the CPU, before the
    batch is copied over, and passes them in."""
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols  # (N,)


def lm_loss_sum(model, input_ids, labels, position_ids=None, document_ids=None, trained_index=None,
                documents=None):
    """Sum of the token losses of a batch (fp32 scalar), and the number of trained tokens.

    Returning the sum, not the mean, lets the caller divide by the trained tokens of a whole
    optimizer step, so gradient accumulation never changes the result. `trained_index` is
    trained_positions(labels), found here when not given; `documents`, packed_documents(document_ids)
    for varlen attention (model.llama), likewise.
    """
    hidden = model.hidden_states(input_ids, position_ids, document_ids, documents=documents)  # (B, T, C)
    if trained_index is None:
        trained_index = trained_positions(labels)
    # Position t predicts token t+1; only trained positions reach lm_head. index_select with known
    # positions, where a boolean mask would need the device to say how many there are.
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, trained_index)  # (N, C)
    targets = labels.reshape(-1).index_select(0, trained_index + 1)  # (N,): the next tokens
    weight = model.lm_head.weight  # (vocab, C)
    rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    return LinearCrossEntropy.apply(hidden, weight, targets, rows), targets.numel()
