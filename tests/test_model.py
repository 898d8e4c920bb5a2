import os
import subprocess
import sys

import pytest
import torch

from grpo.model import ModelLoadError, load_model, resolve_dtype


def test_load_local_dir_sets_pad_and_dtype(tiny_model_dir):
    model, tok = load_model(tiny_model_dir, "bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tok.pad_token is not None and tok.padding_side == "left"
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_missing_local_path_names_model_and_fix(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model.*no config.json.*save_pretrained"):
        load_model(missing)


def test_unreachable_hub_id_names_model_and_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load_model("nobody-here/not-a-model-xyz")
    msg = str(err.value)
    assert "nobody-here/not-a-model-xyz" in msg
    assert "huggingface-cli download nobody-here/not-a-model-xyz" in msg
    assert "\n" not in msg


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype='int8'"):
        resolve_dtype("int8")


def test_cli_turns_missing_model_into_one_line_and_exit_2(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpo.train",
            "--model",
            "nobody-here/not-a-model-xyz",
            "--task",
            "arithmetic",
            "--output_dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1 and "huggingface-cli download" in err_lines[0]
    assert "Traceback" not in proc.stderr


def test_output_head_gets_a_contiguous_input(tiny_model_dir):
    """logits_to_keep hands lm_head a strided slice; the loader's pre-hook makes it contiguous,
    so torch folds it into one matmul instead of copying the weight once per row."""
    model, _ = load_model(tiny_model_dir)
    seen = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        model(torch.randint(4, 90, (3, 9)), logits_to_keep=2)
    assert seen == [True]
