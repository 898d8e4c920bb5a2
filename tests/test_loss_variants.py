"""grpo/objectives.py and the variants of grpo/loss.py beyond the clipped four: CISPO, SAPO,
LUSPO, VESPO, two-sided clipping, off-policy masking, the entropy mask and bonus, token_entropy
and normalise-then-sum advantages. Each pinned by a hand-computed value and gradient on sequences
of unequal length with both advantage signs, and, where TRL defines the option, by TRL's formula
written out independently here (TRL is not imported)."""

import doctest
import math

import pytest
import torch

import grpo.objectives
from grpo.loss import (
    check_loss_options,
    group_advantages,
    grpo_loss,
    reward_advantages,
    selective_log_softmax,
    token_entropy,
)

NAN = float("nan")


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def batch_from_ratios(ratios: list[list[float]], old: float = -2.0):
    """logps [B, T] whose token ratios to old_logps are `ratios` (NaN = padding), and the mask."""
    r = torch.tensor(ratios, dtype=torch.float64)
    mask = ~r.isnan()
    old_logps = torch.full_like(r, old)
    logps = torch.where(mask, old_logps + r.nan_to_num(1.0).log(), 123.0)  # padding: garbage
    return logps.requires_grad_(), old_logps, mask


def test_objectives_docstring_examples_are_true():
    result = doctest.testmod(grpo.objectives)
    assert result.attempted >= 7 and result.failed == 0


# ---------------------------------------------------------------------------------------------
# TRL 1.16's formulas (trl/trainer/grpo_trainer.py, GRPOTrainer._compute_loss), written out
# independently: the value each of our options must equal.
# ---------------------------------------------------------------------------------------------
def trl_loss(logps, old, adv, mask, loss_type, *, eps_low=0.2, eps_high=0.2, level="token",
             num_items=None, delta=None, tau_pos=1.0, tau_neg=1.05, k_pos=2.0, lam_pos=3.0,
             k_neg=3.0, lam_neg=2.0, opsm=None, entropy_mask=None, entropies=None,
             entropy_coef=0.0):  # fmt: skip
    mask = mask.to(logps.dtype)
    adv = adv.unsqueeze(1)
    if opsm is not None:
        kl = old - logps.detach()
        avg = (kl * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
        off_policy_mask = ((adv >= 0) | (avg <= opsm)).to(mask.dtype)
    log_ratio = logps - old
    if level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_w)
    if loss_type == "cispo":  # TRL's epsilon_high is the cap itself: ours is 1 + epsilon_high
        per_token = -torch.clamp(coef_1, max=1 + eps_high).detach() * adv * logps
    elif loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    elif loss_type == "sapo":
        temperatures = torch.where(adv > 0, tau_pos, tau_neg)
        per_token = -torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures * adv
    elif loss_type == "vespo":
        with torch.no_grad():
            seq = torch.sum(torch.clamp(log_ratio, -20.0, 20.0) * mask, dim=-1, keepdim=True)
            log_w_seq = torch.clamp(seq, math.log(1e-8), 20.0)
            nonneg = adv >= 0
            k = torch.where(nonneg, k_pos, k_neg)
            lam = torch.where(nonneg, lam_pos, lam_neg).clamp(min=1e-4)
            phi = torch.exp(lam + k * log_w_seq - lam * torch.exp(log_w_seq)).nan_to_num(0, 0, 0)
        per_token = -phi * adv * logps
    if opsm is not None:
        per_token = per_token * off_policy_mask
    if entropy_mask is not None:
        per_token = per_token * entropy_mask
    if loss_type in ["grpo", "sapo"]:
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type in ["cispo", "dapo", "vespo"]:
        loss = (per_token * mask).sum() / num_items
    elif loss_type == "luspo":
        loss = (per_token * mask.sum(1, keepdim=True)).mean()
    if entropy_coef:
        effective = mask if entropy_mask is None else mask * entropy_mask
        if loss_type in ["cispo", "dapo", "vespo"]:
            bonus = (entropies * effective).sum() / num_items
        else:
            bonus = (entropies * effective).sum() / effective.sum().clamp(min=1.0)
        loss = loss - entropy_coef * bonus
    return loss


def trl_high_entropy_mask(entropies, mask, threshold):
    local = entropies[mask.bool()].float()
    entropy_threshold = torch.quantile(local, threshold)
    return ((entropies * mask.float()) >= entropy_threshold) & mask.bool()


def grad_of(logps, loss):
    (grad,) = torch.autograd.grad(loss, logps)
    return grad


