"""Word problems for a real instruct model: one-step and two-step arithmetic in sentences, answered
in GSM8K's form, a final line `#### N`.

    "Sara has 23 stickers. Sara gets 10 more stickers. How many stickers does Sara have now?"
    gold 33; a well-formed completion: "23 + 10 = 33\\n#### 33" and then the model's end token

Records are generated from a seed by templates (KINDS), and every problem (template and numbers)
lives in exactly one split, so no held-out problem is trained on, even under another name.
Prompts go through the tokenizer's chat template (`chat_prompt`), so the model sees what it was
instruction-tuned on. `final_answer`/`is_right` score the sampled accuracy, the held-out
evaluation and the demo; `REWARDS` are `correctness`, `answer_format` (one `#### N` line
last, not cut off) and `worked_answer` (that form after a written calculation `... = N`, right or
wrong, so a bare guessed `#### N` earns nothing); DAPO's `overlong` penalty is the generic one.

The model must have a chat template (an instruct model such as `smollm2-135m-instruct`,
grpo/pretrained.py); the tiny Phi has none and is refused by `check`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from grpo.config import ConfigError, GRPOConfig
from grpo.rewards import column
from grpo.tasks import Task
from grpo.tasks.answers import last_number, numbers_match, parse_number

INSTRUCTION = "Write the calculation, then the final answer on its own line as: #### <number>"

NAMES = (
    "Sara", "Tom", "Maya", "Leo", "Nina", "Omar", "Lucy", "Ben", "Ava", "Sam", "Zoe", "Eli",
    "Mia", "Jack", "Ruth", "Ivan", "Lena", "Paul", "Kim", "Noah",
)  # fmt: skip
OBJECTS = (
    "stickers", "apples", "marbles", "pencils", "cookies", "books", "stamps", "shells",
    "cards", "balloons", "coins", "flowers", "crayons", "buttons", "eggs", "toy cars",
)  # fmt: skip
KINDS = ("add", "subtract", "multiply", "divide", "two_step")


@dataclass(frozen=True)
class Problem:
    """A problem is its template and numbers; names and objects only dress it."""

    kind: str  # one of KINDS
    template: int  # index into TEMPLATES[kind]
    numbers: tuple[int, ...]  # (a, b) or (a, b, c)

    @property
    def answer(self) -> int:
        return ANSWERS[self.kind][self.template](*self.numbers)


# Each template: {n} name, {f} a second name, {o} objects, {a} {b} {c} numbers.
TEMPLATES = {
    "add": (
        "{n} has {a} {o}. {n} gets {b} more {o}. How many {o} does {n} have now?",
        "{n} found {a} {o} in the morning and {b} {o} in the afternoon. How many {o} did {n} "
        "find in all?",
    ),
    "subtract": (
        "{n} had {a} {o} and gave {b} of them to {f}. How many {o} does {n} have left?",
        "There were {a} {o} in a box. {n} took {b} of them out. How many {o} are still in the box?",
    ),
    "multiply": (
        "{n} has {a} bags with {b} {o} in each bag. How many {o} does {n} have in total?",
        "{n} buys {a} packs of {o}. Each pack holds {b} {o}. How many {o} does {n} buy?",
    ),
    "divide": (
        "{n} shares {a} {o} equally among {b} friends. How many {o} does each friend get?",
        "{n} puts {a} {o} into {b} boxes with the same number in each box. How many {o} go in "
        "each box?",
    ),
    "two_step": (
        "{n} has {a} {o}. {n} buys {b} more {o} and then gives {c} {o} to {f}. How many {o} does "
        "{n} have now?",
        "{n} buys {a} packs of {o} with {b} {o} in each pack. {n} already had {c} {o}. How many "
        "{o} does {n} have now?",
    ),
}
ANSWERS = {
    "add": (lambda a, b: a + b,) * 2,
    "subtract": (lambda a, b: a - b,) * 2,
    "multiply": (lambda a, b: a * b,) * 2,
    "divide": (lambda a, b: a // b,) * 2,
    "two_step": (lambda a, b, c: a + b - c, lambda a, b, c: a * b + c),
}


def all_problems() -> list[Problem]:
    """Every problem, in a fixed order. Ranges keep answers positive whole numbers:

    add a, b in 2..50; subtract 10 <= a <= 60, 1 <= b < a; multiply a in 2..12, b in 2..15;
    divide (quotient q in 2..15, divisor b in 2..12, a = q b); two-step a + b - c with
    a, b in 2..20, c in 1..a + b - 1 (every 3rd c), and a b + c with a in 2..6, b in 2..6, c in
    1..20.

    >>> problems = all_problems(); len(problems), {p.answer > 0 for p in problems}
    (12033, {True})
    """
    out = []
    for t in range(2):
        out += [Problem("add", t, (a, b)) for a in range(2, 51) for b in range(2, 51)]
        out += [Problem("subtract", t, (a, b)) for a in range(10, 61) for b in range(1, a)]
        out += [Problem("multiply", t, (a, b)) for a in range(2, 13) for b in range(2, 16)]
        out += [Problem("divide", t, (q * b, b)) for q in range(2, 16) for b in range(2, 13)]
    out += [
        Problem("two_step", 0, (a, b, c))
        for a in range(2, 21)
        for b in range(2, 21)
        for c in range(1, a + b, 3)
    ]
    out += [
        Problem("two_step", 1, (a, b, c))
        for a in range(2, 7)
        for b in range(2, 7)
        for c in range(1, 21)
    ]
    return out


def question(problem: Problem, rng: random.Random) -> str:
    """The problem in words, with a name, a second name and an object drawn from `rng`."""
    n, f = rng.sample(NAMES, 2)
    letters = dict(zip("abc", problem.numbers, strict=False))
    return TEMPLATES[problem.kind][problem.template].format(
        n=n, f=f, o=rng.choice(OBJECTS), **letters
    )


def chat_prompt(tokenizer, text: str) -> str:
    """`text` and the instruction as the user turn of the tokenizer's chat template, the
    assistant turn opened (what the model continues)."""
    messages = [{"role": "user", "content": f"{text}\n{INSTRUCTION}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------

_FINAL_LINE = re.compile(r"^####\s*(\S+)\s*$")
# a calculation: digit, operator, digit, ..., "=" and its result (the number after the last "=")
_CALCULATION = re.compile(r"\d\s*[-+*/x×÷]\s*\d.*=\s*\$?(-?\d[\d,]*(?:\.\d+)?)")


def final_answer(completion: str) -> str | None:
    """The completion's final answer as written: the text after the last `####` (up to the end of
    its line), else the last number anywhere; None when there is neither.

    >>> final_answer("10+23\\n#### 33"), final_answer("#### 39\\n#### 40"), final_answer("33")
    ('33', '40', '33')
    """
    if "####" in completion:
        after = completion.rsplit("####", 1)[1].strip().splitlines()
        if after:
            number = last_number(after[0])
            return number if number is not None else after[0]
        return None
    return last_number(completion)


def is_right(completion: str, gold: str) -> bool:
    """Whether the final answer equals `gold` numerically.

    >>> is_right("10 + 23 = 33\\n#### 33", "33"), is_right("#### 33\\nor 34", "33")
    (True, True)
    """
    answer = final_answer(completion)
    value = parse_number(answer) if answer is not None else None
    gold_value = parse_number(gold)
    if gold_value is None:
        raise ValueError(f"gold answer {gold!r} is not a number; fix the task's records")
    return value is not None and numbers_match(value, gold_value)


def has_answer_line(completion: str) -> bool:
    """Exactly one `#### N` line (N a number), and it is the last line with any text.

    >>> has_answer_line("3 * 4 = 12\\n#### 12"), has_answer_line("#### 12\\n#### 12")
    (True, False)
    >>> has_answer_line("#### 12\\nDone."), has_answer_line("The answer is 12.")
    (False, False)
    """
    lines = [ln.strip() for ln in completion.strip().splitlines() if ln.strip()]
    if not lines or sum("####" in ln for ln in lines) != 1:
        return False
    match = _FINAL_LINE.match(lines[-1])
    return match is not None and parse_number(match.group(1)) is not None


def correctness_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """1.0 when the final answer (`final_answer`) equals the gold `answer` column, else 0.0.

    >>> correctness_reward(["Q"] * 2, ["#### 33", "#### 34"], answer=["33", "33"])
    [1.0, 0.0]
    """
    golds = column(columns, "answer", len(completions), "correctness_reward", "the gold answers")
    return [float(is_right(c, g)) for c, g in zip(completions, golds, strict=True)]


def answer_format_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """1.0 when the completion ends with one `#### N` line (`has_answer_line`) and then the end
    token, i.e. it was not cut off at the length limit (column `truncated`), else 0.0.

    >>> answer_format_reward(["Q"] * 3, ["#### 5", "#### 5", "5"], truncated=[False, True, False])
    [1.0, 0.0, 0.0]
    """
    cut = column(
        columns,
        "truncated",
        len(completions),
        "answer_format_reward",
        "whether each completion hit the length limit before its end token",
    )
    return [float(has_answer_line(c) and not t) for c, t in zip(completions, cut, strict=True)]


def shows_working(completion: str) -> bool:
    """A well-formed answer (`has_answer_line`) whose number is the result of a calculation
    written on a line before it: `a op b ... = N` on some line, then `#### N` last.

    >>> shows_working("7 * 4 = 28\\n#### 28"), shows_working("#### 28")
    (True, False)
    >>> shows_working("7 * 4 = 27\\n#### 28"), shows_working("It is 28.\\n#### 28")
    (False, False)
    """
    if not has_answer_line(completion):
        return False
    lines = [ln.strip() for ln in completion.strip().splitlines() if ln.strip()]
    answer = parse_number(_FINAL_LINE.match(lines[-1]).group(1))
    for line in lines[:-1]:
        match = _CALCULATION.search(line)
        result = parse_number(match.group(1)) if match else None
        if result is not None and numbers_match(result, answer):
            return True
    return False


def worked_answer_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """1.0 when the completion shows its working (`shows_working`: a calculation `... = N`, then
    `#### N` last) and ended with the end token before the length limit (column `truncated`),
    else 0.0. Right or wrong: it pays the form of an answer whose number comes from a written
    calculation, so a bare guessed `#### N` earns nothing.

    >>> worked_answer_reward(["Q"] * 3, ["2 + 3 = 5\\n#### 5", "#### 5", "2 + 3 = 6\\n#### 6"],
    ...                      truncated=[False, False, True])
    [1.0, 0.0, 0.0]
    """
    cut = column(
        columns,
        "truncated",
        len(completions),
        "worked_answer_reward",
        "whether each completion hit the length limit before its end token",
    )
    return [float(shows_working(c) and not t) for c, t in zip(completions, cut, strict=True)]


def split_problems(seed: int = 0, n_eval: int = 500) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out) problems, balanced across KINDS: each kind's problems are shuffled by
    `seed`, n_eval / 5 of each are held out and the same number of each of the rest trained on
    (as many as the rarest kind has left), both lists interleaved kind by kind. No problem is in
    both.

    >>> train, held_out = split_problems(seed=0, n_eval=300)
    >>> len(train), len(held_out), len(set(train) & set(held_out))
    (1240, 300, 0)
    """
    rng = random.Random(seed)
    by_kind = {k: [p for p in all_problems() if p.kind == k] for k in KINDS}
    fewest = min(len(v) for v in by_kind.values())
    if not 0 < n_eval <= len(KINDS) * (fewest - 1):
        raise ValueError(
            f"n_eval={n_eval} must be between 1 and {len(KINDS) * (fewest - 1)} (the rarest kind "
            f"of word problem has {fewest}, and each kind keeps one for training)"
        )
    for problems in by_kind.values():
        rng.shuffle(problems)
    held = {k: n_eval // len(KINDS) + (i < n_eval % len(KINDS)) for i, k in enumerate(KINDS)}
    n_train = min(len(by_kind[k]) - held[k] for k in KINDS)
    held_out = _interleave([by_kind[k][: held[k]] for k in KINDS])
    train = _interleave([by_kind[k][held[k] : held[k] + n_train] for k in KINDS])
    return train, held_out


def _interleave(lists: list[list]) -> list:
    """Round robin: the first of each list, then the second of each, ...; longer lists' tails
    follow in turn. _interleave([[1, 2, 3], [4]]) == [1, 4, 2, 3]."""
    out = []
    for i in range(max(map(len, lists))):
        out += [xs[i] for xs in lists if i < len(xs)]
    return out


def word_problem_task(tokenizer, seed: int = 0, n_eval: int = 500) -> Task:
    """The splits of `split_problems` as records {"prompt" (chat-templated), "answer",
    "question", "kind"}; names and objects drawn from `seed`."""
    train_problems, held_problems = split_problems(seed, n_eval)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the word_problems task needs a tokenizer with a chat template; fix: use an instruct "
            "model such as smollm2-135m-instruct"
        )
    rng = random.Random(seed + 1)

    def record(p: Problem) -> dict:
        text = question(p, rng)
        prompt = chat_prompt(tokenizer, text)
        return {"prompt": prompt, "answer": str(p.answer), "question": text, "kind": p.kind}

    held_out = [record(p) for p in held_problems]
    train = [record(p) for p in train_problems]
    return Task("word_problems", train=train, eval=held_out, correct=is_right, rewards=REWARDS)


