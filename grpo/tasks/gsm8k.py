"""GSM8K: grade-school maths word problems for Phi-2.

From the hub (`openai/gsm8k`, config "main") or a local JSONL/parquet file with the same columns:
`question`, and `answer` whose last line is `#### 42`. Prompts use Phi-2's plain
"Instruct: ... Output:" style and ask for the final number inside <answer></answer>. A completion is
right when that number equals the gold one (`grpo.tasks.answers.is_correct`); the rewards are
`correctness` and `format` (the answer tags are well formed).
"""

from __future__ import annotations

from pathlib import Path

from grpo.config import ConfigError, GRPOConfig
from grpo.tasks import Task
from grpo.tasks.answers import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    correctness_reward,
    gold_answer,
    is_correct,
    parse_number,
)

GSM8K_INSTRUCTION = (
    "Solve the problem. Think step by step, then give only the final number inside "
    "<answer></answer>."
)
DATASET_SUFFIXES = (".jsonl", ".json", ".parquet")  # a local GSM8K-format file, not a hub id


class DatasetLoadError(RuntimeError):
    """The dataset is neither a local file nor reachable on the hub; the CLI prints one line."""


def _is_well_formatted(text: str) -> bool:
    """See `format_reward`. Counting literal tags (rather than one big regex) makes every rule
    explicit, and is multi-line safe by construction."""
    if text.count(ANSWER_OPEN) != 1 or text.count(ANSWER_CLOSE) != 1:
        return False
    start, end = text.index(ANSWER_OPEN), text.index(ANSWER_CLOSE)
    if end < start or not text[start + len(ANSWER_OPEN) : end].strip():
        return False
    n_think = (text.count(THINK_OPEN), text.count(THINK_CLOSE))
    if n_think == (0, 0):
        return True
    return n_think == (1, 1) and text.index(THINK_OPEN) < text.index(THINK_CLOSE) < start


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
        return Task(
            "gsm8k",
            train=records[:-k],
            eval=records[-k:],
            correct=is_correct,
            rewards=REWARDS,
            answer_tags=True,
        )
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
        correct=is_correct,
        rewards=REWARDS,
        answer_tags=True,
    )


REWARDS = {"correctness": correctness_reward, "format": format_reward}


def check(cfg: GRPOConfig) -> None:
    """A model that can read English, and a local dataset file that exists (nothing is read)."""
    if cfg.model == "tiny":
        raise ConfigError(
            "task='gsm8k': the tiny model only knows the arithmetic task; set model to a Phi-2 "
            "path/id for gsm8k"
        )
    path = Path(cfg.dataset_path)
    if path.suffix in DATASET_SUFFIXES and not path.is_file():
        raise ConfigError(
            f"dataset_path={cfg.dataset_path!r}: no such file; pass a GSM8K-format "
            ".jsonl/.parquet or a hub id"
        )


def load(cfg: GRPOConfig) -> Task:
    return gsm8k_task(cfg.dataset_path or "openai/gsm8k", n_eval=cfg.n_eval)
