"""Supervised warm-up of the embedded tiny Phi, so GRPO starts from a partly-right policy.

GRPO only improves what the policy already samples sometimes: a random model never produces "+082"
for "47+35=", every group's rewards are equal and every advantage is 0. A short cross-entropy
warm-up on the train split (never the held-out split) gets the model to "partly right", then GRPO
takes it from there with rewards alone. How partly matters: GRPO gains little on a kind of problem
the warm-up model almost never gets right (see the README). Phi-2 needs no warm-up: it already
answers GSM8K sometimes.

`ensure_tiny_base` builds the warmed-up tiny Phi once into <output_dir>/base and reuses it while
the settings it depends on (`warmup_settings`) are unchanged.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from grpo.evaluate import evaluate
from grpo.policy import save_model_dir
from grpo.tiny.build import build_tiny_phi
from qlora.atomic import atomic_write_text

if TYPE_CHECKING:
    from grpo.config import GRPOConfig
    from grpo.tasks import Task


def tokenize_records(tokenizer, records: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids + EOS) for every record, tokenized once up front."""
    prompts = tokenizer([r["prompt"] for r in records], add_special_tokens=False)["input_ids"]
    answers = tokenizer([r["answer"] for r in records], add_special_tokens=False)["input_ids"]
    return [(p, a + [tokenizer.eos_token_id]) for p, a in zip(prompts, answers, strict=True)]


