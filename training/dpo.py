"""DPO: preference tuning on train.py's loop, the base model as its own reference policy.

Direct Preference Optimization (Rafailov et al. 2023, eq. 7) trains a policy pi on pairs of
replies y_w (chosen) and y_l (rejected) to a prompt x, with no reward model and no sampling:

    h    = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))
    loss = -log sigmoid(beta * h)

where log pi(y|x) is the sum over the reply's tokens of their log-probabilities (the tokens SFT
would train; the prompt never counts) and beta sets how far pi may move from ref. The implicit
rewards are r = beta * (log pi(y|x) - log ref(y|x)); "accuracy" is the share of pairs with
r_w > r_l. Two variants, a line each:

    cDPO  (label smoothing e, Mitchell 2023: a share e of labels assumed flipped)
          loss = -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
    IPO   (Azar et al. 2023, eq. 17, beta as its tau; log-probs averaged over the reply's tokens,
          as TRL computes it)
          loss = (h - 1 / (2 beta))^2
    RPO   (Pang et al. 2024; TRL's rpo_alpha) adds alpha times the chosen reply's negative
          log-likelihood per token, -log pi(y_w|x) / |y_w|, so that pushing y_l down cannot drag
          y_w down with it (DPO alone lowers both when they share most tokens). Per pair, then
          averaged over pairs like the rest of the loss (TRL averages over the batch's tokens).

With LoRA the reference policy is free: it is the same model with its adapter off
(lora.adapter_disabled), W0 x exactly (with --init-adapter, W0 x plus that adapter's term: the
model the run started from), so no second model sits in memory. A step runs the
reference forward (no gradient) and then the policy forward over the 2B rows of B pairs, chosen
rows first (data/preference.py); with --precompute-ref the reference log-probs are computed once
per pair before training and a step is one forward. PairLoss is the frame the paired objectives
share; ORPO and SimPO (training/reference_free.py) fill in its pair_losses without a reference.
"""

from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from . import parallel
from model.errors import UserError
from model.files import save_safetensors
from model.loss import IGNORE_INDEX, sequence_logps, trained_positions

LOSS_TYPES = ("sigmoid", "ipo")
REFERENCE_FILE = "ref_logps.safetensors"  # --precompute-ref's numbers, in the run directory
# The sums over a batch's pairs that PreferenceLoss returns beside the loss; divided by the pairs
# they are the step's (and the evaluation's) metrics.
STAT_NAMES = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "logps_chosen", "logps_rejected")


def dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
               label_smoothing: float = 0.0, loss_type: str = "sigmoid", rpo_alpha: float = 0.0,
               chosen_tokens=None):
    """(losses, chosen_rewards, rejected_rewards), each (B,): the formulas above, on sequence
    log-probabilities (B,) each. The rewards are detached: metrics, not part of the loss."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)  # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if rpo_alpha:
        losses = losses - rpo_alpha * policy_chosen / chosen_tokens
    return (losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach())


class PairLoss(nn.Module):
    """A paired objective's loss as the model's forward: forward(batch) -> (sum of the pairs' losses,
    the STATS sums), batch being data.make_pair_batch's (2B rows, chosen first) with what count_pairs
    and training/batches.step_batch add: trained_index, trained_rows, reply_tokens; maybe ref_logps.
    DPO (below), ORPO and SimPO (training/reference_free.py) fill in `pair_losses`.

    Like model.loss.LanguageModelLoss it holds no parameters of its own, so DDP can wrap it and
    the model's names stay as they are; the caller divides the sum by the pairs of the whole step.
    """

    STATS = STAT_NAMES
    REF_KEYS = ("ref_chosen", "ref_rejected")  # where precompute_reference keeps an example's two values
    per_token = False  # the log-probs averaged over each reply's tokens (IPO, ORPO, SimPO)
    uses_reference = True

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def logps(self, batch: dict) -> torch.Tensor:
        """log pi(reply | prompt) of each row (2B,), float32; with per_token, averaged over the reply."""
        out = sequence_logps(self.model, batch["input_ids"], batch["labels"], batch.get("trained_index"),
                             batch.get("trained_rows"))
        return out / batch["reply_tokens"].to(out.dtype) if self.per_token else out

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> torch.Tensor:
        """log ref(reply | prompt) (2B,): the model with every LoRA layer off (an --init-adapter
        stays on: it is part of the reference), in eval mode (no NEFTune noise), with no gradient."""
        return reference_mode(self.model, lambda: self.logps(batch))

    def forward(self, batch: dict):
        pairs = batch["pairs"]
        chosen_rows, rejected_rows = slice(0, pairs), slice(pairs, 2 * pairs)  # a batch of no pairs has 1 row
        ref = None
        if self.uses_reference:
            ref = batch.get("ref_logps")
            ref = self.reference_logps(batch) if ref is None else ref.float()
            ref = (ref[chosen_rows], ref[rejected_rows])
        policy = self.logps(batch)  # (2B,)
        losses, chosen, rejected, *extra = self.pair_losses(policy[chosen_rows], policy[rejected_rows], ref,
                                                            batch["reply_tokens"][chosen_rows])
        stats = torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(),
                             policy[chosen_rows].detach().sum(), policy[rejected_rows].detach().sum(),
                             *(e.detach().sum() for e in extra)])
        return losses.sum(), stats

    def pair_losses(self, chosen, rejected, ref, chosen_tokens):
        """(losses (B,), chosen rewards (B,), rejected rewards (B,), maybe more per-pair stats (B,))
        of log-probs (B,) each; ref: the reference's (chosen, rejected), or None."""
        raise NotImplementedError

    def metrics(self, sums: list, n: int, prefix: str = "") -> dict:
        """The STATS sums over n pairs as means, and the reward margin, mean r_w - r_l."""
        return derived_metrics({f"{prefix}{k}": v / max(n, 1) for k, v in zip(self.STATS, sums)}, prefix)


