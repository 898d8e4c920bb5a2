"""A few real GRPO steps of the whole loop on the tiny model (seconds), checkpoints and resume."""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo.checkpoint import latest_checkpoint
from grpo.config import GRPOConfig
from grpo.schedule import learning_rate
from grpo.train import build_trainer, run

pytestmark = pytest.mark.slow  # trains, spawns processes, builds the kernel or drives a browser

FAST = dict(
    model="tiny",
    warmup_sft_steps=150,
    warmup_sft_batch_size=64,
    n_eval=16,
    prompts_per_step=4,
    num_generations=4,
    micro_batch_size=8,
    max_new_tokens=5,
    log_every=1,
    sample_every=1,
    lora_r=4,
    lora_alpha=8.0,
    reward_funcs=["correctness", "digits"],  # partial credit: signal even from a weak base
    reward_weights=[1.0, 1.0],
)


def fast_cfg(out, **kw) -> GRPOConfig:
    return GRPOConfig(**{**FAST, "output_dir": str(out), **kw}).validate()


@pytest.fixture(scope="module")
def shared_base(tmp_path_factory):
    """Build the warmed-up tiny base once; runs copy it into their own output_dir."""
    out = tmp_path_factory.mktemp("base-run")
    build_trainer(fast_cfg(out))
    return out / "base"


def with_base(out: Path, base: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(base, out / "base")
    return out


def test_run_writes_every_artifact_with_finite_metrics(tmp_path, shared_base):
    out = with_base(tmp_path / "run", shared_base)
    summary = run(fast_cfg(out, max_steps=3, save_every=2, beta=0.04, num_iterations=2))
    for name in [
        "config.yaml",
        "metrics.jsonl",
        "samples.jsonl",
        "plots.png",
        "summary.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ]:
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in [
            "reward",
            "accuracy",
            "kl",
            "clip_region",
            "grad_norm",
            "loss",
            "frac_reward_zero_std",
            "completion_length",
            "generated_tokens_per_second",
        ]:
            assert math.isfinite(r[key]), (key, r)
        assert 0 <= r["frac_reward_zero_std"] <= 1 and r["completion_length_max"] <= 5
    # Step 1's second pass comes after one update: the policy has left the reference.
    assert rows[0]["kl"] > 0
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    for key in [
        "accuracy_before",
        "accuracy_after",
        "n_eval",
        "grpo_steps",
        "grpo_seconds",
        "total_seconds",
    ]:
        assert key in saved
    assert saved["grpo_steps"] == 3 and saved["n_eval"] == 16
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert len(sample["completions"]) == 4 and len(sample["advantages"]) == 4


def test_reference_is_the_policy_until_the_first_update(tmp_path, shared_base):
    out = with_base(tmp_path / "run", shared_base)
    trainer = build_trainer(fast_cfg(out, beta=0.04))
    ro = trainer.make_batch().rollout
    ref = trainer.reference_logps(ro)  # adapters disabled
    policy = trainer.policy_logps_nograd(ro)  # adapters on, B = 0
    assert torch.equal(ref, policy)  # so k3 is exactly 0 at the first step
    trainer.train_step()
    assert not torch.equal(trainer.reference_logps(ro), trainer.policy_logps_nograd(ro))


def test_only_lora_moves_and_nf4_bytes_stay(tmp_path, shared_base):
    out = with_base(tmp_path / "run", shared_base)
    trainer = build_trainer(fast_cfg(out, max_steps=2, learning_rate=0.05))
    before = {n: t.clone() for n, t in trainer.model.state_dict().items()}
    qbytes = [m.qweight.packed.clone() for m in trainer.model.modules() if hasattr(m, "qweight")]
    for _ in range(2):
        trainer.train_step()
    after = trainer.model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)
    now = [m.qweight.packed for m in trainer.model.modules() if hasattr(m, "qweight")]
    assert all(torch.equal(a, b) for a, b in zip(qbytes, now, strict=True))


RESUME = dict(max_steps=6, save_every=2, lr_schedule="cosine", warmup_ratio=0.2, learning_rate=0.02)


def lora_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def logged(run_dir: Path, key: str) -> list:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows]


