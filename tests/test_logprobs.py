import copy

import pytest
import torch

from grpo.logprobs import completion_logps
from grpo.loss import selective_log_softmax
from grpo.policy import load_model
from grpo.rollout import generate_rollouts


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    return model.eval(), tok


def test_rollout_logps_match_a_plain_unpadded_forward(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    prompts = ["7+5=", "47+35=", "7+5=", "47+35="]
    ro = generate_rollouts(model, tok, prompts, max_new_tokens=5, temperature=1.0)
    assert ro.prompt_ids.shape[0] == 4 and ro.completion_ids.shape[1] <= 5
    assert (ro.prompt_mask[0, :2] == 0).all()  # "7+5=" is left-padded by 2
    logps = completion_logps(model, ro)  # [4, C]
    for i in range(4):  # each row alone, no padding, default positions 0..L-1
        p = ro.prompt_ids[i][ro.prompt_mask[i] == 1]
        c = ro.completion_ids[i][ro.completion_mask[i] == 1]
        ids = torch.cat([p, c])[None]
        with torch.no_grad():
            logits = model(ids).logits[0, len(p) - 1 : -1]
        ref = selective_log_softmax(logits[None], c[None])[0]
        got = logps[i][ro.completion_mask[i] == 1]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        text = tok.decode(c, skip_special_tokens=True)
        assert ro.completions[i] == text


@pytest.mark.parametrize("max_new_tokens", [1, 5])
def test_shared_prompts_give_the_full_forward_s_logps_and_gradients(tiny, max_new_tokens):
    """Each distinct prompt once, its cache copied to its rows: the same log-probs and LoRA
    gradients as running every row's prompt, up to float32 rounding (left padding included)."""
    from qlora import prepare_qlora

    model, tok = tiny
    model = copy.deepcopy(model)
    prepare_qlora(model, r=4, alpha=8.0, dropout=0.0)  # no random masks: both paths comparable
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    torch.manual_seed(1)
    prompts = ["7+5=", "47+35=", "7+5=", "47+35=", "7+5=", "9-80="]
    ro = generate_rollouts(model, tok, prompts, max_new_tokens=max_new_tokens)
    model.train()
    results = []
    for share in (False, True):
        model.zero_grad()
        logps = completion_logps(model, ro, 0.7, share_prompts=share)
        (logps * ro.completion_mask).sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((logps.detach() * ro.completion_mask, grads))
    (full, full_grads), (shared, shared_grads) = results
    torch.testing.assert_close(shared, full, atol=2e-5, rtol=1e-5)
    for a, b in zip(shared_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert any(g.abs().max() > 1e-3 for g in full_grads)  # gradients that say something
