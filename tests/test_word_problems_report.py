"""bench/word_problems_report.py: the per-side figures on hand-counted completions, and a run
directory that cannot be reported on refused in one line."""

import pytest

from bench.word_problems_report import main, side_figures, tuned_completions
from grpo.tasks import Task
from grpo.tasks.word_problems import REWARDS, is_right
from grpo.tiny.build import build_char_tokenizer


def test_side_figures_count_by_hand():
    records = [
        {"prompt": "p0", "answer": "5", "kind": "add"},
        {"prompt": "p1", "answer": "3", "kind": "sub"},
        {"prompt": "p2", "answer": "1", "kind": "sub"},
    ]
    task = Task("word_problems", records, records, is_right, REWARDS)
    completions = [
        "#### 5",  # 6 tokens (one a character) + end token = 7; well formed, right
        "2\n#### 3",  # 8 tokens = the limit: cut off, so not well formed, though right
        "abc",  # 3 + end token = 4; no answer line, wrong
    ]
    figures = side_figures(task, build_char_tokenizer(), completions, max_new_tokens=8)
    assert figures == {
        "accuracy": pytest.approx(2 / 3),
        "well_formed": pytest.approx(1 / 3),
        "mean_length": pytest.approx((7 + 8 + 4) / 3),
        "truncated": pytest.approx(1 / 3),
        "accuracy_by_kind": {"add": 1.0, "sub": 0.5},
    }


def test_a_directory_without_a_run_is_refused_in_one_line(tmp_path, capsys):
    assert main(["--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path} has no config.yaml and eval_before.json; train it first\n"


def test_the_tuned_side_is_read_from_the_file_of_its_adapter(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval_after.json").write_text('{"accuracy": 0.5, "completions": ["#### 1", "2"]}')
    assert tuned_completions(run, None, False, None, None) == ["#### 1", "2"]
    checkpoint = str(run / "checkpoints" / "step-000010" / "adapter")
    with pytest.raises(FileNotFoundError, match="eval_after_step-000010.json is missing; pass --e"):
        tuned_completions(run, checkpoint, False, None, None)
