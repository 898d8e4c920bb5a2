"""The objectives beside PPO's clip, and the token and sequence masks: pure tensor functions.

`grpo.loss.grpo_loss` picks among them (its module docstring gives the whole objective); each
function here is one formula of one paper, exactly as coded. Shapes as in grpo.loss: B sequences,
T completion positions, m[i, t] = 1 on a real token; rho the importance ratio pi / pi_old (per
token, or GSPO's per-sequence s_i broadcast over the tokens), A_i the advantage; sg() is
stop-gradient (a detached value).

    CISPO   w_it   = sg( min(rho_it, 1 + eps_high) )                         cispo_weight
    SAPO    f_it   = (4 / tau_i) sigmoid( tau_i (rho_it - 1) ),                sapo_surrogate
                     tau_i = tau_pos if A_i > 0 else tau_neg
    VESPO   phi_i  = sg( exp( lambda_i + k_i log w_i - lambda_i w_i ) ),       vespo_weight
                     log w_i = clamp( sum_t m_it clamp(log rho_it, -20, 20), ln 1e-8, 20 ),
                     (k_i, lambda_i) = (k_pos, lambda_pos) if A_i >= 0 else (k_neg, lambda_neg)
    OPSM    keep_i = A_i >= 0  or  sum_t m_it (logp_old_it - sg(logp_it)) / sum_t m_it <= delta
                                                                               off_policy_keep
    80/20   keep_it = m_it and H_it >= quantile_{1 - rho}( {H_js : m_js = 1} )  high_entropy_mask

This module imports nothing from grpo: grpo.loss imports it.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "cispo_weight",
    "sapo_surrogate",
    "sapo_gate",
    "vespo_weight",
    "off_policy_keep",
    "high_entropy_mask",
]

VESPO_LOG_W_MIN = math.log(1e-8)  # the sequence weight is kept in [1e-8, e^20] (exp stays finite)


def cispo_weight(ratio: torch.Tensor, epsilon_high: float) -> torch.Tensor:
    """sg(min(rho, 1 + eps_high)): ratio [B, T] -> the CISPO weight [B, T], no gradient.

    CISPO (MiniMax-M1, 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning
    Attention", arXiv 2506.13585): the importance weight is clipped, not the update; the loss is
    -w_it A_i logp_it, so every token keeps the gradient -w_it A_i grad(logp_it) (PPO's clip
    would zero it), only its size is bounded. One-sided, as the paper ran it (no lower bound).

    >>> cispo_weight(torch.tensor([[0.5, 1.0, 1.3, 4.0]]), 0.28)
    tensor([[0.5000, 1.0000, 1.2800, 1.2800]])
    """
    return torch.clamp(ratio, max=1 + epsilon_high).detach()


def _by_sign(condition: torch.Tensor, if_true: float, if_false: float, like: torch.Tensor):
    """if_true where condition else if_false, in like's dtype (a Python float kept exact)."""
    return torch.full_like(like, if_false).masked_fill(condition, if_true)


def _sapo_tau(advantages: torch.Tensor, tau_pos: float, tau_neg: float) -> torch.Tensor:
    return _by_sign(advantages > 0, tau_pos, tau_neg, advantages)[:, None]  # [B, 1]


def sapo_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, tau_pos: float, tau_neg: float
) -> torch.Tensor:
    """f = (4 / tau) sigmoid(tau (rho - 1)), the SAPO surrogate of rho: [B, T], differentiable.

    SAPO ("Soft Adaptive Policy Optimization", 2025, arXiv 2511.20347): the per-token loss is
    -f A in place of PPO's -min(rho A, clip(rho) A). Its gradient is
        d(-f A) = -A gate(rho) rho grad(logp),
        gate = 4 sigmoid(x) (1 - sigmoid(x)),   x = tau (rho - 1)
    with gate(1) = 1: on-policy it is REINFORCE; off-policy the gate fades smoothly instead of
    dropping to 0 at a clip edge, faster for a larger tau. tau = tau_pos for A > 0, tau_neg for
    A <= 0 (the paper: tau_neg > tau_pos, negative updates are the less stable ones).

    >>> sapo_surrogate(torch.ones(1, 2), torch.tensor([1.0]), 1.0, 1.05)  # (4 / 1) * 0.5
    tensor([[2., 2.]])
    """
    tau = _sapo_tau(advantages, tau_pos, tau_neg)  # [B, 1]
    return torch.sigmoid(tau * (ratio - 1)) * 4 / tau  # [B, T]


