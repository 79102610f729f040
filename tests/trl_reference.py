"""TRL's own loss code as a reference for nanolora's preference losses (tests and benchmarks only).

Each function runs the method of TRL 1.x's trainer that holds the loss, unmodified, on per-sequence
log-probabilities the caller gives, with a stand-in `self` (a SimpleNamespace holding exactly the
attributes the method reads) instead of a trainer, so no model, dataset or Trainer is built:

    trl_orpo   ORPOTrainer.odds_ratio_loss   (trl/experimental/orpo/orpo_trainer.py)
    trl_simpo  CPOTrainer.cpo_loss, loss_type "simpo"   (trl/experimental/cpo/cpo_trainer.py)
    trl_kto    KTOTrainer._compute_loss, loss_type "kto"   (trl/trainer/kto_trainer.py)

In the formulas below, for one pair or example: a_w, a_l are the per-token AVERAGE log-probs of the
chosen and rejected reply (what TRL's ORPO and SimPO compute from the logits: sum of the reply's
token log-probs / its token count), s the SUM of a completion's token log-probs (what TRL's KTO
computes), sigma the logistic function. Every tensor argument is (N,), any float dtype; results are
tensors of the input's dtype unless said otherwise.
"""

import os
import types
from collections import defaultdict

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO and CPO live under trl.experimental


def _accelerator():
    """The two things the methods use of accelerate's Accelerator, for one process."""
    return types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t)


class _KeepDtype(torch.Tensor):
    """A tensor whose .float() is itself: ORPO's odds_ratio_loss starts with `.float()`, which would
    round float64 log-probs to float32; this keeps TRL's arithmetic, in the input's dtype."""

    def float(self):
        return self


def trl_orpo(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float,
             keep_dtype: bool = True) -> dict:
    """ORPO (Hong et al. 2024) as TRL computes it, per pair:

        log_odds = (a_w - log(1 - exp(a_w))) - (a_l - log(1 - exp(a_l)))   the paper's log OR, eq. 7,
                                                                           with P(y|x) = exp(a) (eq. 4)
        losses   = beta * log sigma(log_odds)      = -beta * L_OR: the NEGATED odds-ratio term, weighted
        chosen_rewards, rejected_rewards = beta * a_w, beta * a_l   (detached)
        log_odds_ratio  = mean over the batch of log sigma(log_odds)   (a 0-d tensor, not weighted)
        log_odds_chosen = mean over the batch of log_odds             (a 0-d tensor)

    TRL's training loss is then `nll - losses.mean()`, nll the chosen replies' token-mean cross
    entropy: the paper's L_SFT + lambda * L_OR (eq. 6) with lambda = beta. log(1 - exp(a)) is
    TRL's log1mexp (log1p(-exp(a)) below -ln 2, log(-expm1(a)) above). TRL casts the log-probs to
    float32 first (`.float()`); keep_dtype=True skips only that cast (the rest is TRL's code as
    it is), keep_dtype=False runs the method untouched and returns float32.
    """
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    this = types.SimpleNamespace(beta=beta, accelerator=_accelerator())
    if keep_dtype:
        chosen_avg_logps = chosen_avg_logps.as_subclass(_KeepDtype)
        rejected_avg_logps = rejected_avg_logps.as_subclass(_KeepDtype)
    out = ORPOTrainer.odds_ratio_loss(this, chosen_avg_logps, rejected_avg_logps)
    names = ("losses", "chosen_rewards", "rejected_rewards", "log_odds_ratio", "log_odds_chosen")
    return {k: v.as_subclass(torch.Tensor) for k, v in zip(names, out)}


def trl_simpo(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float,
              gamma: float) -> dict:
    """SimPO (Meng et al. 2024) as TRL's CPOTrainer computes it (loss_type "simpo", label_smoothing 0,
    AlphaPO's alpha 0), per pair:

        losses = -log sigma(beta * ((a_w - a_l) - gamma / beta))  =  -log sigma(beta * a_w - beta * a_l - gamma)
        chosen_rewards, rejected_rewards = beta * a_w, beta * a_l   (detached)

    which is the paper's eq. 6 with its target reward margin gamma: TRL's `simpo_gamma` IS the
    paper's gamma (in reward units; TRL divides it by beta and multiplies back), not gamma / beta.
    TRL's training loss is `losses.mean() + cpo_alpha * nll` (nll the chosen replies' token-mean
    cross entropy); CPOConfig's cpo_alpha defaults to 1.0, so plain SimPO needs cpo_alpha=0 there
    (or loss_type "alphapo", which sets it). No dtype cast: float64 in, float64 out.
    """
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    this = types.SimpleNamespace(beta=beta, simpo_gamma=gamma, loss_type="simpo", label_smoothing=0.0, alpha=0.0,
                                 accelerator=_accelerator())
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(this, chosen_avg_logps, rejected_avg_logps)
    return {"losses": losses, "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}


def _kto_model(completion_logps: torch.Tensor, kl_logps: torch.Tensor):
    """A stand-in for the policy: rows of width 2 are the completions, rows of width 3 the KL rows;
    it returns per-token log-probs (N, width - 1) whose sum over the row is the given value (the
    value in the last column, zeros before: the sum is exact)."""
    def forward(input_ids, **_):
        values = completion_logps if input_ids.shape[1] == 2 else kl_logps
        log_probs = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, dtype=values.dtype)
        log_probs[:, -1] = values
        zeros = torch.zeros_like(log_probs)
        return types.SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros)
    return forward