# ---------------------------------------------------------------------------------------------
# CISPO: the clipped weight is a constant factor, so no token loses its gradient.
# ---------------------------------------------------------------------------------------------
def test_cispo_hand_computed_value_gradient_and_trl():
    # Seq 0: A = +1, ratios 0.5, 1.0, 1.5 (capped at 1.28); seq 1: A = -2, ratios 0.5 (no lower
    # bound), 2.0 (capped). 5 real tokens.
    logps, old, mask = batch_from_ratios([[0.5, 1.0, 1.5], [0.5, 2.0, NAN]])
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss, stats = grpo_loss(logps, old, None, adv, mask, loss_type="cispo", epsilon_high=0.28)
    w = torch.tensor([[0.5, 1.0, 1.28], [0.5, 1.28, 0.0]], dtype=torch.float64)
    lp = logps.detach().where(mask, 0.0)
    expected = -(w * adv[:, None] * lp).sum() / 5
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    # d loss / d logp_it = -w_it A_i / 5 on every real token, capped or not.
    torch.testing.assert_close(grad_of(logps, loss), -w * adv[:, None] / 5)
    trl = trl_loss(logps, old, adv, mask, "cispo", eps_high=0.28, num_items=5)
    assert loss.item() == pytest.approx(trl.item(), abs=1e-12)
    assert stats == pytest.approx({"ratio_mean": 1.1, "cispo_capped": 2 / 5})
    # num_items_in_batch: the whole generation batch's token count divides, as in "dapo".
    loss10, _ = grpo_loss(logps, old, None, adv, mask, loss_type="cispo", epsilon_high=0.28,
                          num_items_in_batch=10)  # fmt: skip
    assert loss10.item() == pytest.approx(expected.item() / 2, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# SAPO: a smooth gate, gradient -A gate(rho) rho / (B |o_i|).
# ---------------------------------------------------------------------------------------------
def test_sapo_hand_computed_value_gradient_and_trl():
    ratios = [[1.0, 2.0, 0.5], [1.0, 1.6, NAN], [10.0, NAN, NAN]]
    logps, old, mask = batch_from_ratios(ratios)
    adv = torch.tensor([1.0, -1.0, -0.5], dtype=torch.float64)
    tau_pos, tau_neg = 1.0, 1.05
    loss, stats = grpo_loss(logps, old, None, adv, mask, loss_type="sapo")

    def f(r, tau):
        return 4 / tau * sigmoid(tau * (r - 1))

    def gate(r, tau):
        s = sigmoid(tau * (r - 1))
        return 4 * s * (1 - s)

    seq0 = -(f(1.0, tau_pos) + f(2.0, tau_pos) + f(0.5, tau_pos)) * 1.0 / 3
    seq1 = (f(1.0, tau_neg) + f(1.6, tau_neg)) / 2
    seq2 = f(10.0, tau_neg) * 0.5
    assert loss.item() == pytest.approx((seq0 + seq1 + seq2) / 3, abs=1e-12)
    expected_grad = torch.zeros(3, 3, dtype=torch.float64)
    taus = [tau_pos, tau_neg, tau_neg]
    for i, row in enumerate(ratios):
        n = sum(not math.isnan(r) for r in row)
        for t, r in enumerate(row[:n]):
            expected_grad[i, t] = -adv[i].item() * gate(r, taus[i]) * r / (3 * n)
    grad = grad_of(logps, loss)
    torch.testing.assert_close(grad, expected_grad)
    # On-policy tokens get exactly REINFORCE's weight; far off-policy ones a small, non-zero one.
    assert grad[0, 0].item() == pytest.approx(-1.0 / 9, abs=1e-12)
    assert 0 < grad[2, 0].item() < 1e-3
    trl = trl_loss(logps, old, adv, mask, "sapo")
    # TRL's torch.where(A > 0, 1.0, 1.05) holds the temperatures in float32: 1e-7 apart.
    assert loss.item() == pytest.approx(trl.item(), abs=1e-6)
    gates = [gate(1, 1), gate(2, 1), gate(0.5, 1), gate(1, 1.05), gate(1.6, 1.05), gate(10, 1.05)]
    assert stats["sapo_gate_mean"] == pytest.approx(sum(gates) / 6)
    # Temperatures: a sharper negative gate fades the A < 0 tokens more.
    sharp, _ = grpo_loss(logps, old, None, adv, mask, loss_type="sapo", sapo_temperature_neg=4.0)
    assert sharp.item() == pytest.approx(
        trl_loss(logps, old, adv, mask, "sapo", tau_neg=4.0).item(), abs=1e-6
    )


# ---------------------------------------------------------------------------------------------
# LUSPO: GSPO's clipped term, each sequence weighted by its length.
# ---------------------------------------------------------------------------------------------
def test_luspo_hand_computed_value_gradient_and_trl():
    # Sequence ratios s_i (geometric means): 1.65^(1/3) = 1.1817 inside; 0.5 -> clipped (A < 0);
    # 1.5 -> clipped (A > 0); 0.99^(1/4) inside with A < 0.
    ratios = [[1.0, 1.1, 1.5, NAN], [0.5, NAN, NAN, NAN], [1.5, 1.5, NAN, NAN],
              [1.1, 0.9, 1.0, 1.0]]  # fmt: skip
    logps, old, mask = batch_from_ratios(ratios)
    adv = torch.tensor([1.0, -1.0, 2.0, -0.5], dtype=torch.float64)
    loss, stats = grpo_loss(logps, old, None, adv, mask, loss_type="luspo",
                            importance_sampling_level="sequence")  # fmt: skip
    s0, s3 = 1.65 ** (1 / 3), 0.99 ** (1 / 4)
    per_sequence = [3 * -s0, 1 * 0.8, 2 * -1.2 * 2.0, 4 * s3 * 0.5]  # |o_i| L_i
    assert loss.item() == pytest.approx(sum(per_sequence) / 4, abs=1e-12)
    # Unclipped sequence i: every real token gets -A_i s_i / B (|o_i| cancels d s_i = s_i / |o_i|).
    expected = torch.zeros(4, 4, dtype=torch.float64)
    expected[0, :3] = -1.0 * s0 / 4
    expected[3, :] = 0.5 * s3 / 4
    torch.testing.assert_close(grad_of(logps, loss), expected)
    trl = trl_loss(logps, old, adv, mask, "luspo", level="sequence")
    assert loss.item() == pytest.approx(trl.item(), abs=1e-12)
    assert stats["clip_low"] == pytest.approx(1 / 10)  # seq 1's one token
    assert stats["clip_high"] == pytest.approx(2 / 10)  # seq 2's two tokens


# ---------------------------------------------------------------------------------------------
# VESPO: the Gamma weight of the whole sequence's ratio, times REINFORCE.
# ---------------------------------------------------------------------------------------------
def test_vespo_hand_computed_value_gradient_and_trl():
    ratios = [[1.2, 1.5, NAN], [0.5, NAN, NAN], [1.0, 1.0, 1.0], [math.exp(30), NAN, NAN]]
    logps, old, mask = batch_from_ratios(ratios)
    adv = torch.tensor([1.0, -1.0, 0.0, -2.0], dtype=torch.float64)
    loss, stats = grpo_loss(logps, old, None, adv, mask, loss_type="vespo")
    # phi(w) = e^lambda w^k e^(-lambda w): (k, lambda) = (2, 3) for A >= 0, (3, 2) for A < 0.
    phi = [
        math.exp(3) * 1.8**2 * math.exp(-3 * 1.8),  # w = 1.2 * 1.5
        math.exp(2) * 0.5**3 * math.exp(-2 * 0.5),  # w = 0.5
        1.0,  # w = 1 (A = 0 uses the positive pair): phi(1) = 1
        0.0,  # log w clamped to 20: e^(2 + 60 - 2 e^20) underflows to 0
    ]
    phi_t = torch.tensor(phi, dtype=torch.float64)[:, None]
    lp = logps.detach().where(mask, 0.0)
    n = 7
    assert loss.item() == pytest.approx((-(phi_t * adv[:, None] * lp).sum() / n).item(), abs=1e-12)
    expected = torch.where(mask, -phi_t * adv[:, None] / n, 0.0)
    torch.testing.assert_close(grad_of(logps, loss), expected)
    trl = trl_loss(logps, old, adv, mask, "vespo", num_items=n)
    assert loss.item() == pytest.approx(trl.item(), abs=1e-12)
    assert stats["vespo_weight_mean"] == pytest.approx(sum(phi) / 4)
    # The weight peaks at w = k / lambda (2/3 for A >= 0), not at w = 1.
    at = {w: grpo.objectives.vespo_weight(torch.tensor([[math.log(w)]]), torch.tensor([1.0]),
                                          torch.ones(1, 1), 2, 3, 3, 2).item()
          for w in (0.5, 2 / 3, 1.0)}  # fmt: skip
    assert at[2 / 3] > at[0.5] and at[2 / 3] > at[1.0] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Two-sided clipping (delta): a negative-advantage token with ratio > delta stops.
# ---------------------------------------------------------------------------------------------
def test_two_sided_clipping_hand_computed_value_gradient_and_trl():
    ratios = [[0.5, 1.0, 1.4, 2.0], [0.5, 1.3, 2.0, NAN]]
    logps, old, mask = batch_from_ratios(ratios)
    adv = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    loss, stats = grpo_loss(logps, old, None, adv, mask, delta=1.5)
    # A = -1: max(min(rho, 1.5), clip(rho)) = 0.8, 1.0, 1.4, 1.5; A = +1: -0.5, -1.2, -1.2.
    assert loss.item() == pytest.approx((4.7 / 4 - 2.9 / 3) / 2, abs=1e-12)
    expected = torch.zeros(2, 4, dtype=torch.float64)
    expected[0, 1], expected[0, 2] = 1.0 / 8, 1.4 / 8  # -A rho / (B |o_0|)
    expected[1, 0] = -0.5 / 6  # A > 0 with rho < 1 - eps is never clipped
    torch.testing.assert_close(grad_of(logps, loss), expected)
    # Without delta the ratio-2.0 token of the A < 0 sequence is pushed down without bound.
    plain, _ = grpo_loss(logps, old, None, adv, mask)
    assert grad_of(logps, plain)[0, 3].item() == pytest.approx(2.0 / 8)
    trl = trl_loss(logps, old, adv, mask, "grpo", delta=1.5)
    assert loss.item() == pytest.approx(trl.item(), abs=1e-12)
    assert stats == pytest.approx({"ratio_mean": 8.7 / 7, "clip_low": 1 / 7, "clip_high": 2 / 7,
                                   "clip_region": 3 / 7, "clip_delta": 1 / 7})  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Off-policy sequence masking.
# ---------------------------------------------------------------------------------------------
def test_off_policy_mask_hand_computed_value_gradient_and_trl():
    # d = logp_old - logp per token; D_i its mean: 0.7 (A < 0: dropped), 0.1 (kept), 1.5 (A > 0:
    # kept whatever its drift).
    drift = [[1.5, -0.1, NAN], [0.3, -0.1, 0.1], [2.0, 1.0, NAN]]
    ratios = [[math.exp(-d) for d in row] for row in drift]
    logps, old, mask = batch_from_ratios(ratios)
    adv = torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)
    loss, stats = grpo_loss(logps, old, None, adv, mask, off_policy_mask_threshold=0.5)
    r = torch.tensor(ratios, dtype=torch.float64).nan_to_num(1.0)
    # Seq 1 (A = -1): max(rho, clip(rho)); seq 2 (A = +1): -min(rho, clip(rho)); seq 0: 0.
    seq1 = sum(max(x, min(max(x, 0.8), 1.2)) for x in r[1].tolist()) / 3
    seq2 = -sum(min(x, min(max(x, 0.8), 1.2)) for x in r[2, :2].tolist()) / 2
    assert loss.item() == pytest.approx((0 + seq1 + seq2) / 3, abs=1e-12)
    expected = torch.zeros(3, 3, dtype=torch.float64)
    expected[1, 1], expected[1, 2] = r[1, 1] / 9, r[1, 2] / 9  # rho 0.741 is clipped (A < 0)
    expected[2, :2] = -r[2, :2] / 6
    torch.testing.assert_close(grad_of(logps, loss), expected)
    trl = trl_loss(logps, old, adv, mask, "grpo", opsm=0.5)
    assert loss.item() == pytest.approx(trl.item(), abs=1e-12)
    assert stats["off_policy_masked"] == pytest.approx(1 / 3)
    # A threshold above every drift, or on-policy data, masks nothing.
    wide, stats = grpo_loss(logps, old, None, adv, mask, off_policy_mask_threshold=0.8)
    assert wide.item() == grpo_loss(logps, old, None, adv, mask)[0].item()
    assert stats["off_policy_masked"] == 0.0
    _, stats = grpo_loss(logps, None, None, adv, mask, off_policy_mask_threshold=1e-9)
    assert stats["off_policy_masked"] == 0.0


