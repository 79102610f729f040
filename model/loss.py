"""The causal language-modelling loss, computed without materialising the full logits.

Labels align with input_ids (the Hugging Face convention): the logits at position t predict
labels[t + 1], and positions labelled -100 carry no loss. Only the trained positions go through
lm_head at all, and they go in chunks, each recomputed in backward, so at most one chunk of fp32
logits (CHUNK_ELEMENTS floats) is alive at a time instead of (B, T, vocab).
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**26  # 64M logits, 256 MB in fp32, per chunk


def _chunk_loss(hidden, weight, targets):
    logits = F.linear(hidden, weight).float()  # (n, vocab): the loss is always taken in fp32
    return F.cross_entropy(logits, targets, reduction="sum")


def lm_loss_sum(model, input_ids, labels, position_ids=None, document_ids=None):
    """Sum of the token losses of a batch (fp32 scalar), and the number of trained tokens.

    Returning the sum, not the mean, lets the caller divide by the trained tokens of a whole
    optimizer step, so gradient accumulation never changes the result.
    """
    hidden = model.hidden_states(input_ids, position_ids, document_ids)  # (B, T, C)
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    trained = targets != IGNORE_INDEX
    hidden = hidden[:, :-1][trained]  # (N, C): only trained positions reach lm_head
    targets = targets[trained]  # (N,)
    weight = model.lm_head.weight  # (vocab, C)
    rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    if hidden.shape[0] <= rows:
        return _chunk_loss(hidden, weight, targets), targets.numel()
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, y in zip(hidden.split(rows), targets.split(rows)):
        total = total + checkpoint(_chunk_loss, h, weight, y, use_reentrant=False)
    return total, targets.numel()
