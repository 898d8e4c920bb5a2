"""One dataclass holding every knob of a run, a YAML file to set them, `--key value` to override.

    python -m grpo.train --config examples/tiny.yaml --learning_rate 3e-4 --beta 0.04

`python -m grpo.train --help` lists every field with its default and meaning. `GRPOConfig.validate`
runs before any model is loaded; a bad value is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from grpo.choices import (
    ARITHMETIC_FORMATS,
    DEVICES,
    DTYPES,
    IS_LEVELS,
    LOSS_TYPES,
    SCALE_REWARDS,
    SCHEDULES,
    TASKS,
)
from grpo.data import DATASET_SUFFIXES, Task, arithmetic_problem_count, load_task

_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # "microsoft/phi-2", "gpt2"


class ConfigError(ValueError):
    """A bad config value; the CLI prints it as one line and exits 2."""


def _f(default, help: str, **kw):
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class GRPOConfig:
    """Every knob of a run. The defaults ARE the embedded default run (`make train`): the tiny Phi
    on two-digit arithmetic on a CPU, minutes; a config file lists only what differs."""

    # --- model -----------------------------------------------------------------------------
    model: str = _f(
        "tiny",
        "hub id (microsoft/phi-2), a local save_pretrained dir, or 'tiny' "
        "(build the embedded tiny Phi + supervised warm-up into <output_dir>/base)",
    )
    dtype: str = _f(
        "float32",
        "dtype the weights are loaded in and LoRA computes in (float32 on CPU; bfloat16 on a GPU)",
    )
    device: str = _f("auto", "'auto' (cuda if available, else cpu), 'cpu' or 'cuda'")
    torch_threads: int = _f(
        2,
        "CPU threads for torch (0: torch's default); 2: both cores of a 2-core machine, a GRPO "
        "step ~1.5x faster than 1 thread when idle (far slower when other jobs share the cores); "
        "under torchrun on CPU, capped at cores // processes",
    )
    gradient_checkpointing: bool = _f(
        False,
        "recompute each decoder layer's activations in the backward pass: less memory, about a "
        "third more compute",
    )
    # --- task ------------------------------------------------------------------------------
    task: str = _f("arithmetic", "'arithmetic' (two-digit +/-, for the tiny model) or 'gsm8k'")
    dataset_path: str = _f("", "gsm8k only: hub id (openai/gsm8k) or a local .jsonl/.parquet")
    arithmetic_format: str = _f(
        "fixed",
        'arithmetic only: \'fixed\' ("07+35=" -> "+042", every digit at a fixed position) or '
        '\'plain\' ("7+35=" -> "42"; learned far more slowly, see the README)',
    )
    n_eval: int = _f(
        500, "held-out problems for the before/after greedy evaluation, never trained on"
    )
    # --- warm-up (model: tiny only) --------------------------------------------------------
    warmup_sft_steps: int = _f(
        900,
        "supervised steps that make the random tiny Phi partly right, ~45% held-out "
        "(python -m grpo.warmup_curve); at most this many, see next",
    )
    warmup_target_accuracy: float = _f(
        0.0,
        "stop the warm-up at the first check (every 25 steps) where greedy accuracy on 256 "
        "train-split problems reaches this (0: run all warmup_sft_steps)",
    )
    warmup_sft_batch_size: int = _f(128, "sequences per supervised warm-up step")
    warmup_sft_learning_rate: float = _f(1e-3, "AdamW learning rate of the warm-up")
    # --- GRPO ------------------------------------------------------------------------------
    max_steps: int = _f(
        200,
        "GRPO optimizer steps (one generation batch each); 200: the tiny default gains 30+ points "
        "in about 2 minutes of GRPO on 2 cores (1000 steps: 5 more points, 5x the time)",
    )
    prompts_per_step: int = _f(32, "distinct prompts per generation batch")
    num_generations: int = _f(
        8, "G: completions per prompt, the group the advantage is relative to"
    )
    num_iterations: int = _f(1, "optimizer passes over each generation batch (>1 needs old logps)")
    micro_batch_size: int = _f(
        256,
        "completions per forward/backward (gradient accumulation); 256 = 32 x 8: the tiny "
        "model's whole batch in one pass",
    )
    max_new_tokens: int = _f(
        6, 'generation limit per completion ("-099" + EOS needs 5; longer is wrong anyway)'
    )
    min_new_tokens: int = _f(
        0,
        "sample at least this many tokens before EOS may end a completion (0: EOS allowed at "
        "once); the Phi-2 scale check forces realistic lengths with it",
    )
    temperature: float = _f(1.0, "sampling temperature for rollouts")
    top_p: float = _f(1.0, "nucleus sampling for rollouts")
    learning_rate: float = _f(
        5e-4, "AdamW peak learning rate (LoRA on the tiny model; 2e-3 collapsed the policy)"
    )
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_ratio: float = _f(0.05, "fraction of max_steps with a linear learning-rate ramp")
    lr_schedule: str = _f("cosine", "after warm-up: 'constant', 'linear' or 'cosine' decay")
    max_grad_norm: float = _f(1.0, "global gradient-norm clip (0 disables)")
    beta: float = _f(
        0.0,
        "KL coefficient (k3 to the adapter-free base); 0 skips the reference (the default run "
        "is short and its reward cannot be gamed)",
    )
    epsilon_low: float = _f(0.2, "clip range below 1 for the importance ratio")
    epsilon_high: float = _f(0.2, "clip range above 1 (DAPO clip-higher: 0.28)")
    loss_type: str = _f(
        "grpo",
        "'grpo' (DeepSeekMath), 'bnpo', 'dr_grpo', 'dapo', 'cispo', 'sapo', 'luspo' (needs "
        "importance_sampling_level: sequence) or 'vespo'; the README's loss table says which when",
    )
    scale_rewards: str = _f(
        "group", "advantage divisor: 'group' std, 'batch' std, 'none' (Dr. GRPO)"
    )
    importance_sampling_level: str = _f("token", "'token' (PPO/GRPO) or 'sequence' (GSPO)")
    mask_truncated_completions: bool = _f(
        False, "drop completions that hit max_new_tokens from the loss (DAPO)"
    )
    reward_funcs: list[str] = _f(
        ["correctness", "digits"],
        "reward functions: built-in names (correctness, format, digits, overlong) or import "
        "paths module:function on sys.path; default: the exact answer plus partial credit per "
        "right digit",
    )
    reward_weights: list[float] = _f([1.0, 1.0], "one weight per reward function")
    overlong_cache: int = _f(0, "'overlong' reward: soft-penalty window in tokens before the limit")
    # --- objective variants (grpo/objectives.py; checked by grpo.loss.check_loss_options) ----
    delta: float = _f(
        0.0,
        "two-sided clipping (INTELLECT-2): ratio cap for negative-advantage tokens of the clipped "
        "losses, > 1 + epsilon_high (0: off)",
    )
    sapo_temperature_pos: float = _f(1.0, "'sapo': gate temperature for A > 0")
    sapo_temperature_neg: float = _f(
        1.05,
        "'sapo': gate temperature for A <= 0 (higher: off-policy negative updates fade sooner)",
    )
    vespo_k_pos: float = _f(2.0, "'vespo', A >= 0: power k of phi(w) = e^lambda w^k e^(-lambda w)")
    vespo_lambda_pos: float = _f(3.0, "'vespo', A >= 0: decay lambda of phi(w)")
    vespo_k_neg: float = _f(3.0, "'vespo', A < 0: power k of phi(w)")
    vespo_lambda_neg: float = _f(2.0, "'vespo', A < 0: decay lambda of phi(w)")
    top_entropy_quantile: float = _f(
        1.0,
        "only this fraction of real tokens, those of highest entropy, carry the policy gradient "
        "(Beyond the 80/20 Rule: 0.2; 1: all tokens, entropies not computed)",
    )
    entropy_coef: float = _f(
        0.0, "entropy bonus: loss -= entropy_coef * mean token entropy (0: off, not computed)"
    )
    off_policy_mask_threshold: float = _f(
        0.0,
        "DeepSeek-V3.2: drop negative-advantage sequences whose mean log(pi_old / pi) exceeds "
        "this (0: off; acts only when num_iterations > 1)",
    )
    multi_objective_aggregation: str = _f(
        "sum_then_normalize",
        "several rewards: 'sum_then_normalize' (advantage of the weighted sum) or "
        "'normalize_then_sum' (GDPO: each reward normalised in its group, then summed)",
    )
    # --- QLoRA -----------------------------------------------------------------------------
    quantize: bool = _f(True, "NF4-quantize the frozen base (QLoRA); false keeps it in dtype")
    use_lora: bool = _f(True, "train LoRA adapters; false = full fine-tuning (tiny model only)")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: float = _f(32.0, "LoRA scale numerator: update = (alpha / r) B A")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input")
    use_rslora: bool = _f(False, "rank-stabilised scale alpha / sqrt(r)")
    lora_targets: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
        "linear modules to wrap, by name or dotted suffix (default: Phi's attention and MLP "
        "linears); checked against the model before any work",
    )
    # --- bookkeeping -----------------------------------------------------------------------
    seed: int = _f(0, "seed for data order, sampling and LoRA init")
    output_dir: str = _f("runs/tiny", "run directory: adapter, checkpoints, metrics, plots")
    log_every: int = _f(10, "steps between progress-bar/metric refreshes")
    sample_every: int = _f(50, "steps between samples.jsonl entries")
    save_every: int = _f(100, "steps between checkpoints (0: only at the end)")
    eval_every: int = _f(
        50, "steps between held-out evaluations during training (0: before/after only)"
    )
    no_signal_patience: int = _f(
        5, "warn when every group has zero reward variance this many steps in a row"
    )
    resume: bool = _f(False, "continue from the newest complete checkpoint in output_dir")

    # ------------------------------------------------------------------------------------
    def load_task(self, task: str | None = None) -> Task:
        """The config's task (or `task`) with its seed, n_eval, dataset_path and format."""
        return load_task(
            task or self.task,
            seed=self.seed,
            n_eval=self.n_eval,
            dataset_path=self.dataset_path,
            arithmetic_format=self.arithmetic_format,
        )

    def build_rewards(self) -> tuple[dict, list[float]]:
        """(reward functions by name, weights): every run and the demo build the run's rewards
        here, built-ins and import paths alike (`grpo.rewards.build_reward_functions`)."""
        from grpo.rewards import build_reward_functions

        return build_reward_functions(
            self.reward_funcs,
            self.reward_weights,
            max_completion_length=self.max_new_tokens,
            cache_length=self.overlong_cache,
        )

    def validate(self) -> GRPOConfig:
        """Check every field before any work; raise ConfigError naming the first bad field, its
        value and the fix. Nothing is loaded or written here (the model's linear names are read
        from its config on the meta device)."""

        def bad(name, why):
            raise ConfigError(f"{name}={getattr(self, name)!r}: {why}")

        hints = typing.get_type_hints(GRPOConfig)
        for f in dataclasses.fields(self):  # types first: the checks below compare numbers
            if not _has_type(getattr(self, f.name), hints[f.name]):
                bad(f.name, f"should be of type {_type_name(hints[f.name])}")

        for name, choices in [
            ("loss_type", LOSS_TYPES),
            ("scale_rewards", SCALE_REWARDS),
            ("importance_sampling_level", IS_LEVELS),
            ("lr_schedule", SCHEDULES),
            ("dtype", DTYPES),
            ("task", TASKS),
            ("arithmetic_format", ARITHMETIC_FORMATS),
            ("device", DEVICES),
        ]:
            if getattr(self, name) not in choices:
                bad(name, f"must be one of {', '.join(choices)}")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                bad("device", "no CUDA device is visible; use auto or cpu")

        # --- numbers: `not lo <= x` form, so NaN fails too
        for name in ("max_steps", "prompts_per_step", "num_iterations", "micro_batch_size",
                     "max_new_tokens", "n_eval", "log_every", "sample_every",
                     "no_signal_patience", "warmup_sft_batch_size", "lora_r"):  # fmt: skip
            if not getattr(self, name) >= 1:
                bad(name, "must be >= 1")
        for name in ("save_every", "eval_every", "warmup_sft_steps", "overlong_cache",
                     "torch_threads", "seed", "min_new_tokens"):  # fmt: skip
            if not getattr(self, name) >= 0:
                bad(name, "must be >= 0")
        if self.num_generations < 2:
            bad("num_generations", "needs >= 2 (a group of one has no relative advantage)")
        for name in ("epsilon_low", "epsilon_high", "learning_rate", "temperature",
                     "warmup_sft_learning_rate", "lora_alpha"):  # fmt: skip
            if not 0 < getattr(self, name) < math.inf:
                bad(name, "must be a finite number > 0")
        for name, why in [
            ("beta", "must be >= 0 (0 disables the KL term)"),
            ("max_grad_norm", "must be >= 0 (0 disables clipping)"),
            ("weight_decay", "must be >= 0"),
        ]:
            if not 0 <= getattr(self, name) < math.inf:
                bad(name, why)
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", "must be in [0, 1) (a probability; 1 would drop every input)")
        if not 0 <= self.warmup_target_accuracy < 1:
            bad("warmup_target_accuracy", "must be in [0, 1) (0 disables the early stop)")
        if not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio", "must be in [0, 1)")
        if self.min_new_tokens > self.max_new_tokens:
            bad("min_new_tokens", f"must be <= max_new_tokens ({self.max_new_tokens})")
        if self.overlong_cache > self.max_new_tokens:
            bad("overlong_cache", f"must be <= max_new_tokens ({self.max_new_tokens})")
        if self.task == "arithmetic":
            problems = arithmetic_problem_count()
            if not self.n_eval < problems:
                bad("n_eval", f"the arithmetic task has {problems} problems; hold out fewer")
            if self.prompts_per_step > problems - self.n_eval:
                bad("prompts_per_step", f"exceeds the {problems - self.n_eval} training problems")

        # --- rewards: one check for built-in names and import paths (grpo.rewards)
        from grpo.rewards import RewardError, check_reward_names

        try:
            check_reward_names(self.reward_funcs)
        except RewardError as err:
            bad("reward_funcs", str(err))
        if len(self.reward_weights) != len(self.reward_funcs):
            bad(
                "reward_weights", f"needs one weight per reward function ({len(self.reward_funcs)})"
            )
        if not all(math.isfinite(w) for w in self.reward_weights):
            bad("reward_weights", "every weight must be a finite number")
        if "overlong" in self.reward_funcs and not 0 < self.overlong_cache <= self.max_new_tokens:
            bad(
                "overlong_cache", "the 'overlong' reward needs 0 < overlong_cache <= max_new_tokens"
            )

        # --- objective variants: one check, shared with the loss (grpo.loss)
        from grpo.loss import LOSS_OPTION_FIELDS, check_loss_options

        try:
            check_loss_options(**{name: getattr(self, name) for name in LOSS_OPTION_FIELDS})
        except ValueError as err:
            raise ConfigError(str(err)) from err

        # --- combinations
        if self.quantize and not self.use_lora:
            bad(
                "quantize",
                "an NF4 base cannot be fine-tuned in full; set use_lora: true or quantize: false",
            )
        if not self.use_lora and self.beta > 0 and self.model != "tiny":
            bad(
                "beta",
                "full fine-tuning with beta > 0 keeps a frozen reference copy; use LoRA "
                "for large models",
            )
        if self.task == "gsm8k" and self.model == "tiny":
            bad(
                "task",
                "the tiny model only knows the arithmetic task; set model to a Phi-2 "
                "path/id for gsm8k",
            )

        # --- paths: nothing is created here
        if not self.output_dir.strip():
            bad("output_dir", "must name a directory, e.g. runs/tiny")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            bad("output_dir", "is a file; name a directory")
        local_dataset = Path(self.dataset_path).suffix in DATASET_SUFFIXES
        if self.task == "gsm8k" and local_dataset and not Path(self.dataset_path).is_file():
            bad("dataset_path", "no such file; pass a GSM8K-format .jsonl/.parquet or a hub id")

        from grpo.model import is_local_name, linear_module_paths

        if not self.model.strip():
            bad("model", "name a hub id (microsoft/phi-2), a local directory, or tiny")
        if self.model != "tiny" and is_local_name(self.model):
            if not (Path(self.model).expanduser() / "config.json").is_file():
                bad("model", "no config.json in that directory; pass a save_pretrained directory")
        elif self.model != "tiny" and not _HUB_ID.fullmatch(self.model):
            bad("model", "is neither tiny, a local directory nor a hub id such as microsoft/phi-2")
        if self.use_lora:
            self._check_lora_targets(linear_module_paths(self.model))
        return self

    def _check_lora_targets(self, paths: list[str] | None) -> None:
        """Every target names a linear of the model (None: the model's architecture is not
        known before it is loaded; the loader checks then)."""
        from qlora.model import PHI_TARGETS, matches_target

        if not self.lora_targets:
            raise ConfigError(
                f"lora_targets=[]: name the linear modules to adapt, e.g. {','.join(PHI_TARGETS)}"
            )
        if len(set(self.lora_targets)) != len(self.lora_targets):
            raise ConfigError(f"lora_targets={self.lora_targets!r}: a name is listed twice")
        if paths is None:
            return
        for target in self.lora_targets:
            if not any(matches_target(p, target) for p in paths):
                names = sorted({p.rsplit(".", 1)[-1] for p in paths})
                raise ConfigError(
                    f"lora_targets={self.lora_targets!r}: {target!r} names no linear layer of "
                    f"{self.model}; its linear layers are {', '.join(names)}"
                )

    # ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> GRPOConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        cfg = cls()
        for key, value in values.items():
            if key not in known:
                raise ConfigError(
                    f"{source}: unknown key {key!r}; `python -m grpo.train --help` lists the fields"
                )
            setattr(cfg, key, _coerce(key, value, _field_type(known[key]), source))
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> GRPOConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; pass --config FILE.yaml")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            first = str(err).splitlines()[0]
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {first}") from err
        if not isinstance(values, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of field: value")
        return cls.from_dict(values, source=str(path))


def _has_type(value, hint) -> bool:
    """isinstance for a field's hint (bool is not an int here; an int is a float)."""
    if typing.get_origin(hint) is list:
        (elem,) = typing.get_args(hint)
        return isinstance(value, list) and all(_has_type(v, elem) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, int | float)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    if typing.get_origin(hint) is list:
        return f"list of {typing.get_args(hint)[0].__name__}"
    return hint.__name__


def _field_type(f: dataclasses.Field) -> tuple[type, type | None]:
    """(type, element type for lists) of a GRPOConfig field."""
    t = typing.get_type_hints(GRPOConfig)[f.name]
    if typing.get_origin(t) is list:
        return list, typing.get_args(t)[0]
    return t, None


def _coerce(key: str, value, kind: tuple[type, type | None], source: str):
    """Check a YAML value or parse a CLI string; never mixes bools, ints and strings quietly."""
    kind, elem = kind

    def wrong():
        return ConfigError(f"{source}: {key}={value!r} should be of type {kind.__name__}")

    if kind is list:
        if isinstance(value, str):  # CLI: comma-separated
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise wrong()
        return [_coerce(f"{key}[{i}]", v, (elem, None), source) for i, v in enumerate(value)]
    if isinstance(value, str) and kind in (int, float):
        try:  # float("1e-3") where YAML 1.1 would read the string "1e-3"
            return kind(value)
        except ValueError as err:
            raise wrong() from err
    if isinstance(value, str) and kind is bool:
        value = {"true": True, "false": False}.get(value.strip().lower(), value)
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    raise wrong()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m grpo.train",
        description="GRPO with a hand-written loss on an NF4 + LoRA (QLoRA) base.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Fields (set in --config YAML or override with --name value; lists: a,b,c):\n"
        + "\n".join(
            f"  --{f.name:<28} {f.metadata['help']} (default: {_default(f)!r})"
            for f in dataclasses.fields(GRPOConfig)
        ),
    )
    parser.add_argument("--config", help="YAML file of field: value")
    return parser


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def parse_cli(argv: list[str] | None = None) -> GRPOConfig:
    """--config FILE.yaml then --key value overrides (bool: --quantize false; list: a,b,c)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    cfg = GRPOConfig.from_yaml(args.config) if args.config else GRPOConfig()
    overrides = {}
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}; overrides look like --key value")
        key = token[2:].replace("-", "_")
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif key in ("resume",) and (i + 1 >= len(rest) or rest[i + 1].startswith("--")):
            value, i = "true", i + 1  # --resume alone is a switch
        else:
            if i + 1 >= len(rest):
                raise ConfigError(f"--{key} needs a value")
            value, i = rest[i + 1], i + 2
        overrides[key] = value
    parsed = GRPOConfig.from_dict(overrides, source="command line")
    for key in overrides:
        setattr(cfg, key, getattr(parsed, key))
    return cfg


def exit_on_error(err: Exception) -> typing.NoReturn:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


__all__ = ["GRPOConfig", "ConfigError", "parse_cli", "build_parser", "exit_on_error"]