def assert_same_run(a: Path, b: Path) -> None:
    """Bit for bit: every LoRA tensor, and the learning rate and reward logged at every step."""
    ta, tb = lora_tensors(a), lora_tensors(b)
    assert ta.keys() == tb.keys()
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    assert logged(a, "lr") == logged(b, "lr")
    assert logged(a, "reward") == logged(b, "reward")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, shared_base):
    """The uninterrupted run the resumed ones must reproduce exactly."""
    out = with_base(tmp_path_factory.mktemp("straight") / "run", shared_base)
    run(fast_cfg(out, **RESUME))
    return out


def test_the_learning_rate_follows_the_schedule_step_by_step(straight_run):
    cfg = fast_cfg(straight_run, **RESUME)  # W = int(0.2 * 6) = 1 warm-up step, then cosine
    want = [0.02 * 0.5] + [0.02 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 5)) for s in range(1, 6)]
    assert [lr for _, lr in logged(straight_run, "lr")] == pytest.approx(want, rel=1e-12)
    assert [learning_rate(cfg, s) for s in range(6)] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("from_step", [2, 4])
def test_resume_from_any_checkpoint_is_bit_identical(
    tmp_path, shared_base, straight_run, from_step
):
    out = with_base(tmp_path / "resumed", shared_base)
    ckpt = f"checkpoints/step-{from_step:06d}"
    shutil.copytree(straight_run / ckpt, out / ckpt)
    shutil.copy(straight_run / "eval_before.json", out)
    rows = (straight_run / "metrics.jsonl").read_text().splitlines(keepends=True)
    # As if killed after logging one step past the checkpoint, mid-way through the next line.
    (out / "metrics.jsonl").write_text("".join(rows[: from_step + 1]) + '{"step": 9')
    summary = run(fast_cfg(out, **RESUME, resume=True))
    assert summary["grpo_steps"] == 6 and summary["resumed_from"].endswith(ckpt)
    assert_same_run(straight_run, out)


def test_killed_twice_at_random_moments_then_resumed_is_bit_identical(
    tmp_path, shared_base, straight_run
):
    out = with_base(tmp_path / "run", shared_base)
    every_step = {**RESUME, "save_every": 1}
    fast_cfg(out, **every_step).save_yaml(tmp_path / "c.yaml")
    rng = random.Random(0)
    for kill in range(2):
        resume = ["--resume"] if kill else []
        proc = subprocess.Popen(
            [sys.executable, "-m", "grpo.train", "--config", str(tmp_path / "c.yaml"), *resume],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline, wanted = time.time() + 120, 2 + 2 * kill
            while time.time() < deadline and len(list(out.glob("checkpoints/step-*"))) < wanted:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))  # inside a step or a checkpoint write
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        ckpt = latest_checkpoint(out)  # never a half-written one
        assert ckpt is not None and int(ckpt.name.split("-")[1]) >= wanted
        assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    summary = run(fast_cfg(out, **every_step, resume=True))
    assert summary["grpo_steps"] == 6
    assert_same_run(straight_run, out)


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_hooks_see_every_phase_in_order_and_the_metrics(tmp_path, shared_base, num_iterations):
    out = with_base(tmp_path / "run", shared_base)
    trainer = build_trainer(fast_cfg(out, num_iterations=num_iterations))
    seen, ends = [], []
    trainer.add_callback("step_start", lambda t, info: seen.append(("step_start", info["step"])))
    trainer.add_callback("phase_end", lambda t, info: seen.append((info["phase"], info["seconds"])))
    trainer.add_callback("step_end", lambda t, info: ends.append(info))
    metrics, batch = trainer.train_step()
    passes = ["forward_backward", "optimizer"] * num_iterations
    assert [name for name, _ in seen] == ["step_start", "generation", "reference", *passes]
    assert seen[0] == ("step_start", 1) and metrics["step"] == 1 and ends == [metrics]
    total = {name: 0.0 for name, _ in seen[1:]}
    for name, seconds in seen[1:]:
        total[name] += seconds
    for name, seconds in total.items():
        assert metrics[f"{name}_seconds"] == seconds > 0
    assert metrics["update_seconds"] == total["forward_backward"] + total["optimizer"]
    assert metrics["step_seconds"] > sum(total.values())
    assert metrics["generated_tokens"] == int(batch.rollout.completion_mask.sum()) > 0
    assert len(batch.rollout) == len(batch.answers) == 16 and batch.advantages.shape == (16,)
    with pytest.raises(ValueError, match="event='step_begin' is not one of step_start"):
        trainer.add_callback("step_begin", print)


