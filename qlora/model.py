"""Model surgery: put QLoRA into a transformers model in place, switch adapters off, merge them out.

prepare_qlora(model)          target nn.Linear -> LoRALinear(NF4Linear(...)), all else frozen
adapters_disabled(model)      with-block in which the model is the frozen (quantized) base
adapter_rows(model, rows)     with-block in which only those batch rows get the LoRA update
merge_adapters(model)         a new plain model, W' = W + s B A in every adapted layer
footprint(model)              bytes actually stored, parameters, bits per parameter
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .layers import LoRALinear, NF4Linear
from .targets import PHI_TARGETS, expand_targets, leaf_names, matches_target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QLoRAConfig:
    """What prepare_qlora did, stored as `model.qlora_config` (save_adapter reads it)."""

    target_modules: tuple[str, ...]
    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    quantize: bool
    blocksize: int
    double_quant: bool
    compute_dtype: str | None


def find_target_linears(model: nn.Module, target_modules) -> dict[str, nn.Linear | NF4Linear]:
    """{module path: layer} for every module the targets name: an nn.Linear, or an NF4Linear that
    `load_quantized` already made; ValueError naming the first target that matches nothing (a
    target list with another architecture's names must not silently adapt fewer layers) or a
    match that is neither."""
    targets = resolve_targets(model, target_modules)
    found: dict[str, nn.Linear] = {}
    for target in targets:
        hits = {n: m for n, m in model.named_modules() if n and matches_target(n, target)}
        if not hits:
            linear_names = leaf_names(
                n for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear))
            )
            raise ValueError(
                f"target module {target!r} matches no module of {type(model).__name__}; "
                f"its linear layers are named {linear_names}; fix: target some of those, or "
                "all-linear"
            )
        for name, module in hits.items():
            if isinstance(module, LoRALinear):
                raise ValueError(
                    f"{name} already has a LoRA adapter; prepare (or load into) a fresh base model"
                )
            if not isinstance(module, (nn.Linear, NF4Linear)):
                raise ValueError(
                    f"target {target!r} matched {name}, a {type(module).__name__}, not an "
                    "nn.Linear; fix: name the linear layers inside it"
                )
            found[name] = module
    return found


def resolve_targets(model: nn.Module, target_modules) -> tuple[str, ...]:
    """The target names with "all-linear" and "auto" expanded for `model` (qlora.targets)."""
    targets = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    if not targets:
        raise ValueError(f"target_modules is empty; for Phi-2 pass {PHI_TARGETS}, or all-linear")
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear))]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_path = next((n for n, m in model.named_modules() if head is not None and m is head), "")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return expand_targets(targets, linears, model_type, head_path)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts as its n logical parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.qweight.numel for m in model.modules() if isinstance(m, NF4Linear))
    return trainable, total


def stored_bytes(module: nn.Module) -> int:
    """Bytes the module really holds: 4-bit codes and scales, parameters, buffers."""
    quantized = sum(m.qweight.nbytes for m in module.modules() if isinstance(m, NF4Linear))
    tensors = list(module.parameters()) + list(module.buffers())
    return quantized + sum(t.numel() * t.element_size() for t in tensors)


def footprint(model: nn.Module) -> dict:
    """{"bytes", "params", "bits_per_param"}: for one NF4Linear without bias, bits_per_param is
    4 + 32/64 = 4.5, or 4 + 8/64 + 32/(64*256) ~= 4.127 with double quantization."""
    params = trainable_parameters(model)[1]
    nbytes = stored_bytes(model)
    return {"bytes": nbytes, "params": params, "bits_per_param": 8 * nbytes / max(params, 1)}


def prepare_qlora(
    model: nn.Module,
    target_modules=PHI_TARGETS,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.05,
    use_rslora: bool = False,
    quantize: bool = True,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Turn `model` into a QLoRA model in place and return it.

    Every target nn.Linear becomes LoRALinear(NF4Linear(linear)) (or LoRALinear(linear) with
    quantize=False); a target that is already an NF4Linear (`load_quantized`) is wrapped as it
    is, never quantized twice. Everything else is frozen. Embeddings and the output head are never
    quantized, as in QLoRA. compute_dtype None means each weight's own dtype. The settings are
    stored as `model.qlora_config` and the counts as `model.qlora_summary` (also logged).
    """
    names = resolve_targets(model, target_modules)  # the adapter config lists plain names
    targets = find_target_linears(model, names)  # raises before anything changes
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    model.requires_grad_(False)
    for name, linear in targets.items():
        base = linear
        if quantize and isinstance(linear, nn.Linear) and linear is not output_head:
            base = NF4Linear.from_linear(linear, blocksize, double_quant, compute_dtype)
        adapted = LoRALinear(base, r, alpha, dropout, use_rslora)
        _set_submodule(model, name, adapted.train(linear.training))  # an eval model stays eval
    dtype_name = None if compute_dtype is None else str(compute_dtype).removeprefix("torch.")
    model.qlora_config = QLoRAConfig(
        target_modules=names,
        r=r,
        alpha=alpha,
        dropout=dropout,
        use_rslora=use_rslora,
        quantize=quantize or any(isinstance(m, NF4Linear) for m in targets.values()),
        blocksize=blocksize,
        double_quant=double_quant,
        compute_dtype=dtype_name,
    )
    trainable, total = trainable_parameters(model)
    model.qlora_summary = {
        "adapted_modules": len(targets),
        "quantized_modules": sum(isinstance(m, NF4Linear) for m in model.modules()),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total,
        **{f"stored_{k}": v for k, v in footprint(model).items()},
    }
    log.info("prepare_qlora: %s", model.qlora_summary)
    return model


@contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block every LoRALinear returns base(x) exactly: the frozen reference policy
    for the KL term, without a second copy of the model. Nests, and restores each layer's
    previous state on exit, exceptions included."""
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no LoRA layers, so 'adapters disabled' would be the "
            "policy itself; fix: call prepare_qlora (or load_adapter) first"
        )
    previous = [layer.disabled for layer in layers]
    try:
        for layer in layers:
            layer.disabled = True
        yield model
    finally:
        for layer, was_disabled in zip(layers, previous, strict=True):
            layer.disabled = was_disabled


@contextmanager
def adapter_rows(model: nn.Module, rows):
    """Inside the block every LoRALinear adds its update to the batch rows `rows` only (a list or
    int64 tensor of indices into dim 0); every other row is the frozen base exactly. Row 0 the
    base and row 1 the tuned model: one forward answers as both, reading each weight once."""
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no LoRA layers; fix: call prepare_qlora (or "
            "load_adapter) first"
        )
    index = torch.as_tensor(rows, dtype=torch.long, device=_device_of(layers[0]))
    previous = [layer.rows for layer in layers]
    try:
        for layer in layers:
            layer.rows = index
        yield model
    finally:
        for layer, was in zip(layers, previous, strict=True):
            layer.rows = was


def _device_of(layer: LoRALinear) -> torch.device:
    return layer.lora_A.weight.device


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    out_features, in_features = weight.shape
    linear = nn.Linear(
        in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype
    )
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.requires_grad_(False)


def _original_dtype(base: nn.Linear | NF4Linear) -> torch.dtype:
    return base.qweight.dtype if isinstance(base, NF4Linear) else base.weight.dtype


def merge_adapters(model: nn.Module) -> nn.Module:
    """A new model with plain nn.Linear layers, W' = dequantize(W) + scaling * B A, in each
    weight's original dtype; the input model is left as it was. Never re-quantized: rounding
    W' to NF4 again would add a second quantization error. Parameters stay frozen.

    Memory: the copy shares every tensor outside the adapted layers with `model` (embeddings,
    norms, lm_head: frozen, read-only), and the merged weights are made one layer at a time, so
    merging costs the merged linears plus one float32 layer, never a second whole model.
    """
    replaced = {}  # module path -> merged nn.Linear
    for name, module in list(model.named_modules()):
        if any(name.startswith(prefix + ".") for prefix in replaced):
            continue  # the NF4Linear inside a LoRALinear already merged
        if isinstance(module, LoRALinear):
            base, weight = module.base, module.merged_weight()  # float32 [out, in]
        elif isinstance(module, NF4Linear):
            base, weight = module, module.dequantize()
        else:
            continue
        replaced[name] = _plain_linear(weight, base.bias, _original_dtype(base))
        del weight
    # deepcopy with a memo: tensors are shared, the replaced modules are never copied
    memo: dict[int, object] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    memo.update({id(model.get_submodule(name)): linear for name, linear in replaced.items()})
    merged = copy.deepcopy(model, memo)
    for attribute in ("qlora_config", "qlora_summary"):
        merged.__dict__.pop(attribute, None)
    return merged
