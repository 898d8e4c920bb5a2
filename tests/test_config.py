import dataclasses
import math

import pytest

from grpo.cli import check_run, config_from_dict, load_config, parse_cli
from grpo.config import COUNT, NON_NEGATIVE, POSITIVE, ConfigError, GRPOConfig, Range
from grpo.tasks import load_task

# The embedded default run as `make train` ran it with every value spelled out in
# examples/tiny.yaml; GRPOConfig's defaults must reproduce it field for field.
DEFAULT_RUN = {
    "model": "tiny", "dtype": "float32", "device": "auto", "torch_threads": 2, "task": "arithmetic",
    "dataset_path": "", "arithmetic_format": "fixed", "n_eval": 500, "warmup_sft_steps": 900,
    "warmup_target_accuracy": 0.0, "warmup_sft_batch_size": 128, "warmup_sft_learning_rate": 1e-3,
    "max_steps": 200, "prompts_per_step": 32, "num_generations": 8, "num_iterations": 1,
    "micro_batch_size": 256, "max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0,
    "learning_rate": 5e-4, "weight_decay": 0.0, "warmup_ratio": 0.05, "lr_schedule": "cosine",
    "max_grad_norm": 1.0, "beta": 0.0, "epsilon_low": 0.2, "epsilon_high": 0.2, "loss_type": "grpo",
    "scale_rewards": "group", "importance_sampling_level": "token",
    "mask_truncated_completions": False, "reward_funcs": ["correctness", "digits"],
    "reward_weights": [1.0, 1.0], "overlong_cache": 0, "quantize": True, "use_lora": True,
    "lora_r": 16, "lora_alpha": 32.0, "lora_dropout": 0.0, "use_rslora": False,
    "lora_targets": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"], "seed": 0,
    "output_dir": "runs/tiny", "log_every": 10, "sample_every": 50, "save_every": 100,
    "eval_every": 50, "no_signal_patience": 5, "resume": False,
    # fields added since, at their no-op values
    "gradient_checkpointing": False, "min_new_tokens": 0,
    "delta": 0.0, "sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05, "vespo_k_pos": 2.0,
    "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0,
    "top_entropy_quantile": 1.0, "entropy_coef": 0.0, "off_policy_mask_threshold": 0.0,
    "multi_objective_aggregation": "sum_then_normalize",
}  # fmt: skip
# examples/phi2_gsm8k.yaml as it resolved under the older defaults (the warm-up fields, used by
# the tiny model alone, left out).
PHI2_RUN = {
    **DEFAULT_RUN,
    "model": "microsoft/phi-2", "dtype": "bfloat16", "torch_threads": 0, "task": "gsm8k",
    "dataset_path": "openai/gsm8k", "max_steps": 500,
    "prompts_per_step": 16, "micro_batch_size": 16, "max_new_tokens": 256, "temperature": 0.9,
    "learning_rate": 5e-6, "warmup_ratio": 0.03, "max_grad_norm": 0.1, "beta": 0.04,
    "epsilon_high": 0.28, "loss_type": "dapo", "mask_truncated_completions": True,
    "reward_funcs": ["correctness", "format", "overlong"], "reward_weights": [1.0, 0.2, 1.0],
    "overlong_cache": 64, "lora_dropout": 0.05, "output_dir": "runs/phi2-gsm8k", "log_every": 1,
    "sample_every": 10, "save_every": 50, "eval_every": 0, "gradient_checkpointing": True,
}  # fmt: skip


def test_defaults_are_the_default_run():
    assert GRPOConfig().to_dict() == DEFAULT_RUN
    assert load_config("examples/tiny.yaml") == GRPOConfig()
    assert parse_cli(["--config", "examples/tiny.yaml"]) == GRPOConfig()


def test_phi2_recipe_is_unchanged_by_the_new_defaults():
    phi2 = load_config("examples/phi2_gsm8k.yaml")
    for name, value in PHI2_RUN.items():
        assert getattr(phi2, name) == value, name
    assert "learning_rate" in open("examples/phi2_gsm8k.yaml").read()  # the recipe names it


