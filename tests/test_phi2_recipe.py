"""The Phi-2 recipe is the same code with a different config: run examples/phi2_gsm8k.yaml for a
few steps with the model swapped to a tiny Phi in a local dir and GSM8K to a small local JSONL."""

import json
import math

import pytest

from grpo.cli import check_run, parse_cli
from grpo.train import run

pytestmark = pytest.mark.slow  # trains, spawns processes, builds the kernel or drives a browser

RECIPE = "examples/phi2_gsm8k.yaml"


def test_recipe_names_phi2_and_every_phi2_linear():
    cfg = check_run(parse_cli(["--config", RECIPE]))
    assert cfg.model == "microsoft/phi-2" and cfg.task == "gsm8k" and cfg.quantize
    assert cfg.dtype == "bfloat16" and cfg.use_lora
    assert sorted(cfg.lora_targets) == sorted(["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"])
    assert cfg.reward_funcs[:2] == ["correctness", "format"]


def test_recipe_runs_on_tiny_phi_and_local_gsm8k(tmp_path, tiny_model_dir):
    data = tmp_path / "gsm8k.jsonl"
    rows = [
        {
            "question": f"Tom has {i} apples and buys {i + 2} more. How many now?",
            "answer": f"He has {i} + {i + 2} = {2 * i + 2}.\n#### {2 * i + 2}",
        }
        for i in range(12)
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    cfg = check_run(
        parse_cli(
            [
                "--config",
                RECIPE,
                "--model",
                str(tiny_model_dir),
                "--dataset_path",
                str(data),
                "--output_dir",
                str(out),
                "--device",
                "cpu",
                "--max_steps",
                "2",
                "--prompts_per_step",
                "2",
                "--num_generations",
                "4",
                "--micro_batch_size",
                "4",
                "--max_new_tokens",
                "12",
                "--overlong_cache",
                "4",
                "--n_eval",
                "4",
                "--save_every",
                "1",
                "--sample_every",
                "1",
            ]
        )
    )
    summary = run(cfg)
    assert summary["grpo_steps"] == 2 and summary["n_eval"] == 4
    for name in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.jsonl",
        "samples.jsonl",
        "plots.png",
        "summary.json",
        "config.yaml",
    ]:
        assert (out / name).is_file(), name
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(tiny_model_dir)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        for key in [
            "reward",
            "reward/correctness",
            "reward/format",
            "reward/overlong",
            "kl",
            "loss",
            "grad_norm",
            "truncated_frac",
        ]:
            assert math.isfinite(r[key]), (key, r)
