"""Rollouts: G sampled completions per prompt (their log-probs: grpo/logprobs.py).

Layout of one generation batch (N = prompts * G rows, each prompt's G rows contiguous):

    prompt_ids      [N, P]  left-padded (pad, pad, p1 .. pk), prompt_mask 0 on the padding
    completion_ids  [N, C]  right-padded after the first EOS, C <= max_new_tokens
    completion_mask [N, C]  1 up to and including the first EOS, 0 after it
    truncated       [N]     True when no EOS came within max_new_tokens

Left padding keeps every prompt's last token in column P-1, so the logit that predicts completion
token t is always column P-1+t. Position ids are counted from the first real token
(cumsum(mask) - 1), as `generate` does, so the training forward sees the same positions as sampling.

Sampling (`sample_completions`) is the loop of transformers' `generate`, written out: one prefill
forward, then one token per step on the KV cache, the logits processed in `generate`'s order
(EOS masked below min_new_tokens, then / temperature, then top-p), one `torch.multinomial` draw
per step (or argmax), finished rows padded, stop when every row has ended. So for the same seed it
draws `generate`'s tokens. One thing `generate` does not do: a prompt that appears G times is
prefilled once and its KV cache copied to its G rows (prefill costs 1/G).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [N, P]
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, C]
    completion_mask: torch.Tensor  # [N, C]
    truncated: torch.Tensor  # [N] bool
    completions: list[str]  # N decoded completions, special tokens removed

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def select(self, rows: slice | torch.Tensor) -> Rollout:
        """The rows `rows` (a micro-batch); `completions` follows."""
        idx = range(len(self))[rows] if isinstance(rows, slice) else rows.tolist()
        return Rollout(
            self.prompt_ids[rows],
            self.prompt_mask[rows],
            self.completion_ids[rows],
            self.completion_mask[rows],
            self.truncated[rows],
            [self.completions[i] for i in idx],
        )


def tokenize_prompts(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask [N, P]; no special tokens are added (Phi-2 adds none)."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_token_id: int):
    """Mask [N, C] that is 1 up to and including the first EOS, and the truncated flags [N].

    Example: eos=2, ids [[5, 2, 0], [5, 6, 7]] -> mask [[1, 1, 0], [1, 1, 1]], truncated [F, T].
    """
    is_eos = completion_ids == eos_token_id  # [N, C]
    # Number of EOS strictly before t: 0 up to and including the first EOS.
    eos_before = is_eos.long().cumsum(dim=1) - is_eos.long()
    mask = (eos_before == 0).long()
    truncated = ~is_eos.any(dim=1)
    return mask, truncated


def nucleus_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p (Holtzman et al. 2020) as transformers' TopPLogitsWarper: set to -inf the least
    likely tokens whose probabilities sum to at most 1 - top_p; the most likely always stays.

    logits [N, V] -> [N, V]. Example: probabilities (0.5, 0.3, 0.2), top_p 0.7 -> the 0.2 token
    goes (0.2 <= 0.3), the 0.3 token stays (0.2 + 0.3 > 0.3).
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)  # [N, V], ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - top_p  # the low tail
    drop[..., -1:] = False
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def next_tokens(
    logits: torch.Tensor,
    step: int,
    *,
    greedy: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    min_new_tokens: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Completion token `step` (0-based) for every row: float32 logits [N, V] -> ids [N]. The one
    next-token rule of rollouts, evaluation and the demo.

    scores = logits, with scores[:, eos] = -inf while step < min_new_tokens
    greedy:  argmax(scores)
    sampled: one draw from softmax(nucleus(scores / temperature, top_p)), from `generator`
    """
    if step < min_new_tokens and eos_token_id is not None:
        logits = logits.clone()
        logits[:, eos_token_id] = float("-inf")
    if greedy:
        return logits.argmax(dim=-1)
    if temperature != 1.0:
        logits = logits / temperature
    probs = nucleus_filter(logits, top_p).softmax(dim=-1)  # [N, V]
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


@torch.no_grad()
def sample_completions(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    rows: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    greedy: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    min_new_tokens: int = 0,
) -> torch.Tensor:
    """Completion ids [N, C] for the N rows `rows` [N] of U distinct left-padded prompts [U, P].

    Prefill the U prompts once (logits of the last position only), copy their KV cache to the N
    rows, then for t = 0 .. max_new_tokens - 1: pick token t from the logits (`next_tokens`), a
    row that has already produced EOS gets pad instead, and stop early once every row has. Each
    decode step feeds the N new tokens at position (last prompt position + 1 + t) with the
    attention mask of the prompt and the tokens so far. C is the number of steps run.
    """
    position_ids = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)  # [U, P]
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.cache
    if rows.numel() != prompt_ids.shape[0] or not torch.equal(
        rows, torch.arange(len(rows), device=rows.device)
    ):
        cache.batch_select_indices(rows)  # [U, ...] -> [N, ...]
    logits = out.logits[rows, -1].float()  # [N, V]
    attention_mask = prompt_mask[rows]  # [N, P + t]
    position = position_ids[rows, -1:]  # [N, 1]
    unfinished = torch.ones(len(rows), dtype=torch.bool, device=prompt_ids.device)
    tokens: list[torch.Tensor] = []  # t entries of [N]
    for step in range(max_new_tokens):
        if step > 0:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], 1)
            position = position + 1
            out = model(
                input_ids=tokens[-1][:, None],
                attention_mask=attention_mask,
                position_ids=position,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = out.cache
            logits = out.logits[:, -1].float()  # [N, V]
        token = next_tokens(
            logits,
            step,
            greedy=greedy,
            temperature=temperature,
            top_p=top_p,
            eos_token_id=eos_token_id,
            min_new_tokens=min_new_tokens,
        )
        token = torch.where(unfinished, token, pad_token_id)  # [N]
        tokens.append(token)
        unfinished &= token != eos_token_id
        if not unfinished.any():
            break
    return torch.stack(tokens, dim=1)  # [N, C]


@torch.no_grad()
def generate_rollouts(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    min_new_tokens: int = 0,
) -> Rollout:
    """One completion per entry of `prompts` (repeat each prompt G times for a group).

    Runs in eval mode under no_grad with the KV cache; restores the model's train/eval mode.
    `do_sample=False` is greedy decoding; `min_new_tokens` keeps EOS out of the first that many
    tokens.
    """
    device = next(model.parameters()).device
    distinct = list(dict.fromkeys(prompts))  # first-seen order
    where = {p: i for i, p in enumerate(distinct)}
    rows = torch.tensor([where[p] for p in prompts], device=device)  # [N] -> distinct prompt
    ids, mask = tokenize_prompts(tokenizer, distinct, device)  # [U, P]
    was_training = model.training
    model.eval()
    try:
        completion_ids = sample_completions(
            model,
            ids,
            mask,
            rows,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            greedy=not do_sample,
            temperature=temperature,
            top_p=top_p,
            min_new_tokens=min_new_tokens,
        )  # [N, C]
    finally:
        model.train(was_training)
    mask_c, truncated = completion_mask_from_ids(completion_ids, tokenizer.eos_token_id)
    completion_ids = completion_ids.masked_fill(mask_c == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(ids[rows], mask[rows], completion_ids, mask_c, truncated, texts)
