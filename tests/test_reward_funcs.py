"""Tests for grpo/reward_funcs.py: the overlong penalty, names to functions (task rewards,
generic ones, import paths) and their one-line errors."""

import doctest
import math
import os
import subprocess
import sys

import pytest

from grpo import reward_funcs
from grpo.cli import check_run
from grpo.config import ConfigError, GRPOConfig
from grpo.reward_funcs import build_reward_functions, overlong_penalty
from grpo.rewards import MissingColumnError, RewardError, combine_rewards
from grpo.tasks import arithmetic, gsm8k
from grpo.tasks.gsm8k import format_reward


def test_docstring_examples():
    result = doctest.testmod(reward_funcs)
    assert result.attempted >= 4
    assert result.failed == 0


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


# --- names to functions ------------------------------------------------------------------------


def test_each_task_names_its_own_rewards_and_overlong_is_generic():
    assert list(arithmetic.REWARDS) == ["correctness", "digits"]
    assert list(gsm8k.REWARDS) == ["correctness", "format"]
    assert list(reward_funcs.GENERIC_REWARDS) == ["overlong"]
    with pytest.raises(RewardError, match="reward 'format' is unknown; choose from correctness, "
                       "digits, overlong"):  # fmt: skip
        build_reward_functions(["format"], [1.0], arithmetic.REWARDS)


def test_registry_and_build():
    fns, weights = build_reward_functions(
        ["format", "overlong"], [0.5, 1], gsm8k.REWARDS, max_completion_length=10, cache_length=5,
        unused=1,
    )  # fmt: skip
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
        build_reward_functions(names, weights, gsm8k.REWARDS, **options)


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
        ["correctness", "my_rewards:brevity", "my_rewards:off_by_one"],
        [1.0, 0.5, 2.0],
        arithmetic.REWARDS,
    )
    total, per = combine_rewards(
        fns, weights, ["2+2="] * 3, ["4", "5", "44"], answer=["4"] * 3, completion_lengths=[2, 4, 8]
    )
    assert per["my_rewards:brevity"].tolist() == [0.5, 0.25, 0.125]
    assert per["my_rewards:off_by_one"].tolist() == [0.0, 1.0, 0.0]
    assert total.tolist() == [1.25, 2.125, 0.0625]
    cfg = GRPOConfig(reward_funcs=["correctness", "my_rewards:brevity"], reward_weights=[1, 0.1])
    assert check_run(cfg) is cfg


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
        ("my_rewards:", "is unknown; choose from correctness, digits, overlong"),
    ],
)
def test_bad_import_paths_are_one_line_config_errors(user_rewards, name, message):
    with pytest.raises(ConfigError, match=message) as err:
        check_run(GRPOConfig(reward_funcs=["correctness", name], reward_weights=[1, 1]))
    assert str(err.value).startswith("reward_funcs=") and "\n" not in str(err.value)


@pytest.mark.slow
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
