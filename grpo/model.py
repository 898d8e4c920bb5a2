"""The one model loader: every entry point (trainer, demo, benchmarks) gets its model here."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model could not be found locally, in the HF cache, or on the hub."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype = "float32"):
    """Load a causal LM and its tokenizer from a hub id (`microsoft/phi-2`) or a local directory.

    Returns (model, tokenizer) with `tokenizer.pad_token` set (Phi-2 has none: eos is used, as
    everyone does) and `model.generation_config.pad_token_id` matching it. Raises `ModelLoadError`
    with one line naming the model and the fix when it is neither local, cached, nor reachable.
    """
    name = str(name_or_path)
    torch_dtype = resolve_dtype(dtype)
    local = Path(name).expanduser()
    looks_local = local.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local and not (local / "config.json").is_file():
        raise ModelLoadError(
            f"model {name!r}: no config.json in that directory; pass a directory written by "
            "save_pretrained (e.g. `make train` builds runs/tiny/base) or a hub id such as "
            "microsoft/phi-2"
        )
    source = str(local) if looks_local else name
    # Read at call time (huggingface_hub reads it only at import), so HF_HUB_OFFLINE=1 set later
    # still means "cache only, no network retries".
    offline = os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in {"1", "true", "yes", "on"}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, local_files_only=offline
        )
    except OSError as err:  # hub unreachable / not cached / repo missing all surface as OSError
        raise ModelLoadError(
            f"model {name!r} is not a local directory, not in the Hugging Face cache, and the hub "
            f"cannot be reached ({type(err).__name__}); fix: run `huggingface-cli download {name}` "
            "on a machine with internet (or copy the cache here), or pass a local directory"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only generation pads on the left
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer
