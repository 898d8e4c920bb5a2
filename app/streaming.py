"""Token-by-token generation of the base and the tuned answer to one prompt, in one pass.

The base and the tuned model are the same weights but for the LoRA update, so both answers decode
as two rows of one batch: row 0 is the base (`adapter_rows(model, [1])` keeps the update off it,
exactly), row 1 the tuned model. Each step reads every weight once for both answers; on a CPU,
where decoding is bound by memory bandwidth, the pair costs about what one answer costs. With
`--merge` the tuned model is a separate dense copy, and the two run one after the other each step.

The loop mirrors what `model.generate` does for one unpadded prompt (prefill with
`logits_to_keep=1`, then one token per step on the KV cache, attention mask of ones), so greedy
decoding gives exactly `model.generate(do_sample=False)`'s tokens for each side; tests/test_app.py
checks that through the running server. When one side reaches EOS its row keeps decoding (its
tokens are dropped: the other row's results do not depend on it) and the other side goes on.

`adapter_rows` and `adapters_disabled` set state on the shared model's layers, so every forward
holds `lock`: two requests running in two threads never see each other's settings.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from grpo.rollout import next_tokens
from qlora import adapter_rows, adapters_disabled

from . import cpu_attention


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen; `greedy` ignores temperature and top_p."""

    max_new_tokens: int
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass(frozen=True)
class PreparedPrompt:
    input_ids: torch.Tensor  # [1, P]
    max_new_tokens: int  # after the cap and the context limit
    notice: str  # "" or what was changed (truncated prompt, lowered limit), for the UI


@dataclass
class Side:
    """One answer as it streams: its tokens, whether it has ended, and when things happened."""

    ids: list[int] = field(default_factory=list)  # the answer's tokens, without the EOS
    done: bool = False
    eos: bool = False  # ended by EOS (else by the limit, or not yet)
    first_token_seconds: float | None = None  # from the request's start: prefill included
    seconds: float | None = None  # from the request's start to this side's latest token

    def add(self, token: int, eos_token_id: int, elapsed: float) -> None:
        if self.first_token_seconds is None:
            self.first_token_seconds = elapsed
        self.seconds = elapsed
        if token == eos_token_id:
            self.done = self.eos = True
        else:
            self.ids.append(token)

    @property
    def tokens(self) -> int:
        """Tokens generated: the answer's, and the EOS that ended it."""
        return len(self.ids) + self.eos

    def tokens_per_second(self) -> float | None:
        """Decode speed: tokens after the first / time after the first (None below 2 tokens)."""
        if self.first_token_seconds is None or self.tokens < 2:
            return None
        return (self.tokens - 1) / max(1e-9, self.seconds - self.first_token_seconds)

    def speed_line(self) -> str:
        """What the pane shows when the answer has ended: `<n> tokens · first after <t> s ·
        <r> tokens/s`."""
        if self.first_token_seconds is None:
            return ""
        parts = [f"{self.tokens} token{'s' if self.tokens != 1 else ''}"]
        parts.append(f"first after {self.first_token_seconds:.2f} s")
        rate = self.tokens_per_second()
        if rate is not None:
            parts.append(f"{rate:.1f} tokens/s")
        return " · ".join(parts)


def next_token(logits: torch.Tensor, sampling: Sampling, generator=None) -> torch.Tensor:
    """[B, V] logits -> [B] token ids by the rollouts' rule (`grpo.rollout.next_tokens`)."""
    return next_tokens(
        logits,
        0,
        greedy=sampling.greedy,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        generator=generator,
    )


