"""What one GRPO step logs to metrics.jsonl: rewards, accuracy, lengths, learning rate, timings.

Means are over the whole step's batch (every process's rows); `generated_tokens` and the
generation throughput are this process's.
"""

from __future__ import annotations

from grpo import distributed as dist


def step_metrics(
    step: int, batch, task, lr: float, grad_norm: float, seconds: dict, stats: dict, device
) -> dict:
    """The metrics of step `step` (counted from 1) that learned from `batch` (a trainer.Batch),
    accuracy as `task` scores it; `seconds` maps each phase after generation to its time, `stats`
    holds the loss's averages."""
    ro, N, W = batch.rollout, len(batch.rollout), dist.world_size()
    lengths = ro.completion_mask.sum(dim=1)  # [N]
    correct = [task.is_correct(c, a) for c, a in zip(ro.completions, batch.answers, strict=True)]

    def mean_over_ranks(total: float) -> float:
        return dist.all_reduce_sum(total, device) / (N * W)

    gen = batch.generation_seconds
    metrics = {
        "step": step,
        "reward": batch.step_rewards.mean().item(),
        "reward_std": batch.step_rewards.std().item(),
        "accuracy": mean_over_ranks(sum(correct)),
        "frac_reward_zero_std": batch.no_signal.float().mean().item(),
        "completion_length": mean_over_ranks(lengths.sum().item()),
        "completion_length_max": int(lengths.max()),
        "truncated_frac": mean_over_ranks(ro.truncated.sum().item()),
        "lr": lr,
        "grad_norm": grad_norm,
        "step_seconds": gen + sum(seconds.values()),  # train_step: the whole call's wall time
        "generation_seconds": gen,
        **{f"{phase}_seconds": s for phase, s in seconds.items()},
        "update_seconds": seconds["forward_backward"] + seconds["optimizer"],
        "generated_tokens": int(lengths.sum()),  # this process's completion tokens
        "generated_tokens_per_second": lengths.sum().item() / max(1e-9, gen),
        **stats,
    }
    for name, values in batch.reward_parts.items():
        metrics[f"reward/{name}"] = values.mean().item()
        metrics[f"reward/{name}_std"] = values.std().item()
    return metrics


def no_signal_warning(streak: int, patience: int, step: int) -> str | None:
    """The warning after `streak` steps in a row in which every group was constant (no
    advantage anywhere): at `patience` steps, then every 5 * patience; None otherwise."""
    if streak != patience and not (streak > 0 and streak % (5 * patience) == 0):
        return None
    return (
        f"WARNING: no learning signal: every group had zero reward variance for {streak} "
        f"consecutive steps (step {step}); all advantages are 0 and nothing is learned. Check "
        "the reward functions and the columns they get, raise temperature or num_generations, "
        "or pick easier prompts."
    )
