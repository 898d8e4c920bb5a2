"""The one model loader: every entry point (trainer, demo, benchmarks) gets its model here, and
`build_policy` turns it into what GRPO trains (NF4 base + LoRA, or the whole model)."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from grpo.choices import DTYPES
from grpo.config import is_local_name
from grpo.pretrained import PretrainedError, config_source, gguf_path, is_pretrained_name, resolve
from qlora import prepare_qlora, return_large_frees_to_os, trainable_parameters
from qlora.atomic import atomic_dir
from qlora.loading import CheckpointError, load_quantized, stored_parameters
from qlora.model import matches_target
from qlora.targets import KEYWORDS as TARGET_KEYWORDS

TORCH_DTYPES = dict(zip(DTYPES, (torch.float32, torch.bfloat16, torch.float16), strict=True))


class ModelLoadError(RuntimeError):
    """The model could not be found locally, in the HF cache, or on the hub."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {DTYPES}")
    return TORCH_DTYPES[dtype]


SMALL_MODEL_PARAMS = 50_000_000  # "auto" dtype: float32 below this (the tiny Phi), else bf16


def auto_dtype(directory: str | os.PathLike) -> torch.dtype:
    """float32 for a small model (per-op overhead dominates, bf16 would only lose precision),
    bfloat16 for a large one (Phi-2: half the memory of float32, and CPU bf16 matmuls are fast)."""
    return torch.float32 if stored_parameters(directory) < SMALL_MODEL_PARAMS else torch.bfloat16


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:])


def fold_output_head_input(model) -> None:
    """Make the output head's input contiguous before its matmul.

    With `logits_to_keep`, transformers hands lm_head a slice hidden[:, -k:] of the hidden
    states, which is not contiguous; torch.matmul cannot fold such a [B, k, d] tensor into one
    [B k, d] x [d, V] product and instead runs a batched matmul against the weight expanded and
    copied B times: for Phi-2 (V = 51,200) and 2 rows, a 524 MB copy in every prefill and every
    training forward. A copy of the few kept hidden rows costs nothing in comparison.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not getattr(head, "_folds_input", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._folds_input = True


def linear_module_paths(name: str) -> list[str] | None:
    """Module paths of every nn.Linear in the model `name` names, read from its config alone: the
    model is built on the meta device (no weights are allocated, even for Phi-2). `name` is a
    local directory or a hub id whose config.json is in the Hugging Face cache. None when the
    architecture cannot be known before loading (a hub id not cached yet, an architecture
    transformers cannot build); `prepare_qlora` checks the names after the load then, which for
    such a model comes before anything is written."""
    if is_pretrained_name(name) and (name := config_source(name)) is None:
        return None  # a named pretrained model not converted yet (grpo.pretrained)
    source = str(Path(name).expanduser()) if is_local_name(name) else name
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):  # not cached / not a model directory / unknown model_type
        return None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, ImportError):  # a config transformers has no causal-LM class for
        return None
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # "microsoft/phi-2", "gpt2"


def check_model_name(name: str) -> str | None:
    """Why `name` cannot name a model (None when it can): a named pretrained model needs its
    package (unless it is converted already), a local directory needs config.json, anything else
    must look like a hub id. Nothing is downloaded or converted."""
    if is_pretrained_name(name):
        if config_source(name) is None:
            try:
                gguf_path(name)
            except PretrainedError as err:
                return str(err)
    elif is_local_name(name):
        if not (Path(name).expanduser() / "config.json").is_file():
            return "no config.json in that directory; pass a save_pretrained directory"
    elif not _HUB_ID.fullmatch(name):
        return "is neither tiny, a local directory nor a hub id such as microsoft/phi-2"
    return None


def check_lora_targets(targets: list[str], paths: list[str], model: str) -> str | None:
    """Why `targets` do not fit a model with linear layers `paths` (None when every target names
    one of them). The keywords all-linear and auto are expanded and checked at the load."""
    for target in targets:
        if target in TARGET_KEYWORDS:
            continue
        if not any(matches_target(p, target) for p in paths):
            names = sorted({p.rsplit(".", 1)[-1] for p in paths})
            return (
                f"{target!r} names no linear layer of {model}; its linear layers are "
                f"{', '.join(names)}"
            )
    return None


def load_model(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    *,
    nf4_targets: tuple[str, ...] | None = None,
):
    """Load a causal LM and its tokenizer from a hub id (`microsoft/phi-2`), a local directory or
    a named pretrained model (`grpo.pretrained`: its cached conversion, made on first use).

    dtype "auto" picks by size (`auto_dtype`). With `nf4_targets`, those linear layers are
    quantized to NF4 while the checkpoint is read, tensor by tensor (`qlora.load_quantized`): a
    16- or 32-bit copy of the whole model never exists, and `prepare_qlora` / `load_adapter`
    then only add LoRA. Returns (model, tokenizer) with `tokenizer.pad_token` set (Phi-2 has none:
    eos is used, as everyone does) and `model.generation_config.pad_token_id` matching it. Raises
    `ModelLoadError` with one line naming the model and the fix when it is neither local, cached,
    nor reachable.
    """
    name = str(name_or_path)
    if is_pretrained_name(name):  # a named model (grpo.pretrained): its cached local directory
        try:
            name = resolve(name)
        except PretrainedError as err:
            raise ModelLoadError(str(err)) from err
    local = Path(name).expanduser()
    looks_local = is_local_name(name)
    if looks_local and not (local / "config.json").is_file():
        raise ModelLoadError(
            f"model {name!r}: no config.json in that directory; pass a directory written by "
            "save_pretrained (e.g. `make train` builds runs/tiny/base) or a hub id such as "
            "microsoft/phi-2"
        )
    # Read at call time (huggingface_hub reads it only at import), so HF_HUB_OFFLINE=1 set later
    # still means "cache only, no network retries".
    offline = os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in {"1", "true", "yes", "on"}
    try:
        source = str(local) if looks_local else snapshot_download(name, local_files_only=offline)
        torch_dtype = auto_dtype(source) if dtype == "auto" else resolve_dtype(dtype)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        if nf4_targets:
            model = load_quantized(source, dtype=torch_dtype, target_modules=tuple(nf4_targets))
        else:
            # use_kernels=False: transformers would otherwise fetch layers from the hub at load
            # time where the `kernels` package is installed (it fails offline, on CUDA).
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=torch_dtype, local_files_only=True, use_kernels=False
            )
    except (CheckpointError, ValueError) as err:  # no safetensors, or a target it lacks
        raise ModelLoadError(f"model {name!r}: {err}") from err
    except OSError as err:  # hub unreachable / not cached / repo missing all surface as OSError
        raise ModelLoadError(
            f"model {name!r} is not a local directory, not in the Hugging Face cache, and the hub "
            f"cannot be reached ({type(err).__name__}); fix: run `huggingface-cli download {name}` "
            "on a machine with internet (or copy the cache here), or pass a local directory"
        ) from err
    fold_output_head_input(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only generation pads on the left
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def save_model_dir(model, tokenizer, directory: str | os.PathLike) -> Path:
    """`save_pretrained` both into `directory`, atomically (temp dir in the same parent, rename)."""
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(directory)


def base_path(cfg) -> str:
    """Where a run's base model is: <output_dir>/base for the tiny default (built by
    `grpo.tiny.warmup.ensure_tiny_base`), else cfg.model (a hub id or a directory)."""
    return str(Path(cfg.output_dir) / "base") if cfg.model == "tiny" else cfg.model


def resolve_device(device: str) -> torch.device:
    """'auto' (cuda when visible, else cpu), 'cpu' or 'cuda' (an error when none is visible)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but no CUDA device is visible; use --device cpu")
    return torch.device(device)


