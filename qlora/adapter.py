"""LoRA adapters on disk in peft's format, so `peft.PeftModel.from_pretrained` reads ours and we
read peft's.

    <dir>/adapter_config.json        peft's LoraConfig fields (peft_type LORA, r, lora_alpha, ...)
    <dir>/adapter_model.safetensors  base_model.model.<module path>.lora_A.weight  [r, in]
                                     base_model.model.<module path>.lora_B.weight  [out, r]

Only safetensors is ever read: `adapter_model.bin` is a pickle, and unpickling can run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_dir
from .layers import LoRALinear
from .model import find_target_linears, lora_layers, prepare_qlora

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
# Files save_adapter may replace in an existing directory; anything else there means the path
# is probably not an adapter directory, and it is left alone.
_ADAPTER_FILES = {CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME, "README.md"}
# peft options that change the math; an adapter using one would load here but compute wrongly.
_UNSUPPORTED = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "modules_to_save": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "exclude_modules": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
}


class AdapterError(ValueError):
    """An adapter directory that cannot be written or read; the message names the path or key."""


def _keys(name: str) -> tuple[str, str]:
    return f"{KEY_PREFIX}{name}.lora_A.weight", f"{KEY_PREFIX}{name}.lora_B.weight"


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str
) -> Path:
    """Write the model's LoRA weights and config in peft's format; returns the directory.

    Atomic: both files go to a temporary directory next to `directory`, which is then renamed
    into place, so a crash never leaves half an adapter behind.
    """
    directory = Path(directory)
    layers = dict(lora_layers(model))
    if not layers:
        raise AdapterError(
            f"{directory}: the model has no LoRA layers to save; call prepare_qlora first"
        )
    config = _peft_config(model, layers, directory)
    config["base_model_name_or_path"] = str(base_model_name_or_path)
    tensors = {}
    for name, layer in layers.items():
        key_a, key_b = _keys(name)
        tensors[key_a] = layer.lora_A.weight.detach().to("cpu").contiguous()
        tensors[key_b] = layer.lora_B.weight.detach().to("cpu").contiguous()
    _write_atomically(directory, config, tensors)
    return directory


def _peft_config(model: nn.Module, layers: dict[str, LoRALinear], directory: Path) -> dict:
    """peft LoraConfig fields for these layers (all must share r, alpha, rslora, dropout)."""
    settings = {(lay.r, lay.alpha, lay.use_rslora, lay.dropout) for lay in layers.values()}
    if len(settings) != 1:
        raise AdapterError(
            f"{directory}: LoRA layers differ in (r, alpha, use_rslora, dropout): "
            f"{sorted(settings)}; peft's plain config holds one setting; fix: prepare all layers "
            "with the same values"
        )
    r, alpha, use_rslora, dropout = settings.pop()
    prepared = getattr(model, "qlora_config", None)
    if prepared is not None:
        targets = list(prepared.target_modules)
    else:
        targets = sorted({name.rsplit(".", 1)[-1] for name in layers})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "use_rslora": use_rslora,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def _write_atomically(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    if directory.exists():
        if not directory.is_dir():
            raise AdapterError(f"{directory} is a file; fix: pass a directory path")
        strangers = sorted(p.name for p in directory.iterdir() if p.name not in _ADAPTER_FILES)
        if strangers:
            raise AdapterError(
                f"{directory} holds {strangers[0]!r}, which is not an adapter file; refusing to "
                "replace it; fix: pass an empty or new directory"
            )
    with atomic_dir(directory) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """adapter_config.json as a dict, checked for what this loader supports."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise AdapterError(
            f"adapter directory {directory} does not exist; fix: pass a directory written by "
            "save_adapter or peft's save_pretrained"
        )
    if not path.is_file():
        raise AdapterError(f"{path} is missing; fix: pass a directory written by save_adapter")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path} is not valid JSON ({err}); fix: re-save the adapter") from err
    if config.get("peft_type") != "LORA":
        raise AdapterError(
            f"{path}: peft_type={config.get('peft_type')!r}, only 'LORA' adapters load here; "
            "fix: load it with peft"
        )
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise AdapterError(f"{path}: key {key!r} is missing; fix: re-save the adapter")
    targets = config["target_modules"]
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise AdapterError(
            f"{path}: target_modules={targets!r} must be a non-empty list of module names "
            "(a regex string is not supported); fix: save with target_modules as a list"
        )
    for key, neutral in _UNSUPPORTED.items():
        if config.get(key, neutral) not in (neutral, [], {}, None, False):
            raise AdapterError(
                f"{path}: {key}={config[key]!r} is not supported by this loader (plain LoRA only); "
                "fix: train the adapter without it or load it with peft"
            )
    if config.get("bias", "none") != "none":
        raise AdapterError(
            f"{path}: bias={config['bias']!r}, only 'none' is supported; fix: load it with peft"
        )
    return config


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, quantize: bool = False, **prepare_kwargs
) -> nn.Module:
    """Load a peft-format LoRA adapter into `model` and return it.

    On a plain model the target modules named in adapter_config.json are first wrapped (with
    its r, lora_alpha, use_rslora, lora_dropout; `quantize` and `prepare_kwargs` such as
    blocksize or compute_dtype go to prepare_qlora). A model that already has LoRA layers must
    match the config. Keys and shapes are all checked before the model is touched.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        if (directory / PICKLE_NAME).is_file():
            raise AdapterError(
                f"{directory / PICKLE_NAME} is a pickle file and is never read (unpickling can "
                "run code); fix: convert it once where you trust it, e.g. PeftModel.from_pretrained"
                f"(...).save_pretrained(dir, safe_serialization=True), to {WEIGHTS_NAME}"
            )
        raise AdapterError(f"{weights_path} is missing; fix: re-save the adapter with save_adapter")
    clash = sorted(set(prepare_kwargs) & {"target_modules", "r", "alpha", "use_rslora"})
    if clash:
        raise AdapterError(
            f"{clash[0]}= comes from {directory / CONFIG_NAME}; fix: drop it from the call"
        )
    r, alpha = config["r"], config["lora_alpha"]
    use_rslora = bool(config.get("use_rslora", False))

    existing = dict(lora_layers(model))
    if existing:
        for name, layer in existing.items():
            if (layer.r, layer.alpha, layer.use_rslora) != (r, alpha, use_rslora):
                raise AdapterError(
                    f"{directory / CONFIG_NAME}: r={r}, lora_alpha={alpha}, "
                    f"use_rslora={use_rslora} but {name} has r={layer.r}, alpha={layer.alpha}, "
                    f"use_rslora={layer.use_rslora}; fix: load into a fresh base model"
                )
        shapes = {name: (layer.in_features, layer.out_features) for name, layer in existing.items()}
    else:
        try:
            linears = find_target_linears(model, config["target_modules"])
        except ValueError as err:
            raise AdapterError(f"{directory / CONFIG_NAME}: {err}") from err
        shapes = {name: (lin.in_features, lin.out_features) for name, lin in linears.items()}

    expected = {}  # key -> shape: A [r, in], B [out, r]
    for name, (in_features, out_features) in shapes.items():
        key_a, key_b = _keys(name)
        expected[key_a], expected[key_b] = (r, in_features), (out_features, r)
    tensors = load_file(weights_path)
    _check_tensors(tensors, expected, weights_path, config)

    if not existing:
        prepare_kwargs.setdefault("dropout", float(config.get("lora_dropout", 0.0)))
        prepare_qlora(
            model,
            target_modules=tuple(config["target_modules"]),
            r=r,
            alpha=alpha,
            use_rslora=use_rslora,
            quantize=quantize,
            **prepare_kwargs,
        )
    with torch.no_grad():
        for name, layer in lora_layers(model):
            key_a, key_b = _keys(name)
            layer.lora_A.weight.copy_(tensors[key_a])
            layer.lora_B.weight.copy_(tensors[key_b])
    return model


def _check_tensors(tensors: dict, expected: dict, path: Path, config: dict) -> None:
    """AdapterError naming the first unexpected key, missing key, or wrong shape."""
    base_model = config.get("base_model_name_or_path")
    fix = f"fix: load into the base model the adapter was trained on ({base_model})"
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise AdapterError(
            f"{path}: key {unexpected[0]} names no LoRA layer of this model (other target "
            f"modules or another base model?); {fix}"
        )
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterError(f"{path}: key {missing[0]} is missing; fix: re-save the adapter")
    for key in sorted(expected):
        if tuple(tensors[key].shape) != expected[key]:
            raise AdapterError(
                f"{path}: {key} has shape {tuple(tensors[key].shape)}, this model needs "
                f"{expected[key]} (r={config['r']}); {fix}"
            )
