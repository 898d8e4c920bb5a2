"""Tests for grpo/rewards.py: combine_rewards' weighted sum and its error paths (each must name
the function, the completion index and the text)."""

import doctest
import math

import pytest
import torch

from grpo import rewards
from grpo.reward_funcs import build_reward_functions
from grpo.rewards import MissingColumnError, RewardError, combine_rewards
from grpo.tasks import gsm8k
from grpo.tasks.answers import correctness_reward
from grpo.tasks.gsm8k import format_reward

MULTILINE = (
    "<think>\nFirst, 6 * 7.\nThat is 40 + 2.\n\nSo the result is 42.\n</think>\n"
    "<answer>\n42\n</answer>"
)


def test_docstring_examples():
    result = doctest.testmod(rewards)
    assert result.attempted >= 1
    assert result.failed == 0


# --- combine_rewards ---------------------------------------------------------------------------


def test_combine_weights_and_per_function():
    completions = [MULTILINE, "42", "<answer>7</answer>", "nothing"]
    fns, weights = build_reward_functions(
        ["correctness", "format", "overlong"],
        [1.0, 0.5, 2.0],
        gsm8k.REWARDS,
        max_completion_length=100,
        cache_length=20,
    )
    total, per = combine_rewards(
        fns,
        weights,
        ["Q"] * 4,
        completions,
        answer=["42"] * 4,
        completion_lengths=[50, 90, 100, 10],
    )
    assert per["correctness"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert per["format"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert per["overlong"].tolist() == [0.0, -0.5, -1.0, 0.0]
    # 1*c + 0.5*f + 2*o
    assert total.tolist() == [1.5, 0.0, -1.5, 0.0]
    assert total.dtype == torch.float32 and total.shape == (4,)
    assert all(t.dtype == torch.float32 for t in per.values())


def test_combine_accepts_a_list_and_numeric_types():
    def tensor_reward(prompts, completions, **columns):
        return torch.arange(len(completions), dtype=torch.float64)

    def int_reward(prompts, completions, **columns):
        return (1, True, 3)

    total, per = combine_rewards([tensor_reward, int_reward], [1, -1], ["Q"] * 3, ["a", "b", "c"])
    assert list(per) == ["tensor_reward", "int_reward"]
    assert total.tolist() == [-1.0, 0.0, -1.0]


def test_combine_weight_count_must_match():
    with pytest.raises(RewardError, match=r"got 1 weights for 2 reward functions"):
        combine_rewards({"a": format_reward, "b": format_reward}, [1.0], ["Q"], ["c"])


def test_combine_prompt_and_column_lengths_must_match():
    with pytest.raises(RewardError, match="got 1 prompts for 2 completions"):
        combine_rewards([format_reward], [1], ["Q"], ["a", "b"])
    with pytest.raises(RewardError, match=r"column 'answer' has 3 entries for 2 completions"):
        combine_rewards([format_reward], [1], ["Q", "Q"], ["a", "b"], answer=["1", "2", "3"])
    with pytest.raises(RewardError, match=r"column 'answer' must be a list .* got str"):
        combine_rewards([format_reward], [1], ["Q", "Q"], ["a", "b"], answer="12")


def test_combine_missing_column_names_function_and_column():
    with pytest.raises(
        MissingColumnError,
        match=r"function 'correctness': .*the column 'answer'.*\['completion_lengths'\]",
    ):
        combine_rewards(
            {"correctness": correctness_reward}, [1], ["Q"], ["42"], completion_lengths=[2]
        )


def test_combine_raising_function_names_the_completion():
    def picky(prompts, completions, **columns):
        return [1.0 / (len(c) - 4) for c in completions]  # a 4-character completion divides by 0

    completions = ["first", "second", "oops", "fourth"]
    with pytest.raises(
        RewardError,
        match=r"'picky' raised ZeroDivisionError: .* on completion 2: 'oops'",
    ):
        combine_rewards([picky], [1], ["Q"] * 4, completions)


def test_combine_raising_on_the_whole_batch_only():
    def batch_of_two(prompts, completions, **columns):
        if len(completions) != 1:
            raise RuntimeError("batch too big")
        return [0.0]

    with pytest.raises(
        RewardError, match=r"'batch_of_two' raised RuntimeError: batch too big \(on the whole batch"
    ):
        combine_rewards([batch_of_two], [1], ["Q"] * 2, ["a", "b"])


def test_combine_wrong_length():
    def short(prompts, completions, **columns):
        return [0.0] * (len(completions) - 1)

    with pytest.raises(RewardError, match=r"'short' returned 2 values, expected 3"):
        combine_rewards([short], [1], ["Q"] * 3, ["a", "b", "c"])


def test_combine_not_a_list():
    def scalar(prompts, completions, **columns):
        return 1.0

    with pytest.raises(RewardError, match=r"'scalar' returned float, expected a list of 2 floats"):
        combine_rewards([scalar], [1], ["Q"] * 2, ["a", "b"])


@pytest.mark.parametrize("bad", [math.nan, None, "1.0", math.inf, [1.0]])
def test_combine_bad_value_names_function_index_and_text(bad):
    long_text = "line one\n" + "x" * 200

    def flaky(prompts, completions, **columns):
        return [0.0, bad, 1.0]

    with pytest.raises(RewardError) as info:
        combine_rewards([flaky], [1], ["Q"] * 3, ["fine", long_text, "fine"])
    message = str(info.value)
    assert f"'flaky' returned {bad!r} at completion 1, expected a finite number" in message
    # The text is shown, newlines escaped, cut to 80 characters.
    assert "completion 1: 'line one\\nxxx" in message
    assert "x" * 80 not in message and message.endswith("...'")
