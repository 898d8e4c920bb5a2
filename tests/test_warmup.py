import pytest
import torch

from grpo.tasks.arithmetic import arithmetic_task
from grpo.tiny.build import build_tiny_phi
from grpo.tiny.warmup import (
    PROBE_EVERY,
    PROBE_SIZE,
    RAMP_STEPS,
    accuracy_target,
    sft_batch,
    supervised_warmup,
    tokenize_records,
    warmup_lr_factor,
)

pytestmark = pytest.mark.slow  # trains, spawns processes, builds the kernel or drives a browser


def test_sft_batch_masks_prompt_and_padding():
    _, tok = build_tiny_phi()
    pairs = tokenize_records(
        tok, [{"prompt": "7+5=", "answer": "12"}, {"prompt": "47+35=", "answer": "82"}]
    )
    batch = sft_batch(pairs, tok.pad_token_id)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert batch["input_ids"].shape == (2, 9)  # "47+35=" + "82" + EOS
    assert tok.decode(batch["input_ids"][0, :7]) == "7+5=12" + tok.eos_token
    assert batch["input_ids"][0, 7:].tolist() == [pad, pad]
    assert batch["labels"][0].tolist()[:4] == [-100] * 4  # prompt: no loss
    assert batch["labels"][0].tolist()[4:] == tok("12", add_special_tokens=False)["input_ids"] + [
        eos,
        -100,
        -100,
    ]
    assert batch["attention_mask"].sum(1).tolist() == [7, 9]


def test_warmup_lowers_the_answer_loss():
    model, tok = build_tiny_phi(seed=0)
    records = arithmetic_task(seed=0, n_eval=100).train[:512]
    batch = sft_batch(tokenize_records(tok, records[:256]), tok.pad_token_id)
    with torch.no_grad():
        before = model(**batch).loss.item()
    info = supervised_warmup(
        model, tok, records, steps=60, batch_size=32, learning_rate=5e-3, log=lambda m: None
    )
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert info["warmup_steps"] == 60
    assert after < 0.6 * before  # random init: ~4.5 nats per answer token; a real drop


def test_warmup_schedule_is_a_ramp_then_constant():
    assert RAMP_STEPS == 100
    factors = [warmup_lr_factor(s) for s in range(300)]
    assert factors[0] == 0.01 and factors[49] == 0.5 and factors[98] == 0.99
    assert factors[99:] == [1.0] * 201  # no decay, and nothing depends on the total step count


def test_k_steps_of_a_longer_warmup_are_a_k_step_warmup():
    """What makes `grpo.tiny.warmup_curve` honest: its snapshot at step k is the k-step base."""
    records = arithmetic_task(seed=0, n_eval=100).train[:256]
    kw = dict(batch_size=8, learning_rate=1e-3, seed=3, log=lambda m: None)
    snapshots = {}

    def keep(step, model):
        if step == 7:
            snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}

    long_model, tok = build_tiny_phi(seed=1)
    supervised_warmup(long_model, tok, records, steps=12, callback=keep, **kw)
    short_model, _ = build_tiny_phi(seed=1)
    supervised_warmup(short_model, tok, records, steps=7, **kw)
    short = short_model.state_dict()
    assert set(snapshots) == {7}
    assert all(torch.equal(snapshots[7][k], short[k]) for k in short)
    assert not torch.equal(long_model.state_dict()["lm_head.weight"], short["lm_head.weight"])


def test_accuracy_target_stops_the_warmup_at_a_probe_check():
    task = arithmetic_task(seed=0, n_eval=100)
    records = task.train[:300]  # the probe is task.train[:PROBE_SIZE], within these
    model, tok = build_tiny_phi(seed=0)
    kw = dict(batch_size=4, learning_rate=1e-3, log=lambda m: None)
    never = accuracy_target(tok, task, 0.999, max_new_tokens=5, log=lambda m: None)
    info = supervised_warmup(model, tok, records, steps=2 * PROBE_EVERY, callback=never, **kw)
    assert info["warmup_steps"] == 2 * PROBE_EVERY  # 50 tiny steps: far from 99.9% right
    assert [s for s, _ in never.history] == [PROBE_EVERY, 2 * PROBE_EVERY]
    assert all(0.0 <= acc < 0.5 for _, acc in never.history)
    logs = []
    first = accuracy_target(tok, task, 0.0, max_new_tokens=5, log=logs.append)
    info = supervised_warmup(model, tok, records, steps=4 * PROBE_EVERY, callback=first, **kw)
    assert info["warmup_steps"] == PROBE_EVERY and len(first.history) == 1
    acc = first.history[0][1]
    assert logs == [f"warm-up: {acc:.1%} of {PROBE_SIZE} train problems right at step 25: stop"]
