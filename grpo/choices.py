"""Every closed set of names a run can choose from, defined once.

The config validates against these tuples, and the modules that act on a name (the loss, the
loader) import them from here, so a new choice is added in one place. Plain tuples: this module
imports nothing. Tasks and rewards are registered where they live (`grpo.tasks.TASK_MODULES`,
each task's `REWARDS`, `grpo.reward_funcs.GENERIC_REWARDS`).
"""

# The per-token objective and how its terms are averaged (grpo.loss; the first four clip like PPO).
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# How several reward functions become one advantage (grpo.loss.reward_advantages).
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
SCALE_REWARDS = ("group", "batch", "none")  # the advantage divisor: group std, batch std, 1
IS_LEVELS = ("token", "sequence")  # importance ratio per token (PPO/GRPO) or per sequence (GSPO)
SCHEDULES = ("constant", "linear", "cosine")  # learning rate after the linear warm-up
DTYPES = ("float32", "bfloat16", "float16")  # weights and LoRA compute
DEVICES = ("auto", "cpu", "cuda")

__all__ = [
    "AGGREGATIONS",
    "DEVICES",
    "DTYPES",
    "IS_LEVELS",
    "LOSS_TYPES",
    "SCALE_REWARDS",
    "SCHEDULES",
]