def sft_batch(
    pairs: list[tuple[list[int], list[int]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """prompt + answer + EOS, right-padded; labels are -100 on the prompt and the padding."""
    seqs = [p + a for p, a in pairs]
    labels = [[-100] * len(p) + a for p, a in pairs]
    T = max(map(len, seqs))
    input_ids = torch.tensor([s + [pad_token_id] * (T - len(s)) for s in seqs])  # [B, T]
    labels_t = torch.tensor([lab + [-100] * (T - len(lab)) for lab in labels])  # [B, T]
    lengths = torch.tensor([len(s) for s in seqs])
    attention_mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # [B, T]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels_t}


RAMP_STEPS = 100


def warmup_lr_factor(step: int) -> float:
    """Linear ramp over the first RAMP_STEPS steps, then constant (step counts from 0):

        factor(step) = min(1, (step + 1) / RAMP_STEPS)

    No decay and no dependence on the total, on purpose: the model after k steps of a longer
    warm-up is exactly the model of a k-step warm-up, so one curve of accuracy against steps
    (`python -m grpo.tiny.warmup_curve`, in the README) shows what any warm-up length gives."""
    return min(1.0, (step + 1) / RAMP_STEPS)


def supervised_warmup(
    model,
    tokenizer,
    records: list[dict],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int = 0,
    log=print,
    callback=None,
) -> dict:
    """`steps` AdamW steps of answer-only cross-entropy on random batches of `records`;
    `callback(step, model)`, if given, runs after every step (step counts from 1); the warm-up
    stops early when it returns True."""
    rng = random.Random(seed)
    pairs = tokenize_records(tokenizer, records)
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lr_factor)
    model.train()
    t0, loss = time.time(), torch.tensor(float("nan"))
    done = 0
    for step in range(steps):
        batch = sft_batch(rng.sample(pairs, batch_size), tokenizer.pad_token_id)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if (step + 1) % max(1, steps // 5) == 0:
            log(
                f"warm-up step {step + 1}/{steps}: loss {loss.item():.3f} ({time.time() - t0:.0f}s)"
            )
        if callback is not None and callback(step + 1, model):
            break
    model.eval()
    return {
        "warmup_steps": done,
        "warmup_final_loss": float(loss.item()),
        "warmup_seconds": time.time() - t0,
    }


PROBE_SIZE, PROBE_EVERY = 256, 25


def accuracy_target(tokenizer, task, target: float, max_new_tokens: int, log=print):
    """A `supervised_warmup` callback: every PROBE_EVERY steps, greedy accuracy on the first
    PROBE_SIZE of `task.train` (train-split problems: the held-out split stays unseen); True, i.e.
    stop, once it is >= `target`. Its `.history` keeps [(step, accuracy), ...]."""
    probe = task.train[:PROBE_SIZE]

    def check(step: int, model) -> bool:
        if step % PROBE_EVERY:
            return False
        model.eval()
        acc, _ = evaluate(model, tokenizer, task, probe, max_new_tokens)
        model.train()
        check.history.append((step, acc))
        if acc >= target:
            log(f"warm-up: {acc:.1%} of {len(probe)} train problems right at step {step}: stop")
            return True
        return False

    check.history = []
    return check


# --------------------------------------------------------------------------------------------
# The cached warm-up base of the tiny default
# --------------------------------------------------------------------------------------------


def warmup_settings(cfg: GRPOConfig) -> dict:
    """Everything the cached warm-up model depends on; a base built with other values is rebuilt."""
    keys = (
        "seed",
        "task",
        "arithmetic_format",
        "n_eval",
        "warmup_sft_steps",
        "warmup_target_accuracy",
        "warmup_sft_batch_size",
        "warmup_sft_learning_rate",
    )
    return {k: getattr(cfg, k) for k in keys}


def read_warmup_settings(base_dir: Path) -> dict:
    try:
        return json.loads((base_dir / "warmup.json").read_text()).get("settings", {})
    except (OSError, ValueError, AttributeError):
        return {}


def ensure_tiny_base(cfg: GRPOConfig, task: Task, log=print) -> Path:
    """<output_dir>/base: the tiny Phi after the supervised warm-up (built once, then reused)."""
    base_dir = Path(cfg.output_dir) / "base"
    wanted = warmup_settings(cfg)
    if (base_dir / "config.json").is_file():
        built = read_warmup_settings(base_dir)
        if built == wanted:
            log(f"warm-up: reusing {base_dir} (delete it to rebuild)")
            return base_dir
        changed = sorted(k for k in wanted if built.get(k) != wanted[k])
        log(
            f"warm-up: {base_dir} was built with other settings ("
            + ", ".join(f"{k}: {built.get(k)!r} -> {wanted[k]!r}" for k in changed)
            + "); rebuilding it"
        )
    torch.manual_seed(cfg.seed)
    model, tokenizer = build_tiny_phi(seed=cfg.seed)
    log(
        f"warm-up: tiny Phi, {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"up to {cfg.warmup_sft_steps} supervised steps on the train split"
        + (
            f", until {cfg.warmup_target_accuracy:.0%} of a train probe is right"
            if cfg.warmup_target_accuracy > 0
            else ""
        )
    )
    stop = None
    if cfg.warmup_target_accuracy > 0:
        stop = accuracy_target(
            tokenizer, task, cfg.warmup_target_accuracy, cfg.max_new_tokens, log=log
        )
    info = supervised_warmup(
        model,
        tokenizer,
        task.train,
        steps=cfg.warmup_sft_steps,
        batch_size=cfg.warmup_sft_batch_size,
        learning_rate=cfg.warmup_sft_learning_rate,
        seed=cfg.seed,
        log=log,
        callback=stop,
    )
    if stop is not None:
        info["probe_accuracy"] = stop.history
    # For reference only: the unquantized warm-up model's held-out accuracy. GRPO's "before"
    # is measured later on the NF4 base it actually starts from.
    info["accuracy_dense"], _ = evaluate(model, tokenizer, task, task.eval, cfg.max_new_tokens)
    log(f"warm-up: held-out greedy accuracy of the unquantized model {info['accuracy_dense']:.1%}")
    info["settings"] = wanted
    save_model_dir(model, tokenizer, base_dir)
    atomic_write_text(base_dir / "warmup.json", json.dumps(info, indent=2))
    return base_dir
