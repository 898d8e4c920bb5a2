"""bench/phi2_scale.py: the Phi-2 recipe's own trainer step on a Phi-2-shaped model cut to 2 layers
(every matrix at Phi-2's real shape), through the command a user runs, so it never rots."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.phi2_scale import synthetic_gsm8k

pytestmark = pytest.mark.slow  # trains, spawns processes, builds the kernel or drives a browser

PROMPTS, GENERATIONS, NEW_TOKENS = 2, 2, 8


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("phi2_scale") / "report.json"
    args = [
        sys.executable, "-m", "bench.phi2_scale", "--device", "cpu", "--layers", "2",
        "--steps", "2", "--prompts", str(PROMPTS), "--generations", str(GENERATIONS),
        "--new-tokens", str(NEW_TOKENS), "--micro-batch", "2", "--threads", "2", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    last = json.loads(done.stdout.strip().splitlines()[-1])
    return last, json.loads(out.read_text()), done.stderr


def test_last_line_is_the_summary(report):
    last, full, _ = report
    assert last["device"] == "cpu" and last["layers"] == 2
    assert last["step_seconds"] == full["step_seconds"] > 0
    assert last["peak_memory_gb"] == full["peak_memory_gb"]


def test_every_phase_of_every_step_is_timed_and_completions_have_the_forced_length(report):
    _, full, _ = report
    assert len(full["steps"]) == 2
    for step in full["steps"]:
        assert set(step["phases"]) == {"generation", "reference", "forward_backward", "optimizer"}
        m = step["metrics"]
        assert m["generated_tokens"] == PROMPTS * GENERATIONS * NEW_TOKENS  # min_new_tokens
        assert m["generation_seconds"] > 0 and m["forward_backward_seconds"] > 0
        parts = sum(m[f"{p}_seconds"] for p in step["phases"])
        assert parts <= m["step_seconds"] * 1.001


def test_memory_breakdown_adds_up_and_the_peak_is_near_it(report):
    _, full, _ = report
    bd = full["breakdown_gb"]
    # 2 blocks of Phi-2: 6 NF4 linears each (2560x2560 x4, 10240x2560 x2) at 4.127 bits/param,
    # + bf16 embeddings and lm_head (51,200 x 2,560 each) and lm_head's bias
    nf4 = 2 * (4 * 2560 * 2560 + 2 * 10240 * 2560) * 4.127 / 8 / 1e9
    dense = 2 * 51200 * 2560 * 2 / 1e9
    assert nf4 + dense < bd["model_gb"] < (nf4 + dense) * 1.02
    lora = 2 * 16 * (4 * (2560 + 2560) + 2 * (10240 + 2560)) * 4 / 1e9  # fp32 A and B
    assert bd["lora_gb"] == pytest.approx(lora, rel=1e-4)
    assert bd["optimizer_gb"] == pytest.approx(2 * lora, rel=1e-4)  # AdamW's two moments
    assert full["sum_of_parts_gb"] == pytest.approx(sum(bd.values()))
    assert full["peak_memory_gb"] <= 1.5 * full["sum_of_parts_gb"]


def test_the_report_renders_both_tables(report):
    _, _, stderr = report
    assert "| step | generation | reference | forward-backward | optimizer |" in stderr
    assert "| peak memory | = runtime | + model |" in stderr


def test_synthetic_prompts_are_gsm8k_shaped():
    rows = synthetic_gsm8k(5, seed=1)
    assert len(rows) == 5 and rows == synthetic_gsm8k(5, seed=1)
    for row in rows:
        assert 150 < len(row["question"]) < 260
        assert row["answer"].rsplit("#### ", 1)[1].isdigit()


@pytest.mark.parametrize(
    "bad, named",
    [(["--layers", "0"], "--layers=0"), (["--generations", "1"], "--generations")],
)
def test_bad_arguments_are_one_line_and_exit_2(bad, named):
    done = subprocess.run(
        [sys.executable, "-m", "bench.phi2_scale", "--device", "cpu", *bad],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0]
