"""Tests for grpo/rewards.py: answer parsing, the three reward functions, and combine_rewards'
error paths (each must name the function, the completion index and the text)."""

import doctest
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from grpo import rewards
from grpo.choices import REWARD_NAMES
from grpo.config import ConfigError, GRPOConfig
from grpo.rewards import (
    REWARD_FUNCTIONS,
    MissingColumnError,
    RewardError,
    answer_value,
    build_reward_functions,
    combine_rewards,
    correctness_reward,
    digits_reward,
    extract_answer,
    format_reward,
    gold_answer,
    is_correct,
    last_number,
    overlong_penalty,
    parse_number,
)

MULTILINE = (
    "<think>\nFirst, 6 * 7.\nThat is 40 + 2.\n\nSo the result is 42.\n</think>\n"
    "<answer>\n42\n</answer>"
)


def test_docstring_examples():
    result = doctest.testmod(rewards)
    assert result.attempted >= 15
    assert result.failed == 0


# --- numbers -----------------------------------------------------------------------------------


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


@pytest.mark.parametrize(
    "completion",
    [
        "<answer>42</answer>",
        MULTILINE,
        "Let me think.\nStep 1: 6 * 7.\nStep 2: done.\n<answer>42</answer>",
        "<think>short</think><answer>not a number, still formatted</answer>",
        "<answer>\nmulti\nline\n</answer>",
        "<answer>42</answer>\nExercise 2: ...",  # trailing text is allowed
    ],
)
def test_format_good(completion):
    assert format_reward(["Q"], [completion]) == [1.0]


@pytest.mark.parametrize(
    "completion",
    [
        "42",
        "",
        "<answer>42",  # unclosed
        "42</answer>",  # unopened
        "</answer>42<answer>",  # closed before opened
        "<answer></answer>",  # empty
        "<answer> \n\t </answer>",  # whitespace only
        "<answer>4</answer><answer>2</answer>",  # duplicated
        "<answer><answer>42</answer></answer>",  # nested
        "<answer>1 <answer>42</answer>",  # stray opening tag
        "<think>\nreasoning\n<answer>42</answer>",  # think unclosed
        "reasoning</think>\n<answer>42</answer>",  # think unopened
        "<answer>42</answer><think>late</think>",  # think after the answer
        "<think>a</think><think>b</think><answer>42</answer>",  # two think blocks
        "<think>a <answer>42</answer></think>",  # answer inside think
        "<ANSWER>42</ANSWER>",  # tags are case-sensitive
        "< answer >42</ answer >",
    ],
)
def test_format_bad(completion):
    assert format_reward(["Q"], [completion]) == [0.0]


# --- overlong penalty --------------------------------------------------------------------------


def test_overlong_penalty_at_boundaries():
    # Lmax = 100, Lcache = 20: zero up to 80, linear to -1 at 100, -1 beyond.
    fn = overlong_penalty(max_completion_length=100, cache_length=20)
    lengths = [0, 79, 80, 81, 90, 99, 100, 101, 1000]
    got = fn(["Q"] * len(lengths), ["c"] * len(lengths), completion_lengths=lengths)
    expected = [0.0, 0.0, 0.0, -0.05, -0.5, -0.95, -1.0, -1.0, -1.0]
    assert got == pytest.approx(expected, abs=1e-12)
    assert fn.__name__ == "overlong_penalty"


def test_overlong_penalty_whole_range_is_cache():
    fn = overlong_penalty(max_completion_length=4, cache_length=4)
    assert fn([""] * 5, [""] * 5, completion_lengths=[0, 1, 2, 4, 5]) == [
        0.0,
        -0.25,
        -0.5,
        -1.0,
        -1.0,
    ]


@pytest.mark.parametrize(
    "lmax, lcache, match",
    [
        (0, 0, "max_completion_length must be > 0"),
        (100, 0, r"cache_length must be in \(0, max_completion_length=100\], got 0"),
        (100, 101, "got 101"),
    ],
)
def test_overlong_penalty_rejects_bad_settings(lmax, lcache, match):
    with pytest.raises(ValueError, match=match):
        overlong_penalty(lmax, lcache)


def test_overlong_penalty_missing_column():
    fn = overlong_penalty(100, 20)
    with pytest.raises(MissingColumnError, match=r"'completion_lengths'.*\['answer'\]"):
        fn(["Q"], ["c"], answer=["1"])


# --- digits (partial credit) -------------------------------------------------------------------


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


def test_registry_and_build():
    assert (
        tuple(REWARD_FUNCTIONS) == REWARD_NAMES == ("correctness", "format", "digits", "overlong")
    )
    fns, weights = build_reward_functions(
        ["format", "overlong"], [0.5, 1], max_completion_length=10, cache_length=5, unused=1
    )
    assert list(fns) == ["format", "overlong"] and weights == [0.5, 1.0]
    assert fns["format"] is format_reward
    assert fns["overlong"](["Q"], ["c"], completion_lengths=[8]) == [-0.6]


