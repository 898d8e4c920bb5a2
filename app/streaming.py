"""Token-by-token generation of the base and the tuned answer to one prompt, interleaved.

Both answers stream at once: each step runs one forward of the base (LoRA switched off with
`adapters_disabled`) and one of the tuned model, each with its own KV cache, and yields both texts.
The loop mirrors what `model.generate` does for one unpadded prompt (prefill with
`logits_to_keep=1`, then one token per step on the cache, attention mask of ones), so greedy
decoding here gives exactly `model.generate(do_sample=False)`'s tokens; tests/test_app.py checks
that through the running server.

`adapters_disabled` flips a flag on the shared model's layers, so every forward holds `lock`: two
requests running in two threads can never see each other's adapter state.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from qlora import adapters_disabled


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


def nucleus_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p (Holtzman et al. 2020) as transformers' TopPLogitsWarper: set to -inf the least
    likely tokens whose probabilities sum to at most 1 - top_p; the most likely always stays.
    logits [B, V] -> [B, V]."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)  # [B, V], ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - top_p  # the low tail
    drop[..., -1:] = False
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def next_token(logits: torch.Tensor, sampling: Sampling, generator=None) -> torch.Tensor:
    """[1, V] logits -> [1] token id: argmax, or sample from softmax(nucleus(logits / T))."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = nucleus_filter(logits / sampling.temperature, sampling.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def _cache_kwarg(model) -> str:
    """transformers 5 calls the KV cache `cache`; 4.x called it `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _Stream:
    """One model's generation state: token ids so far, its KV cache, finished or not."""

    def __init__(self, model, prompt_ids: torch.Tensor, eos_token_id: int, disable_adapters: bool):
        self.model = model
        self.disable_adapters = disable_adapters
        self.eos_token_id = eos_token_id
        self.ids = prompt_ids  # [1, P + t]
        self.prompt_len = prompt_ids.shape[1]
        self.cache = None
        self.done = False
        self.cache_key = _cache_kwarg(model)

    def step(self, sampling: Sampling, generator=None) -> None:
        first = self.cache is None
        inputs = self.ids if first else self.ids[:, -1:]
        context = (
            adapters_disabled(self.model) if self.disable_adapters else contextlib.nullcontext()
        )
        with context:
            out = self.model(
                input_ids=inputs,
                attention_mask=torch.ones_like(self.ids),
                use_cache=True,
                logits_to_keep=1,
                **({} if first else {self.cache_key: self.cache}),
            )
        self.cache = getattr(out, self.cache_key)
        token = next_token(out.logits[:, -1, :].float(), sampling, generator)  # [1]
        self.ids = torch.cat([self.ids, token[:, None].to(self.ids.device)], dim=1)
        if int(token) == self.eos_token_id:
            self.done = True

    @property
    def completion_ids(self) -> torch.Tensor:
        """Generated ids without the EOS (what `skip_special_tokens` drops anyway)."""
        ids = self.ids[0, self.prompt_len :]
        return ids[:-1] if self.done else ids


class PairGenerator:
    """Streams (base_text, tuned_text) for a prompt.

    `base_model` is run under `adapters_disabled`; `tuned_model` is the same object (adapter on)
    or, with --merge, a separate merged copy.
    """

    def __init__(self, base_model, tuned_model, tokenizer, max_new_tokens_cap: int):
        self.base_model = base_model
        self.tuned_model = tuned_model
        self.tokenizer = tokenizer
        self.context_length = int(getattr(base_model.config, "max_position_embeddings", 2048))
        self.max_new_tokens_cap = max(1, min(max_new_tokens_cap, self.context_length - 1))
        self.lock = threading.Lock()
        self.device = next(base_model.parameters()).device

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
        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        room = self.context_length - new_tokens
        if ids.shape[1] > room:
            notes.append(
                f"The prompt is {ids.shape[1]} tokens; with {new_tokens} new tokens the model's "
                f"{self.context_length}-token context holds only {room}, so only its last {room} "
                "tokens were used."
            )
            ids = ids[:, -room:]
        return PreparedPrompt(ids.to(self.device), new_tokens, " ".join(notes))

    def decode(self, stream: _Stream) -> str:
        return self.tokenizer.decode(stream.completion_ids, skip_special_tokens=True)

    @torch.inference_mode()
    def stream(
        self, prepared: PreparedPrompt, sampling: Sampling, generator=None
    ) -> Iterator[tuple[str, str]]:
        """Yield (base_text, tuned_text) after every step, until both stop (EOS or the limit)."""
        eos = self.tokenizer.eos_token_id
        streams = [
            _Stream(self.base_model, prepared.input_ids, eos, disable_adapters=True),
            _Stream(self.tuned_model, prepared.input_ids, eos, disable_adapters=False),
        ]
        for _ in range(prepared.max_new_tokens):
            for s in streams:
                if not s.done:
                    with self.lock:
                        s.step(sampling, generator)
            yield self.decode(streams[0]), self.decode(streams[1])
            if all(s.done for s in streams):
                break
