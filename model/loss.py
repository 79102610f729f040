"""The causal language-modelling loss, computed without materialising the full logits.

Labels align with input_ids (the Hugging Face convention): the logits at position t predict
labels[t + 1], and positions labelled -100 carry no loss. Only the trained positions go through
lm_head at all, and they go in chunks of at most CHUNK_ELEMENTS fp32 logits, so (B, T, vocab)
logits never exist.

The fast loss (model/fused.py: LinearCrossEntropy) never forms the logits; its twin
(`textbook_loss_sum`) does, as a textbook writes it: lm_head, then cross-entropy.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fused

IGNORE_INDEX = -100


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat positions b * T + t of the (B, T) grid whose next token is trained (labels[b, t+1] is
    not -100): where the loss reads hidden states. Finding them takes a nonzero(), which on a GPU
    makes the host wait for the device: the training loop computes them on the CPU, before the
    batch is copied over, and passes them in."""
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols  # (N,)


def lm_loss_sum(model, input_ids, labels, position_ids=None, document_ids=None, trained_index=None,
                documents=None, inputs_embeds=None):
    """Sum of the token losses of a batch (fp32 scalar), and the number of trained tokens.

    Returning the sum, not the mean, lets the caller divide by the trained tokens of a whole
    optimizer step, so gradient accumulation never changes the result. `trained_index` is
    trained_positions(labels), found here when not given; `documents`, packed_documents(document_ids)
    for varlen attention (model.llama), likewise; `inputs_embeds`, input_ids' embedding rows when
    looked up already (Llama.hidden_states).
    """
    hidden = model.hidden_states(input_ids, position_ids, document_ids, documents=documents,
                                 inputs_embeds=inputs_embeds)  # (B, T, C)
    if not fused.enabled():
        return textbook_loss_sum(model.lm_head(hidden), labels)
    if trained_index is None:
        trained_index = trained_positions(labels)
    # Position t predicts token t+1; only trained positions reach lm_head. index_select with known
    # positions, where a boolean mask would need the device to say how many there are.
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, trained_index)  # (N, C)
    targets = labels.reshape(-1).index_select(0, trained_index + 1)  # (N,): the next tokens
    if not head_is_plain(model):  # LoRA on lm_head: its module computes the logits
        logits = model.lm_head(hidden)
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets,
                               reduction="sum"), targets.numel()
    weight = model.lm_head.weight  # (vocab, C)
    rows = max(1, fused.CHUNK_ELEMENTS // weight.shape[0])
    return fused.LinearCrossEntropy.apply(hidden, weight, targets, rows), targets.numel()


def head_is_plain(model) -> bool:
    """Whether lm_head is a plain nn.Linear (not wrapped by a LoRA layer), so that the fused losses
    may read its weight directly."""
    return type(model.lm_head) is nn.Linear


def textbook_loss_sum(logits, labels):
    """The textbook twin of fused.LinearCrossEntropy: logits (B, T, vocab) at position t predict
    labels[t + 1]; the sum of the cross-entropies, in float32 (or wider), over the labels that are
    not -100, and their number."""
    targets = labels[:, 1:].reshape(-1)  # (B * (T - 1),)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32)), targets,
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


class LanguageModelLoss(nn.Module):
    """The model with its training loss as forward: forward(batch) -> (sum of token losses, trained
    tokens), batch being data.make_batch's dict (maybe with to_device's trained_index, documents).

    A module, not a function, because DDP can only hook a module's forward (parallel.wrap wraps
    this one under torchrun). It holds no parameters of its own: `self.model` is the Llama, whose
    names and state dict stay unchanged.
    """

    STATS = ()  # no metrics beside the loss (dpo.PreferenceLoss has some)

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict):
        return lm_loss_sum(self.model, batch["input_ids"], batch["labels"], batch.get("position_ids"),
                           batch.get("document_ids"), batch.get("trained_index"), batch.get("documents"),
                           batch.get("inputs_embeds"))


# -----------------------------------------------------------------------------
# sequence log-probabilities (DPO)

def sequence_logps(model, input_ids, labels, trained_index=None, trained_rows=None):
    """log p(reply | prompt) of each row (R,), fp32: the sum over the row's trained positions of
    log softmax(z_t)[labels[t + 1]], the positions SFT's loss trains (labels not -100).

    `trained_index` is trained_positions(labels) and `trained_rows` its row of each position
    (trained_index // T), both found here when not given (the training loop finds them on the CPU).
    """
    if not fused.enabled():
        return textbook_sequence_logps(model.lm_head(model.hidden_states(input_ids)), labels)
    if trained_index is None:
        trained_index = trained_positions(labels)
    if trained_rows is None:
        trained_rows = trained_index // labels.shape[1]
    logps = token_logps(model, input_ids, labels, trained_index)  # (N,)
    return logps.new_zeros(labels.shape[0]).index_add(0, trained_rows, logps)


def token_logps(model, input_ids, labels, trained_index=None, temperature: float = 1.0):
    """log softmax(z_t / temperature)[labels[t + 1]] at each trained position (N,), fp32, in
    trained_positions' order (row by row): GRPO's per-token log-probabilities (temperature: the
    sampler's, so the policy is the distribution it sampled from). Only the trained positions reach
    lm_head, through fused.LinearTokenCrossEntropy (no logits kept); z / T is (h / T) W^T, lm_head
    having no bias."""
    hidden = model.hidden_states(input_ids)  # (R, T, C)
    if not fused.enabled():
        return textbook_token_logps(model.lm_head(hidden), labels, temperature)
    if trained_index is None:
        trained_index = trained_positions(labels)
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, trained_index)  # (N, C)
    if temperature != 1.0:
        hidden = hidden / temperature
    targets = labels.reshape(-1).index_select(0, trained_index + 1)  # (N,)
    if head_is_plain(model) and not model.lm_head.weight.requires_grad:
        weight = model.lm_head.weight
        rows = max(1, fused.CHUNK_ELEMENTS // weight.shape[0])
        return -fused.LinearTokenCrossEntropy.apply(hidden, weight, targets, rows)  # (N,)
    logits = model.lm_head(hidden)
    return -F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="none")


def textbook_token_logps(logits, labels, temperature: float = 1.0):
    """The textbook twin of token_logps' fast path: logits (R, T, vocab) at position t predict
    labels[t + 1]; log_softmax of logits / temperature over the vocabulary, the label's entry
    picked at each position whose label is not -100, row by row (N,). In float32 (or wider)."""
    wide = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.log_softmax(wide / temperature, dim=-1)
    targets = labels[:, 1:]  # (R, T - 1)
    trained = targets != IGNORE_INDEX
    return logp.gather(-1, torch.where(trained, targets, 0)[..., None]).squeeze(-1)[trained]


def textbook_sequence_logps(logits, labels):
    """The textbook twin of sequence_logps' fast path: logits (R, T, vocab) at position t predict
    labels[t + 1]; log_softmax over the vocabulary, the label's entry picked, summed over each row's
    positions whose label is not -100. In float32 (or wider)."""
    logp = torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    targets = labels[:, 1:]  # (R, T - 1)
    trained = targets != IGNORE_INDEX
    picked = logp.gather(-1, torch.where(trained, targets, 0)[..., None]).squeeze(-1)  # (R, T - 1)
    return torch.where(trained, picked, 0.0).sum(-1)