def _cache_kwarg(model) -> str:
    """transformers 5 calls the KV cache `cache`; 4.x called it `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class PreallocatedLayer(DynamicLayer):
    """A KV-cache layer whose keys and values live in one buffer sized for the whole answer.

    transformers' DynamicLayer concatenates every new token onto the cache, copying all of it:
    O(T) bytes per step and layer, with fresh pages each time (for Phi-2, two rows of a 150-token
    prompt: ~100 MB copied per step). Here a step writes only its own
    [B, heads, n, head_dim] slice and attention reads a view of the first T positions, the same
    values in the same order.
    """

    def __init__(self, capacity: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.capacity = capacity  # positions the buffer holds: prompt + new tokens
        self.buffer_dtype = dtype  # None: the keys' own dtype
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        self.device = key_states.device
        dtype = self.buffer_dtype or key_states.dtype
        self.key_buffer = key_states.new_empty(batch, heads, self.capacity, head_dim, dtype=dtype)
        self.value_buffer = value_states.new_empty(
            batch, heads, self.capacity, value_states.shape[-1], dtype=dtype
        )
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions cannot hold {end}")
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys = self.key_buffer[:, :, :end]  # [B, heads, T, head_dim], a view
        self.values = self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


FLOAT32_CACHE_BYTES = 512 * 2**20  # float32 KV cache up to this size (see preallocated_cache)


def cache_dtype(model, rows: int, capacity: int) -> torch.dtype | None:
    """float32 for a 16-bit model that decodes with app.cpu_attention (which computes decode
    attention in float32) when the float32 cache of `rows` x `capacity` positions stays within
    FLOAT32_CACHE_BYTES; None (the model's dtype) otherwise.

    The keys and values are 16-bit numbers either way (widened exactly); a float32 cache only
    saves attention from widening the whole cache on every step of every layer: for Phi-2 at a
    150-token prompt, reading 16-bit, writing and reading 32-bit copies moved 2.5x the bytes
    of reading a float32 cache once.
    """
    cfg = model.config
    if getattr(cfg, "_attn_implementation", None) != cpu_attention.NAME:
        return None
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    nbytes = 2 * cfg.num_hidden_layers * rows * heads * capacity * head_dim * 4
    return torch.float32 if nbytes <= FLOAT32_CACHE_BYTES else None


def preallocated_cache(model, capacity: int, dtype: torch.dtype | None = None) -> Cache:
    """A KV cache of one PreallocatedLayer per decoder layer of `model`."""
    return Cache(
        layers=[PreallocatedLayer(capacity, dtype) for _ in range(model.config.num_hidden_layers)]
    )


class DecodeRows:
    """Rows of one model decoding together on one KV cache; `setting` (a context-manager factory)
    is entered around every forward (adapter_rows, adapters_disabled, or nothing)."""

    def __init__(self, model, prompt_ids: torch.Tensor, setting, max_new_tokens: int):
        self.model = model
        self.setting = setting
        self.ids = prompt_ids  # [B, P + t]
        capacity = prompt_ids.shape[1] + max_new_tokens
        dtype = cache_dtype(model, prompt_ids.shape[0], capacity)
        self.cache = preallocated_cache(model, capacity, dtype)
        self.first = True
        self.cache_key = _cache_kwarg(model)

    @torch.inference_mode()  # here, not only around stream(): steps may run on another thread
    def step(self, sampling: Sampling, generator=None) -> list[int]:
        inputs = self.ids if self.first else self.ids[:, -1:]
        self.first = False
        with self.setting():
            out = self.model(
                input_ids=inputs,
                attention_mask=torch.ones_like(self.ids),
                use_cache=True,
                logits_to_keep=1,
                **{self.cache_key: self.cache},
            )
        self.cache = getattr(out, self.cache_key)
        tokens = next_token(out.logits[:, -1, :].float(), sampling, generator)  # [B]
        self.ids = torch.cat([self.ids, tokens[:, None].to(self.ids.device)], dim=1)
        return tokens.tolist()


class PairGenerator:
    """Streams the base and the tuned answer to a prompt, token by token.

    `base_model` carries the adapter; its answer is computed with the update switched off. If
    `tuned_model` is the same object, both answers are rows of one batch (one pass per token);
    otherwise (`--merge`) the tuned model is its own copy and decodes beside it.

    `runner(fn, *args)` runs each forward pass: by default in the calling thread; the server
    passes `ModelThread.run` (app/worker.py) so every pass runs on the thread that loaded the model.
    """

    def __init__(
        self,
        base_model,
        tuned_model,
        tokenizer,
        max_new_tokens_cap: int,
        runner: Callable[..., Any] | None = None,
    ):
        self.runner = runner or (lambda fn, *args: fn(*args))
        self.base_model = base_model
        self.tuned_model = tuned_model
        self.one_pass = tuned_model is base_model
        self.tokenizer = tokenizer
        self.context_length = int(getattr(base_model.config, "max_position_embeddings", 2048))
        self.max_new_tokens_cap = max(1, min(max_new_tokens_cap, self.context_length - 1))
        self.lock = threading.Lock()
        self.device = next(base_model.parameters()).device
        # What the model reads for a typed prompt (the demo sets the task's chat formatting)
        self.format_prompt: Callable[[str], str] = lambda text: text

    def prepare(self, prompt: str, max_new_tokens: int) -> PreparedPrompt:
        """Tokenize as the trainer does (no special tokens added); clamp max_new_tokens to the
        cap; keep only the prompt's last tokens when prompt + answer would overflow the context."""
        notes = []
        wanted = int(max_new_tokens)
        new_tokens = max(1, min(wanted, self.max_new_tokens_cap))
        if new_tokens != wanted:
            notes.append(
                f"max new tokens {wanted} is outside 1..{self.max_new_tokens_cap}; "
                f"used {new_tokens}."
            )
        text = self.format_prompt(prompt)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        room = self.context_length - new_tokens
        if ids.shape[1] > room:
            notes.append(
                f"The prompt is {ids.shape[1]} tokens; with {new_tokens} new tokens the model's "
                f"{self.context_length}-token context holds only {room}, so only its last {room} "
                "tokens were used."
            )
            ids = ids[:, -room:]
        return PreparedPrompt(ids.to(self.device), new_tokens, " ".join(notes))

    def decode(self, side: Side) -> str:
        return self.tokenizer.decode(side.ids, skip_special_tokens=True)

    def _batches(self, prepared: PreparedPrompt) -> list[tuple[DecodeRows, list[int]]]:
        """(rows decoding together, which side each row is): one batch of two, or two of one."""
        ids, n = prepared.input_ids, prepared.max_new_tokens
        if self.one_pass:
            model = self.base_model
            both = DecodeRows(model, ids.repeat(2, 1), lambda: adapter_rows(model, [1]), n)
            return [(both, [0, 1])]
        base = DecodeRows(self.base_model, ids, lambda: adapters_disabled(self.base_model), n)
        tuned = DecodeRows(self.tuned_model, ids, contextlib.nullcontext, n)
        return [(base, [0]), (tuned, [1])]

    @torch.inference_mode()
    def stream(
        self, prepared: PreparedPrompt, sampling: Sampling, generator=None
    ) -> Iterator[tuple[Side, Side]]:
        """Yield (base, tuned) after every step, until both have ended (EOS or the limit)."""
        eos = self.tokenizer.eos_token_id
        sides = (Side(), Side())
        batches = self._batches(prepared)
        start = time.perf_counter()
        for step in range(prepared.max_new_tokens):
            for rows, which in batches:
                if all(sides[i].done for i in which):
                    continue
                with self.lock:
                    tokens = self.runner(rows.step, sampling, generator)
                elapsed = time.perf_counter() - start
                for token, i in zip(tokens, which, strict=True):
                    if not sides[i].done:
                        sides[i].add(token, eos, elapsed)
            if step == prepared.max_new_tokens - 1:
                for side in sides:
                    side.done = True  # the limit ends whatever EOS did not
            yield sides
            if all(side.done for side in sides):
                break