def test_off_policy_mask_keeps_the_kl_term_of_a_dropped_sequence():
    logps, old, mask = batch_from_ratios([[math.exp(-2.0), math.exp(-2.0)]])
    ref = old.clone()
    adv = torch.tensor([-1.0], dtype=torch.float64)
    loss, _ = grpo_loss(logps, old, ref, adv, mask, beta=0.1, off_policy_mask_threshold=0.5)
    # Only 0.1 k3 remains: gradient 0.1 (1 - exp(ref - logp)) / 2 per token.
    expected = 0.1 * (1 - torch.exp(ref - logps.detach())) / 2
    torch.testing.assert_close(grad_of(logps, loss), expected)


# ---------------------------------------------------------------------------------------------
# The high-entropy mask and the entropy bonus.
# ---------------------------------------------------------------------------------------------
def entropy_batch():
    ratios = [[1.0, 1.1, 1.5], [0.5, 1.05, NAN]]
    logps, old, mask = batch_from_ratios(ratios)
    entropies = torch.tensor([[0.1, 2.0, 0.5], [1.0, 9.0, 100.0]], dtype=torch.float64)
    return logps, old, mask, torch.tensor([1.0, -1.0], dtype=torch.float64), entropies


def test_top_entropy_quantile_hand_computed_value_gradient_and_trl():
    logps, old, mask, adv, entropies = entropy_batch()
    loss, stats = grpo_loss(logps, old, None, adv, mask, entropies=entropies,
                            top_entropy_quantile=0.4)  # fmt: skip
    # Real entropies 0.1, 0.5, 1.0, 2.0, 9.0: the 0.6 quantile is 1.0 + 0.4 (2.0 - 1.0) = 1.4, so
    # only the tokens with H = 2.0 (ratio 1.1, A = +1) and H = 9.0 (ratio 1.05, A = -1) stay.
    # Denominators stay the real-token counts (3 and 2).
    assert loss.item() == pytest.approx((-1.1 / 3 + 1.05 / 2) / 2, abs=1e-12)
    expected = torch.zeros(2, 3, dtype=torch.float64)
    expected[0, 1], expected[1, 1] = -1.1 / 6, 1.05 / 4
    torch.testing.assert_close(grad_of(logps, loss), expected)
    trl_mask = trl_high_entropy_mask(entropies, mask, 1 - 0.4)
    trl = trl_loss(logps, old, adv, mask, "grpo", entropy_mask=trl_mask.double())
    assert loss.item() == pytest.approx(trl.item(), abs=1e-12)
    assert stats["entropy_masked"] == pytest.approx(3 / 5)
    assert stats["entropy"] == pytest.approx(12.6 / 5)  # padding's 100 is not counted
    # quantile 1 keeps every token (the plain loss); 0 keeps only the highest (H = 9.0).
    keep_all, _ = grpo_loss(logps, old, None, adv, mask, entropies=entropies,
                            top_entropy_quantile=1.0)  # fmt: skip
    assert keep_all.item() == grpo_loss(logps, old, None, adv, mask)[0].item()
    only_max, _ = grpo_loss(logps, old, None, adv, mask, entropies=entropies,
                            top_entropy_quantile=0.0)  # fmt: skip
    assert only_max.item() == pytest.approx((0 + 1.05 / 2) / 2, abs=1e-12)


