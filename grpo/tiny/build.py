"""The embedded default model: a tiny Phi built from transformers' own `PhiForCausalLM`.

Phi-2 cannot be downloaded on a machine without a model hub, so the default run trains a model of
the very same architecture, only small: the module names (`q_proj, k_proj, v_proj, dense, fc1, fc2,
lm_head`) and the loading path (`save_pretrained` -> `AutoModelForCausalLM.from_pretrained(dir)`)
are Phi-2's, so everything that runs on it runs on Phi-2 unchanged.

The tokenizer is character level, built with the `tokenizers` library and wrapped as a
`PreTrainedTokenizerFast`, so `decode(encode(text)) == text` for any text made of its characters.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PhiConfig, PhiForCausalLM, PreTrainedTokenizerFast

from grpo.policy import save_model_dir

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
# Every character the embedded tasks and the demo's prompts use: digits, operators, letters, the
# XML-ish answer tags, punctuation and whitespace.
CHARACTERS = (
    "0123456789+-*/=()<>.,:;?!'\"$%#&_ \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


def build_char_tokenizer(characters: str = CHARACTERS) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character, plus pad/bos/eos/unk."""
    if len(set(characters)) != len(characters):
        raise ValueError("characters must be unique; got duplicates in the character set")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in characters:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Split into single characters and keep every one (spaces and newlines included).
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )


def tiny_phi_config(vocab_size: int, **overrides) -> PhiConfig:
    """Phi-2's architecture at ~0.8M parameters (Phi-2: 2560 wide, 32 layers, 32 heads)."""
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,  # head_dim 32; int(32 * 0.4) = 12 rotary dims (must be even)
        max_position_embeddings=256,
        partial_rotary_factor=0.4,  # as Phi-2
        hidden_act="gelu_new",  # as Phi-2
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,  # as Phi-2: lm_head is its own matrix (with a bias)
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return PhiConfig(**kwargs)


def build_tiny_phi(
    seed: int = 0, **config_overrides
) -> tuple[PhiForCausalLM, PreTrainedTokenizerFast]:
    """A randomly initialised tiny `PhiForCausalLM` and its character tokenizer."""
    tokenizer = build_char_tokenizer()
    config = tiny_phi_config(len(tokenizer), **config_overrides)
    torch.manual_seed(seed)
    model = PhiForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, tokenizer


def save_tiny_phi(directory: str | os.PathLike, seed: int = 0, **config_overrides) -> Path:
    """Build the tiny Phi and save it so `from_pretrained(directory)` loads it like Phi-2."""
    model, tokenizer = build_tiny_phi(seed=seed, **config_overrides)
    return save_model_dir(model, tokenizer, directory)


def tiny_linear_paths() -> list[str]:
    """Module paths of every nn.Linear of the tiny Phi (built on the meta device, no weights)."""
    with torch.device("meta"):
        model = PhiForCausalLM(tiny_phi_config(vocab_size=32))  # names do not depend on vocab
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
