"""How a numeric task reads a completion's final answer and a gold answer, and the
`correctness` reward both shipped tasks use.

- A completion's final answer is the content of the LAST well-formed `<answer>...</answer>` if there
  is one (a model that revises itself usually does so later in the text), else the last number
  anywhere in the completion.
- A number may carry a sign, a leading "$", thousands separators ("1,234"), decimals and a trailing
  "." (end of sentence); answers compare numerically, so "42", "42.0", "$42", "42." and
  "<answer> 42 </answer>" all match the gold "42".
- A gold answer that is not a number raises instead of scoring every completion 0.
"""

from __future__ import annotations

import numbers
import re
from typing import Any

from grpo.rewards import column, snippet

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
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


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


def gold_value(gold: Any) -> float:
    """A gold answer (a record's "answer", or a number) as a number; raises, because a
    non-numeric gold would score every completion 0 without anyone noticing."""
    if isinstance(gold, numbers.Real) and not isinstance(gold, bool):
        return float(gold)
    if not isinstance(gold, str):
        raise ValueError(f"gold answer must be a string or a number, got {type(gold).__name__}")
    value = parse_number(gold_answer(gold))
    if value is None:
        raise ValueError(
            f"gold answer {gold_answer(gold)!r} (from {snippet(gold)!r}) is not a number; "
            "correctness compares numbers, so fix the dataset's answer column"
        )
    return value


def is_correct(completion: str, gold: str | float) -> bool:
    """Whether the completion's final answer equals the gold answer numerically.

    >>> is_correct("<answer>$42.</answer>", "Half of 84 is 42.\\n#### 42")
    True
    """
    value = answer_value(completion)
    return value is not None and numbers_match(value, gold_value(gold))


def correctness_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """1.0 when the completion's final answer equals the gold answer numerically, else 0.0.

    Needs the column `answer` (gold answers, plain "42" or GSM8K "...#### 42"). See
    `extract_answer` for how the final answer is read.

    >>> correctness_reward(["Q"] * 3, ["<answer>42</answer>", "so 42.", "41"], answer=["42"] * 3)
    [1.0, 1.0, 0.0]
    """
    golds = column(columns, "answer", len(completions), "correctness_reward", "the gold answers")
    return [float(is_correct(c, g)) for c, g in zip(completions, golds, strict=True)]