@pytest.mark.parametrize("loss_type, quantile", [("grpo", 1.0), ("dapo", 1.0), ("grpo", 0.4),
                                                 ("cispo", 0.4)])  # fmt: skip
def test_entropy_bonus_value_gradient_and_trl(loss_type, quantile):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 5, (2, 3), generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    logps = selective_log_softmax(logits, tokens)
    entropies = token_entropy(logits)
    zero = torch.zeros(2, dtype=torch.float64)  # no policy term: the bonus alone
    kwargs = {"loss_type": loss_type, "entropies": entropies, "num_items_in_batch": 8}
    loss, stats = grpo_loss(logps, None, None, zero, mask, entropy_coef=0.01,
                            top_entropy_quantile=quantile, **kwargs)  # fmt: skip
    keep = mask if quantile == 1 else trl_high_entropy_mask(entropies.detach(), mask, 1 - quantile)
    n = 8 if loss_type in ("dapo", "cispo") else int(keep.sum())
    h = entropies.detach()
    assert loss.item() == pytest.approx(-0.01 * h[keep].sum().item() / n, abs=1e-12)
    # By hand: dH/dz_v = -p_v (log p_v + H), so d(-c sum_kept H / n)/dz = c p (log p + H) / n.
    logp = torch.log_softmax(logits.detach(), -1)
    expected = 0.01 * logp.exp() * (logp + h[..., None]) * keep[..., None] / n
    loss.backward()
    torch.testing.assert_close(logits.grad, expected)
    trl = trl_loss(logps.detach(), logps.detach(), zero, mask, loss_type, num_items=8,
                   entropies=h, entropy_coef=0.01,
                   entropy_mask=None if quantile == 1 else keep.double())  # fmt: skip
    assert loss.item() == pytest.approx(trl.item(), abs=1e-12)
    assert stats["entropy"] == pytest.approx(h[mask].mean().item())


