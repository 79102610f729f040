"""tests/trl_reference.py runs TRL's own ORPO, SimPO and KTO loss code, and what it computes is the
papers' formulas, written here element by element in float64 with the math module:

- ORPO (Hong et al. 2024, eq. 6-7): TRL's `losses` are beta * log sigma(log odds ratio), the odds
  from P(y|x) = exp(per-token average log-prob); TRL's float32 cast aside, equal to 1e-12.
- SimPO (Meng et al. 2024, eq. 6): -log sigma(beta a_w - beta a_l - gamma), TRL's simpo_gamma being
  the paper's gamma.
- KTO (Ethayarajh et al. 2024): lambda_y (1 - sigma(beta (r - z0))) for desirable, lambda_y
  (1 - sigma(beta (z0 - r))) for undesirable, z0 = max(0, mean of the KL rows' log-ratios), no
  gradient through z0; TRL's batch loss is the plain mean of the weighted losses.
"""

import math

import pytest
import torch

from trl_reference import trl_kto, trl_orpo, trl_simpo

BETA = 0.3


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return math.exp(log_sigmoid(x))


def avg_logps(n: int, seed: int) -> torch.Tensor:
    """Per-token average log-probs in (-3, -0.05): both sides of TRL's log1mexp branch at -ln 2."""
    g = torch.Generator().manual_seed(seed)
    return -0.05 - 2.95 * torch.rand(n, generator=g, dtype=torch.float64)


def close(ours, formula, tol=1e-12):
    assert torch.allclose(torch.as_tensor(ours, dtype=torch.float64), torch.tensor(formula, dtype=torch.float64),
                          rtol=0, atol=tol), (ours, formula)


def orpo_formula(aw: float, al: float, beta: float) -> tuple[float, float]:
    """(beta * log sigma(log OR), log OR), OR = odds(y_w) / odds(y_l), odds = P / (1 - P), P = exp(a)."""
    log_odds = (aw - math.log1p(-math.exp(aw))) - (al - math.log1p(-math.exp(al)))
    return beta * log_sigmoid(log_odds), log_odds


def test_orpo_is_the_papers_odds_ratio_term():
    aw, al = avg_logps(16, 0), avg_logps(16, 1)
    out = trl_orpo(aw, al, BETA)
    formula = [orpo_formula(w, l, BETA) for w, l in zip(aw.tolist(), al.tolist())]
    assert out["losses"].dtype == torch.float64
    close(out["losses"], [f[0] for f in formula])
    close(out["log_odds_chosen"], sum(f[1] for f in formula) / 16)
    close(out["log_odds_ratio"], sum(log_sigmoid(f[1]) for f in formula) / 16)
    close(out["chosen_rewards"], (BETA * aw).tolist())
    close(out["rejected_rewards"], (BETA * al).tolist())
    as_trl = trl_orpo(aw, al, BETA, keep_dtype=False)  # TRL untouched: float32 arithmetic
    assert as_trl["losses"].dtype == torch.float32
    close(as_trl["losses"], [f[0] for f in formula], tol=1e-5)


def test_simpo_is_the_papers_eq6_with_gamma_the_papers_margin():
    aw, al = avg_logps(16, 2), avg_logps(16, 3)
    for gamma in (0.0, 0.5, 1.6):
        out = trl_simpo(aw, al, BETA, gamma)
        close(out["losses"], [-log_sigmoid(BETA * w - BETA * l - gamma) for w, l in zip(aw.tolist(), al.tolist())])
        close(out["chosen_rewards"], (BETA * aw).tolist())
    close(out["rejected_rewards"], (BETA * al).tolist())


@pytest.mark.parametrize("kl_shift", [0.4, -0.4], ids=["z0-positive", "z0-clamped-to-0"])
def test_kto_is_the_papers_loss_with_the_batch_kl_estimate(kl_shift):
    g = torch.Generator().manual_seed(4)
    sums = lambda n: -40 * torch.rand(n, generator=g, dtype=torch.float64)  # summed completion log-probs
    ref_w, ref_l, ref_kl = sums(5), sums(4), sums(9)
    policy_w = (ref_w + torch.randn(5, generator=g, dtype=torch.float64)).requires_grad_()
    policy_l = ref_l + torch.randn(4, generator=g, dtype=torch.float64)
    policy_kl = (ref_kl + kl_shift + 0.1 * torch.randn(9, generator=g, dtype=torch.float64)).requires_grad_()
    lam_d, lam_u = 1.0, 1.33
    out = trl_kto(policy_w, policy_l, policy_kl, ref_w, ref_l, ref_kl, BETA, lam_d, lam_u)

    z0 = max(0.0, sum((policy_kl - ref_kl).tolist()) / 9)
    r_w, r_l = (policy_w - ref_w).tolist(), (policy_l - ref_l).tolist()
    losses = ([lam_d * (1 - sigmoid(BETA * (r - z0))) for r in r_w] +
              [lam_u * (1 - sigmoid(BETA * (z0 - r))) for r in r_l])
    assert (z0 > 0) == (kl_shift > 0)
    close(out["kl"], z0)
    close(out["losses"].detach(), losses)
    close(out["loss"].detach(), sum(losses) / 9)  # a plain mean over the batch's completions
    close(out["chosen_rewards"], [BETA * r for r in r_w])
    close(out["rejected_rewards"], [BETA * r for r in r_l])
    out["loss"].backward()
    assert policy_kl.grad is None and policy_w.grad is not None  # z0 is a constant to the gradient
