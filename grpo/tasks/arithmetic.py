"""Two-digit addition and subtraction for the tiny Phi ("47+05=" -> "+052").

Every problem (a, op, b) with 0 <= a, b <= 99 is generated from a seed in a fixed-width format (see
`arithmetic_prompt`) and lives in exactly one split, so the held-out accuracy is measured on
problems the model never trained on, in the warm-up or in GRPO. A completion is right when its
final answer equals the gold one numerically (`grpo.tasks.answers.is_correct`); the rewards are
that exact answer (`correctness`) and partial credit per right digit (`digits`).

>>> task = arithmetic_task(seed=0, n_eval=2)
>>> gold = task.eval[0]["answer"]; task.eval[0]
{'prompt': '30+03=', 'answer': '+033'}
>>> task.is_correct("+033", gold), task.is_correct("33", gold), task.is_correct("+034", gold)
(True, True, False)
>>> task.accuracy(["+033", "?"], task.eval), task.answer_tags
(0.5, False)
"""

from __future__ import annotations

import random

from grpo.config import ConfigError, GRPOConfig
from grpo.rewards import column
from grpo.tasks import Task
from grpo.tasks.answers import answer_value, correctness_reward, gold_value, is_correct

ARITHMETIC_OPS = ("+", "-")
ARITHMETIC_FORMATS = ("fixed", "plain")  # "07+35=" -> "+042", or "7+35=" -> "42"


def digits_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """Partial credit: the fraction of digit positions that match the gold answer, right-aligned.

    A denser signal than correctness for arithmetic: "93" for gold "92" earns 0.5 (the tens digit
    is right), "-51" for "-51" earns 1.0. With p and g the answer strings without a sign, right-
    aligned and left-filled to n = max(len(p), len(g)):

        reward = (#{i : p_i == g_i} + [sign(p) == sign(g)]) / (n + 1)

    No answer at all earns 0. Needs the column `answer`; only integer golds make sense here.

    >>> digits_reward(["Q"] * 4, ["92", "93", "-51", "x"], answer=["92", "92", "51", "92"])
    [1.0, 0.6666666666666666, 0.6666666666666666, 0.0]
    """
    golds = column(columns, "answer", len(completions), "digits_reward", "the gold answers")
    scores = []
    for completion, gold in zip(completions, golds, strict=True):
        value, gold_number = answer_value(completion), gold_value(gold)
        if value is None or value != int(value):
            scores.append(0.0)
            continue
        p, g = str(abs(int(value))), str(abs(int(gold_number)))
        n = max(len(p), len(g))
        p, g = p.rjust(n, " "), g.rjust(n, " ")
        same_sign = (value < 0) == (gold_number < 0)
        scores.append((sum(a == b for a, b in zip(p, g, strict=True)) + same_sign) / (n + 1))
    return scores


def arithmetic_prompt(a: int, op: str, b: int, width: int = 2) -> str:
    """The tiny model's prompt, the bare expression with zero-padded operands:
    arithmetic_prompt(47, "+", 5) == "47+05=" (width=0: unpadded, "47+5=").

    Fixed width puts every digit at the same position in every problem (the units digits of the
    operands are always characters 1 and 4), so a 0.8M-parameter model can find them by position.
    With unpadded operands ("47+5=") the same model needed about twice the supervised warm-up to
    reach the same accuracy (see the README, "Why a fixed-width format").
    """
    if width == 0:
        return f"{a}{op}{b}="
    return f"{a:0{width}d}{op}{b:0{width}d}="


def arithmetic_answer(value: int, width: int = 2) -> str:
    """The gold answer: a sign and width + 1 digits, so every answer digit has a fixed position too:
    arithmetic_answer(52) == "+052", arithmetic_answer(-7) == "-007". Rewards compare numerically,
    so "52" is just as correct; this is only the form the warm-up teaches. width=0: str(value)."""
    if width == 0:
        return str(value)
    return f"{value:+0{width + 2}d}"


def arithmetic_problem_count(max_operand: int = 99) -> int:
    """Distinct problems a op b with 0 <= a, b <= max_operand: 2 * 100 * 100 = 20,000 for 99."""
    return len(ARITHMETIC_OPS) * (max_operand + 1) ** 2


def arithmetic_task(
    seed: int = 0, n_eval: int = 500, max_operand: int = 99, fmt: str = "fixed"
) -> Task:
    """All problems a op b with 0 <= a, b <= max_operand, shuffled by `seed`, split disjointly.

    With max_operand=99 there are 2 * 100 * 100 = 20,000 problems; `n_eval` of them are held out.
    fmt="fixed": operands zero-padded to the width of `max_operand`, answers signed and one digit
    wider ("07+35=" -> "+042"); fmt="plain": "7+35=" -> "42", for comparison.
    """
    if fmt not in ARITHMETIC_FORMATS:
        raise ValueError(f"arithmetic format {fmt!r} is unknown; use one of {ARITHMETIC_FORMATS}")
    if not 0 < n_eval < arithmetic_problem_count(max_operand):
        raise ValueError(f"n_eval={n_eval} must be between 1 and the number of problems - 1")
    problems = [
        (a, op, b)
        for a in range(max_operand + 1)
        for b in range(max_operand + 1)
        for op in ARITHMETIC_OPS
    ]
    random.Random(seed).shuffle(problems)
    width = len(str(max_operand)) if fmt == "fixed" else 0

    def record(p):
        a, op, b = p
        value = a + b if op == "+" else a - b
        return {
            "prompt": arithmetic_prompt(a, op, b, width),
            "answer": arithmetic_answer(value, width),
        }

    return Task(
        "arithmetic",
        train=[record(p) for p in problems[n_eval:]],
        eval=[record(p) for p in problems[:n_eval]],
        correct=is_correct,
        rewards=REWARDS,
    )


REWARDS = {"correctness": correctness_reward, "digits": digits_reward}


def check(cfg: GRPOConfig) -> None:
    """The format is known, and the held-out and per-step counts fit the 20,000 problems."""
    if cfg.arithmetic_format not in ARITHMETIC_FORMATS:
        raise ConfigError(
            f"arithmetic_format={cfg.arithmetic_format!r}: must be one of "
            f"{', '.join(ARITHMETIC_FORMATS)}"
        )
    problems = arithmetic_problem_count()
    if not cfg.n_eval < problems:
        raise ConfigError(
            f"n_eval={cfg.n_eval!r}: the arithmetic task has {problems} problems; hold out fewer"
        )
    if cfg.prompts_per_step > problems - cfg.n_eval:
        raise ConfigError(
            f"prompts_per_step={cfg.prompts_per_step!r}: exceeds the "
            f"{problems - cfg.n_eval} training problems"
        )


def load(cfg: GRPOConfig) -> Task:
    return arithmetic_task(seed=cfg.seed, n_eval=cfg.n_eval, fmt=cfg.arithmetic_format)
