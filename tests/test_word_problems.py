"""The word-problem task: generated records, disjoint balanced splits, chat-template prompts with
the real SmolLM2 tokenizer (read from the GGUF file in the venv), `#### N` scoring and rewards."""

from collections import Counter

import pytest

from grpo.cli import check_run
from grpo.config import ConfigError, GRPOConfig
from grpo.reward_funcs import build_reward_functions
from grpo.rewards import MissingColumnError, combine_rewards
from grpo.tasks import TASK_MODULES, check_task, load_task
from grpo.tasks import word_problems as wp


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from grpo.pretrained import gguf_path

    path = gguf_path("smollm2-135m-instruct")
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_problems_have_whole_positive_answers_by_their_formula():
    problems = wp.all_problems()
    assert len(problems) == len(set(problems)) == 12033
    assert Counter(p.kind for p in problems) == {
        "add": 4802,
        "subtract": 2 * sum(range(9, 60)),  # b in 1..a-1 for a in 10..60
        "multiply": 308,
        "divide": 308,
        "two_step": 2647 + 5 * 5 * 20,  # c every 3rd of 1..a+b-1; then a b + c
    }
    assert wp.Problem("add", 0, (23, 10)).answer == 33
    assert wp.Problem("subtract", 1, (60, 59)).answer == 1
    assert wp.Problem("divide", 0, (84, 12)).answer == 7
    assert wp.Problem("two_step", 0, (13, 9, 10)).answer == 12
    assert wp.Problem("two_step", 1, (4, 6, 3)).answer == 27
    assert min(p.answer for p in problems) >= 1


def test_splits_share_no_problem_and_are_balanced():
    train, held_out = wp.split_problems(seed=0, n_eval=300)
    assert len(held_out) == 300 and len(train) == 5 * (308 - 60)
    assert not set(train) & set(held_out)
    assert Counter(p.kind for p in held_out) == dict.fromkeys(wp.KINDS, 60)
    assert Counter(p.kind for p in train) == dict.fromkeys(wp.KINDS, 248)
    assert [p.kind for p in held_out[:5]] == list(wp.KINDS)  # interleaved: examples vary
    assert wp.split_problems(seed=0, n_eval=300) == (train, held_out)  # a function of the seed
    assert wp.split_problems(seed=1, n_eval=300)[1] != held_out
    with pytest.raises(ValueError, match="n_eval=5000"):
        wp.split_problems(n_eval=5000)


def test_prompts_go_through_the_chat_template(tokenizer):
    task = wp.word_problem_task(tokenizer, seed=0, n_eval=300)
    record = task.eval[0]
    assert record["prompt"] == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        f"Face<|im_end|>\n<|im_start|>user\n{record['question']}\n{wp.INSTRUCTION}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert record["kind"] == "add" and record["answer"].isdigit()
    questions = {r["question"] for r in task.train}
    assert not questions & {r["question"] for r in task.eval}
    assert len(task.train) == 1240 and len(task.eval) == 300


def test_final_answer_and_well_formed_lines():
    assert wp.final_answer("23 + 10 = 33\n#### 33") == "33"
    assert wp.final_answer("#### 39\n#### 39\n#### 40") == "40"  # the last #### line
    assert wp.final_answer("#### $1,200.") == "$1,200"  # the number as written
    assert wp.final_answer("So she has 12 left.") == "12"  # no ####: the last number
    assert wp.final_answer("####") is None and wp.final_answer("no idea") is None
    assert wp.is_right("#### 1,200", "1200") and not wp.is_right("#### 12", "13")
    assert wp.has_answer_line("13 - 1 = 12\n\n#### 12\n")
    for bad in ("#### 12 apples", "#### 12\n#### 12", "#### 12\nThat is all.", "12", "####"):
        assert not wp.has_answer_line(bad), bad
    with pytest.raises(ValueError, match="'many' is not a number"):
        wp.is_right("#### 3", "many")


def test_rewards_through_the_trainers_combiner():
    fns, weights = build_reward_functions(
        ["correctness", "answer_format", "overlong"],
        [1.0, 0.5, 0.5],
        wp.REWARDS,
        max_completion_length=96,
        cache_length=32,
    )
    completions = ["7 * 4 = 28\n#### 28", "#### 28\n#### 28", "#### 27", "7 * 4 = 28 so"]
    total, parts = combine_rewards(
        fns,
        weights,
        ["Q"] * 4,
        completions,
        answer=["28"] * 4,
        completion_lengths=[12, 96, 80, 96],
        truncated=[False, True, False, True],
    )
    assert parts["correctness"].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert parts["answer_format"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert parts["overlong"].tolist() == [0.0, -1.0, -0.5, -1.0]
    assert total.tolist() == [1.5, 0.5, 0.25, 0.5]
    with pytest.raises(MissingColumnError, match="'truncated'"):
        wp.answer_format_reward(["Q"], ["#### 1"], answer=["1"])


def test_worked_answer_pays_a_calculation_whose_result_is_the_answer():
    completions = [
        "Tom has 7 * 4 = 28 apples.\n#### 28",  # worked, right
        "7 + 4 = 11\n#### 11",  # worked, wrong: still paid (the form, not the value)
        "#### 28",  # a bare guess
        "7 * 4 = 27\n#### 28",  # the answer is not the calculation's result
        "7 * 4 = 28\n#### 28",  # cut off at the length limit
        "7 * 4 = 28\n#### 28\n#### 28",  # two answer lines
    ]
    got = wp.worked_answer_reward(
        ["Q"] * 6, completions, truncated=[False, False, False, False, True, False]
    )
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_task_scores_and_loads_through_the_registry(tokenizer, tmp_path):
    task = wp.word_problem_task(tokenizer, seed=0, n_eval=10)
    gold = task.eval[0]["answer"]
    assert task.is_correct(f"#### {gold}", gold) and not task.is_correct("#### -1", gold)
    assert task.accuracy([f"#### {gold}", "#### -1"], task.eval[:2]) == 0.5
    assert TASK_MODULES["word_problems"] == "grpo.tasks.word_problems"
    assert task.rewards is wp.REWARDS
    assert set(wp.REWARDS) == {"correctness", "answer_format", "worked_answer"}
    tokenizer.save_pretrained(tmp_path / "model")  # `load` reads the model's own tokenizer
    cfg = GRPOConfig(model=str(tmp_path / "model"), task="word_problems", n_eval=10)
    loaded = load_task(cfg)
    assert (loaded.train, loaded.eval) == (task.train, task.eval)
    with pytest.raises(ValueError, match="chat template"):
        wp.word_problem_task(type("Plain", (), {"chat_template": None})(), n_eval=10)


def test_config_checks_name_the_bad_field():
    with pytest.raises(ConfigError, match="chat template.*smollm2-135m-instruct"):
        check_run(GRPOConfig(task="word_problems"))  # the tiny model has none
    cfg = {"model": "org/some-instruct", "task": "word_problems"}
    with pytest.raises(ConfigError, match=r"^n_eval=1536 must be between 1 and 1535"):
        check_task(GRPOConfig(**cfg, n_eval=1535 + 1))
    with pytest.raises(ConfigError, match=r"^prompts_per_step=1241: exceeds the 1240"):
        check_task(GRPOConfig(**cfg, n_eval=300, prompts_per_step=1241))
    with pytest.raises(ConfigError, match="reward 'digits' is unknown; choose from correctness, "
                       "answer_format, worked_answer, overlong"):  # fmt: skip
        check_run(GRPOConfig(**cfg, n_eval=300))  # the default rewards are arithmetic's
