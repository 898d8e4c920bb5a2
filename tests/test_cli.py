"""grpo/cli.py: the options generated from GRPOConfig's fields, YAML configs, the parsing of
values by field type, and the one-line errors of check_run and the command line."""

import dataclasses
import subprocess
import sys

import pytest
from conftest import run_cli_bad_input

from grpo.cli import (
    build_parser,
    check_run,
    config_from_dict,
    exit_on_error,
    load_config,
    parse_cli,
)
from grpo.config import ConfigError, GRPOConfig


def test_every_field_is_an_option_under_both_spellings():
    parser = build_parser()
    options = {s for action in parser._actions for s in action.option_strings}
    for f in dataclasses.fields(GRPOConfig):
        assert f"--{f.name}" in options and f"--{f.name.replace('_', '-')}" in options
    dashed = parse_cli(["--learning-rate", "3e-4", "--num-generations", "4"])
    assert (dashed.learning_rate, dashed.num_generations) == (3e-4, 4)
    assert dashed == parse_cli(["--learning_rate", "3e-4", "--num_generations", "4"])


def test_only_given_fields_are_parsed_and_resume_is_a_switch():
    assert vars(build_parser().parse_args(["--beta", "0.1"])) == {"beta": "0.1"}
    assert parse_cli(["--resume"]).resume is True
    assert parse_cli(["--resume", "false"]).resume is False
    assert parse_cli([]) == GRPOConfig()


def test_values_are_parsed_by_the_field_type():
    cfg = config_from_dict(
        {"learning_rate": "1e-3", "lora_r": "8", "quantize": "False", "lora_alpha": 16,
         "lora_targets": "q_proj, v_proj", "reward_weights": [1, 0.5]},
        source="test",
    )  # fmt: skip
    assert (cfg.learning_rate, cfg.lora_r, cfg.quantize) == (1e-3, 8, False)
    assert cfg.lora_alpha == 16.0 and isinstance(cfg.lora_alpha, float)
    assert cfg.lora_targets == ["q_proj", "v_proj"] and cfg.reward_weights == [1.0, 0.5]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"bogus": 1}, "test: unknown key 'bogus'; `python -m grpo.train --help` lists the fields"),
        ({"lora_r": 2.5}, "test: lora_r=2.5 should be of type int"),
        ({"lora_r": True}, "test: lora_r=True should be of type int"),
        ({"beta": "much"}, "test: beta='much' should be of type float"),
        ({"quantize": "yes"}, "test: quantize='yes' should be of type bool"),
        ({"model": 3}, "test: model=3 should be of type str"),
        ({"lora_targets": ["q_proj", 3]}, r"test: lora_targets\[1\]=3 should be of type str"),
        ({"reward_weights": 1.0}, "test: reward_weights=1.0 should be of type list"),
    ],
)
def test_config_from_dict_names_the_bad_key(values, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        config_from_dict(values, source="test")


def test_load_config_reads_yaml_over_the_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora_r: 4\nbeta: 0.04\nlora_targets: [fc1, fc2]\n")
    assert load_config(path) == GRPOConfig(lora_r=4, beta=0.04, lora_targets=["fc1", "fc2"])
    path.write_text("")  # an empty file: the defaults
    assert load_config(path) == GRPOConfig()


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "does not exist; pass --config FILE.yaml"),
        ("lora_r: [4\n", "is not valid YAML: "),
        ("- lora_r\n- beta\n", "must hold a mapping of field: value"),
        ("lora_rank: 4\n", "unknown key 'lora_rank'"),
    ],
)
def test_load_config_errors_are_one_line(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_parser_error_is_a_config_error():
    with pytest.raises(ConfigError, match="unrecognized arguments: stray; `python -m grpo.train"):
        parse_cli(["--beta", "0.1", "stray"])


@pytest.mark.parametrize(
    "override, message",
    [
        (
            {"reward_funcs": ["nope"], "reward_weights": [1.0]},
            "reward_funcs=['nope']: reward 'nope' is unknown",
        ),
        ({"loss_type": "luspo"}, "loss_type='luspo': "),
        ({"task": "word_problems"}, "task='word_problems': needs an instruct model"),
        (
            {"lora_targets": ["fc1", "wrong"]},
            "lora_targets=['fc1', 'wrong']: 'wrong' names no linear layer",
        ),
        ({"model": "./no/such/dir"}, "model='./no/such/dir': "),
    ],
)
def test_check_run_errors_are_one_line_naming_the_setting(override, message):
    with pytest.raises(ConfigError) as err:
        check_run(GRPOConfig(**override))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_exit_on_error_prints_one_line_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        exit_on_error(ConfigError("beta=-1: must be >= 0"))
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: beta=-1: must be >= 0\n"


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


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [["--num_generations", "1"], ["--loss_type", "ppo"], ["--no_such_key", "3"], ["--beta", "-1"]],
)
def test_cli_bad_value_one_line_exit_2_nothing_written(tmp_path, args):
    out = tmp_path / "run"
    line = run_cli_bad_input("grpo.train", "--output_dir", str(out), *args)
    assert line.startswith("error: ")
    assert not out.exists()


@pytest.mark.slow
def test_help_lists_every_field_with_default():
    proc = subprocess.run(
        [sys.executable, "-m", "grpo.train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0
    for name in GRPOConfig.__dataclass_fields__:
        assert f"--{name}" in proc.stdout
    assert "(default: 8)" in proc.stdout  # num_generations


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, names",
    [
        (["--lora_targets", "q_proj,wrong"], "lora_targets="),
        (["--lora_alpha", "-3"], "lora_alpha=-3.0"),
        (["--lora_dropout", "1.5"], "lora_dropout=1.5"),
        (["--min_new_tokens", "-1"], "min_new_tokens=-1"),
    ],
)
def test_cli_fails_before_any_work(tmp_path, args, names):
    out = tmp_path / "run"
    line = run_cli_bad_input("grpo.train", "--output_dir", str(out), *args)
    assert line.startswith(f"error: {names}")
    assert not out.exists()
