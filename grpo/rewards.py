"""Reward functions by name, their weighted sum, and the checks on both.

Every reward function has one signature, and returns one entry per completion:

    fn(prompts: list[str], completions: list[str], **columns) -> list[float]

`columns` (COLUMNS) carries dataset columns repeated once per completion (each prompt is sampled
G times, so its gold answer is repeated G times) and what the trainer knows of each completion:

    answer=["42", "42", ..., "#### 7", ...]      # gold answer, plain or GSM8K "#### n" style
    completion_lengths=[31, 64, ...]             # completion length in tokens (for "overlong")
    truncated=[False, True, ...]                 # True when the length limit cut it before EOS

A reward that returns 0 for every completion because a column never reached it trains on no
signal at all, silently. So a function missing a column raises `MissingColumnError` (never a
default of 0); `combine_rewards` requires one finite number per completion from every function
(`RewardError`, naming the function and the completion); and a gold answer that is not a number
raises (`grpo.tasks.answers.gold_value`).

A run names its rewards in `reward_funcs`: its task's (`Task.rewards`, grpo/tasks/), one of
`GENERIC_REWARDS` here (DAPO's soft overlong penalty, which looks only at lengths), or an import
path `module:function` on sys.path (`resolve_reward`).
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

RewardFn = Callable[..., Sequence[float]]

__all__ = [
    "COLUMNS",
    "GENERIC_REWARDS",
    "MissingColumnError",
    "RewardError",
    "build_reward_functions",
    "build_rewards",
    "check_reward_names",
    "column",
    "combine_rewards",
    "snippet",
    "overlong_penalty",
    "resolve_reward",
]


class RewardError(ValueError):
    """A reward function failed, or returned something that is not one finite number per
    completion. The message names the function and, where it can, the completion."""


class MissingColumnError(RewardError):
    """A reward function needs a dataset/trainer column that was not passed to it."""


# The columns the trainer passes to every reward function, one entry per completion.
COLUMNS = ("answer", "completion_lengths", "truncated")


def column(columns: Mapping[str, Any], name: str, n: int, fn_name: str, what: str) -> Sequence:
    """`columns[name]`, checked to be there with one entry per completion."""
    if name not in columns:
        raise MissingColumnError(
            f"{fn_name} needs the column {name!r} ({what}), but it was called with columns "
            f"{sorted(columns)}; pass {name}=[...] with one entry per completion"
        )
    values = columns[name]
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise RewardError(
            f"{fn_name}: column {name!r} must be a list with one entry per completion, "
            f"got {type(values).__name__}"
        )
    if len(values) != n:
        raise RewardError(
            f"{fn_name}: column {name!r} has {len(values)} entries for {n} completions; "
            "repeat each prompt's value once per completion"
        )
    return values


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


def snippet(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_number(value: Any) -> float | None:
    """`value` as a finite float, or None when it is not one (None, str, NaN, inf, ...)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _first_failing_index(
    fn: RewardFn, prompts: list[str], completions: list[str], columns: Mapping[str, Any]
) -> int | None:
    """Re-run `fn` one completion at a time to find the first it raises on (error path only)."""
    for i in range(len(completions)):
        try:
            fn([prompts[i]], [completions[i]], **{k: v[i : i + 1] for k, v in columns.items()})
        except Exception:
            return i
    return None