def test_no_default_is_the_learning_rate_that_collapsed_the_policy():
    assert GRPOConfig().learning_rate < 2e-3


def test_defaults_validate_and_yaml_round_trip(tmp_path):
    cfg = check_run(GRPOConfig())
    cfg.save_yaml(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"use_lora": False}, "quantize=True: an NF4 base cannot be fine-tuned in full"),
        ({"lora_r": "eight"}, "lora_r='eight' should be of type int"),
        ({"quantize": 1}, "quantize=1 should be of type bool"),
        ({"num_generations": 1}, "num_generations=1: needs >= 2"),
        ({"epsilon_low": 0.0}, "epsilon_low=0.0: must be a finite number > 0"),
        ({"beta": -0.1}, "beta=-0.1: must be >= 0"),
        ({"lora_r": 0}, "lora_r=0: must be >= 1"),
        ({"loss_type": "ppo"}, "loss_type='ppo': must be one of grpo, bnpo, dr_grpo, dapo"),
        ({"reward_funcs": ["nope"], "reward_weights": [1.0]}, "'nope' is unknown"),
        ({"reward_weights": [1.0]}, "reward_weights=.*one weight per reward function"),
        ({"warmup_target_accuracy": 1.0}, r"warmup_target_accuracy=1.0: must be in \[0, 1\)"),
        ({"arithmetic_format": "words"}, "arithmetic_format='words': must be one of fixed, plain"),
    ],
)
def test_validation_names_field_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        check_run(config_from_dict(override))


def test_config_loads_its_own_task():
    task = load_task(GRPOConfig(n_eval=7, seed=3, arithmetic_format="plain"))
    assert len(task.eval) == 7 and all("+0" not in r["answer"] for r in task.eval)
    assert task.eval == load_task(GRPOConfig(n_eval=7, seed=3, arithmetic_format="plain")).eval
    fixed = load_task(GRPOConfig(n_eval=7, seed=3, task="arithmetic"))
    assert all(len(r["prompt"]) == 6 and r["answer"][0] in "+-" for r in fixed.eval)


