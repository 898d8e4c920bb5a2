"""log pi of a rollout's completion tokens: the policy's forward on prompt + completion, with
the logits that predict completion tokens only, optionally each distinct prompt run once.

Columns follow grpo/rollout.py's layout: left-padded prompts [N, P], so the logit at P-1+t
predicts completion token t [N, C].
"""

from __future__ import annotations

import torch

from grpo.loss import selective_log_softmax, token_entropy
from grpo.rollout import Rollout


def completion_logps(
    model, rollout: Rollout, temperature: float = 1.0, share_prompts: bool = True
) -> torch.Tensor:
    """log pi(completion token t | prompt, tokens < t) for every completion position: [N, C].

    Logits are divided by the sampling temperature, so the ratio compares the distribution the
    tokens were drawn from. Only the C logits that predict completion tokens are computed
    (`logits_to_keep`), and `selective_log_softmax` never builds the full [N, C, V] log-softmax.

    share_prompts, when the N rows hold U < N distinct prompts (a group's G rows share one):
    each distinct prompt runs once, its KV cache (gradients flow through it) is copied to its
    rows, and the completions run on it, so the forward sees U*P + N*C tokens instead of
    N*(P+C), the same positions, masks and values (equal up to float32 rounding). Off for a
    model that cannot keep a cache while training (gradient checkpointing) and under DDP
    (whose reducer expects one forward per backward).
    """
    logits = completion_logits(model, rollout, temperature, share_prompts)  # [N, C, V]
    return selective_log_softmax(logits, rollout.completion_ids)  # [N, C]


def completion_logps_and_entropies(
    model, rollout: Rollout, temperature: float = 1.0, share_prompts: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """completion_logps and, from the same logits, the policy's entropy at every completion
    position, H_t = -sum_v p_tv log p_tv (`token_entropy`, differentiable): two [N, C].

    Only the entropy mask and bonus of the loss need H; without them the trainer calls
    completion_logps, and no entropy is computed."""
    logits = completion_logits(model, rollout, temperature, share_prompts)  # [N, C, V]
    return selective_log_softmax(logits, rollout.completion_ids), token_entropy(logits)


def completion_logits(
    model, rollout: Rollout, temperature: float = 1.0, share_prompts: bool = True
) -> torch.Tensor:
    """The [N, C, V] logits (divided by temperature) that predict the completion tokens: the
    forward of completion_logps."""
    logits = _shared_prompt_logits(model, rollout) if share_prompts else None
    if logits is None:
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
    return logits  # [N, C, V]


def _shared_prompt_logits(model, rollout: Rollout) -> torch.Tensor | None:
    """The [N, C, V] logits of completion_logps with each distinct prompt run once; None when
    no prompt repeats or the model cannot take this path."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing or hasattr(model, "no_sync"):  # no_sync: DDP, one forward per backward
        return None
    prompts = torch.cat([rollout.prompt_ids, rollout.prompt_mask], dim=1)  # [N, 2P]
    distinct, rows = torch.unique(prompts, dim=0, return_inverse=True)  # [U, 2P], [N]
    if distinct.shape[0] == len(rollout):
        return None
    P, C = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    ids, mask = distinct[:, :P], distinct[:, P:]  # [U, P]
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    first = out.logits[rows, -1:]  # [N, 1, V]: predicts completion token 0
    if C == 1:
        return first
    cache = out.cache
    cache.batch_select_indices(rows)  # [U, ...] -> [N, ...], differentiable indexing
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)[:, :-1]
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)[:, P:]  # [N, C-1]
    rest = model(
        input_ids=rollout.completion_ids[:, :-1],
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
    ).logits  # [N, C-1, V]: the logit at completion token t-1 predicts token t
    return torch.cat([first, rest], dim=1)  # [N, C, V]
