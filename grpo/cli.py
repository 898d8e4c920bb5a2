"""The command line of a run: `--config FILE.yaml` plus one `--field value` per GRPOConfig field,
generated from the dataclass; reading a config from YAML; and the checks of a config against its
task, rewards and model.

    python -m grpo.train --config examples/tiny.yaml --learning_rate 3e-4 --beta 0.04

Values are strings parsed by the field's type (bool: true/false; lists: a,b,c); `--resume` alone
is a switch. `check_run` runs before any model is loaded; a bad value is one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

import yaml

from grpo.config import ConfigError, GRPOConfig

SWITCHES = ("resume",)  # fields that may be given without a value, meaning true


class _Parser(argparse.ArgumentParser):
    """argparse's errors as ConfigError (one line, exit 2 by the caller) instead of usage text."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message}; `python -m grpo.train --help` lists the fields")


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def build_parser(prog: str = "python -m grpo.train") -> argparse.ArgumentParser:
    """One option per GRPOConfig field (`--name`, also `--name-with-dashes`), help from its
    metadata."""
    parser = _Parser(
        prog=prog,
        description="GRPO with a hand-written loss on an NF4 + LoRA (QLoRA) base. Fields are set "
        "in --config YAML or overridden with --name value (lists: a,b,c).",
        argument_default=argparse.SUPPRESS,  # only the fields given appear in the namespace
    )
    parser.add_argument("--config", help="YAML file of field: value")
    for f in dataclasses.fields(GRPOConfig):
        names = dict.fromkeys([f"--{f.name}", f"--{f.name.replace('_', '-')}"])  # in order
        switch = {"nargs": "?", "const": "true"} if f.name in SWITCHES else {}
        parser.add_argument(
            *names, dest=f.name, metavar="VALUE", help=f"{f.metadata['help']} (default: "
            f"{_default(f)!r})".replace("%", "%%"), **switch
        )  # fmt: skip
    return parser


def config_from_dict(values: dict, source: str = "config") -> GRPOConfig:
    """A GRPOConfig of the defaults with `values` set, each parsed by its field's type."""
    known = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    cfg = GRPOConfig()
    for key, value in values.items():
        if key not in known:
            raise ConfigError(
                f"{source}: unknown key {key!r}; `python -m grpo.train --help` lists the fields"
            )
        setattr(cfg, key, _coerce(key, value, _field_type(known[key]), source))
    return cfg


def load_config(path: str | Path) -> GRPOConfig:
    """The config a YAML file of `field: value` lines describes (defaults for the rest)."""
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
    return config_from_dict(values, source=str(path))


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


def parse_cli(argv: list[str] | None = None) -> GRPOConfig:
    """--config FILE.yaml then --field value overrides (bool: --quantize false; list: a,b,c)."""
    args = vars(build_parser().parse_args(argv))
    path = args.pop("config", None)
    cfg = load_config(path) if path else GRPOConfig()
    parsed = config_from_dict(args, source="command line")
    for key in args:
        setattr(cfg, key, getattr(parsed, key))
    return cfg


def check_run(cfg: GRPOConfig) -> GRPOConfig:
    """Every check of `cfg` before any work: its values (`GRPOConfig.validate`), then its task's
    own checks, its reward names against the task's rewards, and its model and LoRA targets
    against the model's config (read on the meta device; nothing is loaded or written)."""
    from grpo.loss import LOSS_OPTION_FIELDS, check_loss_options
    from grpo.policy import check_lora_targets, check_model_name, linear_module_paths
    from grpo.reward_funcs import check_reward_names
    from grpo.rewards import RewardError
    from grpo.tasks import check_task, task_module

    cfg.validate()
    try:  # the objective's options: one check, shared with the loss
        check_loss_options(**{name: getattr(cfg, name) for name in LOSS_OPTION_FIELDS})
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_task(cfg)
    try:
        check_reward_names(cfg.reward_funcs, task_module(cfg.task).REWARDS)
    except RewardError as err:
        raise ConfigError(f"reward_funcs={cfg.reward_funcs!r}: {err}") from None
    if cfg.model != "tiny" and (why := check_model_name(cfg.model)):
        raise ConfigError(f"model={cfg.model!r}: {why}")
    if cfg.use_lora:
        if cfg.model == "tiny":
            from grpo.tiny.build import tiny_linear_paths

            paths = tiny_linear_paths()
        else:
            paths = linear_module_paths(cfg.model)
        if paths is not None and (why := check_lora_targets(cfg.lora_targets, paths, cfg.model)):
            raise ConfigError(f"lora_targets={cfg.lora_targets!r}: {why}")
    return cfg


def exit_on_error(err: Exception) -> typing.NoReturn:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


__all__ = [
    "build_parser",
    "check_run",
    "config_from_dict",
    "exit_on_error",
    "load_config",
    "parse_cli",
]
