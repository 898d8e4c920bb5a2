"""The learning-rate schedule, step by step against its formula."""

import math

import pytest

from grpo.config import GRPOConfig
from grpo.schedule import learning_rate


def lrs(steps, **kw):
    cfg = GRPOConfig(learning_rate=1e-3, max_steps=10, **kw)
    return [learning_rate(cfg, s) for s in range(steps)]


def test_warm_up_rises_linearly_to_the_peak_then_each_schedule_decays_from_it():
    # W = int(0.3 * 10) = 3 warm-up steps: 1/4, 2/4, 3/4 of the peak, then the peak at step 3
    for schedule in ("constant", "linear", "cosine"):
        got = lrs(4, warmup_ratio=0.3, lr_schedule=schedule)
        assert got == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3], rel=1e-12)


def test_linear_and_cosine_reach_zero_at_max_steps_and_constant_stays():
    p = [s / 10 for s in range(11)]  # no warm-up: progress = s / max_steps
    assert lrs(11, warmup_ratio=0.0, lr_schedule="linear") == pytest.approx(
        [1e-3 * (1 - x) for x in p], abs=1e-15
    )
    assert lrs(11, warmup_ratio=0.0, lr_schedule="cosine") == pytest.approx(
        [1e-3 * 0.5 * (1 + math.cos(math.pi * x)) for x in p], abs=1e-15
    )
    assert lrs(11, warmup_ratio=0.0, lr_schedule="constant") == [1e-3] * 11


def test_steps_past_the_end_stay_at_the_floor():
    cfg = GRPOConfig(learning_rate=1e-3, max_steps=10, warmup_ratio=0.0, lr_schedule="cosine")
    assert learning_rate(cfg, 12) == 0.0
    cfg.lr_schedule = "linear"
    assert learning_rate(cfg, 12) == 0.0