def release_memory_each_step(model, device: torch.device) -> bool:
    """Whether training steps hand their freed memory back to the OS (glibc set up for it when
    True): on CPU, for a model of at least SMALL_MODEL_PARAMS parameters. A large model's peak
    resident memory then stays near one step's activations; a small one would only re-fault its
    activations' pages every step for a few megabytes."""
    if device.type != "cpu" or trainable_parameters(model)[1] < SMALL_MODEL_PARAMS:
        return False
    return_large_frees_to_os()
    return True


def use_fused_gelu(model) -> int:
    """Swap every NewGELUActivation (Phi's "gelu_new") for transformers' GELUTanh: the same
    formula, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as one torch kernel forward and
    one backward instead of eight elementwise ops and their gradients (equal up to float32
    rounding). Returns how many were swapped."""
    from transformers.activations import GELUTanh, NewGELUActivation

    names = [n for n, m in model.named_modules() if isinstance(m, NewGELUActivation)]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, GELUTanh())
    return len(names)


def build_policy(cfg, device: torch.device):
    """(model, tokenizer, reference or None) for a GRPO run of `cfg` (a GRPOConfig).

    QLoRA (quantize and use_lora): the base is quantized to NF4 while it is read (`nf4_targets`),
    so a 16-bit copy of the whole model never exists, then LoRA wraps the targets. The
    activation is the fused one (use_fused_gelu). use_lora false:
    the whole model trains and the KL reference (beta > 0) is a frozen copy of it."""
    nf4 = tuple(cfg.lora_targets) if cfg.quantize and cfg.use_lora else None
    model, tokenizer = load_model(base_path(cfg), cfg.dtype, nf4_targets=nf4)
    model.to(device)
    use_fused_gelu(model)
    reference = None
    if cfg.use_lora:
        prepare_qlora(
            model,
            target_modules=tuple(cfg.lora_targets),
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            use_rslora=cfg.use_rslora,
            quantize=cfg.quantize,
        )
    elif cfg.beta > 0:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    model.config.use_cache = True
    return model, tokenizer, reference
