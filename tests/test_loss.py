"""grpo/loss.py: every variant pinned by a hand-computed number or an exact identity."""

import doctest
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

import grpo.loss
from grpo.choices import IS_LEVELS, SCALE_REWARDS
from grpo.loss import (
    constant_groups,
    group_advantages,
    grpo_loss,
    grpo_loss_terms,
    kl_k3,
    masked_mean,
    selective_log_softmax,
)

K = 1 - math.log(2)  # k3 when ref - logp = ln 2
# The clipped objective's four normalisations; the other objectives: tests/test_loss_variants.py.
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def test_docstring_worked_examples_are_true():
    result = doctest.testmod(grpo.loss)
    assert result.attempted >= 8 and result.failed == 0


# ---------------------------------------------------------------------------------------------
# 1. Hand-computed values: 2 sequences with 3 and 1 real tokens.
# ---------------------------------------------------------------------------------------------
def hand_batch():
    """Seq 0: A = +1, ratios 1.0, 1.1, 1.5 (1.5 clipped to 1.2). Seq 1: A = -1, one real token
    with ratio 0.5 (clipped to 0.8), then padding holding garbage. ref differs from logps by ln 2
    on seq 1's token only, so k3 is 1 - ln 2 there and 0 elsewhere."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, 7.0, -3.0]])
    ratios = torch.tensor([[1.0, 1.1, 1.5], [0.5, 1.0, 1.0]])
    logps = old + ratios.log()
    logps[1, 1:] = torch.tensor([55.0, -80.0])  # padding: must not matter
    ref = logps.clone()
    ref[1, 0] += math.log(2)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    advantages = torch.tensor([1.0, -1.0])
    return logps, old, ref, advantages, mask


# seq 0 sums to -(1.0 + 1.1 + 1.2) = -3.3 over 3 tokens; seq 1 to +0.8 (+ beta K) over 1 token.
HAND_CASES = [
    ("grpo", {}, (-3.3 / 3 + 0.8) / 2, lambda b: (-3.3 / 3 + 0.8 + b * K) / 2),
    ("bnpo", {}, (-3.3 + 0.8) / 4, lambda b: (-3.3 + 0.8 + b * K) / 4),
    ("dr_grpo", {"max_completion_length": 4}, (-3.3 + 0.8) / 8, lambda b: (-2.5 + b * K) / 8),
    ("dapo", {}, (-3.3 + 0.8) / 4, lambda b: (-2.5 + b * K) / 4),
    ("dapo", {"num_items_in_batch": 10}, (-3.3 + 0.8) / 10, lambda b: (-2.5 + b * K) / 10),
]


@pytest.mark.parametrize("loss_type, kwargs, expected, expected_with_kl", HAND_CASES)
def test_hand_computed_loss(loss_type, kwargs, expected, expected_with_kl):
    logps, old, ref, advantages, mask = hand_batch()
    loss, stats = grpo_loss(logps, old, None, advantages, mask, loss_type=loss_type, **kwargs)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats == pytest.approx(
        {"clip_low": 0.25, "clip_high": 0.25, "clip_region": 0.5, "ratio_mean": 4.1 / 4}
    )
    loss, stats = grpo_loss(
        logps, old, ref, advantages, mask, loss_type=loss_type, beta=0.1, **kwargs
    )
    assert loss.item() == pytest.approx(expected_with_kl(0.1), abs=1e-6)
    assert stats["kl"] == pytest.approx(K / 4, abs=1e-7)


@pytest.mark.parametrize("loss_type, kwargs, expected, expected_with_kl", HAND_CASES)
def test_terms_are_the_hand_per_token_values_and_shares_add_up(
    loss_type, kwargs, expected, expected_with_kl
):
    """grpo_loss_terms: the loss and stats of grpo_loss, the per-token terms L_it by hand (seq 0:
    -1.0, -1.1, -1.2; seq 1: 0.8 + beta K, padding 0), and per_token * d loss / d per_token sums
    to the loss."""
    logps, old, ref, advantages, mask = hand_batch()
    logps.requires_grad_(True)
    loss, stats, terms = grpo_loss_terms(
        logps, old, ref, advantages, mask, loss_type=loss_type, beta=0.5, **kwargs
    )
    plain_loss, plain_stats = grpo_loss(
        logps, old, ref, advantages, mask, loss_type=loss_type, beta=0.5, **kwargs
    )
    assert loss.item() == plain_loss.item() and stats == plain_stats
    hand = torch.tensor([[-1.0, -1.1, -1.2], [0.8 + 0.5 * K, 0.0, 0.0]])
    assert torch.allclose(terms.per_token, hand, atol=1e-6)
    assert terms.clip_high.tolist() == [[False, False, True], [False, False, False]]
    assert terms.clip_low.tolist() == [[False, False, False], [True, False, False]]
    assert terms.kl[1, 0].item() == pytest.approx(K) and terms.kl[0].abs().max() < 1e-6
    (weights,) = torch.autograd.grad(loss, terms.per_token)
    shares = terms.per_token * weights
    assert shares.sum().item() == pytest.approx(expected_with_kl(0.5), rel=1e-6)


def test_hand_computed_sequence_level():
    logps, old, _, advantages, mask = hand_batch()
    s0 = 1.65 ** (1 / 3)  # geometric mean of 1.0, 1.1, 1.5 = 1.1817, inside [0.8, 1.2]
    loss, stats = grpo_loss(
        logps, old, None, advantages, mask, importance_sampling_level="sequence"
    )
    assert loss.item() == pytest.approx((-s0 + 0.8) / 2, abs=1e-6)
    assert stats["clip_low"] == 0.25 and stats["clip_high"] == 0.0
    assert stats["ratio_mean"] == pytest.approx((3 * s0 + 0.5) / 4, abs=1e-6)


def random_batch(seed, batch=6, length=5, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    logps = -3 * torch.rand(batch, length, generator=g)
    old = logps + spread * torch.randn(batch, length, generator=g)
    ref = logps + spread * torch.randn(batch, length, generator=g)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    advantages = torch.randn(batch, generator=g)
    return logps, old, ref, advantages, mask


def test_dapo_micro_batches_equal_full_batch():
    logps, old, ref, advantages, mask = random_batch(seed=1, batch=6, length=7)
    kwargs = {"loss_type": "dapo", "beta": 0.04, "epsilon_high": 0.28}
    full = logps.clone().requires_grad_()
    full_loss, _ = grpo_loss(full, old, ref, advantages, mask, **kwargs)
    full_loss.backward()

    micro = logps.clone().requires_grad_()
    total, bnpo_total = 0.0, 0.0
    for rows in (slice(0, 2), slice(2, 6)):  # unequal micro-batches, as in gradient accumulation
        args = (micro[rows], old[rows], ref[rows], advantages[rows], mask[rows])
        loss, _ = grpo_loss(*args, num_items_in_batch=mask.sum(), **kwargs)
        loss.backward()
        total += loss.item()
        bnpo_total += grpo_loss(*args, **{**kwargs, "loss_type": "bnpo"})[0].item() / 2
    assert total == pytest.approx(full_loss.item(), abs=1e-6)
    torch.testing.assert_close(micro.grad, full.grad, atol=1e-7, rtol=1e-6)
    # What DAPO fixes: averaging per-micro-batch token means is not the token mean.
    assert abs(bnpo_total - full_loss.item()) > 1e-3


# ---------------------------------------------------------------------------------------------
# 2. Clipping, both advantage signs, inside and outside the clip range.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
def test_clipped_tokens_have_zero_gradient_others_minus_a_rho(loss_type, epsilon_high):
    nan = float("nan")
    ratios = torch.tensor(
        [
            [0.5, 0.9, 1.0, 1.1, 1.25, 1.5, nan],  # A = +0.7, 6 real tokens, then padding
            [1.5, 1.25, 1.1, 1.0, 0.9, 0.5, 0.7],  # A = -1.3, 7 real tokens
        ]
    )
    mask = ~ratios.isnan()
    advantages = torch.tensor([0.7, -1.3])
    old = torch.full_like(ratios, -2.0)
    logps = (old + ratios.log()).requires_grad_()
    loss, stats = grpo_loss(
        logps, old, None, advantages, mask, loss_type=loss_type, epsilon_high=epsilon_high,
        max_completion_length=8, num_items_in_batch=40,
    )  # fmt: skip
    loss.backward()

    # Hand-listed: A > 0 clips ratios above 1 + eps_high (1.25 only when eps_high = 0.2), A < 0
    # clips ratios below 0.8. Ratio 0.5 with A > 0 and 1.5 with A < 0 are NOT clipped (pessimism).
    clipped_high = [[0, 0, 0, 0, epsilon_high is None, 1, 0], [0] * 7]
    clipped_low = [[0] * 7, [0, 0, 0, 0, 0, 1, 1]]
    clipped = torch.tensor(clipped_high).bool() | torch.tensor(clipped_low).bool()
    normaliser = {
        "grpo": 2 * mask.sum(-1, keepdim=True).float(),  # B * |o_i|: [[12], [14]]
        "bnpo": torch.tensor(13.0),
        "dr_grpo": torch.tensor(2.0 * 8),
        "dapo": torch.tensor(40.0),
    }[loss_type]
    expected = torch.where(
        clipped | ~mask, 0.0, -advantages[:, None] * ratios.nan_to_num() / normaliser
    )
    torch.testing.assert_close(logps.grad, expected, atol=1e-7, rtol=1e-6)
    assert (logps.grad[clipped | ~mask] == 0).all()
    assert (logps.grad[~clipped & mask] != 0).all()
    n_high = 2 if epsilon_high is None else 1
    assert stats["clip_high"] == pytest.approx(n_high / 13)
    assert stats["clip_low"] == pytest.approx(2 / 13)
    assert stats["clip_region"] == pytest.approx((n_high + 2) / 13)


# ---------------------------------------------------------------------------------------------
# 3. On-policy: the loss is REINFORCE with the group mean as baseline.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_on_policy_gradient_is_reinforce_with_group_baseline(loss_type):
    g = torch.Generator().manual_seed(0)
    batch, length, vocab = 6, 5, 7  # 2 prompts x 3 completions
    logits = torch.randn(batch, length, vocab, generator=g, requires_grad=True)
    tokens = torch.randint(0, vocab, (batch, length), generator=g)
    mask = (torch.arange(length) < torch.tensor([5, 2, 4, 1, 3, 5])[:, None]).long()
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0]), group_size=3)
    logps = selective_log_softmax(logits, tokens)
    loss, stats = grpo_loss(
        logps, None, None, advantages, mask, loss_type=loss_type, max_completion_length=5
    )
    loss.backward()

    # By hand: grad_z log p(y) = onehot(y) - softmax(z), weighted by -A_i m_it / normaliser.
    normaliser = {
        "grpo": batch * mask.sum(-1, keepdim=True),
        "bnpo": mask.sum(),
        "dr_grpo": batch * 5,
        "dapo": mask.sum(),
    }[loss_type]
    weight = -advantages[:, None] * mask / normaliser  # [B, T]
    onehot = torch.nn.functional.one_hot(tokens, vocab).float()
    expected = weight[..., None] * (onehot - torch.softmax(logits.detach(), -1))
    torch.testing.assert_close(logits.grad, expected, atol=1e-7, rtol=1e-6)
    assert stats["ratio_mean"] == 1.0 and stats["clip_region"] == 0.0
    if loss_type == "grpo":  # -mean_i A_i, and advantages sum to 0 within each group
        assert loss.item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# 4. k3.
# ---------------------------------------------------------------------------------------------
def test_k3_is_zero_with_zero_gradient_at_equality():
    logps = torch.tensor([[-0.1, -2.0, -7.5]], requires_grad=True)
    kl = kl_k3(logps, logps.detach().clone())
    kl.sum().backward()
    assert (kl == 0).all() and (logps.grad == 0).all()


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), spread=st.floats(0.0, 20.0))
def test_k3_is_nonnegative_and_its_gradient_is_one_minus_ratio(seed, spread):
    g = torch.Generator().manual_seed(seed)
    logps = (-10 * torch.rand(3, 4, generator=g)).requires_grad_()
    ref = logps.detach() + spread * torch.randn(3, 4, generator=g)
    kl = kl_k3(logps, ref)
    kl.sum().backward()
    assert (kl >= 0).all()
    torch.testing.assert_close(logps.grad, 1 - torch.exp(ref - logps.detach()))


def test_k3_expectation_under_pi_is_exact_kl():
    # sum_x pi(x) k3(x) = sum pi_ref - 1 + KL(pi || pi_ref) = KL exactly, for any two distributions.
    pi = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    ref = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    expected = (pi * (pi / ref).log()).sum()
    actual = (pi * kl_k3(pi.log()[None], ref.log()[None])).sum()
    torch.testing.assert_close(actual, expected, atol=1e-15, rtol=1e-14)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_kl_term_in_the_loss_has_the_k3_gradient(loss_type):
    logps, old, ref, _, mask = random_batch(seed=4, batch=4, length=5, spread=0.5)
    zero_advantages = torch.zeros(4)  # leaves only beta * k3 in the loss
    lp = logps.clone().requires_grad_()
    kwargs = {"loss_type": loss_type, "max_completion_length": 5, "num_items_in_batch": 30}
    loss, stats = grpo_loss(lp, old, ref, zero_advantages, mask, beta=0.04, **kwargs)
    loss.backward()
    normaliser = {
        "grpo": 4 * mask.sum(-1, keepdim=True),
        "bnpo": mask.sum(),
        "dr_grpo": 4 * 5,
        "dapo": 30,
    }[loss_type]
    expected = 0.04 * (1 - torch.exp(ref - logps)) * mask / normaliser
    torch.testing.assert_close(lp.grad, expected)
    assert stats["kl"] == pytest.approx(masked_mean(kl_k3(logps, ref), mask).item())
    # beta = 0: the KL is reported but is not in the loss.
    no_kl, stats = grpo_loss(logps, old, ref, zero_advantages, mask, **kwargs)
    assert no_kl.item() == 0.0 and stats["kl"] > 0


# ---------------------------------------------------------------------------------------------
# 5. Advantages.
# ---------------------------------------------------------------------------------------------
def test_advantages_hand_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    std = math.sqrt(1 / 3)  # Bessel: sum of squares 4 * 0.25 = 1, over n - 1 = 3
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, group_size=4), expected)
    # "batch": per-group mean, one std over all N: rewards 1, 0 | 3, 1 have mean 1.25, and
    # squared deviations 0.0625 + 1.5625 + 3.0625 + 0.0625 = 4.75.
    rewards = torch.tensor([1.0, 0.0, 3.0, 1.0])
    expected = torch.tensor([0.5, -0.5, 1.0, -1.0]) / (math.sqrt(4.75 / 3) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 2, scale="batch"), expected)
    # "none" (Dr. GRPO): r - mean, exactly.
    rewards = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0, 4.0])
    assert group_advantages(rewards, 2, scale="none").tolist() == [1, -1, 0, 0, -2, 2]


@pytest.mark.parametrize("scale", SCALE_REWARDS)
@pytest.mark.parametrize("eps", [0.0, 1e-4])
def test_zero_variance_group_gives_exactly_zero(scale, eps):
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7])  # float mean of 0.1s is not 0.1
    assert group_advantages(rewards, 3, scale=scale, eps=eps).tolist() == [0.0] * 6
    mixed = group_advantages(torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 1.0]), 3, scale=scale, eps=eps)
    assert mixed[:3].tolist() == [0.0] * 3 and torch.isfinite(mixed).all()


@pytest.mark.parametrize("value", [0.2, 2 / 3, 1.2, 0.0, -0.7, 1e3 / 3])
def test_constant_groups_despite_a_nonzero_float_std(value):
    # Eight rewards of 0.2 (0.2 x format, no correctness): float std 1.6e-8, not 0.
    rewards = torch.full((8,), value, dtype=torch.float32)
    if value in (0.2, 2 / 3):
        assert rewards.std().item() > 1e-9
    mixed = torch.cat([rewards, torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])])
    assert constant_groups(mixed, 8).tolist() == [True, False]
    assert group_advantages(mixed, 8)[:8].tolist() == [0.0] * 8
    assert group_advantages(mixed, 8)[8:].abs().min() > 0.3


def test_constant_groups_tolerance_is_relative_rounding_only():
    # Sums of weighted parts in another order differ by an ulp: still constant.
    a = torch.tensor([0.1 + 0.2, 0.3, 0.2 + 0.1, 0.3], dtype=torch.float64)
    assert constant_groups(a, 4).tolist() == [True]
    # A real difference of 1e-5 at scale 1 is signal; at scale 100, 2e-4 still is.
    assert constant_groups(
        torch.tensor([1.0, 1.0, 1.0, 1.00001], dtype=torch.float64), 4
    ).tolist() == [False]
    assert constant_groups(
        torch.tensor([100.0, 100.0, 100.0, 100.0002], dtype=torch.float64), 4
    ).tolist() == [False]
    assert constant_groups(
        torch.tensor([100.0, 100.0, 100.0, 100.00005], dtype=torch.float64), 4
    ).tolist() == [True]
    with pytest.raises(ValueError, match="group_size=3"):
        constant_groups(torch.zeros(8), 3)


@settings(max_examples=50, deadline=None)
@given(
    rewards=st.lists(st.integers(-8, 8), min_size=8, max_size=8),
    shift=st.integers(-100, 100),
    factor=st.sampled_from([0.25, 0.5, 2.0, 4.0, 64.0]),
    scale=st.sampled_from(SCALE_REWARDS),
)
def test_advantages_invariances(rewards, shift, factor, scale):
    # Integer rewards and power-of-two factors keep every input exact, so identities are tight.
    r = torch.tensor(rewards, dtype=torch.float64) / 4
    base = group_advantages(r, group_size=4, scale=scale)
    torch.testing.assert_close(group_advantages(r + shift, 4, scale=scale), base)
    torch.testing.assert_close(base.view(2, 4).sum(-1), torch.zeros(2, dtype=torch.float64))
    if scale == "group":  # positive scaling of one group's rewards (exactly, when eps = 0)
        scaled = torch.cat([r[:4] * factor, r[4:]])
        torch.testing.assert_close(
            group_advantages(scaled, 4, eps=0.0), group_advantages(r, 4, eps=0.0)
        )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rewards_raise_naming_the_rows(bad):
    with pytest.raises(ValueError, match=r"rewards are NaN or infinite at rows \[2\]"):
        group_advantages(torch.tensor([1.0, 0.0, bad, 1.0]), group_size=2)


# ---------------------------------------------------------------------------------------------
# 6. Masking: padding never reaches the loss or the gradient, whatever it holds.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", IS_LEVELS)
def test_padding_values_change_neither_loss_nor_gradients(loss_type, level):
    logps, old, ref, advantages, mask = random_batch(seed=2, batch=5, length=6, spread=0.5)
    kwargs = {"loss_type": loss_type, "beta": 0.1, "importance_sampling_level": level}
    kwargs |= {"max_completion_length": 6}

    def run(lp, o, r):
        lp = lp.clone().requires_grad_()
        loss, stats = grpo_loss(lp, o, r, advantages, mask, **kwargs)
        loss.backward()
        return loss, lp.grad, stats

    loss, grad, stats = run(logps, old, ref)
    pad = mask == 0
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -3.0])
    fill = garbage[torch.arange(int(pad.sum())) % 5]
    for changed in (logps, old, ref):
        changed[pad] = fill.roll(1)
        fill = fill.roll(1)
    loss2, grad2, stats2 = run(logps, old, ref)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2) and stats == stats2
    assert (grad[pad] == 0).all()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_padding_sequences_contribute_nothing_and_never_nan(loss_type):
    logps, old, ref, advantages, mask = random_batch(seed=3, batch=3, length=4)
    mask[1] = 0
    kwargs = {"loss_type": loss_type, "beta": 0.1, "max_completion_length": 4}
    lp = logps.clone().requires_grad_()
    loss, stats = grpo_loss(lp, old, ref, advantages, mask, **kwargs)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all() and (lp.grad[1] == 0).all()
    # Row 1 only adds 0 to the sum: same token sum as the batch without it.
    keep = [0, 2]
    if loss_type in ("bnpo", "dapo"):
        loss_without, _ = grpo_loss(lp[keep], old[keep], ref[keep], advantages[keep], mask[keep],
                                    **kwargs)  # fmt: skip
        assert loss.item() == pytest.approx(loss_without.item(), abs=1e-7)
    empty, stats = grpo_loss(logps, old, ref, advantages, torch.zeros_like(mask), **kwargs)
    assert empty.item() == 0.0 and stats["clip_region"] == 0.0 and stats["kl"] == 0.0


# ---------------------------------------------------------------------------------------------
# 7. Sequence-level importance sampling (GSPO).
# ---------------------------------------------------------------------------------------------
def test_sequence_ratio_is_exp_mean_token_log_ratio_and_tokens_clip_together():
    # Seq 0: log ratios 0.5, 0, 0 -> s = exp(1/6) = 1.1814 < 1.2: no clip, although token 0 alone
    # (ratio 1.65) would clip. Seq 1: 0.7, 0, 0 -> s = exp(0.7/3) = 1.2628 > 1.2: all clip.
    # Seq 2: 0.1, -0.05, 0.02, then padding -> s = exp(0.07 / 3).
    log_ratios = torch.tensor([[0.5, 0.0, 0.0], [0.7, 0.0, 0.0], [0.1, -0.05, 0.02]])
    mask = torch.ones(3, 3)
    advantages = torch.tensor([1.0, 2.0, -1.0])
    old = torch.full((3, 3), -1.0)
    s = torch.tensor([math.exp(0.5 / 3), math.exp(0.7 / 3), math.exp(0.07 / 3)])
    logps = (old + log_ratios).requires_grad_()
    loss, stats = grpo_loss(
        logps, old, None, advantages, mask, importance_sampling_level="sequence"
    )
    loss.backward()
    # loss = (1/3) sum_i -min(s_i A_i, clip(s_i) A_i); d s_i / d logp_it = s_i / 3.
    expected_loss = (-s[0] * 1.0 - 1.2 * 2.0 + s[2] * 1.0) / 3
    assert loss.item() == pytest.approx(expected_loss.item(), abs=1e-6)
    expected_grad = torch.stack(
        [-s[0] / 9 * torch.ones(3), torch.zeros(3), s[2] / 9 * torch.ones(3)]
    )
    torch.testing.assert_close(logps.grad, expected_grad)
    assert (logps.grad[1] == 0).all()  # the whole sequence clipped together
    assert stats["clip_high"] == pytest.approx(3 / 9) and stats["clip_low"] == 0.0
    assert stats["ratio_mean"] == pytest.approx(s.mean().item(), abs=1e-6)

    token_level, token_stats = grpo_loss(logps, old, None, advantages, mask)
    assert token_stats["clip_high"] == pytest.approx(2 / 9)  # token 0 of seqs 0 and 1


def test_sequence_ratio_ignores_padding():
    old = torch.zeros(1, 4)
    logps = torch.tensor([[0.2, 0.1, 9.0, -9.0]])
    _, stats = grpo_loss(logps, old, None, torch.tensor([1.0]), torch.tensor([[1, 1, 0, 0]]),
                         importance_sampling_level="sequence")  # fmt: skip
    assert stats["ratio_mean"] == pytest.approx(math.exp(0.15))


# ---------------------------------------------------------------------------------------------
# 8. selective_log_softmax: exact, and never a full fp32 [B, T, V].
# ---------------------------------------------------------------------------------------------
def naive_log_softmax(logits, index):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, index[..., None]).squeeze(-1)


# atol 1e-6, plus 2 fp32 ulps relative: past |log p| = 16 one ulp is 1.9e-6, and x - lse versus
# (x - max) - log(sum) may round apart by an ulp.
LOGP_TOL = {"atol": 1e-6, "rtol": 2.4e-7}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1, 3, 12, 13, 512])
def test_selective_log_softmax_matches_log_softmax_gather(dtype, chunk_size):
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(3, 6, 50, generator=g)).to(dtype).requires_grad_()
    index = torch.randint(0, 50, (3, 6), generator=g)
    weights = torch.randn(3, 6, generator=g)
    logps = selective_log_softmax(logits, index, chunk_size=chunk_size)
    (logps * weights).sum().backward()
    ours = logits.grad
    logits.grad = None
    expected = naive_log_softmax(logits, index)
    (expected * weights).sum().backward()
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps, expected, **LOGP_TOL)
    atol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16 gradients: one rounding each
    torch.testing.assert_close(ours, logits.grad, atol=atol, rtol=0)


@pytest.mark.parametrize(
    "shape, chunk_size, blocks",
    [((256, 6), 512, 4), ((3, 6), 12, 2), ((2, 7), 3, 6), ((4, 5), 1, 20), ((1, 0), 4, 1)],
)
def test_selective_log_softmax_blocks_cover_every_row_once(shape, chunk_size, blocks):
    from grpo.loss import _chunks

    logits = torch.zeros(*shape, 3)
    seen = torch.zeros(shape, dtype=torch.long)
    got = _chunks(logits, chunk_size)
    for block in got:
        assert logits[block].shape[0] * logits[block].shape[1] <= chunk_size
        seen[block] += 1
    assert len(got) == blocks and (seen == 1).all()  # 256 sequences of 6: 4 blocks, not 256


def test_selective_log_softmax_gradcheck_and_sliced_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    index = torch.randint(0, 7, (2, 4), generator=g)

    def sliced(z):  # the trainer's logits[:, :-1]: not flattenable to [B*T, V] without a copy
        return selective_log_softmax(z[:, :-1], index, chunk_size=3)

    assert torch.autograd.gradcheck(sliced, (logits,))
    torch.testing.assert_close(sliced(logits), naive_log_softmax(logits[:, :-1], index).double())


def peak_bytes(fn):
    """Peak CPU bytes allocated while fn runs, above what was live before. tracemalloc cannot see
    torch's allocations; the profiler records each one (+bytes) and each free (-bytes) in order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        live += record.nbytes()
        peak = max(peak, live)
    return peak


