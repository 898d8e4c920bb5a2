"""grpo/tasks/__init__.py: the task registry, its errors, and Task's scoring on made-up records."""

import importlib

import pytest

from grpo.config import ConfigError, GRPOConfig
from grpo.tasks import TASK_MODULES, TASKS, Task, check_task, load_task, task_module


def test_every_registered_task_module_defines_the_three_entry_points():
    assert TASKS == ("arithmetic", "gsm8k", "word_problems")
    for name, module_name in TASK_MODULES.items():
        module = task_module(name)
        assert module is importlib.import_module(module_name)
        assert callable(module.check) and callable(module.load)
        assert "correctness" in module.REWARDS and all(map(callable, module.REWARDS.values()))


def test_an_unregistered_task_is_one_line_naming_the_choices():
    message = "task='chess': must be one of arithmetic, gsm8k, word_problems"
    with pytest.raises(ConfigError, match=f"^{message}$"):
        task_module("chess")
    with pytest.raises(ConfigError, match=f"^{message}$"):
        load_task(GRPOConfig(task="chess"))
    with pytest.raises(ConfigError, match=f"^{message}$"):
        check_task(GRPOConfig(task="chess"))


def test_check_task_runs_the_task_s_own_check():
    check_task(GRPOConfig())  # the default run: arithmetic on the tiny model
    with pytest.raises(ConfigError, match="^task='word_problems': needs an instruct model"):
        check_task(GRPOConfig(task="word_problems"))  # the tiny model has no chat template


def test_load_task_gives_the_config_s_task_with_its_rewards():
    task = load_task(GRPOConfig(n_eval=5, seed=1))
    module = task_module("arithmetic")
    assert task.name == "arithmetic" and len(task.eval) == 5 and task.rewards is module.REWARDS
    record = task.eval[0]
    assert task.is_correct(record["answer"], record["answer"])
    assert not task.is_correct("", record["answer"])


def exact(completion: str, answer: str) -> bool:
    return completion.strip() == answer


def test_accuracy_is_the_fraction_of_records_answered_correctly():
    task = Task("toy", train=[], eval=[], correct=exact)
    records = [{"answer": "1"}, {"answer": "3"}, {"answer": "x"}, {"answer": "4"}]
    assert task.accuracy(["1", "2", " x ", "4"], records) == 0.75
    assert task.accuracy(["0", "0", "0", "0"], records) == 0.0
    assert task.accuracy([], []) == 0.0  # no records: 0, not a division by zero
    assert task.is_correct(" 3", "3") and not task.is_correct("3", "4")


def test_accuracy_needs_one_completion_per_record():
    task = Task("toy", train=[], eval=[], correct=exact)
    with pytest.raises(ValueError):
        task.accuracy(["1", "2"], [{"answer": "1"}])
