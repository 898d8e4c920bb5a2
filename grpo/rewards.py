"""Reward functions for GRPO: correctness, format and DAPO's soft overlong penalty.

Every reward function has one signature:

    fn(prompts: list[str], completions: list[str], **columns) -> list[float]

with one entry per completion. `columns` carries dataset columns repeated once per completion
(each prompt is sampled G times, so its gold answer is repeated G times), plus what the trainer
knows about each completion:

    answer=["42", "42", ..., "#### 7", ...]      # gold answer, plain or GSM8K "#### n" style
    completion_lengths=[31, 64, ...]             # completion length in tokens (for "overlong")

Three rules hold throughout, because the seed project's reward silently returned 0 for every
completion when a column was never passed, and trained for 1h43m on no signal at all:

1. A function that needs a column and does not get it raises `MissingColumnError`, naming the
   column and the columns it did get. It never defaults to 0.
2. `combine_rewards` checks every function's output: it must return one finite number per
   completion. Anything else raises `RewardError` naming the function, the completion index and
   the completion text.
3. A gold answer that is not a number raises instead of scoring every completion 0.

How a completion's final answer is read (`extract_answer`, `answer_value`):

- the content of the LAST well-formed `<answer>...</answer>` if there is one (a model that revises
  itself usually does so later in the text), else the last number anywhere in the completion;
- a number may carry a sign, a leading "$", thousands separators ("1,234"), decimals and a trailing
  "." (end of sentence); answers compare numerically, so "42", "42.0", "$42", "42." and
  "<answer> 42 </answer>" all match the gold "42".

The registry `REWARD_FUNCTIONS` maps the config names "correctness", "format", "digits" and
"overlong" to functions (or, for "overlong", a factory). A config may also name a function of its
own by import path, `module:function` (found on sys.path), with the same signature; it gets the
same checks. `resolve_reward` turns one name into a function, `check_reward_names` is the one
check of a run's names, and `build_reward_functions` turns names and weights into what
`combine_rewards` takes.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from grpo.choices import REWARD_NAMES

RewardFn = Callable[..., Sequence[float]]

__all__ = [
    "COLUMNS",
    "REWARD_FUNCTIONS",
    "MissingColumnError",
    "RewardError",
    "answer_value",
    "build_reward_functions",
    "check_reward_names",
    "combine_rewards",
    "correctness_reward",
    "extract_answer",
    "format_reward",
    "gold_answer",
    "is_correct",
    "last_number",
    "numbers_match",
    "overlong_penalty",
    "parse_number",
    "resolve_reward",
]


class RewardError(ValueError):
    """A reward function failed, or returned something that is not one finite number per
    completion. The message names the function and, where it can, the completion."""


class MissingColumnError(RewardError):
    """A reward function needs a dataset/trainer column that was not passed to it."""


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------

# "-" is ASCII hyphen-minus, "\u2212" the typographic minus some tokenizers/models emit.
_SIGN = r"[-+\u2212]"
# A sign only counts when it does not follow a word, a digit or a closing bracket, so the "-" in
# "10-3" is subtraction, not the number -3.
_PREFIX = rf"(?:(?<![\w)\].]){_SIGN}\$?|\${_SIGN}?)?"
# Thousands groups must be exactly three digits ("1,234", "12,345,678"); "12,34" is two numbers.
_BODY = r"(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER_RE = re.compile(_PREFIX + _BODY)

# Tags are matched literally and case-sensitively. The tempered dot `(?:(?!<answer>).)` keeps a
# match from spanning a second opening tag, so "<answer>1 <answer>2</answer>" yields only "2".
# DOTALL: the answer and the reasoning before it may span lines.
_ANSWER_RE = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)
_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


def parse_number(s: str) -> float | None:
    """Parse `s` as one number, or return None if it is not exactly one number.

    Accepts surrounding whitespace, a sign ("-", "+", "\u2212"), a leading "$", thousands
    separators in groups of three, decimals, and one trailing "." (end of a sentence).

    >>> parse_number("$1,234.50"), parse_number("42."), parse_number("-7"), parse_number("4 2")
    (1234.5, 42.0, -7.0, None)
    """
    s = s.strip()
    if s.endswith("."):
        s = s[:-1]
    if not _NUMBER_RE.fullmatch(s):
        return None
    return float(s.replace("$", "").replace(",", "").replace("\u2212", "-"))


def last_number(text: str) -> str | None:
    """The last number in `text` as it was written, or None if there is none.

    >>> last_number("3 apples + 4 apples = 7 apples."), last_number("no digits here")
    ('7', None)
    """
    matches = _NUMBER_RE.findall(text)
    return matches[-1] if matches else None


def numbers_match(predicted: float, gold: float) -> bool:
    """Equal up to a relative tolerance of 1e-6 (absolute below 1), so 0.1 + 0.2 matches 0.3.

    >>> numbers_match(42.0000001, 42), numbers_match(41.9, 42)
    (True, False)
    """
    return abs(predicted - gold) <= 1e-6 * max(1.0, abs(gold))


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------


def extract_answer(text: str) -> str | None:
    """The completion's final answer as written: the stripped content of the last well-formed
    `<answer>...</answer>`, else the last number in the text; None when there is neither, or when
    the last answer block is empty (the model committed to an answer and left it blank, so we do
    not go looking for a number elsewhere).

    >>> extract_answer("<think>\\n6 * 7\\n</think>\\n<answer> 42 </answer>")
    '42'
    >>> extract_answer("We get 40, then 42.")
    '42'
    """
    blocks = _ANSWER_RE.findall(text)
    if blocks:
        return blocks[-1].strip() or None
    return last_number(text)


def answer_value(text: str) -> float | None:
    """The numeric value of the completion's final answer (see `extract_answer`), or None.

    An answer block that is not a bare number ("<answer>The total is $18.</answer>") is read as the
    last number inside it: the same rule as for untagged text, applied within the block.

    >>> answer_value("<answer>The total is $1,018.</answer>"), answer_value("no idea")
    (1018.0, None)
    """
    answer = extract_answer(text)
    if answer is None:
        return None
    value = parse_number(answer)
    if value is None:
        number = last_number(answer)
        value = parse_number(number) if number is not None else None
    return value


def gold_answer(answer: str) -> str:
    """The final answer in a gold `answer` field: the text after the last "####" (GSM8K writes
    the worked solution, then "#### 42"), or the whole field when there is no "####".

    >>> gold_answer("Natalia sold 48/2 = 24 clips in May.\\n#### 72"), gold_answer(" 42 ")
    ('72', '42')
    """
    if "####" in answer:
        answer = answer.rsplit("####", 1)[1]
    return answer.strip()


def _gold_value(gold: Any) -> float:
    """A gold answer as a number; raises, because a non-numeric gold would score every
    completion 0 without anyone noticing."""
    if isinstance(gold, numbers.Real) and not isinstance(gold, bool):
        return float(gold)
    if not isinstance(gold, str):
        raise ValueError(f"gold answer must be a string or a number, got {type(gold).__name__}")
    value = parse_number(gold_answer(gold))
    if value is None:
        raise ValueError(
            f"gold answer {gold_answer(gold)!r} (from {_snippet(gold)!r}) is not a number; "
            "correctness compares numbers, so fix the dataset's answer column"
        )
    return value


def is_correct(completion: str, gold: str | float) -> bool:
    """Whether the completion's final answer equals the gold answer numerically.

    >>> is_correct("<answer>$42.</answer>", "Half of 84 is 42.\\n#### 42")
    True
    """
    value = answer_value(completion)
    return value is not None and numbers_match(value, _gold_value(gold))


# ---------------------------------------------------------------------------------------------
# Reward functions
# ---------------------------------------------------------------------------------------------


def _column(columns: Mapping[str, Any], name: str, n: int, fn_name: str, what: str) -> Sequence:
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


def correctness_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """1.0 when the completion's final answer equals the gold answer numerically, else 0.0.

    Needs the column `answer` (gold answers, plain "42" or GSM8K "...#### 42"). See
    `extract_answer` for how the final answer is read.

    >>> correctness_reward(["Q"] * 3, ["<answer>42</answer>", "so 42.", "41"], answer=["42"] * 3)
    [1.0, 1.0, 0.0]
    """
    golds = _column(columns, "answer", len(completions), "correctness_reward", "the gold answers")
    return [float(is_correct(c, g)) for c, g in zip(completions, golds, strict=True)]


def digits_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """Partial credit: the fraction of digit positions that match the gold answer, right-aligned.

    A denser signal than correctness for arithmetic: "93" for gold "92" earns 0.5 (the tens digit
    is right), "-51" for "-51" earns 1.0. With p and g the answer strings without a sign, right-
    aligned and left-filled to n = max(len(p), len(g)):

        reward = (#{i : p_i == g_i} + [sign(p) == sign(g)]) / (n + 1)

    No answer at all earns 0. Needs the column `answer`; only integer golds make sense here.

    >>> digits_reward(["Q"] * 4, ["92", "93", "-51", "x"], answer=["92", "92", "51", "92"])
    [1.0, 0.6666666666666666, 0.6666666666666666, 0.0]
    """
    golds = _column(columns, "answer", len(completions), "digits_reward", "the gold answers")
    scores = []
    for completion, gold in zip(completions, golds, strict=True):
        value, gold_value = answer_value(completion), _gold_value(gold)
        if value is None or value != int(value):
            scores.append(0.0)
            continue
        p, g = str(abs(int(value))), str(abs(int(gold_value)))
        n = max(len(p), len(g))
        p, g = p.rjust(n, " "), g.rjust(n, " ")
        same_sign = (value < 0) == (gold_value < 0)
        scores.append((sum(a == b for a, b in zip(p, g, strict=True)) + same_sign) / (n + 1))
    return scores


def _is_well_formatted(text: str) -> bool:
    """See `format_reward`. Counting literal tags (rather than one big regex) makes every rule
    explicit, and is multi-line safe by construction."""
    if text.count(_ANSWER_OPEN) != 1 or text.count(_ANSWER_CLOSE) != 1:
        return False
    start, end = text.index(_ANSWER_OPEN), text.index(_ANSWER_CLOSE)
    if end < start or not text[start + len(_ANSWER_OPEN) : end].strip():
        return False
    n_think = (text.count(_THINK_OPEN), text.count(_THINK_CLOSE))
    if n_think == (0, 0):
        return True
    return n_think == (1, 1) and text.index(_THINK_OPEN) < text.index(_THINK_CLOSE) < start


def format_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """1.0 when the completion is well formatted, else 0.0. Needs no columns.

    Well formatted means all of:

    - exactly one `<answer>` and exactly one `</answer>`, the opening one first;
    - the text between them is not empty or whitespace only (it need not be a number:
      correctness judges the content);
    - `<think>`/`</think>` are optional; if either appears, there is exactly one of each, in that
      order, closed before `<answer>`.

    Any text may come before the answer (reasoning, with or without `<think>`, over any number of
    lines) and after it (trailing text is left to EOS and the overlong penalty). Tags are
    literal and case-sensitive: `<Answer>` or `< answer >` is not a tag.

    >>> format_reward(["Q"] * 4, [
    ...     "<think>\\nstep 1\\nstep 2\\n</think>\\n<answer>42</answer>",  # multi-line reasoning
    ...     "<answer>42",                                               # unclosed
    ...     "<answer> </answer>",                                       # empty
    ...     "<answer>4</answer><answer>2</answer>",                     # duplicated
    ... ])
    [1.0, 0.0, 0.0, 0.0]
    """
    return [float(_is_well_formatted(c)) for c in completions]


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
        lengths = _column(
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


# Config name -> reward function, or a factory (named in _FACTORIES) called with build options.
REWARD_FUNCTIONS: dict[str, Callable[..., Any]] = dict(
    zip(
        REWARD_NAMES,
        (correctness_reward, format_reward, digits_reward, overlong_penalty),
        strict=True,
    )
)
_FACTORIES = frozenset({"overlong"})
# The columns the trainer passes to every reward function, one entry per completion.
COLUMNS = ("answer", "completion_lengths")


def resolve_reward(name: str) -> Callable[..., Any]:
    """The reward function (or factory) a config name stands for: a built-in name, or an import
    path `module:function` found on sys.path. Raises RewardError, in one line, when the name is
    unknown, the module does not import, the attribute is missing or not callable, or it cannot be
    called as fn(prompts, completions, **columns) with the trainer's columns.

    >>> resolve_reward("correctness") is correctness_reward
    True
    >>> try:
    ...     resolve_reward("math:pi")
    ... except RewardError as err:
    ...     print(err)
    reward 'math:pi' is a float, not a function fn(prompts, completions, **columns)
    """
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    module_name, colon, attr = name.partition(":")
    if not colon or not module_name or not attr or ":" in attr:
        raise RewardError(
            f"reward {name!r} is unknown; choose from {', '.join(REWARD_NAMES)} or give an "
            "import path module:function"
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


def check_reward_names(names: Sequence[str]) -> None:
    """The one check of a run's reward names: at least one, none twice, each resolvable
    (`resolve_reward`); raises RewardError in one line."""
    names = list(names)
    if not names:
        raise RewardError(
            f"need at least one reward function; choose from {', '.join(REWARD_NAMES)}"
        )
    for name in names:
        if names.count(name) > 1:
            raise RewardError(f"reward function {name!r} is listed twice in {names}")
        resolve_reward(name)


def build_reward_functions(
    names: Sequence[str], weights: Sequence[float], **options: Any
) -> tuple[dict[str, RewardFn], list[float]]:
    """Reward functions by config name, with their weights checked, ready for `combine_rewards`.

    Names are built-ins or import paths (`resolve_reward`). Factories take the options they name
    from `options` (unused options are ignored, so a trainer can pass all of its length settings
    every time).

    >>> fns, w = build_reward_functions(["correctness", "overlong"], [1.0, 0.5],
    ...                                 max_completion_length=256, cache_length=64)
    >>> list(fns), w
    (['correctness', 'overlong'], [1.0, 0.5])
    """
    names, weights = list(names), [float(w) for w in weights]
    check_reward_names(names)
    if len(weights) != len(names):
        raise RewardError(
            f"got {len(weights)} reward weights for {len(names)} reward functions {names}; "
            "give one weight per function"
        )
    if not all(math.isfinite(w) for w in weights):
        raise RewardError(f"reward weights must be finite, got {weights}")
    fns: dict[str, RewardFn] = {}
    for name in names:
        entry = resolve_reward(name)
        if name in _FACTORIES:
            wanted = list(inspect.signature(entry).parameters)
            missing = [p for p in wanted if p not in options]
            if missing:
                raise RewardError(f"reward function {name!r} needs the options {missing}")
            entry = entry(**{p: options[p] for p in wanted})
        fns[name] = entry
    return fns, weights


# ---------------------------------------------------------------------------------------------
# Combining
# ---------------------------------------------------------------------------------------------


def _snippet(text: str, limit: int = 80) -> str:
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

    >>> total, per = combine_rewards({"correctness": correctness_reward, "format": format_reward},
    ...                              [1.0, 0.5], ["Q", "Q"], ["<answer>42</answer>", "42"],
    ...                              answer=["42", "42"])
    >>> total.tolist(), per["format"].tolist()
    ([1.5, 1.0], [1.0, 0.0])
    """
    if isinstance(reward_fns, Mapping):
        named = list(reward_fns.items())
    else:
        named = [(getattr(fn, "__name__", repr(fn)), fn) for fn in reward_fns]
        if len({name for name, _ in named}) != len(named):
            raise RewardError(
                f"reward functions have duplicate names {[n for n, _ in named]}; "
                "pass a dict name -> function"
            )
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
        _column(columns, key, n, "combine_rewards", "a per-completion column")

    total = torch.zeros(n, dtype=torch.float32)
    per_function: dict[str, torch.Tensor] = {}
    for (name, fn), weight in zip(named, weights, strict=True):
        try:
            result = fn(prompts, completions, **columns)
        except MissingColumnError as exc:
            # Every completion would fail the same way: no index to hunt for.
            raise MissingColumnError(f"reward function {name!r}: {exc}") from exc
        except Exception as exc:
            index = _first_failing_index(fn, prompts, completions, columns)
            where = (
                f" on completion {index}: {_snippet(completions[index])!r}"
                if index is not None
                else " (on the whole batch; no single completion fails alone)"
            )
            raise RewardError(
                f"reward function {name!r} raised {type(exc).__name__}: {exc}{where}"
            ) from exc
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
                    f"finite number; completion {i}: {_snippet(completions[i])!r}"
                )
            floats.append(number)
        per_function[name] = torch.tensor(floats, dtype=torch.float32)
        total += float(weight) * per_function[name]
    return total, per_function