# ---------------------------------------------------------------------------------------------
# token_entropy.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [1, 3, 512])
def test_token_entropy_matches_the_definition_and_its_gradient(chunk_size):
    g = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(2, 5, 11, generator=g, dtype=torch.float64)).requires_grad_()
    h = token_entropy(logits, chunk_size=chunk_size)
    logp = torch.log_softmax(logits, -1)
    naive = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(h, naive)
    weights = torch.randn(2, 5, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((h * weights).sum(), logits)
    (naive_grad,) = torch.autograd.grad((naive * weights).sum(), logits)
    torch.testing.assert_close(grad, naive_grad)
    assert torch.autograd.gradcheck(lambda x: token_entropy(x, chunk_size=chunk_size), logits)


def test_token_entropy_of_uniform_one_hot_and_masked_logits():
    inf = float("inf")
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0], [0.0, -inf, 0.0, -inf]]],
                          requires_grad=True)  # fmt: skip
    h = token_entropy(logits)
    assert h.tolist()[0] == pytest.approx([math.log(4), 0.0, math.log(2)], abs=1e-6)
    h.sum().backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[0, 2, [1, 3]] == 0).all()
    # bf16 logits give an fp32 entropy.
    assert token_entropy(torch.zeros(1, 1, 8, dtype=torch.bfloat16)).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Every variant: on-policy it is REINFORCE, padding never matters, micro-batches add up.
