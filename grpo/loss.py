"""The GRPO objective as pure tensor functions: no model, no tokenizer, no I/O.

Shapes: B completions in the batch, T completion positions (right-padded), V vocabulary size. The
K = group_size completions of one prompt are contiguous rows. m[i, t] is 1 on a real completion
token and 0 on padding. This is exactly what the code below computes:

    advantage        A_i    = (r_i - mean_{j in group(i)} r_j) / (std_{j in group(i)} r_j + eps)
                              (scale="batch": std of all rewards; "none": no division; 0 for a
                              group of equal rewards; std is Bessel-corrected)
    token ratio      rho_it = exp(logp_it - logp_old_it)
    sequence ratio   rho_it = s_i = exp( sum_t m_it (logp_it - logp_old_it) / sum_t m_it )   (GSPO)
    KL estimate      k3_it  = exp(d_it) - d_it - 1 >= 0,  d_it = logp_ref_it - logp_it
                              (computed as expm1(d) - d: exact to rounding near d = 0)
    per-token loss   L_it   = -min( rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i )
                              + beta k3_it

    loss_type   loss                                            normalisation
    "grpo"      (1/B) sum_i [ sum_t m_it L_it / sum_t m_it ]    per-sequence mean, then mean
    "bnpo"      sum_it m_it L_it / sum_it m_it                  token mean of this batch
    "dr_grpo"   sum_it m_it L_it / (B * max_completion_length)  a constant
    "dapo"      sum_it m_it L_it / num_items_in_batch           token mean of the generation batch
                (num_items_in_batch=None: sum_it m_it, and "dapo" equals "bnpo")

(every token-count denominator is clamped at 1, so an all-padding sequence adds 0, never NaN).

The other objectives replace the clipped policy term P_it = -min(rho A, clip(rho) A) of L_it
(their formulas, papers and reasons: grpo/objectives.py; sg() is stop-gradient):

    loss_type   P_it                                                normalisation
    "cispo"     -sg(min(rho_it, 1 + eps_high)) A_i logp_it          as "dapo"
    "sapo"      -(4 / tau_i) sigmoid(tau_i (rho_it - 1)) A_i        as "grpo"
                tau_i = sapo_temperature_pos if A_i > 0 else sapo_temperature_neg
    "luspo"     the clipped term with GSPO's s_i                    (1/B) sum_i sum_t m_it L_it
                (= (1/B) sum_i |o_i| L_i: each sequence weighs by its length; needs
                importance_sampling_level="sequence")
    "vespo"     -sg(phi_i) A_i logp_it                              as "dapo"
                phi_i = exp(lambda + k log w_i - lambda w_i), w_i = prod_t rho_it (log-clamped,
                vespo_weight); (k, lambda) = vespo_k/lambda_pos if A_i >= 0, else vespo_k/lambda_neg
    delta > 0   (the clipped losses) the first term of the min uses min(rho_it, delta): a token
                with A < 0 and rho > delta gets no gradient (two-sided clipping, INTELLECT-2)

and on top of any of them, each off by default:

    off_policy_mask_threshold > 0   P_it = 0 for the sequences off_policy_keep drops
                                    (A_i < 0 and mean_t (logp_old - logp) > threshold)
    top_entropy_quantile < 1        P_it = 0 unless H_it is in the top quantile of this batch's
                                    real tokens (high_entropy_mask); the KL stays on every token
    entropy_coef > 0                loss -= entropy_coef * sum_it k_it H_it / n, k the tokens
                                    kept by the entropy mask (all real ones without it), n =
                                    num_items_in_batch for "dapo", "cispo", "vespo" (the mean
                                    over the generation batch), else sum_it k_it
    H_it = -sum_v p_itv log p_itv, the entropy of the policy at position t (token_entropy).

At token level, an unclipped token's gradient is -A_i rho_it grad(logp_it) / normaliser. Where
the clip is active, rho < 1 - eps_low with A < 0 or rho > 1 + eps_high with A > 0, the min selects
the clipped, constant term and the token's gradient is exactly zero: the update stops once the
policy has moved far enough in the advantage's direction. On-policy (old_logps=None: one
optimiser step per generation) rho = 1 in value, and the loss is REINFORCE with the group mean as
baseline.

DeepSeekMath GRPO (Shao et al., 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning
in Open Language Models"). PPO's clipped surrogate (Schulman et al., 2017) without a value
network: the baseline is the mean reward of the K completions of the same prompt, divided by their
std. Each sequence's token losses are averaged over its own length, then over sequences. The KL to
the reference model is added to the loss, not to the reward, estimated per token with k3
(Schulman, 2020, "Approximating KL Divergence"): unbiased and never negative. Paper: beta = 0.04.
Here: loss_type="grpo", scale="group".

Dr. GRPO (Liu et al., 2025, "Understanding R1-Zero-Like Training: A Critical Perspective").
Removes two biases. Dividing by the sequence length gives each token of a short sequence more
weight, so correct answers are pushed shorter while long wrong answers are penalised less per
token, and wrong answers grow. Dividing by the group std up-weights prompts that are almost always
or almost never solved. Fix: a constant normaliser and no std. Here: loss_type="dr_grpo",
max_completion_length=<the generation limit>, scale="none".

DAPO (Yu et al., 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale").
Token-level mean over every real token of the generation batch, so a token weighs the same whatever
its sequence's length; pass num_items_in_batch (real tokens in all micro-batches and processes)
and accumulated micro-batch losses sum to exactly that mean ("bnpo" is the same mean over one
micro-batch). Clip-higher: epsilon_high = 0.28 > epsilon_low = 0.2 lets unlikely tokens with a
positive advantage gain more probability, which keeps entropy from collapsing. No KL term.
Here: loss_type="dapo", epsilon_high=0.28, beta=0. Dynamic sampling and overlong reward shaping
are not part of the loss.

GSPO (Zheng et al., 2025, "Group Sequence Policy Optimization"). The reward belongs to the whole
sequence, so the importance ratio does too: s_i is the length-normalised sequence likelihood ratio
(the geometric mean of the token ratios), shared by the tokens of sequence i, which clip together.
s_i stays close to 1, so the clip range is tiny (3e-4 below, 4e-4 above in the paper). With
loss_type="grpo" the loss is GSPO's -(1/B) sum_i min(s_i A_i, clip(s_i) A_i). Here:
importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4.

Several reward functions (reward_advantages): "sum_then_normalize" takes the group advantage of
the weighted sum (above); "normalize_then_sum" (GDPO, 2026) normalises each reward within its
group first, so a reward with a small spread is not drowned by one with a large spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from grpo.choices import AGGREGATIONS, IS_LEVELS, LOSS_TYPES, SCALE_REWARDS
from grpo.objectives import (
    cispo_weight,
    high_entropy_mask,
    off_policy_keep,
    sapo_gate,
    sapo_surrogate,
    vespo_weight,
)

__all__ = [
    "constant_groups",
    "group_advantages",
    "reward_advantages",
    "selective_log_softmax",
    "token_entropy",
    "kl_k3",
    "masked_mean",
    "grpo_loss",
    "grpo_loss_terms",
    "LossTerms",
    "check_loss_options",
    "CLIPPED_LOSS_TYPES",
    "GLOBAL_TOKEN_LOSSES",
    "LOSS_VARIANT_OPTIONS",
    "LOSS_OPTION_FIELDS",
]

CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # PPO's clipped surrogate
GLOBAL_TOKEN_LOSSES = ("dapo", "cispo", "vespo")  # divided by num_items_in_batch
# grpo_loss's keyword options beyond the clip, each a GRPOConfig field of the same name.
LOSS_VARIANT_OPTIONS = (
    "delta",
    "sapo_temperature_pos",
    "sapo_temperature_neg",
    "vespo_k_pos",
    "vespo_lambda_pos",
    "vespo_k_neg",
    "vespo_lambda_neg",
    "top_entropy_quantile",
    "entropy_coef",
    "off_policy_mask_threshold",
)
# The GRPOConfig fields check_loss_options reads.
LOSS_OPTION_FIELDS = (
    "loss_type",
    "importance_sampling_level",
    "epsilon_low",
    "epsilon_high",
    *LOSS_VARIANT_OPTIONS,
    "multi_objective_aggregation",
    "scale_rewards",
)


CONSTANT_RTOL = 1e-6


def constant_groups(
    rewards: torch.Tensor, group_size: int, rtol: float = CONSTANT_RTOL
) -> torch.Tensor:
    """Which groups carry no learning signal: rewards [N] -> bool [N / group_size].

    A group is constant when its rewards are equal up to float rounding:

        max_j r_j - min_j r_j <= rtol * max(1, max_j |r_j|)        (rtol = 1e-6)

    Not `std == 0`: the float std of eight rewards of 0.2 is 1.6e-8 and of eight of 2/3 is 6.4e-8
    (the mean is off by an ulp), yet such a group teaches nothing. float32 rounds a sum of
    rewards of size ~1 at ~1e-7, so 1e-6 separates rounding from any real difference.

    >>> constant_groups(torch.tensor([0.2] * 4 + [1.0, 0.0, 0.0, 0.0]), group_size=4)
    tensor([ True, False])
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} and group_size={group_size}: expected "
            "rewards [N] with N a multiple of group_size >= 1"
        )
    grouped = rewards.view(-1, group_size)  # [P, G]
    spread = grouped.amax(dim=1) - grouped.amin(dim=1)  # [P]
    scale = grouped.abs().amax(dim=1).clamp(min=1.0)  # [P]
    return spread <= rtol * scale


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """A_i = (r_i - mean(group)) / (std + eps); rewards [N] -> advantages [N], groups contiguous.

    scale="group": std of the group (Bessel-corrected); "batch": std of all N rewards (the mean is
    still the group's); "none": no division (Dr. GRPO). A group whose rewards are all equal up to
    float rounding (`constant_groups`) carries no signal and gets exactly 0. eps keeps
    near-constant groups from exploding.

    Worked example, two prompts with 4 completions each; the second group is all wrong:
    >>> group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]), group_size=4)
    tensor([ 0.8659, -0.8659, -0.8659,  0.8659,  0.0000,  0.0000,  0.0000,  0.0000])
    >>> group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=4, scale="none")
    tensor([ 0.5000, -0.5000, -0.5000,  0.5000])
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)}; expected [N] (one per row)")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"group_size={group_size} must be >= 1 and divide len(rewards)={rewards.numel()}"
        )
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale={scale!r} is not one of {SCALE_REWARDS}")
    if eps < 0:
        raise ValueError(f"eps={eps} must be >= 0")
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(
            f"rewards are NaN or infinite at rows {bad}: a reward function returned a non-number; "
            "fix the reward function (a NaN would silently poison every advantage of its group)"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()

    grouped = rewards.view(-1, group_size)  # [G, K]
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # [G, K]
    if scale == "group" and group_size > 1:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch" and rewards.numel() > 1:
        centred = centred / (rewards.std() + eps)
    # Equal rewards: the float mean may differ from them by an ulp, which / (0 + eps) would inflate.
    constant = constant_groups(rewards, group_size)[:, None]  # [G, 1]
    return torch.where(constant, 0.0, centred).view(-1)  # [N]


def reward_advantages(
    parts: torch.Tensor,
    weights,
    group_size: int,
    *,
    aggregation: str = "sum_then_normalize",
    scale: str = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """Advantages [N] from K reward functions: parts [N, K] (unweighted), weights [K].

        "sum_then_normalize"  A = group_advantages(r, scale),  r_i = sum_k w_k parts_ik
        "normalize_then_sum"  z_.k = group_advantages(parts_.k, "group")   for each reward k
                              q_i = sum_k w_k z_ik,   A_i = q_i / (std_batch(q) + eps)

    The weighted sums are accumulated k by k in float32 as `grpo.rewards.combine_rewards` does,
    so "sum_then_normalize" is bit for bit group_advantages of combine_rewards' total.
    GDPO (2026, "GDPO: Group reward-Decoupled Normalization Policy Optimization for Multi-reward
    RL Optimization"): normalising the sum maps distinct reward combinations to one advantage
    ((1, 0) and (0, 1) on two rewards sum alike) and rescales whichever reward varies in a group
    to the same size, whatever its weight; normalising each reward in its group first keeps each
    reward's own signal, and the weights set their importance. Each z_.k sums to 0 within every
    group, so mean_batch(q) = 0 and only the batch std is divided out (Bessel-corrected; no
    division for N = 1); scale must be "group".

    Two prompts, two completions each: correctness differs in group 0, format (weight 0.1) only
    in group 1. Summed then normalised, group 1's 0.1 difference weighs as much as group 0's
    correctness; normalised then summed, it weighs 0.1 of it.
    >>> parts = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 0.0]])  # [N, K]
    >>> reward_advantages(parts, [1.0, 0.1], 2)
    tensor([ 0.7070, -0.7070,  0.7061, -0.7061])
    >>> reward_advantages(parts, [1.0, 0.1], 2, aggregation="normalize_then_sum")
    tensor([ 1.2185, -1.2185,  0.1218, -0.1218])
    """
    if parts.dim() != 2 or parts.shape[1] != len(weights):
        raise ValueError(
            f"reward parts have shape {tuple(parts.shape)} for {len(weights)} weights; expected "
            "[N, K] with one column per reward function"
        )
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r} is not one of {AGGREGATIONS}")
    if aggregation == "normalize_then_sum" and scale != "group":
        raise ValueError(
            f"scale={scale!r} with aggregation='normalize_then_sum': each reward is normalised "
            "by its group std; use scale='group'"
        )
    parts = parts.float()
    if aggregation == "sum_then_normalize":
        total = torch.zeros(parts.shape[0], dtype=torch.float32)  # [N]
        for k, weight in enumerate(weights):
            total += float(weight) * parts[:, k]
        return group_advantages(total, group_size, scale=scale, eps=eps)
    summed = torch.zeros(parts.shape[0], dtype=torch.float32)  # [N], q
    for k, weight in enumerate(weights):
        summed += float(weight) * group_advantages(parts[:, k], group_size, "group", eps)
    if summed.numel() < 2:
        return summed
    return summed / (summed.std() + eps)  # [N]


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log softmax(logits)[index], chunk by chunk, with the gradient written by hand.

    Autograd through a chunked loop would save every fp32 chunk for backward (a full fp32 [B, T, V]
    again); here backward recomputes each chunk's softmax from the saved logsumexp.
    """

    @staticmethod
    def forward(ctx, logits, index, chunk_size):  # logits [B, T, V], index [B, T]
        dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16 -> fp32, fp64 stays
        logsumexp = torch.empty(index.shape, dtype=dtype, device=logits.device)  # [B, T]
        picked = torch.empty(index.shape, dtype=dtype, device=logits.device)  # [B, T]
        for block in _chunks(logits, chunk_size):
            chunk = logits[block].to(dtype)  # [b, t, V]: the only upcast temporary
            logsumexp[block] = torch.logsumexp(chunk, dim=-1)
            picked[block] = chunk.gather(-1, index[block].unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(logits, index, logsumexp)
        ctx.chunk_size = chunk_size
        return picked - logsumexp  # [B, T]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps):  # grad_logps [B, T]
        logits, index, logsumexp = ctx.saved_tensors
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for block in _chunks(logits, ctx.chunk_size):
            grad = grad_logps[block].unsqueeze(-1).to(logsumexp.dtype)  # [b, t, 1]
            # d log p(y) / d z_v = 1[v = y] - softmax(z)_v
            chunk = logits[block].to(logsumexp.dtype, copy=True)  # [b, t, V]
            chunk.sub_(logsumexp[block].unsqueeze(-1)).exp_().mul_(-grad)
            chunk.scatter_add_(-1, index[block].unsqueeze(-1), grad)
            grad_logits[block] = chunk
        return grad_logits, None, None


def _chunks(logits: torch.Tensor, chunk_size: int):
    """(batch slice, position slice) blocks of at most chunk_size rows of logits [B, T, V].

    Whole sequences, chunk_size // T of them per block, when a sequence fits in a chunk (short
    completions: a handful of blocks, not one per sequence); else runs of chunk_size positions
    of one sequence. A block is a strided view, so logits[:, :-1] is read without a copy.
    """
    batch, length, _ = logits.shape
    if length <= chunk_size:
        per = max(1, chunk_size // max(1, length))  # sequences per block
        return [(slice(b, b + per), slice(None)) for b in range(0, batch, per)]
    return [
        (slice(b, b + 1), slice(t, t + chunk_size))
        for b in range(batch)
        for t in range(0, length, chunk_size)
    ]


def selective_log_softmax(
    logits: torch.Tensor, index: torch.Tensor, *, chunk_size: int = 512
) -> torch.Tensor:
    """log p(index) = logits[index] - logsumexp(logits): logits [B, T, V], index [B, T] -> [B, T].

    The result is fp32 (fp64 for fp64 logits) whatever the logits' dtype. A full fp32 [B, T, V]
    log-softmax is never materialised: at most chunk_size rows are upcast at once, forward and
    backward (Phi-2, V = 51200: 512 rows is 100 MiB, against 1.6 GiB for 8 x 1024 positions).

    >>> logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]]])  # [1, 2, 4]
    >>> selective_log_softmax(logits, torch.tensor([[3, 0]]))  # log(1/4), log(e^2 / (e^2 + 3))
    tensor([[-1.3863, -0.3408]])
    """
    if logits.dim() != 3 or index.shape != logits.shape[:2]:
        raise ValueError(
            f"logits has shape {tuple(logits.shape)} and index {tuple(index.shape)}; "
            "expected logits [B, T, V] and index [B, T]"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    return _SelectiveLogSoftmax.apply(logits, index.long(), chunk_size)


class _TokenEntropy(torch.autograd.Function):
    """H = -sum_v p_v log p_v over the last axis of logits, chunk by chunk, gradient by hand:

        dH / dz_v = -p_v (log p_v + H)

    backward recomputes each chunk's softmax, so no fp32 [B, T, V] is kept for it."""

    @staticmethod
    def forward(ctx, logits, chunk_size):  # logits [B, T, V]
        dtype = torch.promote_types(logits.dtype, torch.float32)
        entropy = torch.empty(logits.shape[:2], dtype=dtype, device=logits.device)  # [B, T]
        for block in _chunks(logits, chunk_size):
            logp = torch.log_softmax(logits[block].to(dtype), dim=-1)  # [b, t, V]
            entropy[block] = -torch.xlogy(logp.exp(), logp.exp()).sum(dim=-1)  # 0 log 0 = 0
        ctx.save_for_backward(logits, entropy)
        ctx.chunk_size = chunk_size
        return entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_entropy):  # grad_entropy [B, T]
        logits, entropy = ctx.saved_tensors
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for block in _chunks(logits, ctx.chunk_size):
            logp = torch.log_softmax(logits[block].to(entropy.dtype), dim=-1)  # [b, t, V]
            p = logp.exp()
            inner = torch.where(p > 0, logp + entropy[block].unsqueeze(-1), 0.0)
            grad_logits[block] = -p * inner * grad_entropy[block].unsqueeze(-1).to(p.dtype)
        return grad_logits, None


def token_entropy(logits: torch.Tensor, *, chunk_size: int = 512) -> torch.Tensor:
    """H_t = -sum_v p_tv log p_tv, p = softmax(logits): logits [B, T, V] -> [B, T], differentiable.

    The entropy of the policy at each position (in nats), for the entropy mask and bonus of
    grpo_loss. fp32 (fp64 for fp64 logits) whatever the logits' dtype; like
    selective_log_softmax, at most chunk_size rows are upcast at once, forward and backward.

    >>> token_entropy(torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, -float("inf"), 0.0, 0.0]]]))
    tensor([[1.3863, 1.0986]])
    """
    if logits.dim() != 3:
        raise ValueError(f"logits has shape {tuple(logits.shape)}; expected [B, T, V]")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    return _TokenEntropy.apply(logits, chunk_size)


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(pi || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1, [B, T].

    Schulman (2020), "Approximating KL Divergence": for tokens sampled from pi its mean is exactly
    KL(pi || pi_ref), and every term is >= 0 (e^x >= 1 + x), unlike the plain -log ratio.
    The gradient with respect to logp is 1 - exp(ref - logp). Computed as expm1(d) - d with
    d = ref - logp, the same value without the cancellation of exp(d) - 1 near d = 0, which in
    float32 could round a tiny KL to a negative number.

    >>> kl_k3(torch.tensor([[0.5, 0.25]]).log(), torch.tensor([[0.5, 0.5]]).log())  # 0, 1 - ln 2
    tensor([[0.0000, 0.3069]])
    """
    if logps.shape != ref_logps.shape:
        raise ValueError(
            f"ref_logps has shape {tuple(ref_logps.shape)}, logps {tuple(logps.shape)}; "
            "they must match"
        )
    log_ratio = ref_logps - logps  # d = log(pi_ref / pi)
    return torch.expm1(log_ratio) - log_ratio  # exp(d) - 1 - d


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over mask == 1 (along dim, or all of it); the count is clamped at 1, so an empty
    mask gives 0. Masked-out entries are selected away, not multiplied: NaN or inf there is fine."""
    real = mask.bool()
    total = torch.where(real, x, 0.0).sum() if dim is None else torch.where(real, x, 0.0).sum(dim)
    count = real.sum() if dim is None else real.sum(dim)
    return total / count.clamp(min=1)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    **options,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss (module docstring) and its statistics, for one (micro-)batch: the first two
    results of grpo_loss_terms, whose docstring lists the options and a worked example."""
    loss, stats, _ = grpo_loss_terms(logps, old_logps, ref_logps, advantages, mask, **options)
    return loss, stats


@dataclass
class LossTerms:
    """The per-token pieces of one grpo_loss call, [B, T] each (padding: 0 / False)."""

    per_token: torch.Tensor  # m * L: the token's term before the loss_type's normalisation
    ratio: torch.Tensor  # rho (token or sequence level)
    clip_low: torch.Tensor  # bool, no gradient: A < 0 and ratio < 1 - eps_low (or > delta)
    clip_high: torch.Tensor  # bool, no gradient: A > 0 and ratio > 1 + eps_high
    kl: torch.Tensor | None  # k3 per token; None without ref_logps


def grpo_loss_terms(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    entropies: torch.Tensor | None = None,
    delta: float = 0.0,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    top_entropy_quantile: float = 1.0,
    entropy_coef: float = 0.0,
    off_policy_mask_threshold: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float], LossTerms]:
    """The GRPO loss (module docstring) and its statistics, for one (micro-)batch.

    logps, old_logps, ref_logps, mask: [B, T], completion tokens only. old_logps=None means
    on-policy (old = logps.detach()); ref_logps may be None when beta == 0. advantages: [B].
    epsilon_high=None means epsilon_low (symmetric clip). max_completion_length is used by
    "dr_grpo" only, num_items_in_batch by "dapo", "cispo" and "vespo" (None: the real tokens of
    this batch). entropies [B, T] (token_entropy of the policy's logits) are needed only by
    top_entropy_quantile < 1 and entropy_coef > 0. delta = 0 and off_policy_mask_threshold = 0
    switch those options off.

    stats: "ratio_mean", the token mean of the ratio; for the clipped losses "clip_low" /
    "clip_high" / "clip_region", the fractions of real tokens where the clip changed the
    objective: ratio < 1 - eps_low with A < 0 / ratio > 1 + eps_high with A > 0 / either, and
    with delta "clip_delta" (ratio > delta with A < 0); "cispo_capped" (ratio > 1 + eps_high),
    "sapo_gate_mean" (token mean of sapo_gate), "vespo_weight_mean" (mean phi_i of the non-empty
    sequences); "off_policy_masked" (fraction of non-empty sequences dropped), "entropy" (token
    mean of H, when entropies are given), "entropy_masked" (fraction of real tokens the entropy
    mask drops); "kl", the token mean of k3 (when ref_logps is given).

    The per-token terms (LossTerms) come third. Without the entropy bonus the loss is linear in
    `per_token` (each loss_type divides its sum by a normaliser), so per_token * d loss /
    d per_token is each token's share, and the shares add up to the loss. clip_low / clip_high
    are the clipped losses' clips (all False for cispo, sapo and vespo, which do not clip).

    Worked example: sequence 0 has A = +1 and three tokens with ratios 1.0, 1.1, 1.5 (the last one
    is clipped to 1.2); sequence 1 has A = -1 and one token with ratio 0.5 (clipped to 0.8).
    "grpo" = mean(-(1.0 + 1.1 + 1.2) / 3, 0.8 / 1) = -0.15; "bnpo" = (-3.3 + 0.8) / 4 = -0.625.
    >>> old = torch.zeros(2, 3)
    >>> logps = torch.tensor([[1.0, 1.1, 1.5], [0.5, 1.0, 1.0]]).log()
    >>> mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    >>> loss, stats = grpo_loss(logps, old, None, torch.tensor([1.0, -1.0]), mask)
    >>> round(loss.item(), 4), stats["clip_low"], stats["clip_high"], stats["clip_region"]
    (-0.15, 0.25, 0.25, 0.5)
    """
    options = {
        "loss_type": loss_type, "importance_sampling_level": importance_sampling_level,
        "epsilon_low": epsilon_low, "epsilon_high": epsilon_high, "delta": delta,
        "sapo_temperature_pos": sapo_temperature_pos,
        "sapo_temperature_neg": sapo_temperature_neg, "vespo_k_pos": vespo_k_pos,
        "vespo_lambda_pos": vespo_lambda_pos, "vespo_k_neg": vespo_k_neg,
        "vespo_lambda_neg": vespo_lambda_neg, "top_entropy_quantile": top_entropy_quantile,
        "entropy_coef": entropy_coef, "off_policy_mask_threshold": off_policy_mask_threshold,
    }  # fmt: skip
    check_loss_options(**options)
    _check_arguments(
        logps, old_logps, ref_logps, advantages, mask, loss_type, epsilon_low, epsilon_high, beta,
        max_completion_length, num_items_in_batch, entropies, top_entropy_quantile, entropy_coef,
    )  # fmt: skip
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    batch = logps.shape[0]
    real = mask.bool()  # [B, T]
    # Padding may hold anything (even -inf). Select it to 0 before any arithmetic: multiplying by
    # the mask afterwards would still let 0 * inf = NaN into the loss or its gradient.
    old_logps = logps.detach() if old_logps is None else old_logps
    log_ratio = torch.where(real, logps - old_logps, 0.0)  # [B, T], log(pi / pi_old)
    real_logps = torch.where(real, logps, 0.0)  # [B, T]

    if importance_sampling_level == "token":
        ratio = torch.exp(log_ratio)  # [B, T]
    else:  # GSPO: s_i = exp(mean_t log ratio), shared by the tokens of sequence i
        ratio = torch.exp(masked_mean(log_ratio, real, dim=-1))[:, None].expand_as(logps)  # [B, T]
    adv = advantages[:, None]  # [B, 1]
    if loss_type in CLIPPED_LOSS_TYPES:
        clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + eps_high)
        unclipped = torch.clamp(ratio, max=delta) if delta > 0 else ratio  # two-sided clip
        policy = -torch.min(unclipped * adv, clipped_ratio * adv)  # [B, T]
    elif loss_type == "cispo":
        policy = -cispo_weight(ratio, eps_high) * adv * real_logps  # [B, T]
    elif loss_type == "sapo":
        policy = -sapo_surrogate(ratio, advantages, sapo_temperature_pos, sapo_temperature_neg)
        policy = policy * adv  # [B, T]
    else:  # "vespo"
        phi = vespo_weight(
            log_ratio, advantages, real, vespo_k_pos, vespo_lambda_pos, vespo_k_neg,
            vespo_lambda_neg,
        )  # fmt: skip  # [B]
        policy = -phi[:, None] * adv * real_logps  # [B, T]

    keep = real  # [B, T], the tokens whose policy term counts
    if off_policy_mask_threshold > 0:
        keep_seq = off_policy_keep(
            real_logps, torch.where(real, old_logps, 0.0), advantages, real,
            off_policy_mask_threshold,
        )  # fmt: skip  # [B]
        keep = keep & keep_seq[:, None]
    if top_entropy_quantile < 1:
        entropy_keep = high_entropy_mask(entropies.detach(), real, top_entropy_quantile)  # [B, T]
        keep = keep & entropy_keep
    per_token = torch.where(keep, policy, 0.0)  # [B, T]
    if ref_logps is not None:
        kl = kl_k3(real_logps, torch.where(real, ref_logps, 0.0))  # [B, T]
        if beta > 0:
            per_token = per_token + beta * kl
    per_token = torch.where(real, per_token, 0.0)  # [B, T], m * L

    num_items = None
    if loss_type in GLOBAL_TOKEN_LOSSES:
        num_items = real.sum() if num_items_in_batch is None else num_items_in_batch
        num_items = torch.as_tensor(num_items, dtype=per_token.dtype, device=per_token.device)
        num_items = num_items.clamp(min=1)
    if loss_type in ("grpo", "sapo"):
        loss = masked_mean(per_token, real, dim=-1).mean()
    elif loss_type == "bnpo":
        loss = per_token.sum() / real.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (batch * max_completion_length)
    elif loss_type == "luspo":
        loss = per_token.sum(dim=-1).mean()  # (1/B) sum_i sum_t m L: weighted by length
    else:  # "dapo", "cispo", "vespo"
        loss = per_token.sum() / num_items

    if entropy_coef > 0:  # the bonus: minus the mean entropy of the kept tokens
        bonus = real if top_entropy_quantile == 1 else real & entropy_keep  # [B, T]
        denominator = num_items if num_items is not None else bonus.sum().clamp(min=1)
        loss = loss - entropy_coef * torch.where(bonus, entropies, 0.0).sum() / denominator

    with torch.no_grad():
        tokens = real.sum().clamp(min=1)

        def fraction(selected):  # of the real tokens
            return ((real & selected).sum() / tokens).item()

        stats = {"ratio_mean": masked_mean(ratio, real).item()}
        if loss_type in CLIPPED_LOSS_TYPES:
            clip_low = (ratio < 1 - epsilon_low) & (adv < 0)  # [B, T]
            clip_high = (ratio > 1 + eps_high) & (adv > 0)  # [B, T]
            stats["clip_low"] = fraction(clip_low)
            stats["clip_high"] = fraction(clip_high)
            stats["clip_region"] = fraction(clip_low | clip_high)
            if delta > 0:
                stats["clip_delta"] = fraction((ratio > delta) & (adv < 0))
        elif loss_type == "cispo":
            stats["cispo_capped"] = fraction(ratio > 1 + eps_high)
        elif loss_type == "sapo":
            gate = sapo_gate(ratio, advantages, sapo_temperature_pos, sapo_temperature_neg)
            stats["sapo_gate_mean"] = masked_mean(gate, real).item()
        else:
            stats["vespo_weight_mean"] = masked_mean(phi, real.any(dim=-1)).item()
        if off_policy_mask_threshold > 0:
            nonempty = real.any(dim=-1)  # [B]
            stats["off_policy_masked"] = masked_mean((~keep_seq).float(), nonempty).item()
        if entropies is not None:
            stats["entropy"] = masked_mean(entropies.detach(), real).item()
        if top_entropy_quantile < 1:
            stats["entropy_masked"] = fraction(~entropy_keep)
        if ref_logps is not None:
            stats["kl"] = masked_mean(kl, real).item()
    no_clip = torch.zeros_like(real)
    if loss_type in CLIPPED_LOSS_TYPES:
        clip_low = real & (ratio < 1 - epsilon_low) & (adv < 0)  # [B, T]
        if delta > 0:
            clip_low = clip_low | (real & (ratio > delta) & (adv < 0))
        clip_high = real & (ratio > 1 + eps_high) & (adv > 0)  # [B, T]
    else:
        clip_low = clip_high = no_clip
    kl_terms = torch.where(real, kl, 0.0) if ref_logps is not None else None
    terms = LossTerms(per_token, ratio, clip_low.detach(), clip_high.detach(), kl_terms)
    return loss, stats, terms


def check_loss_options(
    *,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float = 0.0,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    top_entropy_quantile: float = 1.0,
    entropy_coef: float = 0.0,
    off_policy_mask_threshold: float = 0.0,
    multi_objective_aggregation: str = "sum_then_normalize",
    scale_rewards: str = "group",
) -> None:
    """Raise ValueError, one line `name=value: why, and the fix`, for an objective option that
    cannot work. GRPOConfig.validate calls it before any work (every name is a config field, see
    LOSS_OPTION_FIELDS), grpo_loss on every call."""

    def bad(name, value, why):
        raise ValueError(f"{name}={value!r}: {why}")

    if loss_type not in LOSS_TYPES:
        bad("loss_type", loss_type, f"must be one of {', '.join(LOSS_TYPES)}")
    if importance_sampling_level not in IS_LEVELS:
        bad("importance_sampling_level", importance_sampling_level, f"must be one of {IS_LEVELS}")
    if loss_type == "luspo" and importance_sampling_level != "sequence":
        bad(
            "loss_type", loss_type, "LUSPO weighs GSPO's one-ratio-per-sequence term by length; "
            "set importance_sampling_level: sequence",
        )  # fmt: skip
    if loss_type == "vespo" and importance_sampling_level != "token":
        bad(
            "loss_type", loss_type, "VESPO builds its sequence weight prod_t rho_t from the token "
            "ratios itself; set importance_sampling_level: token",
        )  # fmt: skip
    for name, value in [
        ("sapo_temperature_pos", sapo_temperature_pos),
        ("sapo_temperature_neg", sapo_temperature_neg),
        ("vespo_lambda_pos", vespo_lambda_pos),
        ("vespo_lambda_neg", vespo_lambda_neg),
    ]:
        if not 0 < value < math.inf:
            bad(name, value, "must be a finite number > 0")
    for name, value in [
        ("vespo_k_pos", vespo_k_pos),
        ("vespo_k_neg", vespo_k_neg),
        ("entropy_coef", entropy_coef),
        ("off_policy_mask_threshold", off_policy_mask_threshold),
    ]:
        if not 0 <= value < math.inf:
            bad(name, value, "must be a finite number >= 0 (0: off)" if "k_" not in name
                else "must be a finite number >= 0")  # fmt: skip
    if not 0 <= top_entropy_quantile <= 1:
        bad(
            "top_entropy_quantile", top_entropy_quantile,
            "must be in [0, 1]: the fraction of highest-entropy tokens kept (1: all)",
        )  # fmt: skip
    if delta != 0:
        eps_high = epsilon_low if epsilon_high is None else epsilon_high
        if loss_type not in CLIPPED_LOSS_TYPES:
            bad(
                "delta", delta, f"two-sided clipping bounds the clipped losses "
                f"({', '.join(CLIPPED_LOSS_TYPES)}), not {loss_type!r}; set delta: 0",
            )  # fmt: skip
        if not 1 + eps_high < delta < math.inf:
            bad("delta", delta, f"must be 0 (off) or a finite number > 1 + epsilon_high "
                f"= {1 + eps_high:g}")  # fmt: skip
    if multi_objective_aggregation not in AGGREGATIONS:
        bad(
            "multi_objective_aggregation", multi_objective_aggregation,
            f"must be one of {', '.join(AGGREGATIONS)}",
        )  # fmt: skip
    if multi_objective_aggregation == "normalize_then_sum" and scale_rewards != "group":
        bad(
            "multi_objective_aggregation", multi_objective_aggregation,
            f"normalises each reward by its group std, not scale_rewards={scale_rewards!r}; set "
            "scale_rewards: group",
        )  # fmt: skip


def _check_arguments(
    logps, old_logps, ref_logps, advantages, mask, loss_type, epsilon_low, epsilon_high, beta,
    max_completion_length, num_items_in_batch, entropies, top_entropy_quantile, entropy_coef,
):  # fmt: skip
    """Raise ValueError naming the argument and its value for every input grpo_loss cannot use."""
    nonnegative = {"epsilon_low": epsilon_low, "epsilon_high": epsilon_high, "beta": beta}
    for name, value in nonnegative.items():
        if value is not None and value < 0:
            raise ValueError(f"{name}={value} must be >= 0")
    if logps.dim() != 2:
        raise ValueError(f"logps has shape {tuple(logps.shape)}; expected [B, T]")
    for name, value in [
        ("old_logps", old_logps), ("ref_logps", ref_logps), ("mask", mask),
        ("entropies", entropies),
    ]:  # fmt: skip
        if value is not None and value.shape != logps.shape:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}, logps {tuple(logps.shape)}; must match"
            )
    if advantages.shape != logps.shape[:1]:
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}; expected [B] = [{logps.shape[0]}]"
        )
    if ref_logps is None and beta > 0:
        raise ValueError(f"ref_logps=None with beta={beta}: the KL term needs reference log-probs")
    if entropies is None and (top_entropy_quantile < 1 or entropy_coef > 0):
        raise ValueError(
            f"entropies=None with top_entropy_quantile={top_entropy_quantile} and "
            f"entropy_coef={entropy_coef}: pass the token entropies (grpo.loss.token_entropy)"
        )
    if loss_type == "dr_grpo":
        if max_completion_length is None or max_completion_length < 1:
            raise ValueError(
                f"max_completion_length={max_completion_length} with loss_type='dr_grpo': pass "
                "the generation limit (the constant normaliser is B * max_completion_length)"
            )
        if logps.shape[1] > max_completion_length:
            raise ValueError(
                f"max_completion_length={max_completion_length} is below the {logps.shape[1]} "
                "positions of logps: pass completion tokens only, or the real generation limit"
            )
    if loss_type in GLOBAL_TOKEN_LOSSES and num_items_in_batch is not None:
        if num_items_in_batch < 0:
            raise ValueError(f"num_items_in_batch={num_items_in_batch} must be >= 0")
