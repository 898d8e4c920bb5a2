"""The learning-rate schedule: warm-up, then linear, cosine or constant, a function of the step."""

from __future__ import annotations

import math

from grpo.config import GRPOConfig


def learning_rate(cfg: GRPOConfig, step: int) -> float:
    """The learning rate of the optimizer step after `step` completed steps (step counts from 0):

        lr(s) = learning_rate * f(s),   W = int(warmup_ratio * max_steps)
        f(s)  = (s + 1) / (W + 1)                                        if s < W
        f(s)  = max(0, 1 - p) | (1 + cos(pi * min(1, p))) / 2 | 1        linear | cosine | constant
                with p = (s - W) / max(1, max_steps - W)

    A function of the step alone, so a resumed run continues on exactly the same curve.

    >>> cfg = GRPOConfig(learning_rate=1e-3, max_steps=10, warmup_ratio=0.2, lr_schedule="linear")
    >>> [round(learning_rate(cfg, s) * 1e4, 6) for s in (0, 1, 2, 6, 10)]
    [3.333333, 6.666667, 10.0, 5.0, 0.0]
    """
    warm = int(cfg.warmup_ratio * cfg.max_steps)
    progress = (step - warm) / max(1, cfg.max_steps - warm)
    if step < warm:
        factor = (step + 1) / (warm + 1)
    elif cfg.lr_schedule == "linear":
        factor = max(0.0, 1.0 - progress)
    elif cfg.lr_schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    else:
        factor = 1.0
    return cfg.learning_rate * factor
