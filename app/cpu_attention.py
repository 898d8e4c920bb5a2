"""Attention for bfloat16 models on a CPU, where decoding is concerned.

PyTorch's fused CPU kernel for scaled-dot-product attention is slower in bfloat16 than in float32
when the query is a single position, and a decode step runs it once per layer. So queries of at
most DECODE_QUERY_LENGTH positions are computed in float32 from the same bf16 keys and values and
cast back (more precise, never less); longer queries (prefill, training) go to transformers' "sdpa"
unchanged. The keys and values may come from a float32 cache (app.streaming keeps one for decoding,
so that they are not widened again on every step): they hold 16-bit values, narrowed back exactly
for long queries.

    use_cpu_decode_attention(model)   switch a model that runs "sdpa" to this attention
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

NAME = "sdpa_cpu_decode"
DECODE_QUERY_LENGTH = 4  # query positions up to which attention runs in float32 on CPU


def cpu_decode_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention signature: query [B, heads, q, d], key/value [B, heads, k, d]."""
    if not (
        query.device.type == "cpu"
        and query.dtype == torch.bfloat16
        and query.shape[2] <= DECODE_QUERY_LENGTH
    ):
        if key.dtype != query.dtype:  # a float32 KV cache of 16-bit values: narrowed exactly
            key, value = key.to(query.dtype), value.to(query.dtype)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(
        module, query.float(), key.float(), value.float(), attention_mask, **kwargs
    )
    return out.to(query.dtype), weights


def use_cpu_decode_attention(model) -> None:
    """Make `model` (running "sdpa") use cpu_decode_attention; other implementations stay."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(NAME, cpu_decode_attention)
    model.set_attn_implementation(NAME)
