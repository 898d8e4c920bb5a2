"""Supervised warm-up of the embedded tiny Phi, so GRPO starts from a partly-right policy.

GRPO only improves what the policy already samples sometimes: a random model never produces "82"
for "47+35=", every group's rewards are equal and every advantage is 0. A short cross-entropy
warm-up on the train split (never the held-out split) gets the model to "often right", then GRPO
takes it from there with rewards alone. Phi-2 needs no warm-up: it already answers GSM8K sometimes.
"""

from __future__ import annotations

import random
import time

import torch


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
) -> dict:
    """`steps` AdamW steps of answer-only cross-entropy on random batches of `records`."""
    rng = random.Random(seed)
    pairs = tokenize_records(tokenizer, records)
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    # Linear warm-up over 5% then cosine decay to 10%: a stable, reproducible endpoint.
    warm = max(1, steps // 20)

    def lr_at(step):
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    t0, loss = time.time(), torch.tensor(float("nan"))
    for step in range(steps):
        batch = sft_batch(rng.sample(pairs, batch_size), tokenizer.pad_token_id)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % max(1, steps // 5) == 0:
            log(
                f"warm-up step {step + 1}/{steps}: loss {loss.item():.3f} ({time.time() - t0:.0f}s)"
            )
    model.eval()
    return {
        "warmup_steps": steps,
        "warmup_final_loss": float(loss.item()),
        "warmup_seconds": time.time() - t0,
    }
