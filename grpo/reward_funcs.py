"""A run's `reward_funcs`: config names to reward functions, and the checks of the names.

A name is one of its task's rewards (`Task.rewards`: the tasks own correctness and what makes
sense for them, grpo/tasks/), one of `GENERIC_REWARDS` here (DAPO's soft overlong penalty, which
looks only at lengths), or an import path `module:function` found on sys.path, with the
signature and the checks of grpo/rewards.py. `resolve_reward` turns one name into a function,
`check_reward_names` is the one check of a run's names, and `build_reward_functions` turns names
and weights into what `combine_rewards` takes.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from grpo.rewards import COLUMNS, RewardError, RewardFn, column

__all__ = [
    "GENERIC_REWARDS",
    "build_reward_functions",
    "build_rewards",
    "check_reward_names",
    "overlong_penalty",
    "resolve_reward",
]


def overlong_penalty(max_completion_length: int, cache_length: int) -> RewardFn:
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", eq. 13) as a reward function.

    With L the completion length in tokens, Lmax = `max_completion_length` and
    Lcache = `cache_length`:

        R(L) = 0                          if L <= Lmax - Lcache
             = (Lmax - Lcache - L) / Lcache  if Lmax - Lcache < L <= Lmax
             = -1                         if L > Lmax

    so the penalty grows linearly from 0 to -1 over the last `cache_length` tokens. The returned
    function needs the column `completion_lengths` (list[int], tokens actually generated,
    padding excluded), which the trainer passes.

    >>> penalty = overlong_penalty(max_completion_length=100, cache_length=20)
    >>> penalty(["Q"] * 4, ["a"] * 4, completion_lengths=[80, 90, 100, 101])
    [0.0, -0.5, -1.0, -1.0]
    """
    if max_completion_length <= 0:
        raise ValueError(f"max_completion_length must be > 0, got {max_completion_length}")
    if not 0 < cache_length <= max_completion_length:
        raise ValueError(
            f"cache_length must be in (0, max_completion_length={max_completion_length}], "
            f"got {cache_length}"
        )
    soft_start = max_completion_length - cache_length

    def overlong_penalty_reward(
        prompts: list[str], completions: list[str], **columns
    ) -> list[float]:
        lengths = column(
            columns,
            "completion_lengths",
            len(completions),
            "overlong_penalty",
            "completion lengths in tokens",
        )
        rewards = []
        for length in lengths:
            if length <= soft_start:
                rewards.append(0.0)
            elif length <= max_completion_length:
                rewards.append((soft_start - length) / cache_length)
            else:
                rewards.append(-1.0)
        return rewards

    overlong_penalty_reward.__name__ = "overlong_penalty"
    return overlong_penalty_reward


# Rewards any task may use, by config name: factories, called with the run's length settings.
GENERIC_REWARDS: dict[str, Callable[..., RewardFn]] = {"overlong": overlong_penalty}


def _known(task_rewards: Mapping[str, RewardFn] | None) -> dict[str, Callable[..., Any]]:
    """The rewards a run can name: its task's, then the generic ones."""
    return {**(task_rewards or {}), **GENERIC_REWARDS}


