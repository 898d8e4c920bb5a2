"""Every closed set of names a run can choose from, defined once.

The config validates against these tuples, and the modules that act on a name (the loss, the
loader) import them from here, so a new choice is added in one place. Plain tuples: this module
imports nothing. Tasks and rewards are registered where they live (`grpo.tasks.TASK_MODULES`,
each task's `REWARDS`, `grpo.rewards.GENERIC_REWARDS`).
"""

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # how per-token terms are averaged (grpo.loss)
SCALE_REWARDS = ("group", "batch", "none")  # the advantage divisor: group std, batch std, 1
IS_LEVELS = ("token", "sequence")  # importance ratio per token (PPO/GRPO) or per sequence (GSPO)
SCHEDULES = ("constant", "linear", "cosine")  # learning rate after the linear warm-up
DTYPES = ("float32", "bfloat16", "float16")  # weights and LoRA compute
DEVICES = ("auto", "cpu", "cuda")

__all__ = ["DEVICES", "DTYPES", "IS_LEVELS", "LOSS_TYPES", "SCALE_REWARDS", "SCHEDULES"]
