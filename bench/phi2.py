"""A Phi-2-sized model with random weights, built once from Phi-2's config and cached on disk.

Speed and memory do not depend on the weights' values: a `PhiForCausalLM` built from
microsoft/phi-2's config.json (2.78 B parameters) with random bf16 weights runs every kernel,
loader and trainer path the real one would, with no model hub. The tokenizer is the tiny Phi's
character tokenizer (ids < 100 of the 51,200-entry vocabulary), so a prompt of n characters is n
tokens. It is cached where converted models are (`grpo.pretrained.cache_root`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from grpo.pretrained import cache_root
from qlora.atomic import atomic_dir

# microsoft/phi-2 config.json; everything not listed is PhiConfig's default (gelu_new, rope theta
# 10,000, layer norm eps 1e-5), which matches Phi-2's file.
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
# (out, in) of its quantized linears: attention (q, k, v, dense), fc1, fc2
PHI2_SHAPES = ((2560, 2560), (10240, 2560), (2560, 10240))


def phi2_config(num_layers: int = 32):
    from transformers import PhiConfig

    from grpo.tiny.build import SPECIAL_TOKENS

    pad, bos, eos = (SPECIAL_TOKENS.index(t) for t in ("<pad>", "<bos>", "<eos>"))
    kwargs = {**PHI2_CONFIG, "num_hidden_layers": num_layers}
    return PhiConfig(**kwargs, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos)


def phi2_dir(num_layers: int = 32, seed: int = 0, log=print) -> Path:
    """The cached random Phi-2 (bf16 safetensors + the character tokenizer); built if missing
    (32 layers: ~5.6 GB)."""
    directory = cache_root() / f"phi2-random-{num_layers}L-seed{seed}"
    if (directory / "config.json").is_file():
        return directory
    from transformers import PhiForCausalLM

    from grpo.tiny.build import build_char_tokenizer

    log(f"building a random Phi-2 ({num_layers} layers, bf16) in {directory} (once)")
    torch.manual_seed(seed)
    model = PhiForCausalLM._from_config(phi2_config(num_layers), dtype=torch.bfloat16)
    tokenizer = build_char_tokenizer()
    tokenizer.model_max_length = PHI2_CONFIG["max_position_embeddings"]
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return directory
