"""grpo/evaluate.py: greedy accuracy is the share of completions whose answer is the gold one."""

import pytest

from grpo.evaluate import evaluate, evaluate_distributed
from grpo.policy import load_model
from grpo.tasks import Task
from grpo.tasks.answers import answer_value, is_correct

TASK = Task("arithmetic", train=[], eval=[], correct=is_correct)  # scores by the gold answer


@pytest.fixture(scope="module")
def model_and_records(tiny_model_dir):
    """A random tiny Phi and 40 prompts; the gold answers are set from its own greedy output."""
    model, tokenizer = load_model(tiny_model_dir)
    prompts = [f"{a:02d}+{b:02d}=" for a in range(10, 90, 9) for b in range(3, 80, 17)][:40]
    _, completions = evaluate(
        model, tokenizer, TASK, [{"prompt": p, "answer": "0"} for p in prompts], max_new_tokens=8
    )
    numbered = [(p, answer_value(c)) for p, c in zip(prompts, completions, strict=True)]
    numbered = [(p, v) for p, v in numbered if v is not None]
    assert len(numbered) >= 4, completions  # enough completions that carry a number
    # Half right (the number it writes), half wrong (that number + 1).
    records = [
        {"prompt": p, "answer": str(v if i % 2 == 0 else v + 1)}
        for i, (p, v) in enumerate(numbered)
    ]
    return model, tokenizer, records


def test_accuracy_counts_the_right_answers(model_and_records):
    model, tokenizer, records = model_and_records
    accuracy, completions = evaluate(model, tokenizer, TASK, records, max_new_tokens=8)
    assert len(completions) == len(records)
    assert accuracy == sum(i % 2 == 0 for i in range(len(records))) / len(records)


def test_batching_and_the_distributed_share_change_nothing(model_and_records):
    model, tokenizer, records = model_and_records
    whole = evaluate(model, tokenizer, TASK, records, max_new_tokens=8)
    assert evaluate(model, tokenizer, TASK, records, max_new_tokens=8, batch_size=3) == whole
    assert evaluate_distributed(model, tokenizer, TASK, records, max_new_tokens=8) == whole


def test_no_records_is_zero_not_a_division_error(model_and_records):
    model, tokenizer, _ = model_and_records
    assert evaluate(model, tokenizer, TASK, [], max_new_tokens=8) == (0.0, [])
