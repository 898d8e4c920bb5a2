import contextlib

import pytest
import torch

from grpo.policy import load_model
from grpo.rollout import (
    completion_mask_from_ids,
    generate_rollouts,
    next_tokens,
    nucleus_filter,
    tokenize_prompts,
)

PROMPTS = ["7+5=", "47+35=", "12-40=", "99+1="]  # unequal lengths -> left padding


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    return model.eval(), tok


def hf_generate(model, tok, prompts, **kwargs):
    """transformers' own generate on the same left-padded batch: the reference."""
    ids, mask = tokenize_prompts(tok, prompts, "cpu")
    if kwargs.get("do_sample"):
        kwargs["top_k"] = 0  # generation_config's default top_k=50 would filter too
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **kwargs,
    )
    return out[:, ids.shape[1] :]


@contextlib.contextmanager
def eos_likely(model, tok, boost: float):
    """`boost` added to EOS's output bias (completions end early), the bias restored after."""
    saved = model.lm_head.bias.data.clone()
    model.lm_head.bias.data[tok.eos_token_id] += boost
    try:
        yield model
    finally:
        model.lm_head.bias.data.copy_(saved)


def test_completion_mask_up_to_and_including_first_eos():
    ids = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 9, 2, 9]])
    mask, truncated = completion_mask_from_ids(ids, eos_token_id=2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


@pytest.mark.parametrize("group", [1, 3])
def test_greedy_rollout_equals_generate(tiny, group):
    model, tok = tiny
    prompts = [p for p in PROMPTS for _ in range(group)]  # group 3: each prompt prefilled once
    ro = generate_rollouts(model, tok, prompts, max_new_tokens=6, do_sample=False)
    ref = hf_generate(model, tok, prompts, max_new_tokens=6, do_sample=False)
    assert ro.completions == tok.batch_decode(ref, skip_special_tokens=True)
    assert ro.prompt_ids.tolist() == tokenize_prompts(tok, prompts, "cpu")[0].tolist()


@pytest.mark.parametrize(
    "temperature, top_p, min_new_tokens", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 0.5, 3)]
)
def test_sampled_rollout_draws_generates_tokens_for_the_same_seed(
    tiny, temperature, top_p, min_new_tokens
):
    model, tok = tiny
    with eos_likely(model, tok, 2.5):  # so EOS, padding and early stop all happen
        prompts = [p for p in PROMPTS for _ in range(4)]
        kw = dict(temperature=temperature, top_p=top_p, min_new_tokens=min_new_tokens)
        torch.manual_seed(7)
        ro = generate_rollouts(model, tok, prompts, max_new_tokens=6, **kw)
        torch.manual_seed(7)
        ref = hf_generate(model, tok, prompts, max_new_tokens=6, do_sample=True, **kw)
    mask, truncated = completion_mask_from_ids(ref, tok.eos_token_id)
    assert ro.completion_ids.tolist() == ref.masked_fill(mask == 0, tok.pad_token_id).tolist()
    assert ro.completion_mask.tolist() == mask.tolist()
    assert ro.truncated.tolist() == truncated.tolist()
    assert 0 < ro.truncated.sum() < len(prompts)  # some rows ended by EOS, some by the limit


def test_min_new_tokens_keeps_eos_out_of_the_first_tokens(tiny):
    model, tok = tiny
    with eos_likely(model, tok, 30.0):  # EOS is all but certain wherever it is allowed
        torch.manual_seed(0)
        free = generate_rollouts(model, tok, PROMPTS * 4, max_new_tokens=6)
        held = generate_rollouts(model, tok, PROMPTS * 4, max_new_tokens=6, min_new_tokens=3)
        greedy = generate_rollouts(
            model, tok, PROMPTS, max_new_tokens=6, do_sample=False, min_new_tokens=2
        )
    # Without it every completion is EOS alone, and sampling stops after one step.
    assert free.completion_ids.shape[1] == 1 and free.completion_mask.sum(1).tolist() == [1] * 16
    # With 3: three non-EOS tokens, then EOS at position 3 (length 4), then stop.
    assert held.completion_ids.shape[1] == 4
    assert held.completion_mask.sum(1).tolist() == [4] * 16
    assert (held.completion_ids[:, :3] != tok.eos_token_id).all()
    assert (held.completion_ids[:, 3] == tok.eos_token_id).all() and not held.truncated.any()
    assert greedy.completion_mask.sum(1).tolist() == [3] * 4


def reference_top_p_keep(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Token j stays iff the probability of the tokens strictly more likely than j is < top_p."""
    keep = torch.zeros_like(probs, dtype=torch.bool)
    for i, row in enumerate(probs.tolist()):
        for j, p in enumerate(row):
            more = sum(q for q in row if q > p)
            keep[i, j] = more < top_p
    return keep


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9, 0.99])
def test_nucleus_filter_keeps_the_reference_set(top_p):
    g = torch.Generator().manual_seed(int(top_p * 100))
    logits = torch.randn(16, 24, generator=g) * 2  # [16, 24]
    got = nucleus_filter(logits, top_p)
    keep = reference_top_p_keep(logits.softmax(-1), top_p)
    assert (got > float("-inf")).tolist() == keep.tolist()
    torch.testing.assert_close(got[keep], logits[keep], rtol=0, atol=0)  # kept: unchanged
    assert (keep.sum(1) >= 1).all() and (keep.sum(1) < 24).any()


def test_sampled_tokens_follow_softmax_of_the_nucleus():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(10, generator=g) * 1.5  # [V = 10]
    temperature, top_p = 0.8, 0.85
    probs = (logits / temperature).softmax(-1)
    keep = reference_top_p_keep(probs[None], top_p)[0]
    expected = torch.where(keep, probs, 0.0)
    expected = expected / expected.sum()  # [V]
    torch.manual_seed(0)
    draws = next_tokens(
        logits.expand(40_000, -1), 0, greedy=False, temperature=temperature, top_p=top_p
    )  # [40000]
    freq = torch.bincount(draws, minlength=10).float() / len(draws)
    assert (freq[~keep] == 0).all()
    # binomial standard error at 40k draws is <= 0.0025; 0.01 is four of them
    assert (freq - expected).abs().max() < 0.01


def test_next_tokens_greedy_is_argmax_and_masks_eos_below_min_new_tokens():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 2.0]])
    assert next_tokens(logits, 0, greedy=True).tolist() == [1, 0]
    kw = dict(greedy=True, eos_token_id=1, min_new_tokens=2)
    assert next_tokens(logits, 1, **kw).tolist() == [2, 0]  # step 1 < 2: EOS (1) is out
    assert next_tokens(logits, 2, **kw).tolist() == [1, 0]  # step 2: allowed again
    assert logits[0, 1] == 5.0  # the caller's logits are untouched


def test_nucleus_filter_matches_transformers():
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    for top_p in (0.1, 0.5, 0.9, 0.99):
        ours = nucleus_filter(logits, top_p)
        theirs = TopPLogitsWarper(top_p)(None, logits.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), top_p
