"""Tests for grpo/tasks/gsm8k.py: prompts, local and hub loading, gold checks, the format reward."""

import json

import pytest

from grpo.config import GRPOConfig
from grpo.tasks import load_task
from grpo.tasks.answers import correctness_reward
from grpo.tasks.gsm8k import DatasetLoadError, format_reward, gsm8k_prompt, gsm8k_task

MULTILINE = (
    "<think>\nFirst, 6 * 7.\nThat is 40 + 2.\n\nSo the result is 42.\n</think>\n"
    "<answer>\n42\n</answer>"
)


@pytest.mark.parametrize(
    "completion",
    [
        "<answer>42</answer>",
        MULTILINE,
        "Let me think.\nStep 1: 6 * 7.\nStep 2: done.\n<answer>42</answer>",
        "<think>short</think><answer>not a number, still formatted</answer>",
        "<answer>\nmulti\nline\n</answer>",
        "<answer>42</answer>\nExercise 2: ...",  # trailing text is allowed
    ],
)
def test_format_good(completion):
    assert format_reward(["Q"], [completion]) == [1.0]


@pytest.mark.parametrize(
    "completion",
    [
        "42",
        "",
        "<answer>42",  # unclosed
        "42</answer>",  # unopened
        "</answer>42<answer>",  # closed before opened
        "<answer></answer>",  # empty
        "<answer> \n\t </answer>",  # whitespace only
        "<answer>4</answer><answer>2</answer>",  # duplicated
        "<answer><answer>42</answer></answer>",  # nested
        "<answer>1 <answer>42</answer>",  # stray opening tag
        "<think>\nreasoning\n<answer>42</answer>",  # think unclosed
        "reasoning</think>\n<answer>42</answer>",  # think unopened
        "<answer>42</answer><think>late</think>",  # think after the answer
        "<think>a</think><think>b</think><answer>42</answer>",  # two think blocks
        "<think>a <answer>42</answer></think>",  # answer inside think
        "<ANSWER>42</ANSWER>",  # tags are case-sensitive
        "< answer >42</ answer >",
    ],
)
def test_format_bad(completion):
    assert format_reward(["Q"], [completion]) == [0.0]


# --- overlong penalty --------------------------------------------------------------------------


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
    cfg = GRPOConfig(task="gsm8k", model="microsoft/phi-2", dataset_path=str(path), n_eval=3)
    assert load_task(cfg).eval[0]["answer"] == "8"


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
        load_task(GRPOConfig(task="chess"))


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
    assert not load_task(GRPOConfig(n_eval=5)).answer_tags
