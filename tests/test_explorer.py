"""The "Inside one GRPO step" explorer (app/explorer.py, app/explorer_ui.py) on the tiny model:
its numbers are the trainer's, its scratch step leaves the served weights alone, and bad input
gets a notice. The browser drives the tab in tests/test_app.py."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from app.explorer import (
    NO_SIGNAL,
    TOKEN_COLUMNS,
    ExplorerInputError,
    StepRequest,
    check_request,
    explore,
    write_downloads,
)
from app.explorer_ui import run_explorer, summary_markdown
from app.serving import load_demo
from app.spec import resolve_spec
from grpo.choices import LOSS_TYPES
from grpo.cli import check_run
from grpo.config import GRPOConfig
from grpo.logprobs import completion_logps
from grpo.loss import kl_k3
from grpo.train import build_trainer

sys.path.insert(0, str(Path(__file__).parent))
from test_app import make_run  # noqa: E402  (the faked run directory of the demo's tests)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo as `python -m app --run-dir` loads it (NF4 base, an adapter with non-zero B)."""
    run = make_run(tmp_path_factory.mktemp("explorer") / "run")
    return load_demo(resolve_spec(str(run)))


def run_step(demo, **kw) -> object:
    prompt = kw.pop("prompt", demo.examples[0])
    request = StepRequest(prompt, kw.pop("answer", demo.answers[prompt]), **kw)
    return explore(
        demo.generator.base_model,
        demo.generator.tokenizer,
        request,
        demo.spec.config,
        demo.reward_fns,
        demo.reward_weights,
    )


# --- the numbers are the trainer's -----------------------------------------------------------


def test_rewards_advantages_loss_and_update_equal_the_trainers(tmp_path):
    """A trainer's Batch for the explorer's completions has the same rewards and advantages, its
    update reports the same loss, and after its real optimizer step the completions' log-probs
    are the ones the explorer predicted from its scratch step."""
    cfg = GRPOConfig(
        model="tiny",
        output_dir=str(tmp_path),
        warmup_sft_steps=0,  # the untrained tiny base: seconds
        n_eval=16,
        prompts_per_step=1,
        num_generations=4,
        micro_batch_size=4,
        max_new_tokens=6,
        beta=0.04,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        lr_schedule="constant",  # the trainer's first step uses learning_rate itself
        lora_r=4,
        lora_alpha=8.0,
        reward_funcs=["correctness", "digits"],
        reward_weights=[1.0, 0.5],
    )
    trainer = build_trainer(check_run(cfg), log=lambda msg: None)
    with torch.no_grad():  # a non-zero B: the adapter changes the policy, and A gets gradients
        g = torch.Generator().manual_seed(3)
        for p in trainer.params:
            p.copy_(p + 0.05 * torch.randn(p.shape, generator=g))
    record = trainer.task.eval[0]
    request = StepRequest(record["prompt"], record["answer"], group_size=4, beta=0.04, seed=1)
    step = explore(
        trainer.model, trainer.tokenizer, request, cfg, trainer.reward_fns, trainer.reward_weights
    )
    assert not step.no_signal, "pick another seed: this group carries no signal"

    batch = trainer.score([record], step.rollout)
    assert batch.rewards.tolist() == step.rewards
    assert batch.advantages.tolist() == step.advantages
    for name, values in batch.reward_parts.items():
        assert values.tolist() == step.reward_parts[name]
    metrics = trainer.update(batch)
    assert metrics["loss"] == pytest.approx(step.loss, rel=1e-5, abs=1e-7)
    assert metrics["kl"] == pytest.approx(step.stats["kl"], rel=1e-4)
    assert metrics["grad_norm"] == pytest.approx(step.grad_norm, rel=1e-4)
    trainer.model.eval()
    with torch.no_grad():
        after = completion_logps(trainer.model, step.rollout, request.temperature)  # [G, C]
    mask = step.rollout.completion_mask.bool()
    predicted = [t for row in step.logps_after for t in row]
    assert after[mask].tolist() == pytest.approx(predicted, abs=1e-5)
    # and the step did move them: the comparison is not of two unchanged copies
    assert max(abs(c) for c in step.logp_change) > 1e-3


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_token_shares_add_up_to_the_loss_and_kl_is_k3(demo, loss_type):
    step = run_step(demo, group_size=6, beta=0.1, loss_type=loss_type)
    total = sum(sum(row) for row in step.share)
    assert total == pytest.approx(step.loss, rel=1e-4, abs=1e-7)
    logps = torch.tensor([t for row in step.logps for t in row])
    ref = torch.tensor([t for row in step.ref_logps for t in row])
    assert [t for row in step.kl for t in row] == pytest.approx(kl_k3(logps, ref).tolist())
    # on-policy: every token of completion i has the same surrogate term, -A_i, so a token's
    # share is w_i (-A_i + beta k3_it) with the loss type's weight w_i (grpo: 1 / (G n_i))
    for i, row in enumerate(step.share):
        n = len(row)
        if loss_type == "grpo":
            expected = [(-step.advantages[i] + 0.1 * k) / (6 * n) for k in step.kl[i]]
            assert row == pytest.approx(expected, rel=1e-4, abs=1e-8)


