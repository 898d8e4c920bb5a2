"""A Phi-2-sized model with random weights, built once from Phi-2's config and cached on disk.

Model hubs are out of reach here, but speed and memory do not depend on the weights' values: a
`PhiForCausalLM` built from microsoft/phi-2's config.json (2.78 B parameters) with random bf16
weights runs every kernel, loader and trainer path the real one would. The tokenizer is the tiny
Phi's character tokenizer (ids < 100 of the 51,200-entry vocabulary), so a prompt of n characters
is n tokens.

    phi2_dir()                 -> Path of the cached model (built on first use, ~5.6 GB, ~1 min)
    phi2_dir(num_layers=2)     -> the same shapes cut to 2 blocks (tests, CI)

The cache lives in $GRPO_QLORA_CACHE (default ~/.cache/grpo-qlora); a directory is complete once
its `complete` marker exists, so a build killed halfway is rebuilt, never half-read.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

# microsoft/phi-2 config.json; everything not listed is PhiConfig's default (gelu_new, rope theta
# 10,000, layer norm eps 1e-5), which matches Phi-2's file. Dropout is irrelevant to speed.
PHI2_CONFIG = dict(
    vocab_size=51200,
    hidden_size=2560,
    intermediate_size=10240,
    num_hidden_layers=32,
    num_attention_heads=32,
    partial_rotary_factor=0.4,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def cache_root() -> Path:
    return Path(os.environ.get("GRPO_QLORA_CACHE", Path.home() / ".cache" / "grpo-qlora"))


def phi2_config(num_layers: int = 32, **overrides):
    from transformers import PhiConfig

    from grpo.tiny.build import SPECIAL_TOKENS

    pad, bos, eos = (SPECIAL_TOKENS.index(t) for t in ("<pad>", "<bos>", "<eos>"))
    kwargs = {**PHI2_CONFIG, "num_hidden_layers": num_layers, **overrides}
    return PhiConfig(**kwargs, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos)


def phi2_dir(num_layers: int = 32, seed: int = 0, root: Path | None = None, log=print) -> Path:
    """The cached random Phi-2 (bf16 safetensors + the character tokenizer); built if missing."""
    root = Path(root) if root is not None else cache_root()
    directory = root / f"phi2-random-{num_layers}L-seed{seed}"
    if (directory / "complete").is_file():
        return directory
    from transformers import PhiForCausalLM

    from grpo.tiny.build import build_char_tokenizer

    log(f"building a random Phi-2 ({num_layers} layers, bf16) in {directory} (once)")
    torch.manual_seed(seed)
    model = PhiForCausalLM._from_config(phi2_config(num_layers), dtype=torch.bfloat16)
    tokenizer = build_char_tokenizer()
    tokenizer.model_max_length = PHI2_CONFIG["max_position_embeddings"]
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=root))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model directory is not
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "complete").write_text("built by bench.phi2.phi2_dir\n")
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


if __name__ == "__main__":
    print(phi2_dir())