# ---------------------------------------------------------------------------------------------
VARIANTS = {
    "cispo": {"loss_type": "cispo", "epsilon_high": 4.0},
    "sapo": {"loss_type": "sapo"},
    "luspo": {"loss_type": "luspo", "importance_sampling_level": "sequence"},
    "vespo": {"loss_type": "vespo"},
    "delta": {"delta": 1.5},
    "off_policy": {"off_policy_mask_threshold": 0.1},
    "top_entropy": {"top_entropy_quantile": 0.5},
    "entropy_bonus": {"loss_type": "dapo", "entropy_coef": 0.05},
}


@pytest.mark.parametrize("variant", ["cispo", "sapo", "luspo", "vespo", "delta", "off_policy"])
def test_on_policy_every_variant_is_reinforce(variant):
    g = torch.Generator().manual_seed(0)
    batch, length, vocab = 4, 5, 7
    logits = torch.randn(batch, length, vocab, generator=g, requires_grad=True)
    tokens = torch.randint(0, vocab, (batch, length), generator=g)
    mask = (torch.arange(length) < torch.tensor([5, 2, 4, 1])[:, None]).long()
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
    logps = selective_log_softmax(logits, tokens)
    kwargs = VARIANTS[variant]
    loss, _ = grpo_loss(logps, None, None, advantages, mask, **kwargs)
    loss.backward()
    normaliser = {
        "cispo": mask.sum(),  # as "dapo"
        "vespo": mask.sum(),
        "luspo": batch,  # (1/B) sum_i |o_i| L_i: each token weighs 1 / B
    }.get(kwargs.get("loss_type"), batch * mask.sum(-1, keepdim=True))  # as "grpo"
    weight = -advantages[:, None] * mask / normaliser  # [B, T]
    onehot = torch.nn.functional.one_hot(tokens, vocab).float()
    expected = weight[..., None] * (onehot - torch.softmax(logits.detach(), -1))
    torch.testing.assert_close(logits.grad, expected, atol=1e-7, rtol=1e-6)


