"""ORPO and SimPO: preference tuning on pairs with no reference policy at all.

Both score a reply by its log-probability averaged over its tokens (length-normalised),

    a(y|x) = (1 / |y|) sum_t log pi(y_t | x, y_<t)

the tokens being those SFT would train (the reply and its end-of-turn token), on the same pairs and
the same loop as DPO (training/dpo.py), with one forward per step and nothing else in memory.

ORPO (Hong et al. 2024, eq. 6-7) adds to the SFT loss of the chosen reply a term that favours its
odds over the rejected reply's, with P(y|x) = exp a(y|x) and odds(y|x) = P / (1 - P):

    log odds(y|x) = a - log(1 - exp a)
    L_OR          = -log sigmoid(log odds(y_w|x) - log odds(y_l|x))
    loss          = -a(y_w|x) + lambda * L_OR

Per pair, then averaged over pairs (TRL's ORPOTrainer averages the NLL over the batch's chosen
tokens instead: the same when the replies are equally long). Its rewards, as TRL logs them, are
lambda * a(y|x); `log_odds_ratio` is the mean of log sigmoid(...) and `log_odds_chosen` of the
log-odds difference inside it.

SimPO (Meng et al. 2024, eq. 6): the reward is beta * a(y|x), and a pair's margin must exceed gamma:

    loss = -log sigmoid(beta * a(y_w|x) - beta * a(y_l|x) - gamma)

"accuracy" in both is the share of pairs whose chosen reward is the larger.
"""

import torch
import torch.nn.functional as F

from .dpo import STAT_NAMES, PairLoss


def log_odds(avg_logps: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) for P = exp(avg_logps) < 1: a - log(-expm1(a)), which keeps its precision
    where a is near 0 (log1p(-exp(a)) would round 1 - exp(a) first)."""
    return avg_logps - torch.log(-torch.expm1(avg_logps))


def orpo_losses(chosen, rejected, lam: float):
    """(losses, chosen rewards, rejected rewards, log sigmoid(log-odds ratio), log-odds ratio, NLL),
    each (B,), of per-token mean log-probs (B,) each: the formula above; all but losses detached."""
    ratio = log_odds(chosen) - log_odds(rejected)  # (B,)
    log_sigmoid = F.logsigmoid(ratio)
    losses = -chosen - lam * log_sigmoid
    return (losses, lam * chosen.detach(), lam * rejected.detach(), log_sigmoid.detach(), ratio.detach(),
            -chosen.detach())


def simpo_losses(chosen, rejected, beta: float, gamma: float):
    """(losses, chosen rewards, rejected rewards), each (B,), of per-token mean log-probs (B,) each."""
    losses = -F.logsigmoid(beta * (chosen - rejected) - gamma)
    return losses, beta * chosen.detach(), beta * rejected.detach()


class ORPOLoss(PairLoss):
    """ORPO on train.py's loop: --orpo-lambda is lambda."""

    STATS = STAT_NAMES + ("log_odds_ratio", "log_odds_chosen", "nll_loss")
    per_token = True
    uses_reference = False

    def __init__(self, model, lam: float = 0.1):
        super().__init__(model)
        self.lam = lam

    def pair_losses(self, chosen, rejected, ref, chosen_tokens):
        return orpo_losses(chosen, rejected, self.lam)


class SimPOLoss(PairLoss):
    """SimPO on train.py's loop: --simpo-beta and --simpo-gamma."""

    per_token = True
    uses_reference = False

    def __init__(self, model, beta: float = 2.0, gamma: float = 1.0):
        super().__init__(model)
        self.beta, self.gamma = beta, gamma

    def pair_losses(self, chosen, rejected, ref, chosen_tokens):
        return simpo_losses(chosen, rejected, self.beta, self.gamma)