def _kto_call(kto_trainer, policy: torch.Tensor, ref: torch.Tensor, labels: list[bool], policy_kl: torch.Tensor,
              ref_kl: torch.Tensor, settings: dict) -> tuple[torch.Tensor, dict]:
    """One call of KTOTrainer._compute_loss on a batch of len(labels) completions and len(policy_kl)
    KL rows, reference log-probs precomputed: (its loss, its metrics)."""
    this = types.SimpleNamespace(model=types.SimpleNamespace(training=True), accelerator=_accelerator(),
                                 aux_loss_enabled=False, precompute_ref_logps=True, calculate_KL=True,
                                 loss_type="kto", _metrics=defaultdict(lambda: defaultdict(list)),
                                 _total_train_tokens=0, _tp_size=1, **settings)
    this._compute_kl_logps = types.MethodType(kto_trainer._compute_kl_logps, this)  # TRL's own, on the stand-in
    # (N, 2) completion rows and (M, 3) KL rows: a prompt token, then one completion token (the KL
    # rows one token wider, which is how the stand-in model tells the two forwards apart)
    n, m = len(labels), len(policy_kl)
    batch = {"input_ids": torch.zeros(n, 2, dtype=torch.long), "attention_mask": torch.ones(n, 2, dtype=torch.long),
             "completion_mask": torch.tensor([[0, 1]] * n), "label": torch.tensor(labels, dtype=torch.bool),
             "KL_input_ids": torch.zeros(m, 3, dtype=torch.long),
             "KL_attention_mask": torch.ones(m, 3, dtype=torch.long),
             "KL_completion_mask": torch.tensor([[0, 0, 1]] * m), "ref_logps": ref, "ref_KL_logps": ref_kl}
    loss = kto_trainer._compute_loss(this, _kto_model(policy, policy_kl), batch, return_outputs=False)
    return loss, this._metrics["train"]


def trl_kto(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, policy_kl: torch.Tensor,
            ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, ref_kl: torch.Tensor, beta: float,
            desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> dict:
    """KTO (Ethayarajh et al. 2024) as TRL's KTOTrainer computes it (loss_type "kto"), from SUMMED
    completion log-probs s: policy_* and ref_* for the desirable (chosen) and undesirable (rejected)
    completions, and for the KL rows (each prompt with a mismatched completion):

        z0 = max(0, mean_j (policy_kl_j - ref_kl_j))   ONE scalar for the batch: a plain mean over
             all its KL rows (desirable and undesirable alike), then (with several processes) the
             mean over processes, THEN clamped at 0; detached (TRL runs the KL forward under
             no_grad and .detach()es the mean): no gradient flows through z0
        r  = policy - ref                              per completion
        losses = [desirable_weight * (1 - sigma(beta * (r_w - z0))) for each chosen,
                  undesirable_weight * (1 - sigma(beta * (z0 - r_l))) for each rejected]
                 chosen first, then rejected (TRL's order, whatever the batch's)
        loss = mean of losses                           (nanmean over the B completions: the
                                                         weights are NOT renormalised)
        chosen_rewards, rejected_rewards = beta * r_w, beta * r_l   (detached)
        kl = z0 (a Python float, as TRL logs it)

    This is the paper's L_KTO = E[lambda_y - v(x, y)], v = lambda_D sigma(beta (r - z0)) or
    lambda_U sigma(beta (z0 - r)), with z0 estimated from the batch's mismatched pairs.

    TRL 1.x has no kto_loss method: the loss is written inside _compute_loss, which also runs the
    model. So this runs _compute_loss itself, with a stand-in model returning the given log-probs
    and the reference log-probs passed as precomputed (precompute_ref_logps). _compute_loss returns
    only the scalar loss; the per-completion `losses` and rewards come from one further call per
    completion, each with that single completion and all the KL rows (so the same z0): its loss is
    that completion's weighted loss, its logged reward mean that completion's reward.
    """
    from trl.trainer.kto_trainer import KTOTrainer
    settings = {"beta": beta, "desirable_weight": desirable_weight, "undesirable_weight": undesirable_weight}
    policy, ref = torch.cat([policy_chosen, policy_rejected]), torch.cat([ref_chosen, ref_rejected])
    labels = [True] * len(policy_chosen) + [False] * len(policy_rejected)
    loss, metrics = _kto_call(KTOTrainer, policy, ref, labels, policy_kl, ref_kl, settings)
    losses, rewards = [], []
    for i, label in enumerate(labels):
        one_loss, one = _kto_call(KTOTrainer, policy[i:i + 1], ref[i:i + 1], [label], policy_kl, ref_kl, settings)
        losses.append(one_loss)
        rewards.append(one["rewards/chosen" if label else "rewards/rejected"][0])
    rewards = torch.tensor(rewards, dtype=policy.dtype)
    return {"losses": torch.stack(losses), "loss": loss, "chosen_rewards": rewards[:len(policy_chosen)],
            "rejected_rewards": rewards[len(policy_chosen):], "kl": metrics["kl"][0]}
