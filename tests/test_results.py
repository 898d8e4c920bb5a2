import json

import pytest

from grpo.results import END, START, render, update_readme

SUMMARY = {
    "accuracy_before": 0.42,
    "accuracy_after": 0.836,
    "accuracy_dense_base": 0.446,
    "n_eval": 500,
    "grpo_steps": 1000,
    "grpo_seconds": 301.4,
    "total_seconds": 402.6,
    "torch_threads": 2,
    "trainable_parameters": 147_456,
    "total_parameters": 962_906,
    "bytes": 1_111_111,
}


def write_run(run, evals=True):
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(SUMMARY))
    (run / "config.yaml").write_text("max_steps: 1000\nlearning_rate: 0.0005\nseed: 0\n")
    if evals:
        (run / "eval.jsonl").write_text(
            '{"step": 200, "accuracy": 0.75}\n{"step": 400, "accuracy": 0.776}\n'
        )
    return run


def test_render_has_every_figure_from_the_run(tmp_path):
    text = render(write_run(tmp_path / "run"))
    assert "| warm-up model, unquantized (for reference) | 44.6% |" in text
    assert "| **before GRPO**: the NF4 base GRPO starts from | **42.0%** |" in text
    assert "| **after GRPO** (1000 steps, LoRA on NF4) | **83.6%** |" in text
    assert "| gain | +41.6 points |" in text
    assert "| during GRPO (`eval.jsonl`) | step 200: 75.0%, step 400: 77.6% |" in text
    assert "| whole run (`total_seconds`) | 403 |" in text and "2 torch thread(s)" in text
    assert "Config: max_steps=1000, learning_rate=0.0005." in text
    assert "during GRPO" not in render(write_run(tmp_path / "bare", evals=False))


def test_update_readme_replaces_only_the_marked_block(tmp_path):
    run = write_run(tmp_path / "run")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nold figures\n{END}\noutro\n")
    update_readme(readme, run)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{END}\noutro\n")
    assert "old figures" not in text and "**83.6%**" in text
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="markers"):
        update_readme(readme, run)
