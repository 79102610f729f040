"""KTO: preference tuning on unpaired completions, each labelled desirable or undesirable.

Kahneman-Tversky Optimization (Ethayarajh et al. 2024, eq. 8) needs no pairs: a record is a prompt
x, one completion y and whether y is desirable (data/unpaired.py). With the implied reward

    r(x, y) = log pi(y|x) - log ref(y|x)                 (sums over the completion's trained tokens)

and a reference point z0, the policy's KL from the reference estimated on the batch, each completion
is valued by a sigmoid around z0 and the loss is what that value falls short of its weight:

    desirable     loss = lambda_D * (1 - sigmoid(beta * (r - z0)))
    undesirable   loss = lambda_U * (1 - sigmoid(beta * (z0 - r)))

averaged over the completions. z0 is estimated as TRL's KTOTrainer does: each prompt is paired with
another record's completion (data/unpaired.py: record i with record i-1's), so that y' is a
completion the policy was not trained to give to x, and

    z0 = max(0, mean over those mismatched rows of log pi(y'|x) - log ref(y'|x)),

a constant to the gradient (detached). TRL takes the mean over each device's micro-batch,
gathered over the devices; here it is over the whole optimizer step (every micro-batch, every
rank), computed before the step's first forward with a gradient (`prepare_step`, no gradient), so
that accumulation 4 x 1 equals 1 x 4 and z0 does not depend on the micro-batch size. The policy's
mismatched log-probs are taken in eval mode (no dropout): z0 estimates the policy, not its dropout.

The rewards logged are beta * r, their means over the step's desirable completions
(rewards_chosen) and undesirable ones (rewards_rejected), and kl is z0. The reference policy is
the model with its adapter off, as DPO's (with --init-adapter: the base plus that adapter).
"""

import torch
import torch.nn as nn

from model.loss import trained_positions, sequence_logps

from . import parallel
from .dpo import reference_mode


def kto_losses(policy, ref, kl, desirable, beta: float, desirable_weight: float, undesirable_weight: float):
    """(losses, rewards), each (B,), of sequence log-probs (B,) of policy and reference, the
    reference point kl (a 0-dim tensor, no gradient) and desirable (B,) bool; rewards detached."""
    r = policy - ref
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - r))))
    return losses, beta * r.detach()


class KTOLoss(nn.Module):
    """KTO as the model's forward: forward(batch) -> (sum of the completions' losses, the STATS sums),
    batch being data.make_unpaired_batch's (B completion rows, B KL rows apart) with what count_unpaired
    and training/batches.step_batch add. prepare_step(batches) sets z0 first, for the step's batches."""

    STATS = ("rewards_chosen", "rewards_rejected", "desirable", "undesirable", "logps_chosen", "logps_rejected",
             "kl")
    REF_KEYS = ("ref_completion", "ref_kl")  # where precompute_reference keeps an example's two values

    def __init__(self, model: nn.Module, beta: float = 0.1, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0):
        super().__init__()
        self.model, self.beta = model, beta
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        self.kl = None  # z0 of the step being run (a 0-dim tensor on the device)

    def logps(self, batch: dict, kl_rows: bool = False) -> torch.Tensor:
        """log pi(completion | prompt) of the B completion rows (or of the B KL rows), float32."""
        k = "kl_" if kl_rows else ""
        return sequence_logps(self.model, batch[f"{k}input_ids"], batch[f"{k}labels"], batch.get(f"{k}trained_index"),
                              batch.get(f"{k}trained_rows"))

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> torch.Tensor:
        """log ref of the completion rows, then of the KL rows (2B,): precompute_reference's order."""
        return reference_mode(self.model, lambda: torch.cat([self.logps(batch), self.logps(batch, kl_rows=True)]))

    @torch.no_grad()
    def prepare_step(self, batches: list[dict], autocast, n: int):
        """z0 for the step (or the evaluation) made of `batches`, n completions over all ranks: the
        mean of log pi - log ref over their KL rows, clamped at 0; no host sync (all on the device)."""
        device = batches[0]["input_ids"].device
        total = torch.zeros((), device=device)
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in batches:
                rows = batch["examples"]
                with autocast:
                    policy = self.logps(batch, kl_rows=True)[:rows]
                    ref = batch.get("ref_logps")
                    ref = (reference_mode(self.model, lambda: self.logps(batch, kl_rows=True)) if ref is None
                           else ref[rows:].float())[:rows]
                total += (policy - ref).sum()
        finally:
            self.model.train(was_training)
        self.kl = (parallel.all_reduce_tensor(total[None])[0] / max(n, 1)).clamp(min=0)

    def forward(self, batch: dict):
        if self.kl is None:
            raise RuntimeError("KTOLoss.prepare_step sets z0 before a step's forwards")
        rows = batch["examples"]
        ref = batch.get("ref_logps")  # precomputed: the completions' then the KL rows'
        ref = reference_mode(self.model, lambda: self.logps(batch)) if ref is None else ref.float()
        policy = self.logps(batch)[:rows]  # a batch of no examples has 1 row
        desirable = batch["desirable"][:rows]
        losses, rewards = kto_losses(policy, ref[:rows], self.kl, desirable, self.beta, self.desirable_weight,
                                     self.undesirable_weight)
        d, u = desirable.float(), (~desirable).float()
        logps = policy.detach()
        stats = torch.stack([(rewards * d).sum(), (rewards * u).sum(), d.sum(), u.sum(), (logps * d).sum(),
                             (logps * u).sum(), self.kl * rows])
        return losses.sum(), stats

    def metrics(self, sums: list, n: int, prefix: str = "") -> dict:
        """Means of the rewards and log-probs over the desirable and the undesirable completions
        (left out where there were none), their margin, and z0 (kl)."""
        s = dict(zip(self.STATS, sums))
        out = {f"{prefix}kl": s["kl"] / max(n, 1)}
        for side, count in (("chosen", "desirable"), ("rejected", "undesirable")):
            if s[count]:
                out.update({f"{prefix}rewards_{side}": s[f"rewards_{side}"] / s[count],
                            f"{prefix}logps_{side}": s[f"logps_{side}"] / s[count]})
        if s["desirable"] and s["undesirable"]:
            out[f"{prefix}reward_margin"] = out[f"{prefix}rewards_chosen"] - out[f"{prefix}rewards_rejected"]
        return out


def count_unpaired(batch: dict) -> dict:
    """A micro-batch of unpaired completions (data.make_unpaired_batch) with what KTOLoss reads,
    counted on the CPU before training/batches.step_batch moves it: n_loss, the completions it is a
    mean over; the row of each trained position of the completion rows; the KL rows' trained
    positions and their rows (step_batch finds the completion rows' positions)."""
    labels, kl_labels = batch["labels"], batch["kl_labels"]
    kl_index = trained_positions(kl_labels)
    return {**batch, "n_loss": batch["examples"], "trained_rows": trained_positions(labels) // labels.shape[1],
            "kl_trained_index": kl_index, "kl_trained_rows": kl_index // kl_labels.shape[1]}
