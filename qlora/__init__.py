"""QLoRA written by hand: NF4 4-bit weights with double quantization (byte-identical to
bitsandbytes), LoRA adapters on top, adapters saved in peft's format.

    nf4.py          NF4_CODE, quantize_nf4, dequantize_nf4 (pure tensor functions)
    layers.py       NF4Linear (frozen 4-bit linear), LoRALinear (the adapter)
    model.py        prepare_qlora, adapters_disabled, adapter_rows, merge_adapters, footprint
    targets.py      LoRA target names by architecture (PHI_TARGETS, LLAMA_TARGETS), all-linear, auto
    loading.py      load_quantized: a checkpoint read tensor by tensor straight into NF4
    adapter.py      save_adapter / load_adapter (peft format, safetensors only)
    kernel.py       the fused NF4 CPU kernel (C++, built on first use) and its dispatch
    int16_decode.py the opt-in int16 NF4 decode kernel and bf16 GEMV output layer (C++)
    atomic.py       atomic_path / atomic_dir: a file or directory written whole or not at all

This package never imports grpo/.
"""

from .adapter import AdapterError, load_adapter, read_adapter_config, save_adapter
from .layers import LoRALinear, NF4Linear
from .loading import (
    CheckpointError,
    load_quantized,
    release_freed_memory,
    return_large_frees_to_os,
)
from .model import (
    PHI_TARGETS,
    QLoRAConfig,
    adapter_rows,
    adapters_disabled,
    footprint,
    lora_layers,
    merge_adapters,
    prepare_qlora,
    stored_bytes,
    trainable_parameters,
)
from .nf4 import (
    NF4_CODE,
    NF4Weight,
    create_dynamic_map,
    create_normal_map,
    dequantize_nf4,
    quantize_nf4,
)

__all__ = [
    "NF4_CODE",
    "PHI_TARGETS",
    "AdapterError",
    "CheckpointError",
    "LoRALinear",
    "NF4Linear",
    "NF4Weight",
    "QLoRAConfig",
    "adapter_rows",
    "adapters_disabled",
    "create_dynamic_map",
    "create_normal_map",
    "dequantize_nf4",
    "footprint",
    "load_adapter",
    "load_quantized",
    "lora_layers",
    "merge_adapters",
    "prepare_qlora",
    "quantize_nf4",
    "read_adapter_config",
    "release_freed_memory",
    "return_large_frees_to_os",
    "save_adapter",
    "stored_bytes",
    "trainable_parameters",
]