# One bad value per field: (overrides, message). A field without a case fails the walk.
BAD_VALUES = {
    "model": ({"model": "/no/such/model"}, "no config.json"),
    "dtype": ({"dtype": "int8"}, "must be one of float32"),
    "device": ({"device": "tpu"}, "must be one of auto, cpu, cuda"),
    "torch_threads": ({"torch_threads": -1}, "must be >= 0"),
    "gradient_checkpointing": ({"gradient_checkpointing": "yes"}, "should be of type bool"),
    "task": ({"task": "chess"}, "must be one of arithmetic, gsm8k"),
    "dataset_path": (
        {
            "task": "gsm8k",
            "model": "microsoft/phi-2",
            "dataset_path": "/no/such/gsm8k.jsonl",
            "reward_funcs": ["correctness", "format"],
        },
        "no such file",
    ),
    "arithmetic_format": ({"arithmetic_format": "roman"}, "must be one of fixed, plain"),
    "n_eval": ({"n_eval": 20_000}, "the arithmetic task has 20000 problems"),
    "warmup_sft_steps": ({"warmup_sft_steps": -5}, "must be >= 0"),
    "warmup_target_accuracy": ({"warmup_target_accuracy": 1.5}, r"must be in \[0, 1\)"),
    "warmup_sft_batch_size": ({"warmup_sft_batch_size": 0}, "must be >= 1"),
    "warmup_sft_learning_rate": ({"warmup_sft_learning_rate": 0.0}, "finite number > 0"),
    "max_steps": ({"max_steps": 0}, "must be >= 1"),
    "prompts_per_step": ({"prompts_per_step": 0}, "must be >= 1"),
    "num_generations": ({"num_generations": 1}, "needs >= 2"),
    "num_iterations": ({"num_iterations": 0}, "must be >= 1"),
    "micro_batch_size": ({"micro_batch_size": 0}, "must be >= 1"),
    "max_new_tokens": ({"max_new_tokens": 0}, "must be >= 1"),
    "min_new_tokens": ({"min_new_tokens": 7}, r"must be <= max_new_tokens \(6\)"),
    "temperature": ({"temperature": math.nan}, "finite number > 0"),
    "top_p": ({"top_p": 1.5}, r"must be in \(0, 1\]"),
    "learning_rate": ({"learning_rate": -1e-4}, "finite number > 0"),
    "weight_decay": ({"weight_decay": -0.1}, "must be >= 0"),
    "warmup_ratio": ({"warmup_ratio": 1.0}, r"must be in \[0, 1\)"),
    "lr_schedule": ({"lr_schedule": "step"}, "must be one of constant, linear, cosine"),
    "max_grad_norm": ({"max_grad_norm": math.inf}, "must be >= 0"),
    "beta": ({"beta": -0.04}, "must be >= 0"),
    "epsilon_low": ({"epsilon_low": 0.0}, "finite number > 0"),
    "epsilon_high": ({"epsilon_high": -0.2}, "finite number > 0"),
    "loss_type": ({"loss_type": "ppo"}, "must be one of grpo"),
    "scale_rewards": ({"scale_rewards": "max"}, "must be one of group, batch, none"),
    "importance_sampling_level": ({"importance_sampling_level": "word"}, "must be one of token"),
    "mask_truncated_completions": ({"mask_truncated_completions": 1}, "should be of type bool"),
    "reward_funcs": ({"reward_funcs": ["correctness", "nope"]}, "'nope' is unknown"),
    "reward_weights": ({"reward_weights": [1.0, math.nan]}, "finite number"),
    "overlong_cache": ({"overlong_cache": 7}, r"must be <= max_new_tokens \(6\)"),
    "delta": ({"delta": 1.1}, r"must be 0 \(off\) or a finite number > 1 \+ epsilon_high = 1.2"),
    "sapo_temperature_pos": ({"sapo_temperature_pos": -1.0}, "finite number > 0"),
    "sapo_temperature_neg": ({"sapo_temperature_neg": 0.0}, "finite number > 0"),
    "vespo_k_pos": ({"vespo_k_pos": -2.0}, "finite number >= 0"),
    "vespo_lambda_pos": ({"vespo_lambda_pos": 0.0}, "finite number > 0"),
    "vespo_k_neg": ({"vespo_k_neg": math.inf}, "finite number >= 0"),
    "vespo_lambda_neg": ({"vespo_lambda_neg": -2.0}, "finite number > 0"),
    "top_entropy_quantile": ({"top_entropy_quantile": 1.2}, r"must be in \[0, 1\]"),
    "entropy_coef": ({"entropy_coef": -0.01}, r"finite number >= 0 \(0: off\)"),
    "off_policy_mask_threshold": ({"off_policy_mask_threshold": -0.5}, "finite number >= 0"),
    "multi_objective_aggregation": (
        {"multi_objective_aggregation": "mean"},
        "must be one of sum_then_normalize, normalize_then_sum",
    ),
    "quantize": ({"quantize": "nf4"}, "should be of type bool"),
    "use_lora": ({"use_lora": "no"}, "should be of type bool"),
    "lora_r": ({"lora_r": -16}, "must be >= 1"),
    "lora_alpha": ({"lora_alpha": -3.0}, "finite number > 0"),
    "lora_dropout": ({"lora_dropout": 1.5}, r"must be in \[0, 1\)"),
    "use_rslora": ({"use_rslora": None}, "should be of type bool"),
    "lora_targets": ({"lora_targets": ["q_proj", "wrong"]}, "'wrong' names no linear layer"),
    "seed": ({"seed": -1}, "must be >= 0"),
    "output_dir": ({"output_dir": " "}, "must name a directory"),
    "log_every": ({"log_every": 0}, "must be >= 1"),
    "sample_every": ({"sample_every": 0}, "must be >= 1"),
    "save_every": ({"save_every": -100}, "must be >= 0"),
    "eval_every": ({"eval_every": -1}, "must be >= 0"),
    "no_signal_patience": ({"no_signal_patience": 0}, "must be >= 1"),
    "resume": ({"resume": "true"}, "should be of type bool"),
}


