import subprocess
import sys

import pytest
from conftest import run_cli_bad_input

from grpo.config import ConfigError, GRPOConfig, parse_cli


def test_defaults_validate_and_yaml_round_trip(tmp_path):
    cfg = GRPOConfig().validate()
    cfg.save_yaml(tmp_path / "c.yaml")
    assert GRPOConfig.from_yaml(tmp_path / "c.yaml") == cfg


def test_yaml_then_cli_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "lora_r: 4\nbeta: 0.04\nreward_funcs: [correctness, format]\nreward_weights: [1.0, 0.5]\n"
    )
    cfg = parse_cli(
        [
            "--config",
            str(tmp_path / "c.yaml"),
            "--beta",
            "0.1",
            "--quantize",
            "false",
            "--learning_rate",
            "1e-3",
            "--lora_targets",
            "q_proj,v_proj",
        ]
    )
    assert (cfg.lora_r, cfg.beta, cfg.quantize, cfg.learning_rate) == (4, 0.1, False, 1e-3)
    assert cfg.reward_funcs == ["correctness", "format"] and cfg.reward_weights == [1.0, 0.5]
    assert cfg.lora_targets == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "override, message",
    [
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"lora_r": "eight"}, "lora_r='eight' should be of type int"),
        ({"quantize": 1}, "quantize=1 should be of type bool"),
        ({"num_generations": 1}, "num_generations=1: needs >= 2"),
        ({"epsilon_low": 0.0}, "epsilon_low=0.0: must be > 0"),
        ({"beta": -0.1}, "beta=-0.1: must be >= 0"),
        ({"lora_r": 0}, "lora_r=0: must be a positive integer"),
        ({"loss_type": "ppo"}, "loss_type='ppo': must be one of grpo, bnpo, dr_grpo, dapo"),
        ({"reward_funcs": ["nope"], "reward_weights": [1.0]}, "'nope' is unknown"),
        ({"reward_weights": [1.0, 2.0]}, "reward_weights=.*one weight per reward function"),
        ({"warmup_target_accuracy": 1.0}, r"warmup_target_accuracy=1.0: must be in \[0, 1\)"),
        ({"arithmetic_format": "words"}, "arithmetic_format='words': must be one of fixed, plain"),
    ],
)
def test_validation_names_field_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        GRPOConfig.from_dict(override).validate()


@pytest.mark.parametrize(
    "args",
    [["--num_generations", "1"], ["--loss_type", "ppo"], ["--no_such_key", "3"], ["--beta", "-1"]],
)
def test_cli_bad_value_one_line_exit_2_nothing_written(tmp_path, args):
    out = tmp_path / "run"
    line = run_cli_bad_input("grpo.train", "--output_dir", str(out), *args)
    assert line.startswith("error: ")
    assert not out.exists()


def test_help_lists_every_field_with_default():
    proc = subprocess.run(
        [sys.executable, "-m", "grpo.train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0
    for name in GRPOConfig.__dataclass_fields__:
        assert f"--{name}" in proc.stdout
    assert "(default: 8)" in proc.stdout  # num_generations


def test_config_loads_its_own_task():
    task = GRPOConfig(n_eval=7, seed=3, arithmetic_format="plain").load_task()
    assert len(task.eval) == 7 and all("+0" not in r["answer"] for r in task.eval)
    assert task.eval == GRPOConfig(n_eval=7, seed=3, arithmetic_format="plain").load_task().eval
    fixed = GRPOConfig(n_eval=7, seed=3).load_task("arithmetic")
    assert all(len(r["prompt"]) == 6 and r["answer"][0] in "+-" for r in fixed.eval)
