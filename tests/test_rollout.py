import torch

from grpo.loss import selective_log_softmax
from grpo.model import load_model
from grpo.rollout import completion_logps, completion_mask_from_ids, generate_rollouts


def test_completion_mask_up_to_and_including_first_eos():
    ids = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 9, 2, 9]])
    mask, truncated = completion_mask_from_ids(ids, eos_token_id=2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_rollout_logps_match_a_plain_unpadded_forward(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    torch.manual_seed(0)
    prompts = ["7+5=", "47+35=", "7+5=", "47+35="]  # unequal lengths -> left padding
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


def test_greedy_rollout_equals_generate(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    ro = generate_rollouts(model, tok, ["12+34="], max_new_tokens=6, do_sample=False)
    ids = tok("12+34=", return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(
        ids,
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    assert ro.completions[0] == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
