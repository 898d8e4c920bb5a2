"""What the demo should load, from the command line and the run directory: paths, task,
settings. Only light imports (no torch), so a bad path fails in a fraction of a second.

A run directory (`make train` writes runs/tiny) holds config.yaml, base/ (model: tiny only),
adapter/ and summary.json. `--model` and `--adapter` override the run's, or replace it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from grpo.cli import load_config
from grpo.config import ConfigError, GRPOConfig, is_local_name


class DemoError(RuntimeError):
    """The demo cannot start; the message is one line naming the path and the fix (exit 2)."""


@dataclass
class DemoSpec:
    """What to load, resolved from the CLI: paths, task, settings."""

    model: str
    adapter: Path
    quantize: bool = True
    merge: bool = False
    int16: bool = False  # decode with the int16 NF4 kernel (qlora.int16_decode), not the exact one
    dtype: str = "auto"  # the run's, else by size: float32 for the tiny Phi, bf16 for Phi-2
    task: str | None = None  # examples and gold answers come from this task's splits
    config: GRPOConfig | None = None  # the run's config, when loading a run directory
    summary: dict = field(default_factory=dict)  # the run's summary.json, when present
    max_new_tokens: int = 64  # the slider's starting value
    max_new_tokens_cap: int = 256


def resolve_spec(
    run_dir: str | None,
    model: str | None = None,
    adapter: str | None = None,
    *,
    quantize: bool = True,
    merge: bool = False,
    int16: bool = False,
    task: str | None = None,
    max_new_tokens_cap: int = 256,
    dtype: str | None = None,
) -> DemoSpec:
    """Turn the CLI's paths into a DemoSpec, or raise DemoError naming the missing path."""
    cfg, summary = None, {}
    if run_dir is not None:
        run = Path(run_dir)
        cfg, summary = read_run(run)
        # A tiny run's base lives inside the run directory, wherever that has been moved.
        model = model or str(run / "base" if cfg.model == "tiny" else cfg.model)
        adapter = adapter or str(run / "adapter")
        task = task or cfg.task
    adapter_dir = check_adapter(adapter, from_run=run_dir is not None)
    if model is None:  # --adapter alone: the base the adapter says it was trained on
        model = adapter_base_model(adapter_dir)
    check_local_model(model)
    return DemoSpec(
        model=str(model),
        adapter=adapter_dir,
        quantize=quantize,
        merge=merge,
        int16=int16,
        dtype=dtype or (cfg.dtype if cfg else "auto"),
        task=task,
        config=cfg,
        summary=summary,
        max_new_tokens=cfg.max_new_tokens if cfg else 64,
        max_new_tokens_cap=max_new_tokens_cap,
    )


def read_run(run: Path) -> tuple[GRPOConfig, dict]:
    """A run directory's config (required) and summary.json (optional: a bad one is ignored
    with a warning)."""
    config_path = run / "config.yaml"
    if not config_path.is_file():
        raise DemoError(
            f"{config_path} is missing, so {run} is not a trained run; fix: train it "
            "(`make train` writes runs/tiny) or pass --model MODEL --adapter DIR"
        )
    try:
        cfg = load_config(config_path)
    except ConfigError as err:
        raise DemoError(f"{err}; fix: repair the file or re-run `make train`") from err
    summary = {}
    summary_path = run / "summary.json"
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError:
            print(f"demo: warning: {summary_path} is not valid JSON; ignored", file=sys.stderr)
    return cfg, summary


def check_adapter(adapter: str | None, from_run: bool) -> Path:
    """The adapter directory, checked to hold adapter_config.json."""
    if adapter is None:
        raise DemoError(
            "no adapter given; fix: pass --run-dir runs/tiny (after `make train`) or "
            "--adapter DIR (a peft-format LoRA directory)"
        )
    adapter_dir = Path(adapter)
    if not (adapter_dir / "adapter_config.json").is_file():
        fix = (
            f"run `make train` (writes {adapter_dir}) or pass --adapter DIR"
            if from_run
            else "pass a directory written by save_adapter or peft's save_pretrained"
        )
        raise DemoError(f"adapter {adapter_dir / 'adapter_config.json'} does not exist; fix: {fix}")
    return adapter_dir


def adapter_base_model(adapter_dir: Path) -> str:
    """The base model an adapter names (base_model_name_or_path in its adapter_config.json)."""
    config_path = adapter_dir / "adapter_config.json"
    try:
        model = json.loads(config_path.read_text()).get("base_model_name_or_path")
    except (json.JSONDecodeError, AttributeError) as err:
        raise DemoError(
            f"{config_path} is not a JSON object ({err}); fix: re-save the adapter, or pass --model"
        ) from err
    if not model:
        raise DemoError(f"{config_path} names no base_model_name_or_path; fix: pass --model")
    return model


def check_local_model(model: str) -> None:
    """A model given as a path must hold config.json: said now rather than after loading
    (load_model still checks hub ids and everything else)."""
    if is_local_name(str(model)) and not (Path(model).expanduser() / "config.json").is_file():
        raise DemoError(
            f"model {model}: no config.json there; fix: pass a directory written by "
            "save_pretrained (`make train` builds runs/tiny/base) or a hub id such as "
            "microsoft/phi-2"
        )