def random_batch(seed, batch=5, length=6, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    logps = -3 * torch.rand(batch, length, generator=g)
    old = logps + spread * torch.randn(batch, length, generator=g)
    ref = logps + spread * torch.randn(batch, length, generator=g)
    entropies = 3 * torch.rand(batch, length, generator=g)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = (torch.arange(length) < lengths[:, None]).long()
    advantages = torch.randn(batch, generator=g)
    return logps, old, ref, entropies, advantages, mask


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_padding_values_change_neither_loss_nor_gradients(variant):
    logps, old, ref, entropies, advantages, mask = random_batch(seed=2)
    kwargs = {**VARIANTS[variant], "beta": 0.1}

    def run(lp, o, r, h):
        lp, h = lp.clone().requires_grad_(), h.clone().requires_grad_()
        loss, stats = grpo_loss(lp, o, r, advantages, mask, entropies=h, **kwargs)
        loss.backward()
        return loss, lp.grad, h.grad, stats

    loss, grad, h_grad, stats = run(logps, old, ref, entropies)
    pad = mask == 0
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -3.0])
    fill = garbage[torch.arange(int(pad.sum())) % 5]
    for changed in (logps, old, ref, entropies):
        changed[pad] = fill.roll(1)
        fill = fill.roll(1)
    loss2, grad2, h_grad2, stats2 = run(logps, old, ref, entropies)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2) and stats == stats2
    assert (grad[pad] == 0).all() and torch.isfinite(grad).all()
    if variant == "entropy_bonus":  # the only one whose loss depends on H's value
        assert torch.equal(h_grad, h_grad2) and (h_grad[pad] == 0).all()
    else:
        assert h_grad is None and h_grad2 is None


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_all_padding_gives_zero_and_never_nan(variant):
    logps, old, ref, entropies, advantages, mask = random_batch(seed=3, batch=3, length=4)
    lp = logps.clone().requires_grad_()
    loss, stats = grpo_loss(lp, old, ref, advantages, torch.zeros_like(mask), entropies=entropies,
                            beta=0.1, **VARIANTS[variant])  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0 and (lp.grad == 0).all()
    assert all(math.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("variant", ["cispo", "vespo", "entropy_bonus"])
def test_global_token_mean_micro_batches_equal_the_full_batch(variant):
    logps, old, ref, entropies, advantages, mask = random_batch(seed=1, batch=6, length=7)
    kwargs = {**VARIANTS[variant], "beta": 0.04, "num_items_in_batch": mask.sum()}
    full = logps.clone().requires_grad_()
    grpo_loss(full, old, ref, advantages, mask, entropies=entropies, **kwargs)[0].backward()
    micro = logps.clone().requires_grad_()
    for rows in (slice(0, 2), slice(2, 6)):
        loss, _ = grpo_loss(micro[rows], old[rows], ref[rows], advantages[rows], mask[rows],
                            entropies=entropies[rows], **kwargs)  # fmt: skip
        loss.backward()
    torch.testing.assert_close(micro.grad, full.grad, atol=1e-7, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Several rewards: sum then normalise, or normalise then sum (GDPO).
# ---------------------------------------------------------------------------------------------
def test_normalize_then_sum_hand_values():
    parts = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    adv = reward_advantages(parts, [1.0, 0.1], 2, aggregation="normalize_then_sum")
    z = 0.5 / (math.sqrt(0.5) + 1e-4)  # a pair (1, 0) normalised in its group: +-z
    q = [z, -z, 0.1 * z, -0.1 * z]
    std = math.sqrt(sum(x * x for x in q) / 3)  # Bessel; mean(q) = 0
    assert adv.tolist() == pytest.approx([x / (std + 1e-4) for x in q], abs=1e-6)


def trl_advantages(parts, weights, group_size, aggregation):
    weights = torch.tensor(weights)
    if aggregation == "sum_then_normalize":
        rewards = (parts * weights.unsqueeze(0)).nansum(dim=1)
        mean = rewards.view(-1, group_size).mean(dim=1).repeat_interleave(group_size)
        std = rewards.view(-1, group_size).std(dim=1).repeat_interleave(group_size)
        return (rewards - mean) / (std + 1e-4)
    grouped = parts.view(-1, group_size, parts.shape[1])
    mean_k = grouped.mean(dim=1, keepdim=True)
    std_k = grouped.std(dim=1, keepdim=True)
    reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, parts.shape[1])
    rewards = (reward_k * weights.unsqueeze(0)).nansum(dim=1)
    return (rewards - rewards.mean()) / (rewards.std() + 1e-4)


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_reward_aggregation_equals_trl(aggregation):
    g = torch.Generator().manual_seed(0)
    correct = torch.randint(0, 2, (12,), generator=g).float()
    correct[:4] = 1.0  # one group all right: constant in this reward
    fmt = torch.rand(12, generator=g)
    parts = torch.stack([correct, fmt], dim=1)  # [N, K]
    ours = reward_advantages(parts, [1.0, 0.3], 4, aggregation=aggregation)
    torch.testing.assert_close(ours, trl_advantages(parts, [1.0, 0.3], 4, aggregation),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_sum_then_normalize_is_bit_for_bit_the_advantage_of_the_weighted_sum():
    g = torch.Generator().manual_seed(1)
    parts = torch.rand(16, 3, generator=g)
    weights = [1.0, 0.2, 0.7]
    total = torch.zeros(16)
    for k, w in enumerate(weights):  # as grpo.rewards.combine_rewards accumulates it
        total += w * parts[:, k]
    for scale in ("group", "batch", "none"):
        assert torch.equal(
            reward_advantages(parts, weights, 4, scale=scale), group_advantages(total, 4, scale)
        )


def test_normalize_then_sum_constant_groups_stay_zero():
    parts = torch.tensor([[1.0, 0.5], [1.0, 0.5], [1.0, 0.0], [0.0, 1.0]])
    adv = reward_advantages(parts, [1.0, 1.0], 2, aggregation="normalize_then_sum")
    assert adv[:2].tolist() == [0.0, 0.0]
    # (1, 0) against (0, 1): summed they tie; normalised each, they tie too with equal weights,
    # and a larger correctness weight breaks the tie.
    assert adv[2:].abs().max() < 1e-6
    adv = reward_advantages(parts, [2.0, 1.0], 2, aggregation="normalize_then_sum")
    assert adv[2] > 0 > adv[3]


# ---------------------------------------------------------------------------------------------
# Bad values: one line naming the field and the fix, before any work.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, message",
    [
        ({"loss_type": "luspo"}, r"^loss_type='luspo': .*set importance_sampling_level: sequence"),
        ({"loss_type": "vespo", "importance_sampling_level": "sequence"},
         r"^loss_type='vespo': .*set importance_sampling_level: token"),
        ({"sapo_temperature_pos": -1.0}, r"^sapo_temperature_pos=-1.0: must be a finite number"),
        ({"sapo_temperature_neg": math.nan}, r"^sapo_temperature_neg=nan: must be a finite"),
        ({"top_entropy_quantile": 1.5}, r"^top_entropy_quantile=1.5: must be in \[0, 1\]"),
        ({"top_entropy_quantile": -0.1}, r"^top_entropy_quantile=-0.1: must be in \[0, 1\]"),
        ({"entropy_coef": -0.1}, r"^entropy_coef=-0.1: must be a finite number >= 0"),
        ({"off_policy_mask_threshold": -1.0}, r"^off_policy_mask_threshold=-1.0: must be"),
        ({"vespo_k_pos": -1.0}, r"^vespo_k_pos=-1.0: must be a finite number >= 0"),
        ({"vespo_lambda_neg": 0.0}, r"^vespo_lambda_neg=0.0: must be a finite number > 0"),
        ({"delta": 1.1}, r"^delta=1.1: must be 0 \(off\) or a finite number > 1 \+ epsilon_high"),
        ({"delta": 1.25, "epsilon_high": 0.28}, r"^delta=1.25: .*> 1 \+ epsilon_high = 1.28"),
        ({"delta": 2.0, "loss_type": "sapo"}, r"^delta=2.0: two-sided clipping .*set delta: 0"),
        ({"multi_objective_aggregation": "max"}, r"^multi_objective_aggregation='max': must be"),
        ({"multi_objective_aggregation": "normalize_then_sum", "scale_rewards": "batch"},
         r"^multi_objective_aggregation='normalize_then_sum': .*set scale_rewards: group"),
    ],
)  # fmt: skip
def test_bad_options_raise_one_line_naming_the_field(options, message):
    with pytest.raises(ValueError, match=message) as err:
        check_loss_options(**options)
    assert "\n" not in str(err.value)
    loss_options = {k: v for k, v in options.items() if k != "multi_objective_aggregation"}
    if len(loss_options) == len(options) and "scale_rewards" not in options:
        logps, old, mask = batch_from_ratios([[1.0, 1.0]])
        with pytest.raises(ValueError, match=message):  # grpo_loss checks before any work
            grpo_loss(logps, old, None, torch.ones(1, dtype=torch.float64), mask,
                      entropies=torch.zeros(1, 2), **loss_options)  # fmt: skip


def test_options_needing_entropies_say_so():
    logps, old, mask = batch_from_ratios([[1.0, 1.0]])
    adv = torch.ones(1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^entropies=None with top_entropy_quantile=0.2"):
        grpo_loss(logps, old, None, adv, mask, top_entropy_quantile=0.2)
    with pytest.raises(ValueError, match=r"entropy_coef=0.1: pass the token entropies"):
        grpo_loss(logps, old, None, adv, mask, entropy_coef=0.1)
    with pytest.raises(ValueError, match=r"^entropies has shape \(1, 3\)"):
        grpo_loss(logps, old, None, adv, mask, entropies=torch.zeros(1, 3))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: reward_advantages(torch.zeros(4), [1.0], 2), r"reward parts have shape \(4,\)"),
        (lambda: reward_advantages(torch.zeros(4, 2), [1.0], 2), r"for 1 weights"),
        (lambda: reward_advantages(torch.zeros(4, 1), [1.0], 2, aggregation="avg"),
         r"aggregation='avg'"),
        (lambda: reward_advantages(torch.zeros(4, 1), [1.0], 2, aggregation="normalize_then_sum",
                                   scale="none"), r"scale='none' with aggregation"),
        (lambda: token_entropy(torch.zeros(2, 3)), r"logits has shape \(2, 3\)"),
        (lambda: token_entropy(torch.zeros(1, 2, 3), chunk_size=0), r"chunk_size=0"),
    ],
)  # fmt: skip
def test_other_errors_name_argument_and_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------------------
# The entropies the trainer computes: the same forward as the log-probs.
# ---------------------------------------------------------------------------------------------
def test_completion_entropies_are_those_of_a_plain_forward(tiny_model_dir):
    from grpo.logprobs import completion_logps, completion_logps_and_entropies
    from grpo.policy import load_model
    from grpo.rollout import generate_rollouts

    model, tok = load_model(tiny_model_dir)
    model.eval()
    torch.manual_seed(0)
    prompts = ["7+5=", "47+35=", "7+5=", "47+35="]  # shared prompts, unequal lengths
    ro = generate_rollouts(model, tok, prompts, max_new_tokens=5, temperature=0.7)
    with torch.no_grad():
        logps, entropies = completion_logps_and_entropies(model, ro, 0.7)
        assert torch.equal(logps, completion_logps(model, ro, 0.7))
        for i in range(4):  # each row alone, no padding
            p = ro.prompt_ids[i][ro.prompt_mask[i] == 1]
            c = ro.completion_ids[i][ro.completion_mask[i] == 1]
            logits = model(torch.cat([p, c])[None]).logits[0, len(p) - 1 : -1] / 0.7
            logp = torch.log_softmax(logits, -1)
            expected = -(logp.exp() * logp).sum(-1)
            got = entropies[i][ro.completion_mask[i] == 1]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
