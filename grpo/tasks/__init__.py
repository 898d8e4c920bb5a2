"""Tasks: what a run trains on and how a completion of it is judged.

A task is one module of this package, registered in `TASK_MODULES` below, that defines

    REWARDS          {config name: reward function} for the rewards that make sense for it
                     (`fn(prompts, completions, **columns) -> list[float]`, grpo.rewards)
    check(cfg)       raise ConfigError naming a setting the task cannot run with (before any work)
    load(cfg)        -> Task: its train and held-out records, prompts already formatted

The `Task` it returns owns its scoring: the trainer's sampled accuracy, the held-out evaluation
and the demo all ask `task.is_correct`, and the trainer's rewards come from `task.rewards`; the
loop never imports a grader. A new task is one new module plus one line in `TASK_MODULES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType

from grpo.config import ConfigError, GRPOConfig

# Task name -> module (imported when the task is used).
TASK_MODULES = {
    "arithmetic": "grpo.tasks.arithmetic",
    "gsm8k": "grpo.tasks.gsm8k",
    "word_problems": "grpo.tasks.word_problems",
}
TASKS = tuple(TASK_MODULES)


@dataclass
class Task:
    """A task's records and how a completion of one is judged."""

    name: str
    train: list[dict]  # {"prompt": str, "answer": str}
    eval: list[dict]  # held out: never trained on
    correct: Callable[[str, str], bool]  # (completion, gold answer) -> right or not
    rewards: Mapping[str, Callable] = field(default_factory=dict)  # the task's REWARDS
    # The prompts ask for the final answer inside <answer></answer>, so a completion's format
    # means something (GSM8K); the bare arithmetic task has no format to judge.
    answer_tags: bool = False

    def is_correct(self, completion: str, answer: str) -> bool:
        """Whether `completion` answers a record whose gold is `answer` correctly."""
        return self.correct(completion, answer)

    def accuracy(self, completions: list[str], records: list[dict]) -> float:
        """The fraction of `completions` that answer their `records` correctly."""
        correct = [
            self.is_correct(c, r["answer"]) for c, r in zip(completions, records, strict=True)
        ]
        return sum(correct) / max(1, len(records))


def task_module(name: str) -> ModuleType:
    """The module of task `name`; ConfigError for a name that is not registered."""
    if name not in TASK_MODULES:
        raise ConfigError(f"task={name!r}: must be one of {', '.join(TASKS)}")
    return importlib.import_module(TASK_MODULES[name])


def load_task(cfg: GRPOConfig) -> Task:
    """The task `cfg.task` with the config's seed, n_eval and task settings."""
    return task_module(cfg.task).load(cfg)


def check_task(cfg: GRPOConfig) -> None:
    """The task's own checks of `cfg` (`check` of its module); ConfigError when one fails."""
    task_module(cfg.task).check(cfg)


__all__ = ["TASKS", "TASK_MODULES", "Task", "check_task", "load_task", "task_module"]