def test_every_field_has_a_bad_value_case():
    assert sorted(BAD_VALUES) == sorted(f.name for f in dataclasses.fields(GRPOConfig))


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(GRPOConfig)])
def test_every_field_rejects_a_bad_value_naming_it(name):
    overrides, message = BAD_VALUES[name]
    base = {k: v for k, v in overrides.items() if k != name}
    check_run(GRPOConfig(**base))  # the context alone is fine: the field is what fails
    with pytest.raises(ConfigError, match=message) as err:
        check_run(GRPOConfig(**overrides))
    assert str(err.value).startswith(f"{name}=") and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"model": "phi 2"}, "model='phi 2': is neither tiny, a local directory nor a hub id"),
        ({"prompts_per_step": 19_501}, "prompts_per_step=19501: exceeds the 19500 training"),
        ({"reward_funcs": ["correctness", "correctness"]}, "'correctness' is listed twice"),
        (
            {"lora_targets": ["fc1", "fc1"]},
            r"lora_targets=\['fc1', 'fc1'\]: a name is listed twice",
        ),
        ({"lora_targets": []}, r"lora_targets=\[\]: name the linear modules"),
        ({"output_dir": "pyproject.toml"}, "output_dir='pyproject.toml': is a file"),
        ({"loss_type": "luspo"}, "loss_type='luspo': .* set importance_sampling_level: sequence"),
        (
            {"loss_type": "vespo", "importance_sampling_level": "sequence"},
            "loss_type='vespo': .* set importance_sampling_level: token",
        ),
        ({"loss_type": "cispo", "delta": 2.0}, "delta=2.0: two-sided clipping .* set delta: 0"),
        (
            {"multi_objective_aggregation": "normalize_then_sum", "scale_rewards": "none"},
            "multi_objective_aggregation='normalize_then_sum': .* set scale_rewards: group",
        ),
    ],
)
def test_more_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        check_run(GRPOConfig(**override))


def test_lora_targets_accept_dotted_suffixes_and_full_paths():
    check_run(GRPOConfig(lora_targets=["self_attn.q_proj", "model.layers.0.mlp.fc1"]))
    with pytest.raises(ConfigError, match="'mlp.q_proj' names no linear layer"):
        check_run(GRPOConfig(lora_targets=["mlp.q_proj"]))


def test_lora_targets_checked_against_a_local_model_dir(tiny_model_dir):
    check_run(GRPOConfig(model=str(tiny_model_dir), lora_targets=["fc1"]))
    with pytest.raises(ConfigError, match="its linear layers are dense, fc1, fc2, k_proj"):
        check_run(GRPOConfig(model=str(tiny_model_dir), lora_targets=["gate_proj"]))


def test_a_range_says_its_bounds_and_holds_no_nan():
    assert COUNT.message() == "must be >= 1" and POSITIVE.message() == "must be a finite number > 0"
    assert Range(0, 1, lo_open=True, hi_open=False).message() == "must be in (0, 1]"
    assert Range(0, 1, why="0: off").message() == "must be in [0, 1) (0: off)"
    assert 1 in Range(0, 1, hi_open=False) and 1 not in Range(0, 1) and 0 not in POSITIVE
    assert math.nan not in NON_NEGATIVE and math.inf not in NON_NEGATIVE and 0 in NON_NEGATIVE


def test_every_number_field_declares_its_range_and_every_name_field_its_choices():
    fields = {f.name: f.metadata for f in dataclasses.fields(GRPOConfig)}
    assert fields["lora_dropout"]["within"] == Range(
        0, 1, why="a probability; 1 would drop every input"
    )
    assert fields["loss_type"]["choices"][:2] == ("grpo", "bnpo")
    unbounded = {n for n, m in fields.items() if m["within"] is None}
    numbers = {f.name for f in dataclasses.fields(GRPOConfig) if f.type in ("int", "float")}
    # the objective's options are checked with the loss (grpo.loss.check_loss_options)
    assert numbers & unbounded == {
        "delta", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos",
        "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "top_entropy_quantile",
        "entropy_coef", "off_policy_mask_threshold",
    }  # fmt: skip
