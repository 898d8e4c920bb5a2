"""Tasks: lists of `{"prompt", "answer"}` records with a train split and a held-out eval split.

Two tasks ship:

- `arithmetic`: two-digit addition and subtraction for the tiny Phi ("47+05=" -> "+052"), generated
  from a seed, in a fixed-width format (see `arithmetic_prompt`). Every problem (a, op, b) lives in
  exactly one split, so the held-out accuracy is measured on problems the model never trained on,
  in the warm-up or in GRPO.
- `gsm8k`: grade-school maths word problems for Phi-2, from the hub (`openai/gsm8k`, config "main")
  or from a local JSONL/parquet file with the same columns: `question`, and `answer` whose last line
  is `#### 42`. Prompts use Phi-2's plain "Instruct: ... Output:" style.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from grpo.choices import ARITHMETIC_FORMATS, TASKS
from grpo.rewards import gold_answer, is_correct, parse_number

ARITHMETIC_OPS = ("+", "-")

GSM8K_INSTRUCTION = (
    "Solve the problem. Think step by step, then give only the final number inside "
    "<answer></answer>."
)


DATASET_SUFFIXES = (".jsonl", ".json", ".parquet")  # a local GSM8K-format file, not a hub id


class DatasetLoadError(RuntimeError):
    """The dataset is neither a local file nor reachable on the hub; the CLI prints one line."""


@dataclass
class Task:
    """A task's records and how a completion of one is judged. The task owns its scoring: the
    trainer's sampled accuracy, the held-out evaluation and the demo all ask `is_correct`.

    >>> task = arithmetic_task(seed=0, n_eval=2)
    >>> gold = task.eval[0]["answer"]; task.eval[0]
    {'prompt': '30+03=', 'answer': '+033'}
    >>> task.is_correct("+033", gold), task.is_correct("33", gold), task.is_correct("+034", gold)
    (True, True, False)
    >>> task.accuracy(["+033", "?"], task.eval), task.answer_tags
    (0.5, False)
    """

    name: str
    train: list[dict]  # {"prompt": str, "answer": str}
    eval: list[dict]
    # The prompts ask for the final answer inside <answer></answer>, so a completion's format
    # means something (GSM8K); the bare arithmetic task has no format to judge.
    answer_tags: bool = False

    def is_correct(self, completion: str, answer: str) -> bool:
        """Whether `completion`'s final answer equals the gold `answer` (a record's "answer")
        numerically: the rule of the `correctness` reward (`grpo.rewards.is_correct`)."""
        return is_correct(completion, answer)

    def accuracy(self, completions: list[str], records: list[dict]) -> float:
        """The fraction of `completions` that answer their `records` correctly."""
        correct = [
            self.is_correct(c, r["answer"]) for c, r in zip(completions, records, strict=True)
        ]
        return sum(correct) / max(1, len(records))


def arithmetic_prompt(a: int, op: str, b: int, width: int = 2) -> str:
    """The tiny model's prompt, the bare expression with zero-padded operands:
    arithmetic_prompt(47, "+", 5) == "47+05=" (width=0: unpadded, "47+5=").

    Fixed width puts every digit at the same position in every problem (the units digits of the
    operands are always characters 1 and 4), so a 0.8M-parameter model can find them by position.
    With unpadded operands ("47+5=") the same model needed about twice the supervised warm-up to
    reach the same accuracy (see the README, "Why a fixed-width format").
    """
    if width == 0:
        return f"{a}{op}{b}="
    return f"{a:0{width}d}{op}{b:0{width}d}="


def arithmetic_answer(value: int, width: int = 2) -> str:
    """The gold answer: a sign and width + 1 digits, so every answer digit has a fixed position too:
    arithmetic_answer(52) == "+052", arithmetic_answer(-7) == "-007". Rewards compare numerically,
    so "52" is just as correct; this is only the form the warm-up teaches. width=0: str(value)."""
    if width == 0:
        return str(value)
    return f"{value:+0{width + 2}d}"


def arithmetic_problem_count(max_operand: int = 99) -> int:
    """Distinct problems a op b with 0 <= a, b <= max_operand: 2 * 100 * 100 = 20,000 for 99."""
    return len(ARITHMETIC_OPS) * (max_operand + 1) ** 2


def arithmetic_task(
    seed: int = 0, n_eval: int = 500, max_operand: int = 99, fmt: str = "fixed"
) -> Task:
    """All problems a op b with 0 <= a, b <= max_operand, shuffled by `seed`, split disjointly.

    With max_operand=99 there are 2 * 100 * 100 = 20,000 problems; `n_eval` of them are held out.
    fmt="fixed": operands zero-padded to the width of `max_operand`, answers signed and one digit
    wider ("07+35=" -> "+042"); fmt="plain": "7+35=" -> "42", for comparison.
    """
    if fmt not in ARITHMETIC_FORMATS:
        raise ValueError(f"arithmetic format {fmt!r} is unknown; use one of {ARITHMETIC_FORMATS}")
    if not 0 < n_eval < arithmetic_problem_count(max_operand):
        raise ValueError(f"n_eval={n_eval} must be between 1 and the number of problems - 1")
    problems = [
        (a, op, b)
        for a in range(max_operand + 1)
        for b in range(max_operand + 1)
        for op in ARITHMETIC_OPS
    ]
    random.Random(seed).shuffle(problems)
    width = len(str(max_operand)) if fmt == "fixed" else 0

    def record(p):
        a, op, b = p
        value = a + b if op == "+" else a - b
        return {
            "prompt": arithmetic_prompt(a, op, b, width),
            "answer": arithmetic_answer(value, width),
        }

    return Task(
        "arithmetic",
        train=[record(p) for p in problems[n_eval:]],
        eval=[record(p) for p in problems[:n_eval]],
    )


def gsm8k_prompt(question: str) -> str:
    """Phi-2's QA format: `Instruct: <instruction> <question>\\nOutput:`."""
    return f"Instruct: {GSM8K_INSTRUCTION}\n{question.strip()}\nOutput:"


