"""Rollouts: G sampled completions per prompt with HF `generate`, and the log-probs of them.

Layout of one generation batch (N = prompts * G rows, each prompt's G rows contiguous):

    prompt_ids      [N, P]  left-padded (pad, pad, p1 .. pk), prompt_mask 0 on the padding
    completion_ids  [N, C]  right-padded after the first EOS, C <= max_new_tokens
    completion_mask [N, C]  1 up to and including the first EOS, 0 after it
    truncated       [N]     True when no EOS came within max_new_tokens

Left padding keeps every prompt's last token in column P-1, so the logit that predicts completion
token t is always column P-1+t. Position ids are counted from the first real token
(cumsum(mask) - 1), as `generate` does, so the training forward sees the same positions as sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo.loss import selective_log_softmax


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
) -> Rollout:
    """One completion per entry of `prompts` (repeat each prompt G times for a group).

    Runs in eval mode under no_grad with the KV cache; restores the model's train/eval mode.
    """
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompts, device)
    was_training = model.training
    model.eval()
    try:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        out = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            **(sampling if do_sample else {"do_sample": False}),
        )
    finally:
        model.train(was_training)
    completion_ids = out[:, prompt_ids.shape[1] :]  # [N, C]
    mask, truncated = completion_mask_from_ids(completion_ids, tokenizer.eos_token_id)
    completion_ids = completion_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, completion_ids, mask, truncated, texts)


def completion_logps(model, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """log pi(completion token t | prompt, tokens < t) for every completion position: [N, C].

    Logits are divided by the sampling temperature, so the ratio compares the distribution the
    tokens were drawn from. Only the C logits that predict completion tokens are computed
    (`logits_to_keep`), and `selective_log_softmax` never builds the full [N, C, V] log-softmax.
    """
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)  # [N, P+C]
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    C = rollout.completion_ids.shape[1]
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=C + 1,
        use_cache=False,
    ).logits  # [N, C+1, V]
    logits = logits[:, :-1]  # [N, C, V]: the logit at P-1+t predicts completion token t
    if temperature != 1.0:
        logits = logits / temperature
    return selective_log_softmax(logits, rollout.completion_ids)  # [N, C]
