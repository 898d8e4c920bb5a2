import json

import pytest
from conftest import run_cli_bad_input

from grpo.cli import check_run
from grpo.config import GRPOConfig
from grpo.tiny.warmup_curve import main, warmup_curve

pytestmark = pytest.mark.slow  # trains, spawns processes, builds the kernel or drives a browser


def test_curve_rows_every_k_steps_and_the_last(tmp_path):
    cfg = check_run(
        GRPOConfig(output_dir=str(tmp_path), n_eval=16, warmup_sft_batch_size=4, torch_threads=1)
    )
    rows = warmup_curve(cfg, steps=5, every=2, log=lambda m: None)
    assert [r["step"] for r in rows] == [2, 4, 5]
    for r in rows:
        assert set(r) == {"step", "train_probe", "accuracy_dense", "accuracy_nf4"}
        assert all(0.0 <= r[k] <= 1.0 for k in ("train_probe", "accuracy_dense", "accuracy_nf4"))


def test_main_writes_the_jsonl_atomically(tmp_path, capsys):
    main(
        ["--steps", "2", "--every", "1", "--output_dir", str(tmp_path), "--n_eval", "8"]
        + ["--warmup_sft_batch_size", "2", "--torch_threads", "1"]
    )
    lines = (tmp_path / "warmup_curve.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["warmup_curve.jsonl"]  # no temp file left
    assert "step     2  train probe" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "--steps 0 --every 50: both must be positive integers"),
        (["--model", "microsoft/phi-2"], "model='microsoft/phi-2': the warm-up curve is for"),
        (["--arithmetic_format", "words"], "arithmetic_format='words': must be one of"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    out = tmp_path / "curve"
    assert message in run_cli_bad_input("grpo.tiny.warmup_curve", "--output_dir", str(out), *args)
    assert not out.exists()
