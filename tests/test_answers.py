"""Tests for grpo/tasks/answers.py: reading a completion's final answer and a gold answer, and the
correctness reward both tasks use."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grpo.rewards import (
    MissingColumnError,
    RewardError,
)
from grpo.tasks.answers import (
    answer_value,
    correctness_reward,
    extract_answer,
    gold_answer,
    is_correct,
    last_number,
    parse_number,
)

MULTILINE = (
    "<think>\nFirst, 6 * 7.\nThat is 40 + 2.\n\nSo the result is 42.\n</think>\n"
    "<answer>\n42\n</answer>"
)


EQUIVALENT_TO_42 = [
    "42",
    "42.0",
    "$42",
    "42.",
    "<answer> 42 </answer>",
    "<answer>$42.00</answer>",
    "The answer is 42.",
    "Hmm, 41? No: 42",
    MULTILINE,
]


@pytest.mark.parametrize(
    "text, value",
    [
        ("42", 42.0),
        ("42.0", 42.0),
        ("$42", 42.0),
        ("42.", 42.0),
        ("  42  ", 42.0),
        ("-7", -7.0),
        ("\u22127", -7.0),
        ("+3", 3.0),
        ("-$5", -5.0),
        ("$-5", -5.0),
        ("1,234", 1234.0),
        ("-1,234,567.25", -1234567.25),
        ("$1,234.50", 1234.5),
        (".5", 0.5),
        ("0.25", 0.25),
    ],
)
def test_parse_number_accepts(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize(
    "text", ["", "abc", "4 2", "12,34", "1,2345", "--5", "nan", "inf", "42..", "$", "1.2.3"]
)
def test_parse_number_rejects(text):
    assert parse_number(text) is None


@given(st.integers(min_value=-(10**9), max_value=10**9))
def test_parse_number_formats_agree(n):
    # Every way of writing the same integer parses to it.
    for text in (str(n), f"{n:,}", f"{n}.", f"{n}.0", f"{n:,}.00"):
        assert parse_number(text) == n, text
    dollars = f"-${abs(n):,}" if n < 0 else f"${n:,}"
    assert parse_number(dollars) == n


@pytest.mark.parametrize(
    "text, number",
    [
        ("I tried 41 then 43, and the answer is 42.", "42"),
        ("It drops to -3 degrees", "-3"),
        ("10-3=7", "7"),
        ("10-3", "3"),  # subtraction, not the number -3
        ("a total of 1,234 apples", "1,234"),
        ("items 1,2,3", "3"),
        ("costs $18.50.", "$18.50"),
        ("no digits at all", None),
    ],
)
def test_last_number(text, number):
    assert last_number(text) == number


# --- extracting answers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, answer",
    [
        ("<answer>42</answer>", "42"),
        ("<answer> 42 </answer>", "42"),
        (MULTILINE, "42"),
        ("<answer>1</answer> no wait <answer>2</answer>", "2"),  # the last block wins
        ("<answer>7</answer> and the number 99 after it", "7"),  # tags beat the last number
        ("<answer>1 <answer>2</answer>", "2"),  # the innermost well-formed block
        ("<answer>42", "42"),  # unclosed: fall back to the last number
        ("<answer></answer> 42", None),  # an empty block is no answer
        ("Thinking... the answer is -5.", "-5"),
        ("nothing numeric here", None),
        ("", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_answer_value_reads_last_number_inside_block():
    assert answer_value("<answer>The total is $1,018.</answer>") == 1018.0
    assert answer_value("<answer>forty-two</answer>") is None


@pytest.mark.parametrize(
    "gold, final",
    [
        ("42", "42"),
        ("  42\n", "42"),
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
        ("She has 1000 + 234 = 1234.\n#### 1,234", "1,234"),
        ("####-3", "-3"),
    ],
)
def test_gold_answer(gold, final):
    assert gold_answer(gold) == final


# --- correctness -------------------------------------------------------------------------------


@pytest.mark.parametrize("gold", ["42", "Six sevens are 42.\n#### 42", 42])
def test_correctness_numeric_equivalence(gold):
    n = len(EQUIVALENT_TO_42)
    assert correctness_reward(["Q"] * n, EQUIVALENT_TO_42, answer=[gold] * n) == [1.0] * n


@pytest.mark.parametrize(
    "completion",
    [
        "no number at all",
        "",
        "42 is what I first thought, but it is 43",  # the last number counts
        "<answer>43</answer> though 42 is also nice",  # the tag counts, not the later number
        "<answer></answer>",
        "-42",
        "4.2",
        "420",
    ],
)
def test_correctness_wrong(completion):
    assert correctness_reward(["Q"], [completion], answer=["42"]) == [0.0]


def test_correctness_negative_and_thousands():
    completions = [
        "It ends at -5.",
        "<answer>\u22125</answer>",
        "5",
        "1,234 total",
        "1234",
        "12,34",
    ]
    golds = ["#### -5", "-5", "-5", "1234", "#### 1,234", "1234"]
    assert correctness_reward([""] * 6, completions, answer=golds) == [1, 1, 0, 1, 1, 0]


def test_correctness_missing_column_names_it_and_the_columns_passed():
    with pytest.raises(
        MissingColumnError, match=r"needs the column 'answer'.*\['completion_lengths'\]"
    ):
        correctness_reward(["Q"], ["42"], completion_lengths=[3])


def test_correctness_rejects_non_numeric_gold():
    with pytest.raises(ValueError, match=r"gold answer 'forty-two' .* is not a number"):
        correctness_reward(["Q"], ["42"], answer=["#### forty-two"])


def test_correctness_rejects_column_of_wrong_length():
    with pytest.raises(RewardError, match=r"column 'answer' has 1 entries for 2 completions"):
        correctness_reward(["Q", "Q"], ["1", "2"], answer=["1"])


def test_is_correct():
    assert is_correct("<answer>0.3</answer>", "0.30000000000000004")
    assert not is_correct("<answer>0.3001</answer>", "0.3")


# --- format ------------------------------------------------------------------------------------
