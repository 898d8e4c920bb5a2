"""Greedy held-out accuracy: the figure a run is judged by ("before" and "after" GRPO).

Greedy decoding (no sampling), so the same model always gets the same score; a completion is right
as its task scores it (`Task.accuracy`: for both tasks, the final answer equals the gold answer
numerically).
"""

from __future__ import annotations

import torch

from grpo import distributed as dist
from grpo.rollout import generate_rollouts


@torch.no_grad()
def evaluate(
    model, tokenizer, task, records: list[dict], max_new_tokens: int, batch_size: int = 256
):
    """Greedy accuracy on `records` (scored by `task`) and the completions:
    (accuracy, [completion, ...])."""
    completions: list[str] = []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        ro = generate_rollouts(
            model,
            tokenizer,
            [r["prompt"] for r in chunk],
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        completions.extend(ro.completions)
    return task.accuracy(completions, records), completions


def evaluate_distributed(model, tokenizer, task, records: list[dict], max_new_tokens: int):
    """`evaluate` with each process taking an interleaved share (records[rank::world_size]);
    every rank gets the accuracy and every completion, in the order of `records`."""
    W, r = dist.world_size(), dist.rank()
    _, mine = evaluate(model, tokenizer, task, records[r::W], max_new_tokens)
    shares = dist.gather_lists(mine)
    ordered = [shares[i % W][i // W] for i in range(len(records))]
    return task.accuracy(ordered, records), ordered