def test_the_scratch_step_leaves_the_served_weights_bit_for_bit(demo):
    model = demo.generator.base_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    rng = torch.get_rng_state()
    step = run_step(demo, group_size=8, beta=0.04)
    assert max(abs(c) for c in step.logp_change) > 1e-3  # the scratch copy did move
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng)  # the seed did not leak into the server's RNG
    again = run_step(demo, group_size=8, beta=0.04)  # same seed, same served weights
    assert again.completions == step.completions and again.logps == step.logps


def test_positive_advantage_rises_negative_falls(demo):
    """The whole point of GRPO on one screen, on groups of 4 (where the one step's effect on each
    completion is clear): above the group mean up, below it down."""
    groups = 0
    for prompt in demo.examples[:4]:
        step = run_step(demo, prompt=prompt, group_size=4)
        if step.no_signal:
            continue
        groups += 1
        signed = [(a, c) for a, c in zip(step.advantages, step.logp_change, strict=True) if a]
        assert all((a > 0) == (c > 0) for a, c in signed), (prompt, signed)
    assert groups >= 2, "too few groups with a learning signal: pick other prompts"


def test_a_constant_group_shows_the_no_signal_line(demo, monkeypatch):
    assert NO_SIGNAL not in summary_markdown(run_step(demo, group_size=4))
    monkeypatch.setattr(demo, "reward_fns", {"constant": lambda p, c, **kw: [0.5] * len(c)})
    monkeypatch.setattr(demo, "reward_weights", [1.0])
    step = run_step(demo, group_size=4, beta=0.0)
    assert step.no_signal and step.advantages == [0.0] * 4
    assert step.loss == 0.0 and step.logp_change == [0.0] * 4  # no gradient, no move
    assert summary_markdown(step).startswith(f"**{NO_SIGNAL}**")


def test_downloads_hold_every_token(demo, tmp_path):
    step = run_step(demo, group_size=3, beta=0.04)
    csv_path, json_path = write_downloads(step, tmp_path)
    rows = list(csv.DictReader(csv_path.open()))
    assert tuple(rows[0]) == TOKEN_COLUMNS
    assert len(rows) == sum(len(t) for t in step.tokens)
    assert float(rows[0]["share"]) == pytest.approx(step.share[0][0])
    data = json.loads(json_path.read_text())
    assert data["group"]["loss"] == step.loss and len(data["completions"]) == 3
    assert data["completions"][1]["advantage"] == step.advantages[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "explorer-step.json",
        "explorer-tokens.csv",
    ]


# --- bad input: a notice, never a traceback ----------------------------------------------------


def test_bad_input_is_one_line_before_any_model_work(demo):
    tok, cfg, ctx = demo.generator.tokenizer, demo.spec.config, demo.generator.context_length
    prompt, answer = demo.examples[0], demo.answers[demo.examples[0]]
    cases = {
        "G = 1 is not": StepRequest(prompt, answer, group_size=1),
        "G = 17 is not": StepRequest(prompt, answer, group_size=17),
        "the prompt is empty": StepRequest("  ", answer),
        "no gold answer": StepRequest(prompt, ""),
        f"{ctx}-token context": StepRequest("1+2=3\n" * 60, answer),
        "temperature = 0.0": StepRequest(prompt, answer, temperature=0.0),
        "loss type 'ppo'": StepRequest(prompt, answer, loss_type="ppo"),
    }
    for needle, request in cases.items():
        with pytest.raises(ExplorerInputError, match=needle) as err:
            check_request(request, tok, cfg, ctx, demo.reward_fns)
        assert "\n" not in str(err.value)


def test_the_tab_answers_bad_input_with_a_notice(demo):
    prompt = demo.examples[0]
    args = (1.0, 0.0, 0.2, 0.2, "grpo", 0)
    for g, text, needle in [
        (17, prompt, "G = 17"),
        (2.5, prompt, "G = 2.5"),
        (None, prompt, "G = None"),
        (4, "", "the prompt is empty"),
        (4, "1+2=3\n" * 60, "shorten the prompt"),
    ]:
        notice, summary, table, tokens, files = run_explorer(demo, text, "7", g, *args)
        assert needle in notice and (summary, table, tokens, files) == ("", "", "", None)
    notice, summary, table, tokens, files = run_explorer(demo, prompt, "", 4, *args)
    assert notice == "" and "reward mean" in summary  # the gold answer comes from the task
    assert table.count("<tr>") == 5 and 'class="xp-tok' in tokens and len(files) == 2
