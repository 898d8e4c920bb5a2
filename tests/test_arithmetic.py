"""Tests for grpo/tasks/arithmetic.py: the seeded disjoint splits, the fixed-width format, and the
digits reward."""

import pytest

from grpo.rewards import (
    MissingColumnError,
)
from grpo.tasks.arithmetic import (
    arithmetic_answer,
    arithmetic_prompt,
    arithmetic_task,
    digits_reward,
)


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        ("92", "92", 1.0),  # 2 digits + sign, all right
        ("93", "92", 2 / 3),  # tens right, units wrong, sign right
        ("29", "92", 1 / 3),  # only the sign
        ("-51", "51", 2 / 3),  # digits right, sign wrong
        ("5", "105", 2 / 4),  # right-aligned: units 5 and the sign
        ("105", "5", 2 / 4),
        ("<answer>-7</answer>", "-7", 1.0),
        ("no number", "7", 0.0),
        ("7.5", "7", 0.0),  # not an integer
        ("1,234", "1234", 1.0),
    ],
)
def test_digits_reward_values(completion, gold, expected):
    assert digits_reward(["Q"], [completion], answer=[gold]) == [pytest.approx(expected)]


def test_digits_reward_needs_answer_column():
    with pytest.raises(MissingColumnError, match="answer"):
        digits_reward(["Q"], ["1"])


# --- registry ----------------------------------------------------------------------------------


def test_arithmetic_split_is_disjoint_seeded_and_correct():
    task = arithmetic_task(seed=0, n_eval=500)
    assert len(task.eval) == 500 and len(task.train) == 20_000 - 500
    assert not {r["prompt"] for r in task.eval} & {r["prompt"] for r in task.train}
    assert arithmetic_task(seed=0).eval == task.eval
    assert arithmetic_task(seed=1).eval != task.eval
    for r in task.eval[:50] + task.train[:50]:
        a, op, b = int(r["prompt"][:2]), r["prompt"][2], int(r["prompt"][3:5])
        assert int(r["answer"]) == (a + b if op == "+" else a - b)
        assert len(r["prompt"]) == 6 and len(r["answer"]) == 4 and r["answer"][0] in "+-"


def test_arithmetic_fixed_width_format():
    assert arithmetic_prompt(47, "+", 5) == "47+05=" and arithmetic_prompt(0, "-", 99) == "00-99="
    assert [arithmetic_answer(v) for v in (52, -7, 0, 198, -99)] == [
        "+052",
        "-007",
        "+000",
        "+198",
        "-099",
    ]
    small = arithmetic_task(seed=0, n_eval=10, max_operand=9)  # one-digit operands: "7+5=" "+12"
    assert len(small.train) + len(small.eval) == 200
    assert all(len(r["prompt"]) == 4 and len(r["answer"]) == 3 for r in small.train)