class PreferenceLoss(PairLoss):
    """DPO and its variants (the formulas above) as the model's forward; the reference log-probs
    come with the batch (--precompute-ref) or from the model with its adapter off."""

    def __init__(self, model: nn.Module, beta: float = 0.1, label_smoothing: float = 0.0,
                 loss_type: str = "sigmoid", rpo_alpha: float = 0.0):
        super().__init__(model)
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        self.beta, self.label_smoothing, self.loss_type = beta, label_smoothing, loss_type
        self.rpo_alpha = rpo_alpha
        self.per_token = loss_type == "ipo"

    def pair_losses(self, chosen, rejected, ref, chosen_tokens):
        # IPO's log-probs are already per token; RPO's NLL is per token in every variant
        per_token = 1 if self.per_token else chosen_tokens
        return dpo_losses(chosen, rejected, ref[0], ref[1], self.beta, self.label_smoothing, self.loss_type,
                          self.rpo_alpha, per_token)


def reference_mode(model: nn.Module, compute):
    """compute() as the reference policy, with no gradient: every LoRA layer off, eval mode (no
    dropout, no NEFTune noise); the model's mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), lora.adapter_disabled(model):
            return compute()
    finally:
        model.train(was_training)


def derived_metrics(means: dict, prefix: str = "") -> dict:
    """The reward margin, mean r_w - r_l, beside the STAT_NAMES means."""
    return {**means, f"{prefix}reward_margin": means[f"{prefix}rewards_chosen"] - means[f"{prefix}rewards_rejected"]}


@torch.no_grad()
def precompute_reference(loss_fn, examples: list[dict], make_batch, micro_batch_size: int,
                         autocast, advance=lambda n: None):
    """Set the two REF_KEYS of loss_fn (floats) on every example: its reference log-probs (DPO: of
    the chosen and the rejected reply; KTO: of the completion and of its KL row), computed in
    micro-batches in file order (make_batch(examples, idx) -> batch on the
    device). One host sync per micro-batch, before training starts; advance(n) after each."""
    for start in range(0, len(examples), micro_batch_size):
        idx = list(range(start, min(start + micro_batch_size, len(examples))))
        with autocast:
            ref = loss_fn.reference_logps(make_batch(examples, idx)).tolist()
        first, second = loss_fn.REF_KEYS
        for k, i in enumerate(idx):
            examples[i][first], examples[i][second] = ref[k], ref[len(idx) + k]
        advance(len(idx))


def cached_reference(loss_fn, train: list[dict], val: list[dict], path: Path, resuming: bool,
                     make_batch, micro_batch_size: int, autocast, console):
    """The reference log-probs of every example (precompute_reference), with a progress bar, written
    to `path` (float64, (examples, 2) per split) by rank 0; a resumed run reads them back from there,
    so it continues on the very numbers the run started with."""
    if resuming and path.is_file():
        saved = safetensors.torch.load_file(path)
        if saved["train"].shape[0] != len(train) or saved["val"].shape[0] != len(val):
            raise UserError(f"--resume: {path} holds {saved['train'].shape[0]} + {saved['val'].shape[0]} pairs, "
                            f"the data {len(train)} + {len(val)}")
        first, second = loss_fn.REF_KEYS
        for examples, key in ((train, "train"), (val, "val")):
            for e, (c, r) in zip(examples, saved[key].tolist()):
                e[first], e[second] = c, r
        return
    from rich.progress import Progress
    with Progress(console=console, transient=True, disable=not parallel.is_main()) as progress:
        task = progress.add_task("reference log-probs", total=len(train) + len(val))
        for examples in (train, val):
            precompute_reference(loss_fn, examples, make_batch, micro_batch_size, autocast,
                                 lambda n: progress.advance(task, n))
    if parallel.is_main():
        pairs = lambda ex: torch.tensor([[e[k] for k in loss_fn.REF_KEYS] for e in ex],
                                        dtype=torch.float64).reshape(-1, 2)
        tmp = path.with_name(path.name + ".tmp")
        save_safetensors({"train": pairs(train), "val": pairs(val)}, tmp)
        tmp.replace(path)  # atomic: a kill mid-write leaves no half file for --resume to read


def count_pairs(batch: dict) -> dict:
    """A micro-batch of pairs (data.make_pair_batch: chosen rows, then rejected) with what the
    preference loss reads, on the CPU before training/batches.step_batch moves it: n_loss, the pairs
    it is a mean over; the row of each trained position; each row's trained tokens (IPO's averages)."""
    labels = batch["labels"]
    return {**batch, "n_loss": batch["pairs"], "trained_rows": trained_positions(labels) // labels.shape[1],
            "reply_tokens": (labels[:, 1:] != IGNORE_INDEX).sum(1)}