def test_min_new_tokens_forces_every_completion_to_full_length(tmp_path, shared_base):
    """The warmed-up tiny model ends its answers with EOS after ~5 tokens; with min_new_tokens =
    max_new_tokens = 9 every completion of the step has all 9 tokens."""
    out = with_base(tmp_path / "run", shared_base)
    trainer = build_trainer(fast_cfg(out, max_new_tokens=9, min_new_tokens=9))
    metrics, batch = trainer.train_step()
    assert batch.rollout.completion_mask.sum(dim=1).tolist() == [9] * 16
    assert metrics["generated_tokens"] == 16 * 9


def constant_reward(value: float):
    def constant(prompts, completions, **columns):
        return [value] * len(completions)

    return constant


@pytest.mark.parametrize("value", [0.2, 2 / 3])
def test_constant_rewards_warn_and_give_zero_advantages(tmp_path, shared_base, capsys, value):
    out = with_base(tmp_path / "run", shared_base)
    # One group per step: torch's std of eight equal floats is then 1.6e-8 (0.2) or 6.4e-8 (2/3),
    # not 0 (with several groups per reduction it happens to be 0): rounding, not signal.
    cfg = fast_cfg(out, no_signal_patience=2, prompts_per_step=1, num_generations=8)
    trainer = build_trainer(cfg)
    trainer.reward_fns, trainer.reward_weights = {"constant": constant_reward(value)}, [1.0]
    for _ in range(2):
        metrics, batch = trainer.train_step()
        assert batch.rewards.std().item() > 1e-8
        assert metrics["frac_reward_zero_std"] == 1.0
        assert batch.advantages.tolist() == [0.0] * 8
    assert (
        "no learning signal: every group had zero reward variance for 2" in capsys.readouterr().err
    )


def test_no_signal_warning_is_loud(tmp_path, shared_base, capsys):
    out = with_base(tmp_path / "run", shared_base)
    trainer = build_trainer(fast_cfg(out, no_signal_patience=2))
    out.mkdir(exist_ok=True)
    for _ in range(2):
        trainer.check_signal(1.0)
    err = capsys.readouterr().err
    assert "no learning signal" in err and "2 consecutive steps" in err
    trainer.check_signal(0.5)
    assert trainer.no_signal_streak == 0


def test_full_fine_tuning_option_saves_a_loadable_model(tmp_path, shared_base):
    from grpo.policy import load_model

    out = with_base(tmp_path / "run", shared_base)
    summary = run(
        fast_cfg(out, max_steps=1, use_lora=False, quantize=False, beta=0.04, learning_rate=1e-4)
    )
    assert summary["trainable_parameters"] == summary["total_parameters"]  # every weight trains
    assert (out / "checkpoints" / "step-000001" / "model.safetensors").is_file()
    model, _ = load_model(out / "model")
    base, _ = load_model(out / "base")
    moved = [
        n
        for (n, p), q in zip(model.named_parameters(), base.parameters(), strict=True)
        if not torch.equal(p, q)
    ]
    assert moved and any("fc1" in n for n in moved)


def test_cached_base_is_reused_only_with_the_same_warmup_settings(tmp_path):
    from grpo.tasks import load_task
    from grpo.tiny.warmup import ensure_tiny_base

    task = load_task(GRPOConfig(n_eval=16))
    logs: list[str] = []
    cfg = fast_cfg(tmp_path, warmup_sft_steps=2, warmup_sft_batch_size=4)
    base = ensure_tiny_base(cfg, task, log=logs.append)
    assert json.loads((base / "warmup.json").read_text())["settings"]["warmup_sft_steps"] == 2
    ensure_tiny_base(cfg, task, log=logs.append)
    assert logs[-1] == f"warm-up: reusing {base} (delete it to rebuild)"
    plain = load_task(GRPOConfig(n_eval=16, arithmetic_format="plain"))
    cfg.arithmetic_format = "plain"  # a base taught "+042" must not serve a "42" run
    ensure_tiny_base(cfg, plain, log=logs.append)
    assert any("arithmetic_format: 'fixed' -> 'plain'" in m and "rebuilding" in m for m in logs)
    settings = json.loads((base / "warmup.json").read_text())["settings"]
    assert settings["arithmetic_format"] == "plain"