def test_selective_log_softmax_never_allocates_a_full_fp32_logsoftmax():
    batch, length, vocab, chunk = 2, 64, 32768, 8
    full_fp32 = batch * length * vocab * 4  # 16 MiB
    logits = torch.randn(batch, length, vocab, dtype=torch.bfloat16, requires_grad=True)
    index = torch.randint(0, vocab, (batch, length))

    def measure(log_softmax):
        out = []
        forward = peak_bytes(lambda: out.append(log_softmax(logits, index).sum()))
        backward = peak_bytes(lambda: out[0].backward())
        logits.grad = None
        return forward, backward

    def chunked_autograd(z, i):  # chunked, but autograd saves every fp32 chunk for backward
        rows = [(b, t) for b in range(batch) for t in range(0, length, chunk)]
        chunks = [(z[b, t : t + chunk].float(), i[b, t : t + chunk, None]) for b, t in rows]
        return torch.cat([c.gather(-1, j)[:, 0] - c.logsumexp(-1) for c, j in chunks])

    forward, backward = measure(lambda z, i: selective_log_softmax(z, i, chunk_size=chunk))
    naive_forward, naive_backward = measure(naive_log_softmax)
    chunked_forward, _ = measure(chunked_autograd)
    # The meter sees the fp32 [B, T, V] of log_softmax(logits.float()), forward and backward, and
    # the one that chunking alone still keeps alive for backward ...
    assert min(naive_forward, naive_backward, chunked_forward) >= full_fp32
    # ... while ours holds a few [chunk, V] fp32 rows (1 MiB) and, backward, the bf16 gradient.
    assert forward <= 3 * chunk * vocab * 4
    assert backward <= full_fp32 // 2 + 3 * chunk * vocab * 4


