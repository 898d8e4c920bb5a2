"""Tests for bench/results.py: the README's results block, rendered from a run directory."""

import json

import pytest
import yaml

from bench.results import (
    END,
    START,
    ReadmeError,
    main,
    render,
    replace_block,
    rewrite_block,
    update_readme,
)

SUMMARY = {
    "quantize": True,
    "use_lora": True,
    "accuracy_before": 0.42,
    "accuracy_after": 0.836,
    "accuracy_dense_base": 0.446,
    "n_eval": 500,
    "grpo_steps": 1000,
    "grpo_seconds": 301.4,
    "total_seconds": 402.6,
    "torch_threads": 2,
    "machine": {"cpu_model": "Example CPU 9000", "cpu_count": 3, "torch_threads": 2},
    "trainable_parameters": 147_456,
    "total_parameters": 962_906,
    "bytes": 1_111_111,
}
CONFIG = {"max_steps": 1000, "learning_rate": 0.0005, "seed": 0, "lora_r": 8, "quantize": True}


def write_run(run, evals=True, summary=SUMMARY, config=CONFIG):
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if evals:
        (run / "eval.jsonl").write_text(
            '{"step": 200, "accuracy": 0.75}\n{"step": 400, "accuracy": 0.776}\n'
        )
    return run


def test_render_has_every_figure_from_the_run(tmp_path):
    text = render(write_run(tmp_path / "run"))
    assert "| warm-up model, unquantized (for reference) | 44.6% |" in text
    assert "| **before GRPO**: the NF4 base GRPO starts from | **42.0%** |" in text
    assert "| **after GRPO** (1000 steps, LoRA r=8 on the NF4 base) | **83.6%** |" in text
    assert "| gain | +41.6 points |" in text
    assert "| during GRPO (`eval.jsonl`) | step 200: 75.0%, step 400: 77.6% |" in text
    assert "| whole run (`total_seconds`) | 403 |" in text
    assert "Config: max_steps=1000, learning_rate=0.0005, lora_r=8." in text
    assert "during GRPO" not in render(write_run(tmp_path / "bare", evals=False))


def test_the_machine_and_the_method_come_from_the_run_not_from_constants(tmp_path):
    text = render(write_run(tmp_path / "run"))
    assert "on Example CPU 9000, 3 cores, 2 torch threads;" in text
    assert "2-core" not in text
    dense = {**SUMMARY, "quantize": False, "machine": {"cpu_model": "Other", "cpu_count": 1}}
    text = render(write_run(tmp_path / "dense", summary=dense, config={**CONFIG, "dtype": "bf16"}))
    assert "on Other, 1 core;" in text and "NF4" not in text
    assert "| **before GRPO**: the bf16 base GRPO starts from | **42.0%** |" in text
    full = {**dense, "use_lora": False}
    text = render(write_run(tmp_path / "full", summary=full, config={"dtype": "float32"}))
    assert "(1000 steps, full fine-tuning of the float32 model)" in text
    old = {k: v for k, v in SUMMARY.items() if k != "machine"}
    text = render(write_run(tmp_path / "old", summary=old))
    assert "on a machine the run did not record (2 torch thread(s));" in text


def test_update_readme_replaces_only_the_marked_block(tmp_path):
    run = write_run(tmp_path / "run")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nold figures\n{END}\noutro\n")
    update_readme(readme, run)
    text = readme.read_text()
    assert text.startswith(f"intro\n{START}\nMeasured by the run in") and text.endswith(
        f"{END}\noutro\n"
    )
    assert "old figures" not in text and "**83.6%**" in text
    update_readme(readme, run)  # idempotent
    assert readme.read_text() == text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
    readme.write_text("no markers")
    with pytest.raises(ReadmeError, match="results:start"):
        update_readme(readme, run)
    assert readme.read_text() == "no markers"


@pytest.mark.parametrize(
    "text, match",
    [
        ("a\n<s>\nb\n", "found 1 and 0"),
        ("<s>\n<e>\n<s>\n<e>\n", "found 2 and 2"),
        ("<e>\n<s>\n", "before"),
        ("a <s> b\n<e>\n", "stand alone"),
    ],
)
def test_replace_block_refuses_bad_markers(text, match):
    with pytest.raises(ReadmeError, match=match):
        replace_block(text, "<s>", "<e>", "new")


def test_replace_block_keeps_other_blocks_and_empty_bodies():
    text = "x\n<s>\nold\n<e>\nmid\n<S2>\nkeep\n<E2>\nend"
    once = replace_block(text, "<s>", "<e>", "\nnew 1\nnew 2\n\n")
    assert once == "x\n<s>\nnew 1\nnew 2\n<e>\nmid\n<S2>\nkeep\n<E2>\nend"
    assert replace_block(once, "<s>", "<e>", "") == "x\n<s>\n<e>\nmid\n<S2>\nkeep\n<E2>\nend"


def test_rewrite_block_names_a_missing_file(tmp_path):
    with pytest.raises(ReadmeError, match="does not exist"):
        rewrite_block(tmp_path / "none.md", "<s>", "<e>", "x")


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "make train" in err
    run = write_run(tmp_path / "run")
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    assert main([str(run), str(readme)]) == 2
    assert "results:start" in capsys.readouterr().err
    readme.write_text(f"{START}\n{END}\n")
    assert main([str(run), str(readme)]) == 0
    assert "83.6%" in readme.read_text()