@pytest.mark.parametrize(
    "names, weights, options, match",
    [
        (["correctness", "speed"], [1, 1], {}, r"reward 'speed' is unknown; choose from"),
        (["correctness"], [1, 1], {}, "got 2 reward weights for 1 reward functions"),
        (["format", "format"], [1, 1], {}, "listed twice"),
        (["overlong"], [1], {"max_completion_length": 8}, r"needs the options \['cache_length'\]"),
        (["format"], [math.nan], {}, "must be finite"),
        ([], [], {}, "at least one"),
    ],
)
def test_build_errors(names, weights, options, match):
    with pytest.raises(ValueError, match=match):
        build_reward_functions(names, weights, **options)


# --- combine_rewards ---------------------------------------------------------------------------


def test_combine_weights_and_per_function():
    completions = [MULTILINE, "42", "<answer>7</answer>", "nothing"]
    fns, weights = build_reward_functions(
        ["correctness", "format", "overlong"],
        [1.0, 0.5, 2.0],
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


# --- rewards by import path ----------------------------------------------------------------------

USER_REWARDS = """
def brevity(prompts, completions, completion_lengths, **columns):
    return [1.0 / n for n in completion_lengths]

def off_by_one(prompts, completions, answer, **columns):
    return [float(c.strip() == str(int(a) + 1)) for c, a in zip(completions, answer)]

def no_columns(prompts, completions):
    return [0.0] * len(completions)

def returns_text(prompts, completions, **columns):
    return ["high"] * len(completions)

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_REWARDS)
    (tmp_path / "broken_rewards.py").write_text("import no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("my_rewards", "broken_rewards"):
        sys.modules.pop(name, None)


def test_import_path_rewards_combine_with_built_ins(user_rewards):
    fns, weights = build_reward_functions(
        ["correctness", "my_rewards:brevity", "my_rewards:off_by_one"], [1.0, 0.5, 2.0]
    )
    total, per = combine_rewards(
        fns, weights, ["2+2="] * 3, ["4", "5", "44"], answer=["4"] * 3, completion_lengths=[2, 4, 8]
    )
    assert per["my_rewards:brevity"].tolist() == [0.5, 0.25, 0.125]
    assert per["my_rewards:off_by_one"].tolist() == [0.0, 1.0, 0.0]
    assert total.tolist() == [1.25, 2.125, 0.0625]
    cfg = GRPOConfig(reward_funcs=["correctness", "my_rewards:brevity"], reward_weights=[1, 0.1])
    assert cfg.validate() is cfg


def test_import_path_rewards_get_the_built_ins_output_checks(user_rewards):
    fns, weights = build_reward_functions(["my_rewards:returns_text"], [1.0])
    with pytest.raises(
        RewardError, match="'my_rewards:returns_text' returned 'high' at completion 0"
    ):
        combine_rewards(fns, weights, ["Q"], ["c"], answer=["1"], completion_lengths=[1])


@pytest.mark.parametrize(
    "name, message",
    [
        ("no_such_module:fn", "module 'no_such_module' does not import .ModuleNotFoundError"),
        ("broken_rewards:fn", "module 'broken_rewards' does not import .*no_such_dependency"),
        ("my_rewards:missing", "module 'my_rewards' has no attribute 'missing'"),
        ("my_rewards:NOT_A_FUNCTION", "is a int, not a function"),
        ("my_rewards:no_columns", r"cannot be called as fn\(prompts, completions, \*\*columns\)"),
        ("my_rewards:", "is unknown; choose from correctness, format, digits, overlong"),
    ],
)
def test_bad_import_paths_are_one_line_config_errors(user_rewards, name, message):
    with pytest.raises(ConfigError, match=message) as err:
        GRPOConfig(reward_funcs=["correctness", name], reward_weights=[1, 1]).validate()
    assert str(err.value).startswith("reward_funcs=") and "\n" not in str(err.value)


def test_cli_bad_import_path_exits_2_before_any_work(user_rewards):
    out = user_rewards / "run"
    env_path = f"{user_rewards}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    proc = subprocess.run(
        [sys.executable, "-m", "grpo.train", "--output_dir", str(out),
         "--reward_funcs", "correctness,my_rewards:missing"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": env_path},
    )  # fmt: skip
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.strip().splitlines() == [
        "error: reward_funcs=['correctness', 'my_rewards:missing']: reward 'my_rewards:missing': "
        "module 'my_rewards' has no attribute 'missing'; fix: define def missing(prompts, "
        "completions, **columns) in it"
    ]