def _gsm8k_records(rows) -> list[dict]:
    records = []
    for i, row in enumerate(rows):
        if "question" not in row or "answer" not in row:
            raise ValueError(
                f"GSM8K row {i} has columns {sorted(row)}; need 'question' and 'answer' "
                "(answer ending in '#### <number>')"
            )
        if "####" not in row["answer"]:
            raise ValueError(
                f"GSM8K row {i}: answer has no '#### <number>' line: {row['answer'][-80:]!r}"
            )
        gold = gold_answer(row["answer"])  # the one gold parser, the one correctness uses
        if parse_number(gold) is None:
            raise ValueError(f"GSM8K row {i}: final answer {gold!r} after '####' is not a number")
        records.append({"prompt": gsm8k_prompt(row["question"]), "answer": gold})
    return records


def gsm8k_task(source: str = "openai/gsm8k", n_eval: int | None = None) -> Task:
    """GSM8K from a local .jsonl/.json/.parquet file (train split only: the last `n_eval` rows, or
    10%, are held out) or from the hub id `source` (its own train/test splits)."""
    from datasets import load_dataset

    path = Path(source)
    if path.suffix in DATASET_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(
                f"dataset file {source!r} does not exist; pass a GSM8K-format file"
            )
        kind = "parquet" if path.suffix == ".parquet" else "json"
        rows = list(load_dataset(kind, data_files=str(path), split="train"))
        records = _gsm8k_records(rows)
        k = n_eval if n_eval is not None else max(1, len(records) // 10)
        if not 0 < k < len(records):
            raise ValueError(f"n_eval={k} must be between 1 and {len(records) - 1} for {source!r}")
        return Task("gsm8k", train=records[:-k], eval=records[-k:], answer_tags=True)
    try:
        ds = load_dataset(source, "main")
    except OSError as err:  # FileNotFoundError, ConnectionError (offline, unreachable, missing)
        raise DatasetLoadError(
            f"dataset {source!r} is not a local .jsonl/.json/.parquet file and could not be loaded "
            f"from the hub ({type(err).__name__}); fix: `huggingface-cli download --repo-type "
            f"dataset {source}` on a machine with internet, or pass --dataset_path FILE.jsonl"
        ) from err
    test = _gsm8k_records(ds["test"])
    return Task(
        "gsm8k",
        train=_gsm8k_records(ds["train"]),
        eval=test[:n_eval] if n_eval else test,
        answer_tags=True,
    )


def load_task(
    name: str,
    *,
    seed: int = 0,
    n_eval: int | None = None,
    dataset_path: str = "",
    arithmetic_format: str = "fixed",
) -> Task:
    """`name` is "arithmetic" (in `arithmetic_format`) or "gsm8k" (then `dataset_path` is a hub id
    or a local file)."""
    if name == "arithmetic":
        return arithmetic_task(seed=seed, n_eval=n_eval or 500, fmt=arithmetic_format)
    if name == "gsm8k":
        return gsm8k_task(dataset_path or "openai/gsm8k", n_eval=n_eval)
    raise ValueError(f"task={name!r} is unknown; use one of {TASKS}")
