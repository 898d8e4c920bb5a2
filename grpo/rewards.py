"""What a reward function is, and the weighted sum of a batch's rewards with the checks on both.

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

Which functions a run uses is its config's `reward_funcs`, resolved by grpo/reward_funcs.py.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

RewardFn = Callable[..., Sequence[float]]

__all__ = [
    "COLUMNS",
    "MissingColumnError",
    "RewardError",
    "RewardFn",
    "column",
    "combine_rewards",
    "snippet",
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