def resolve_reward(
    name: str, task_rewards: Mapping[str, RewardFn] | None = None
) -> Callable[..., Any]:
    """The reward function (or factory) a config name stands for: one of `task_rewards` (the
    task's `REWARDS`), of `GENERIC_REWARDS`, or an import path `module:function` found on
    sys.path. Raises RewardError, in one line, when the name is unknown, the module does not
    import, the attribute is missing or not callable, or it cannot be called as
    fn(prompts, completions, **columns) with the trainer's columns.

    >>> resolve_reward("overlong") is overlong_penalty
    True
    >>> try:
    ...     resolve_reward("math:pi")
    ... except RewardError as err:
    ...     print(err)
    reward 'math:pi' is a float, not a function fn(prompts, completions, **columns)
    """
    known = _known(task_rewards)
    if name in known:
        return known[name]
    module_name, colon, attr = name.partition(":")
    if not colon or not module_name or not attr or ":" in attr:
        raise RewardError(
            f"reward {name!r} is unknown; choose from {', '.join(known)} (this task's and the "
            "generic rewards) or give an import path module:function"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure to import is the user's module's, reported in a line
        raise RewardError(
            f"reward {name!r}: module {module_name!r} does not import "
            f"({type(exc).__name__}: {exc}); fix: put {module_name}.py on sys.path (PYTHONPATH)"
        ) from None
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise RewardError(
                f"reward {name!r}: module {module_name!r} has no attribute {attr!r}; "
                f"fix: define def {attr}(prompts, completions, **columns) in it"
            )
        fn = getattr(fn, part)
    if not callable(fn):
        raise RewardError(
            f"reward {name!r} is a {type(fn).__name__}, not a function "
            "fn(prompts, completions, **columns)"
        )
    try:
        inspect.signature(fn).bind([], [], **{column: [] for column in COLUMNS})
    except (TypeError, ValueError):
        raise RewardError(
            f"reward {name!r} cannot be called as fn(prompts, completions, **columns) with the "
            f"columns {', '.join(COLUMNS)}; give it that signature"
        ) from None
    return fn


def check_reward_names(
    names: Sequence[str], task_rewards: Mapping[str, RewardFn] | None = None
) -> None:
    """The one check of a run's reward names: at least one, none twice, each resolvable
    (`resolve_reward`); raises RewardError in one line."""
    names = list(names)
    if not names:
        raise RewardError(
            f"need at least one reward function; choose from {', '.join(_known(task_rewards))}"
        )
    for name in names:
        if names.count(name) > 1:
            raise RewardError(f"reward function {name!r} is listed twice in {names}")
        resolve_reward(name, task_rewards)


def build_reward_functions(
    names: Sequence[str],
    weights: Sequence[float],
    task_rewards: Mapping[str, RewardFn] | None = None,
    **options: Any,
) -> tuple[dict[str, RewardFn], list[float]]:
    """Reward functions by config name, with their weights checked, ready for `combine_rewards`.

    Names are the task's rewards, generic ones or import paths (`resolve_reward`). The generic
    ones are factories that take the options they name from `options` (unused options are
    ignored, so a trainer can pass all of its length settings every time).

    >>> fns, w = build_reward_functions(["overlong"], [0.5], max_completion_length=256,
    ...                                 cache_length=64)
    >>> list(fns), w, fns["overlong"](["Q"], ["a"], completion_lengths=[224])
    (['overlong'], [0.5], [-0.5])
    """
    names, weights = list(names), [float(w) for w in weights]
    check_reward_names(names, task_rewards)
    if len(weights) != len(names):
        raise RewardError(
            f"got {len(weights)} reward weights for {len(names)} reward functions {names}; "
            "give one weight per function"
        )
    if not all(math.isfinite(w) for w in weights):
        raise RewardError(f"reward weights must be finite, got {weights}")
    fns: dict[str, RewardFn] = {}
    for name in names:
        entry = resolve_reward(name, task_rewards)
        if name in GENERIC_REWARDS:
            wanted = list(inspect.signature(entry).parameters)
            missing = [p for p in wanted if p not in options]
            if missing:
                raise RewardError(f"reward function {name!r} needs the options {missing}")
            entry = entry(**{p: options[p] for p in wanted})
        fns[name] = entry
    return fns, weights


def build_rewards(cfg, task) -> tuple[dict[str, RewardFn], list[float]]:
    """(reward functions by name, weights) of a run of `cfg` on `task`: what every run and the
    demo score with."""
    return build_reward_functions(
        cfg.reward_funcs,
        cfg.reward_weights,
        task.rewards,
        max_completion_length=cfg.max_new_tokens,
        cache_length=cfg.overlong_cache,
    )