def combine_rewards(
    reward_fns: Mapping[str, RewardFn] | Sequence[RewardFn],
    weights: Sequence[float],
    prompts: list[str],
    completions: list[str],
    **columns: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run every reward function and return the weighted sum and each function's raw rewards.

        total[i] = sum_k weights[k] * reward_fns[k](prompts, completions, **columns)[i]

    `reward_fns` is a name -> function mapping (as `build_reward_functions` returns) or a list of
    functions, named by their `__name__`. Returns `total` (float32, [N]) and `per_function`
    ({name: float32 [N]}, unweighted, for logging). Raises `RewardError` naming the function, and
    where possible the completion index and text, when a function raises, returns a different
    number of values than there are completions, or returns something that is not a finite number.

    >>> def exact(prompts, completions, **columns):
    ...     return [float(c == a) for c, a in zip(completions, columns["answer"])]
    >>> def short(prompts, completions, **columns):
    ...     return [float(len(c) <= 2) for c in completions]
    >>> total, per = combine_rewards({"exact": exact, "short": short}, [1.0, 0.5], ["Q", "Q"],
    ...                              ["42", "42.0"], answer=["42", "42"])
    >>> total.tolist(), per["short"].tolist()
    ([1.5, 0.0], [1.0, 0.0])
    """
    named = _named(reward_fns)
    if len(weights) != len(named):
        raise RewardError(
            f"got {len(weights)} weights for {len(named)} reward functions "
            f"{[n for n, _ in named]}; give one weight per function"
        )
    n = len(completions)
    if len(prompts) != n:
        raise RewardError(
            f"got {len(prompts)} prompts for {n} completions; repeat each prompt once per "
            "completion"
        )
    for key in columns:
        column(columns, key, n, "combine_rewards", "a per-completion column")

    total = torch.zeros(n, dtype=torch.float32)
    per_function: dict[str, torch.Tensor] = {}
    for (name, fn), weight in zip(named, weights, strict=True):
        result = _call(name, fn, prompts, completions, columns)
        values = _finite_values(name, result, completions)
        per_function[name] = torch.tensor(values, dtype=torch.float32)
        total += float(weight) * per_function[name]
    return total, per_function


def _named(reward_fns: Mapping[str, RewardFn] | Sequence[RewardFn]) -> list[tuple[str, RewardFn]]:
    """(name, function) pairs: a mapping's items, or a list's functions by their `__name__`."""
    if isinstance(reward_fns, Mapping):
        return list(reward_fns.items())
    named = [(getattr(fn, "__name__", repr(fn)), fn) for fn in reward_fns]
    if len({name for name, _ in named}) != len(named):
        raise RewardError(
            f"reward functions have duplicate names {[n for n, _ in named]}; "
            "pass a dict name -> function"
        )
    return named


def _call(
    name: str, fn: RewardFn, prompts: list[str], completions: list[str], columns: Mapping
) -> Any:
    """fn(prompts, completions, **columns); what it raises becomes a RewardError naming `name`
    and the first completion it fails on alone."""
    try:
        return fn(prompts, completions, **columns)
    except MissingColumnError as exc:
        # Every completion would fail the same way: no index to hunt for.
        raise MissingColumnError(f"reward function {name!r}: {exc}") from exc
    except Exception as exc:
        index = _first_failing_index(fn, prompts, completions, columns)
        where = (
            f" on completion {index}: {snippet(completions[index])!r}"
            if index is not None
            else " (on the whole batch; no single completion fails alone)"
        )
        raise RewardError(
            f"reward function {name!r} raised {type(exc).__name__}: {exc}{where}"
        ) from exc


def _finite_values(name: str, result: Any, completions: list[str]) -> list[float]:
    """`result` as one finite float per completion, or a RewardError naming what is wrong."""
    n = len(completions)
    try:
        values = list(result)
    except TypeError:
        raise RewardError(
            f"reward function {name!r} returned {type(result).__name__}, "
            f"expected a list of {n} floats"
        ) from None
    if len(values) != n:
        raise RewardError(
            f"reward function {name!r} returned {len(values)} values, expected {n} "
            "(one per completion)"
        )
    floats = []
    for i, value in enumerate(values):
        number = _as_number(value)
        if number is None:
            raise RewardError(
                f"reward function {name!r} returned {value!r} at completion {i}, expected a "
                f"finite number; completion {i}: {snippet(completions[i])!r}"
            )
        floats.append(number)
    return floats