def sapo_gate(
    ratio: torch.Tensor, advantages: torch.Tensor, tau_pos: float, tau_neg: float
) -> torch.Tensor:
    """gate = 4 sigmoid(x)(1 - sigmoid(x)), x = tau (rho - 1): SAPO's gradient weight, [B, T].

    1 at rho = 1, falling towards 0 as rho leaves 1 (logged as the step's mean gate).

    >>> sapo_gate(torch.tensor([[1.0, 3.0]]), torch.tensor([1.0]), 1.0, 1.05)  # 4 s(2) s(-2)
    tensor([[1.0000, 0.4200]])
    """
    s = torch.sigmoid(_sapo_tau(advantages, tau_pos, tau_neg) * (ratio.detach() - 1))  # [B, T]
    return 4 * s * (1 - s)


@torch.no_grad()
def vespo_weight(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    k_pos: float,
    lambda_pos: float,
    k_neg: float,
    lambda_neg: float,
) -> torch.Tensor:
    """phi_i = exp(lambda + k log w_i - lambda w_i) = e^lambda w_i^k e^(-lambda w_i): [B], no grad.

    VESPO ("Variational Sequence-Level Soft Policy Optimization", 2026, arXiv 2602.10693):
    w_i = prod_t rho_it is the whole sequence's likelihood ratio (not GSPO's geometric mean), and
    instead of a clip each sequence's REINFORCE term -A_i logp_it is weighted by a Gamma-shaped
    phi(w): phi(1) = 1, largest at w = k / lambda, falling to 0 as w -> 0 (rate set by k) and as
    w -> infinity (by lambda). (k, lambda) are (k_pos, lambda_pos) for A >= 0 and (k_neg,
    lambda_neg) for A < 0. log rho is clamped to [-20, 20] per token and log w to
    [ln 1e-8, 20], so phi is finite.
    log_ratio, mask: [B, T] (log_ratio 0 on padding); advantages: [B].

    >>> vespo_weight(torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.ones(2, 3), 2, 3, 3, 2)
    tensor([1., 1.])
    """
    per_token = torch.where(mask.bool(), torch.clamp(log_ratio, -20.0, 20.0), 0.0)  # [B, T]
    log_w = torch.clamp(per_token.sum(dim=-1), VESPO_LOG_W_MIN, 20.0)  # [B]
    nonneg = advantages >= 0
    k = _by_sign(nonneg, k_pos, k_neg, log_w)  # [B]
    lam = _by_sign(nonneg, lambda_pos, lambda_neg, log_w)  # [B]
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w))  # [B]


@torch.no_grad()
def off_policy_keep(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """Off-policy sequence masking (DeepSeek-V3.2, 2025, arXiv 2512.02556): which sequences keep
    their policy term.

        keep_i = A_i >= 0  or  D_i <= threshold
        D_i    = sum_t m_it (logp_old_it - logp_it) / sum_t m_it

    D_i is a (k1) estimate of KL(pi_old || pi) along the sampled sequence. A sequence that
    is penalised (A < 0) after the policy has drifted far from the one that sampled it mostly
    teaches noise, so it is dropped; positive-advantage sequences always stay. logps, old_logps,
    mask [B, T]; advantages [B] -> bool [B].

    >>> old = torch.zeros(3, 2)
    >>> logps = torch.tensor([[-1.0, -1.0], [-1.0, -1.0], [-0.1, -0.1]])  # D = 1, 1, 0.1
    >>> off_policy_keep(logps, old, torch.tensor([1.0, -1.0, -1.0]), torch.ones(3, 2), 0.5)
    tensor([ True, False,  True])
    """
    real = mask.bool()
    drift = torch.where(real, old_logps - logps.detach(), 0.0)  # [B, T]
    mean_drift = drift.sum(dim=-1) / real.sum(dim=-1).clamp(min=1)  # [B]
    return (advantages >= 0) | (mean_drift <= threshold)


@torch.no_grad()
def high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """The "forking tokens" of "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive
    Effective Reinforcement Learning for LLM Reasoning" (2025, arXiv 2506.01939): bool [B, T].

        keep_it = m_it  and  H_it >= q,   q = torch.quantile({H_js : m_js = 1}, 1 - quantile)

    (linear interpolation between order statistics). quantile = rho = 0.2 (the paper) keeps the
    20% of real tokens with the highest entropy; 1 keeps every real token; 0 only the highest.
    The threshold is over the real tokens given (one micro-batch).

    >>> h = torch.tensor([[0.1, 2.0, 0.5], [1.0, 9.0, 3.0]])
    >>> high_entropy_mask(h, torch.tensor([[1, 1, 1], [1, 1, 0]]), 0.5)  # q = median = 1.0
    tensor([[False,  True, False],
            [ True,  True, False]])
    """
    real = mask.bool()
    if not real.any():
        return real
    threshold = torch.quantile(entropies[real].float(), 1 - quantile)
    return real & (entropies.float() >= threshold)
