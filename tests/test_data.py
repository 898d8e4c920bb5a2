import json

import pytest

from grpo.data import (
    DatasetLoadError,
    arithmetic_answer,
    arithmetic_prompt,
    arithmetic_task,
    gsm8k_prompt,
    gsm8k_task,
    load_task,
)
from grpo.rewards import correctness_reward


def test_arithmetic_split_is_disjoint_seeded_and_correct():
    task = arithmetic_task(seed=0, n_eval=500)
    assert len(task.eval) == 500 and len(task.train) == 20_000 - 500
    assert not {r["prompt"] for r in task.eval} & {r["prompt"] for r in task.train}
    assert arithmetic_task(seed=0).eval == task.eval
    assert arithmetic_task(seed=1).eval != task.eval
    for r in task.eval[:50] + task.train[:50]:
        a, op, b = int(r["prompt"][:2]), r["prompt"][2], int(r["prompt"][3:5])
        assert int(r["answer"]) == (a + b if op == "+" else a - b)
        assert len(r["prompt"]) == 6 and len(r["answer"]) == 4 and r["answer"][0] in "+-"


def test_arithmetic_fixed_width_format():
    assert arithmetic_prompt(47, "+", 5) == "47+05=" and arithmetic_prompt(0, "-", 99) == "00-99="
    assert [arithmetic_answer(v) for v in (52, -7, 0, 198, -99)] == [
        "+052",
        "-007",
        "+000",
        "+198",
        "-099",
    ]
    small = arithmetic_task(seed=0, n_eval=10, max_operand=9)  # one-digit operands: "7+5=" "+12"
    assert len(small.train) + len(small.eval) == 200
    assert all(len(r["prompt"]) == 4 and len(r["answer"]) == 3 for r in small.train)


def test_gsm8k_prompt():
    p = gsm8k_prompt("  What is 2+2? ")
    assert p.startswith("Instruct: ") and p.endswith("What is 2+2?\nOutput:")


def test_gsm8k_local_jsonl(tmp_path):
    path = tmp_path / "gsm.jsonl"
    rows = [
        {"question": f"What is {i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"} for i in range(10)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = gsm8k_task(str(path), n_eval=2)
    assert len(task.train) == 8 and [r["answer"] for r in task.eval] == ["9", "10"]
    assert load_task("gsm8k", dataset_path=str(path), n_eval=3).eval[0]["answer"] == "8"


def test_gsm8k_unreachable_hub_dataset_is_one_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nobody/nothing' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetLoadError, match=r"'nobody/nothing'.*--dataset_path FILE.jsonl"):
        gsm8k_task("nobody/nothing")


def test_gsm8k_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        gsm8k_task(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"q": "x", "a": "#### 1"}) + "\n" + json.dumps({"q": "y", "a": "#### 2"})
    )
    with pytest.raises(ValueError, match="need 'question' and 'answer'"):
        gsm8k_task(str(bad))
    with pytest.raises(ValueError, match="task='chess'"):
        load_task("chess")


@pytest.mark.parametrize(
    "answer, message",
    [
        ("She has 7 apples.", r"row 1: answer has no '#### <number>' line"),
        ("She has 7.\n#### seven", r"row 1: final answer 'seven' after '####' is not a number"),
    ],
)
def test_gsm8k_gold_answers_are_checked_at_load(tmp_path, answer, message):
    path = tmp_path / "gsm.jsonl"
    rows = [{"question": "q0", "answer": "#### 1"}, {"question": "q1", "answer": answer}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=message):
        gsm8k_task(str(path), n_eval=1)


def test_the_task_scores_with_the_gold_parser_the_reward_uses(tmp_path):
    path = tmp_path / "gsm.jsonl"
    rows = [
        {"question": "How many?", "answer": "Half of 2,468 is 1,234.\n#### 1,234"},
        {"question": "And now?", "answer": "It is 12 - 20 = -8.\n####   -8  "},
        {"question": "Last?", "answer": "#### 3"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = gsm8k_task(str(path), n_eval=1)
    assert task.answer_tags and [r["answer"] for r in task.train] == ["1,234", "-8"]
    gold = task.train[0]["answer"]
    assert task.is_correct("<answer>1234</answer>", gold)
    assert task.is_correct("so the answer is $1,234.", gold)
    assert not task.is_correct("<answer>1,243</answer>", gold)
    assert task.accuracy(["<answer>1234</answer>", "-8.0", "4"], task.train + task.eval) == 2 / 3
    assert correctness_reward(
        ["q"] * 2, ["<answer>1234</answer>", "<answer>-8</answer>"], answer=["1,234", "-8"]
    ) == [1.0, 1.0]
    assert not arithmetic_task(n_eval=5).answer_tags