# ---------------------------------------------------------------------------------------------
# 9. Properties: finite loss and gradients for any shapes and values; stats are fractions.
# ---------------------------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(
    batch=st.integers(1, 5),
    length=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    spread=st.floats(0.0, 8.0),
    loss_type=st.sampled_from(LOSS_TYPES),
    level=st.sampled_from(IS_LEVELS),
    beta=st.sampled_from([0.0, 0.04]),
    epsilon_high=st.sampled_from([None, 0.28]),
    on_policy=st.booleans(),
)
def test_property_loss_and_gradients_finite(
    batch, length, seed, spread, loss_type, level, beta, epsilon_high, on_policy
):
    g = torch.Generator().manual_seed(seed)
    logps = (-20 * torch.rand(batch, length, generator=g)).requires_grad_()
    old = None if on_policy else logps.detach() + spread * torch.randn(batch, length, generator=g)
    ref = logps.detach() + spread * torch.randn(batch, length, generator=g)
    mask = torch.rand(batch, length, generator=g) < 0.7  # may leave sequences or all empty
    advantages = 3 * torch.randn(batch, generator=g)
    kwargs = {"loss_type": loss_type, "beta": beta, "epsilon_high": epsilon_high}
    kwargs |= {"importance_sampling_level": level, "max_completion_length": length}
    loss, stats = grpo_loss(logps, old, ref, advantages, mask, **kwargs)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logps.grad).all()
    assert all(math.isfinite(v) for v in stats.values())
    assert 0 <= stats["clip_low"] <= stats["clip_region"] <= 1
    assert stats["clip_region"] == pytest.approx(stats["clip_low"] + stats["clip_high"])
    if loss_type == "dapo":  # num_items_in_batch=None: dapo is bnpo
        bnpo, _ = grpo_loss(logps, old, ref, advantages, mask, **{**kwargs, "loss_type": "bnpo"})
        assert torch.equal(loss, bnpo)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 40)),
    chunk_size=st.integers(1, 10),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_selective_log_softmax_any_shape(shape, chunk_size, seed):
    g = torch.Generator().manual_seed(seed)
    logits = 10 * torch.randn(*shape, generator=g)
    index = torch.randint(0, shape[-1], shape[:2], generator=g)
    logps = selective_log_softmax(logits, index, chunk_size=chunk_size)
    torch.testing.assert_close(logps, naive_log_softmax(logits, index), **LOGP_TOL)


