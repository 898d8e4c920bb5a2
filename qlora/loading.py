"""Load a transformers checkpoint straight into NF4, one tensor at a time.

`AutoModelForCausalLM.from_pretrained` followed by `prepare_qlora` holds the whole model in 16 or
32 bits before a single weight is quantized: 5.6 GB for Phi-2 in bf16 (11 GB in fp32) to end with
a 1.8 GB model. `load_quantized` never does:

    1. build the model from its config with every parameter on the meta device (no memory);
       buffers such as the rotary frequencies are computed for real, as in any construction
    2. read the safetensors file(s) tensor by tensor with pread(2), never memory-mapped (a mapped
       file's touched pages would count as resident until it is closed)
    3. a target linear's weight is quantized to NF4 as soon as it is read and its 16-bit copy is
       dropped; every other tensor (embeddings, norms, biases, lm_head) is cast to `dtype` and
       becomes the parameter
    4. every target linear becomes an NF4Linear; nothing may be left on the meta device

Peak memory is the final model plus one tensor being quantized, and the result equals
`prepare_qlora`'s NF4 base exactly (same bytes: tests/test_loading.py checks it). LoRA adapters
then wrap the NF4Linear layers with `prepare_qlora` or `load_adapter`, which never re-quantize.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .kernel import quantize
from .layers import NF4Linear
from .model import PHI_TARGETS, _set_submodule, find_target_linears

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded this way; the message names the file or key."""


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; elsewhere nothing).

    glibc serves allocations below its adaptive mmap threshold (up to 32 MB) from the heap and
    keeps them when freed: the 16-bit weights just quantized would stay resident as free heap
    although nothing uses them.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


MMAP_THRESHOLD = 1 << 20  # bytes: allocations this large get pages of their own


def return_large_frees_to_os(threshold: int = MMAP_THRESHOLD) -> bool:
    """Make glibc serve every allocation of >= threshold bytes by mmap, so freeing it returns
    its pages at once; True if set (glibc), False elsewhere.

    By default glibc raises its mmap threshold to the size of each large block freed, up to
    32 MB, and then serves such blocks from the heap, where free memory stays resident: a CPU
    training step of Phi-2 allocates and frees activations of that size by the hundred, and its
    resident memory grows far past what it uses. A fixed threshold (mallopt M_MMAP_THRESHOLD)
    turns the adjustment off; the cost is a page fault per fresh page of a large tensor.
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    m_mmap_threshold = -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, int(threshold)))


def _malloc_trim():
    return _libc_function("malloc_trim")


@functools.cache
def _libc_function(name: str):
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name, None)
    except OSError:  # not glibc (macOS, musl): nothing to call
        return None


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a save_pretrained directory: one file, or the shards its index
    lists. A pickle-only checkpoint (pytorch_model.bin) is refused: unpickling can run code."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model directory {directory} does not exist")
    if (directory / INDEX_FILE).is_file():
        index = json.loads((directory / INDEX_FILE).read_text())
        return [directory / name for name in sorted(set(index["weight_map"].values()))]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    raise CheckpointError(
        f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}; fix: re-save the model with "
        "save_pretrained(..., safe_serialization=True) (pickled .bin weights are never read)"
    )


def stored_parameters(directory: str | os.PathLike) -> int:
    """Number of values in the checkpoint's tensors, read from the safetensors headers only."""
    total = 0
    for path in checkpoint_files(directory):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


def empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The model of `config`, every parameter on the meta device, buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    module_name, _, attr = key.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def load_quantized(
    directory: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    target_modules=PHI_TARGETS,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """The causal LM saved in `directory` with every target linear in NF4 (module docstring).

    Non-quantized tensors are stored in `dtype`; NF4Linear computes in `compute_dtype` (None:
    `dtype`). Returns the model in eval mode with every parameter frozen.
    """
    from transformers import AutoConfig

    directory = Path(directory)
    files = checkpoint_files(directory)
    model = empty_model(AutoConfig.from_pretrained(directory), dtype)
    targets = find_target_linears(model, target_modules)
    output_head = model.get_output_embeddings()
    quantized = {name for name, linear in targets.items() if linear is not output_head}
    expected = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    qweights = {}
    for path in files:
        with safe_open(path, framework="pt", backend="pread") as f:
            for key in f.keys():
                if key not in expected:
                    raise CheckpointError(
                        f"{path}: tensor {key!r} is no parameter of {type(model).__name__}; "
                        "fix: load this checkpoint with its own model class"
                    )
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(expected[key].shape):
                    raise CheckpointError(
                        f"{path}: {key} has shape {tuple(tensor.shape)}, the config says "
                        f"{tuple(expected[key].shape)}; fix: pass the config.json saved with it"
                    )
                module_name, _, attr = key.rpartition(".")
                if module_name in quantized and attr == "weight":
                    # quantize works on the values in `dtype`, as prepare_qlora does on a model
                    # loaded in `dtype`: round to `dtype` first so the bytes match it
                    qweights[module_name] = quantize(
                        tensor.to(dtype), blocksize=blocksize, double_quant=double_quant
                    )
                else:
                    owner, attr = _owner(model, key)
                    value = tensor.to(dtype) if tensor.is_floating_point() else tensor
                    if attr in owner._buffers:
                        owner._buffers[attr] = value
                    else:
                        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
                del tensor
                release_freed_memory()
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    for name in sorted(quantized):
        if name not in qweights:
            raise CheckpointError(f"{directory}: no tensor {name}.weight; fix: re-save the model")
        linear = targets[name]
        bias = linear.bias if linear.bias is not None and not linear.bias.is_meta else None
        if linear.bias is not None and bias is None:
            raise CheckpointError(f"{directory}: no tensor {name}.bias; fix: re-save the model")
        layer = NF4Linear(qweights.pop(name), bias, compute_dtype or dtype)
        _set_submodule(model, name, layer)
    release_freed_memory()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"{directory}: no tensor {left[0]}; fix: re-save the model")
    return model.eval().requires_grad_(False)