REWARDS = {
    "correctness": correctness_reward,
    "answer_format": answer_format_reward,
    "worked_answer": worked_answer_reward,
}


def check(cfg: GRPOConfig) -> None:
    """A model with a chat template (not the tiny Phi), and held-out and per-step counts that fit
    the problems (nothing is read)."""
    if cfg.model == "tiny":
        raise ConfigError(
            "task='word_problems': needs an instruct model with a chat template; the tiny model "
            "has none; fix: set model, e.g. model: smollm2-135m-instruct"
        )
    try:
        train, _ = split_problems(cfg.seed, cfg.n_eval)
    except ValueError as err:
        raise ConfigError(f"{err}; fix: hold out fewer") from None
    if cfg.prompts_per_step > len(train):
        raise ConfigError(
            f"prompts_per_step={cfg.prompts_per_step!r}: exceeds the {len(train)} training "
            "word problems"
        )


def load(cfg: GRPOConfig) -> Task:
    """The task for `cfg.model` (a named pretrained model, a local directory or a hub id): its
    tokenizer's chat template makes the prompts."""
    from transformers import AutoTokenizer

    from grpo.pretrained import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.model), local_files_only=True)
    return word_problem_task(tokenizer, seed=cfg.seed, n_eval=cfg.n_eval)
