"""GRPO's loss: group-relative advantages, a clipped policy gradient and a KL penalty to the reference.

Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, section 4.1) samples, for each
prompt q, a group of G completions o_1..o_G from the policy as it was when sampling (pi_old),
scores each with the reward functions (r_i), and uses each completion's reward relative to its
group as the advantage of every one of its tokens (eq. 3, outcome supervision):

    A_i = (r_i - mean(r_1..r_G)) / std(r_1..r_G)          (std: unbiased, + 1e-4, as TRL)

Per token t of completion i, with the ratio rho = pi(o_i,t | q, o_i,<t) / pi_old(o_i,t | ...):

    pg    = min(rho A_i, clip(rho, 1 - eps, 1 + eps) A_i)                PPO's clipped objective
    kl    = pi_ref / pi - log(pi_ref / pi) - 1                           eq. 4: unbiased, >= 0
    loss  = -(pg - beta kl)

and the token losses are averaged per completion, then over completions (the paper's eq. 3:
"sequence"), or averaged over all the tokens of all completions alike ("token", as Dr. GRPO
(Liu et al. 2025) and DAPO do: a long completion is no longer weighed down by its length). Both
are means over the whole optimizer step, so accumulation 4 x 1 equals 1 x 4.

pi_old's log-probabilities come from the sampling pass, so one generation serves several updates
(--grpo-iterations): at the first, pi_old is the policy as it is (rho is exactly 1, its gradient
A grad log pi, as in TRL: the sampling pass, without dropout, in another batch shape, would give
rho = 1 only up to that noise); at the later ones the clip bounds how far each update moves a
token's probability from the sampling pass's. The
log-probabilities are of logits / temperature, the distribution the sampler drew from. The
reference is the model with its adapter off (beta 0: not run at all). When every completion of a
group has the same reward its advantages are 0 and only the KL term moves the adapter.
"""

import torch
import torch.nn as nn

from model.loss import IGNORE_INDEX, token_logps, trained_positions

from .dpo import reference_mode

NORMS = ("sequence", "token")
EPS = 1e-4  # added to a group's std: a group of equal rewards has advantages 0, not 0 / 0


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """(N,) rewards of N = P x G completions, each prompt's G together -> their advantages (N,):
    the reward minus its group's mean, divided by the group's std (unbiased) + EPS when scale."""
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + EPS)
    # A group rewarded alike: exactly 0 (its mean can leave rounding behind, which 1 / EPS would magnify)
    alike = (groups == groups[:, :1]).all(dim=1, keepdim=True)
    return torch.where(alike, torch.zeros_like(centred), centred).reshape(-1)


def grpo_token_losses(logps, old_logps, advantages, epsilon: float, beta: float = 0.0, ref_logps=None):
    """(losses, kl, low-clipped, high-clipped), each (N,) over the trained tokens: the formula above,
    of the policy's log-probs (N,), pi_old's (N,), each token's advantage (N,) and, for beta > 0,
    the reference's (N,). A token is clipped low when rho < 1 - eps with A < 0 (the clip holds its
    gradient at 0), high when rho > 1 + eps with A > 0."""
    ratio = torch.exp(logps - old_logps)
    pg = torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages)
    kl = torch.zeros_like(logps)
    if beta:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
    losses = -(pg - beta * kl)
    with torch.no_grad():
        low = (ratio < 1 - epsilon) & (advantages < 0)
        high = (ratio > 1 + epsilon) & (advantages > 0)
    return losses, kl.detach(), low, high


class GRPOLoss(nn.Module):
    """GRPO as the model's forward: forward(batch) -> (the micro-batch's share of the loss as a
    sum, the STATS sums), batch being completions as rows (prompt + completion, right-padded;
    labels the completion's tokens, its end-of-turn token included) with what count_completions
    and training/batches.step_batch add: trained_index, trained_rows, completion_tokens, and the
    sampling pass's old_logps (N,) and each row's advantage (R,); on_policy (an int, 1 at a
    generation's first update) takes pi_old from the forward itself.

    The sum is of per-completion means ("sequence": the caller divides by the step's completions)
    or of token losses ("token": by the step's completion tokens)."""

    STATS = ("kl", "clipped_low", "clipped_high", "tokens")

    def __init__(self, model: nn.Module, epsilon: float = 0.2, beta: float = 0.04, norm: str = "sequence",
                 temperature: float = 1.0):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.model, self.epsilon, self.beta, self.norm, self.temperature = model, epsilon, beta, norm, temperature

    def logps(self, batch: dict) -> torch.Tensor:
        return token_logps(self.model, batch["input_ids"], batch["labels"], batch.get("trained_index"),
                           self.temperature)

    def forward(self, batch: dict):
        logps = self.logps(batch)  # (N,)
        rows = batch["trained_rows"]
        ref = reference_mode(self.model, lambda: self.logps(batch)) if self.beta else None
        # The first update on a generation is on-policy: pi_old is this forward itself (detached), as
        # TRL takes it, so rho is exactly 1 (the sampling pass ran without dropout, maybe in another
        # precision and batch shape: its log-probs would make rho 1 only up to that noise, and clip it)
        old = logps.detach() if batch.get("on_policy") else batch["old_logps"].to(logps.dtype)
        losses, kl, low, high = grpo_token_losses(logps, old,
                                                  batch["advantages"].to(logps.dtype)[rows], self.epsilon,
                                                  self.beta, ref)
        if self.norm == "sequence":
            losses = losses / batch["completion_tokens"].to(losses.dtype)[rows]  # each completion's mean
        stats = torch.stack([kl.sum(), low.sum().to(kl.dtype), high.sum().to(kl.dtype),
                             kl.new_full((), logps.numel())])  # a fill on the device: no host-to-device copy
        return losses.sum(), stats

    def metrics(self, sums: list, n: int, prefix: str = "") -> dict:
        """Per token: the mean KL to the reference, and the share clipped (low, high, both)."""
        s = dict(zip(self.STATS, sums))
        tokens = max(s["tokens"], 1)
        return {f"{prefix}kl": s["kl"] / tokens, f"{prefix}clip_low": s["clipped_low"] / tokens,
                f"{prefix}clip_high": s["clipped_high"] / tokens,
                f"{prefix}clip_fraction": (s["clipped_low"] + s["clipped_high"]) / tokens}


def count_completions(batch: dict, norm: str) -> dict:
    """A micro-batch of completions with what GRPOLoss reads, counted on the CPU before
    training/batches.step_batch moves it: the row of each trained position, each row's completion
    tokens, and n_loss, what the step's loss is a mean over (completions, or their tokens)."""
    labels = batch["labels"]
    index = trained_positions(labels)
    tokens = (labels[:, 1:] != IGNORE_INDEX).sum(1)  # (R,)
    n_loss = int(tokens.sum()) if norm == "token" else int((tokens > 0).sum())
    return {**batch, "trained_rows": index // labels.shape[1], "completion_tokens": tokens.clamp(min=1),
            "n_loss": n_loss}