# ---------------------------------------------------------------------------------------------
# Errors name the argument and its value.
# ---------------------------------------------------------------------------------------------
def _args():
    logps, old, ref, advantages, mask = hand_batch()
    return {"logps": logps, "old_logps": old, "ref_logps": ref, "advantages": advantages,
            "mask": mask}  # fmt: skip


@pytest.mark.parametrize(
    "change, message",
    [
        ({"loss_type": "ppo"}, r"loss_type='ppo'"),
        ({"importance_sampling_level": "seq"}, r"importance_sampling_level='seq'"),
        ({"epsilon_low": -0.1}, r"epsilon_low=-0.1"),
        ({"epsilon_high": -1.0}, r"epsilon_high=-1.0"),
        ({"beta": -0.5}, r"beta=-0.5"),
        ({"logps": torch.zeros(6)}, r"logps has shape \(6,\)"),
        ({"old_logps": torch.zeros(2, 2)}, r"old_logps has shape \(2, 2\)"),
        ({"ref_logps": torch.zeros(3, 3)}, r"ref_logps has shape \(3, 3\)"),
        ({"mask": torch.ones(2, 4)}, r"mask has shape \(2, 4\)"),
        ({"advantages": torch.zeros(2, 1)}, r"advantages has shape \(2, 1\)"),
        ({"ref_logps": None, "beta": 0.1}, r"ref_logps=None with beta=0.1"),
        ({"loss_type": "dr_grpo"}, r"max_completion_length=None"),
        ({"loss_type": "dr_grpo", "max_completion_length": 2}, r"max_completion_length=2"),
        ({"loss_type": "dapo", "num_items_in_batch": -1}, r"num_items_in_batch=-1"),
    ],
)
def test_grpo_loss_errors_name_argument_and_value(change, message):
    with pytest.raises(ValueError, match=message):
        grpo_loss(**{**_args(), **change})


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: group_advantages(torch.zeros(6), 4), r"group_size=4"),
        (lambda: group_advantages(torch.zeros(4), 2, scale="std"), r"scale='std'"),
        (lambda: group_advantages(torch.zeros(4), 2, eps=-1.0), r"eps=-1.0"),
        (lambda: group_advantages(torch.zeros(2, 2), 2), r"rewards has shape \(2, 2\)"),
        (lambda: selective_log_softmax(torch.zeros(2, 3), torch.zeros(2).long()), r"logits"),
        (lambda: selective_log_softmax(torch.zeros(1, 2, 3), torch.zeros(1, 3).long()), "index"),
        (
            lambda: selective_log_softmax(
                torch.zeros(1, 2, 3), torch.zeros(1, 2).long(), chunk_size=0
            ),
            r"chunk_size=0",
        ),  # fmt: skip
        (lambda: kl_k3(torch.zeros(2, 3), torch.zeros(3, 2)), r"ref_logps has shape \(3, 2\)"),
    ],
)
def test_other_errors_name_argument_and_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_mean(x, mask).item() == pytest.approx(13 / 4)
    assert masked_mean(x, mask, dim=-1).tolist() == [1.5, 5.0]
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
