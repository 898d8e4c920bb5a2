"""Inside one GRPO step: one group of G completions taken through a training step's computation on
the served model, which it never changes. No Gradio here (app/explorer_ui.py shows the result).

    1. rollouts    G completions of one prompt from the current policy: grpo.rollout, as
                   GRPOTrainer.make_batch samples them (the run's max_new_tokens, top_p,
                   min_new_tokens; the chosen temperature)
    2. rewards     r_i = sum_k w_k reward_k(prompt, completion_i): the run's reward functions
    3. advantages  A_i = reward_advantages(r_k, w_k, G) (grpo.loss), the run's scale_rewards
                   and multi_objective_aggregation
    4. log-probs   logp_it under the policy, logp_ref_it under the base (adapters disabled),
                   kl_it = k3(logp_it, logp_ref_it)
    5. loss        grpo_loss_terms (grpo.loss, what grpo_loss computes): on-policy, as the first
                   pass of a step (ratio 1); each token's share of the loss is
                   share_it = L_it * d loss / d L_it, so the shares of all tokens add up to the loss
    6. the update  one AdamW step (the run's learning_rate, weight_decay, max_grad_norm) on a
                   scratch copy of the LoRA matrices; then logp'_it under the stepped copy, each
                   completion's change delta_i = sum_t m_it (logp'_it - logp_it), and the ratio
                   exp(logp' - logp) with the tokens that a second pass over the group
                   (num_iterations > 1) would clip

The served weights are never written: the scratch step runs the model through
torch.func.functional_call with the copies in place of the LoRA matrices, and the copies are
dropped afterwards.

Where this differs from a training step, on purpose: a step's batch holds many prompts, here one
(so scale_rewards "batch" is this group's std); dropout stays off (the model stays in eval mode,
so a seed repeats its numbers); the learning rate is the run's peak `learning_rate`, not the
schedule's value at the end of the run (about 0 for a cosine schedule).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.func import functional_call
from torch.nn.utils import clip_grad_norm_
from torch.optim import AdamW

from grpo.choices import LOSS_TYPES
from grpo.config import GRPOConfig
from grpo.logprobs import completion_logps
from grpo.loss import (
    LOSS_VARIANT_OPTIONS,
    check_loss_options,
    constant_groups,
    grpo_loss_terms,
    reward_advantages,
)
from grpo.rewards import combine_rewards
from grpo.rollout import Rollout, generate_rollouts
from qlora import adapters_disabled, lora_layers
from qlora.atomic import atomic_write_text

G_MIN, G_MAX = 2, 16
NO_SIGNAL = "no learning signal: every completion scored the same"


class ExplorerInputError(ValueError):
    """A request the explorer cannot run; the message is one line naming the value and the fix."""


@dataclass(frozen=True)
class StepRequest:
    """What the user chose; everything else comes from the run's config."""

    prompt: str
    answer: str  # the gold answer the task's rewards compare with
    group_size: int = 8  # G
    temperature: float = 1.0
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_type: str = "grpo"
    seed: int = 0


@dataclass
class StepResult:
    """One group through one step. Per-token lists hold the completion's real tokens (up to and
    including its EOS), in order."""

    request: StepRequest
    learning_rate: float
    completions: list[str]  # [G] decoded text
    tokens: list[list[str]]  # [G][n_i] each token decoded on its own
    token_ids: list[list[int]]
    truncated: list[bool]  # [G] no EOS within max_new_tokens
    reward_parts: dict[str, list[float]]  # reward name -> [G] unweighted values
    reward_weights: dict[str, float]
    rewards: list[float]  # [G] weighted totals
    reward_mean: float
    reward_std: float  # Bessel-corrected, as group_advantages divides by it
    advantages: list[float]  # [G]
    no_signal: bool  # constant_groups: every advantage is exactly 0
    loss: float
    stats: dict[str, float]  # grpo_loss's statistics
    logps: list[list[float]]  # log pi(token | prefix) before the step
    ref_logps: list[list[float]]  # the same under the base (adapters disabled)
    kl: list[list[float]]  # k3 per token
    share: list[list[float]]  # the token's share of the loss (the shares sum to `loss`)
    in_loss: list[list[bool]]  # False: masked out (a truncated completion, when the run masks)
    logps_after: list[list[float]]  # after the scratch step
    ratio_after: list[list[float]]  # exp(logp_after - logp): what a second pass would see
    clipped_after: list[list[bool]]  # a second pass would clip it (no gradient)
    logp_change: list[float]  # [G] sum over the completion's tokens of logp_after - logp
    grad_norm: float  # before clipping
    rollout: Rollout | None = None  # the G rollouts themselves (ids, masks)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds by phase


def loss_options(request: StepRequest, cfg: GRPOConfig, num_items: int | None) -> dict:
    """grpo_loss's options as GRPOTrainer.update passes them, with the request's loss type,
    clip and beta. LUSPO takes sequence-level ratios and VESPO token-level ones, as they must;
    the entropy options stay off: the explorer computes no token entropies."""
    options = {name: getattr(cfg, name) for name in LOSS_VARIANT_OPTIONS}
    options.update(top_entropy_quantile=1.0, entropy_coef=0.0)
    options.update(
        loss_type=request.loss_type,
        epsilon_low=request.epsilon_low,
        epsilon_high=request.epsilon_high,
        beta=request.beta,
        importance_sampling_level={"luspo": "sequence", "vespo": "token"}.get(
            request.loss_type, cfg.importance_sampling_level
        ),
    )
    if num_items is not None:
        options.update(max_completion_length=cfg.max_new_tokens, num_items_in_batch=num_items)
    return options


def check_request(
    request: StepRequest, tokenizer, cfg: GRPOConfig, context_length: int, reward_fns
) -> int:
    """Raise ExplorerInputError for a request that cannot run (before any model work); return
    the prompt's length in tokens."""
    G = request.group_size
    if not (isinstance(G, int) and G_MIN <= G <= G_MAX):
        raise ExplorerInputError(
            f"G = {G} is not a whole number in {G_MIN}..{G_MAX}; pick a group size in that range"
        )
    if not request.prompt.strip():
        raise ExplorerInputError("the prompt is empty; type one or pick a held-out example")
    if not request.answer.strip():
        raise ExplorerInputError(
            "no gold answer for this prompt, so its rewards cannot be computed; type the answer "
            "or pick a held-out example"
        )
    if not reward_fns:
        raise ExplorerInputError(
            "the run's reward functions are not available here; serve a run directory "
            "(--run-dir) whose rewards resolve in this process"
        )
    checks = {
        "temperature": (request.temperature, request.temperature > 0),
        "beta": (request.beta, request.beta >= 0),
        "epsilon low": (request.epsilon_low, 0 <= request.epsilon_low < 1),
        "epsilon high": (request.epsilon_high, request.epsilon_high >= 0),
    }
    for name, (value, ok) in checks.items():
        if not (ok and math.isfinite(value)):
            raise ExplorerInputError(f"{name} = {value} is out of range; pick another value")
    if request.loss_type not in LOSS_TYPES:
        raise ExplorerInputError(f"loss type {request.loss_type!r} is not one of {LOSS_TYPES}")
    try:  # the run's objective options with this loss type (e.g. luspo needs sequence ratios)
        check_loss_options(
            **{k: v for k, v in loss_options(request, cfg, None).items() if k != "beta"}
        )
    except ValueError as err:
        raise ExplorerInputError(f"{err}") from None
    n = len(tokenizer(request.prompt, add_special_tokens=False)["input_ids"])
    room = context_length - cfg.max_new_tokens
    if n > room:
        raise ExplorerInputError(
            f"the prompt is {n} tokens; with the run's {cfg.max_new_tokens} new tokens the "
            f"model's {context_length}-token context holds {room}; shorten the prompt"
        )
    return n


def lora_weights(model) -> dict[str, torch.Tensor]:
    """Every LoRA matrix of `model` by its parameter name (`<layer>.lora_A.weight`, ...)."""
    weights = {}
    for name, layer in lora_layers(model):
        weights[f"{name}.lora_A.weight"] = layer.lora_A.weight
        weights[f"{name}.lora_B.weight"] = layer.lora_B.weight
    if not weights:
        raise ExplorerInputError("the model has no LoRA adapter; load one (--adapter DIR)")
    return weights


class WithWeights:
    """`model` run with `weights` (parameter name -> tensor) in place of its own parameters; any
    other attribute is the model's. The model's own parameters are never written."""

    def __init__(self, model, weights: dict[str, torch.Tensor]):
        self.model = model
        self.weights = weights

    def __call__(self, *args, **kwargs):
        return functional_call(self.model, self.weights, args, kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def _rows(x: torch.Tensor, mask: torch.Tensor) -> list[list]:
    """[G, C] tensor -> per-row lists of the real positions' values."""
    return [row[m.bool()].tolist() for row, m in zip(x, mask, strict=True)]


def seeded_rollouts(model, tokenizer, request: StepRequest, cfg: GRPOConfig) -> Rollout:
    """Step 1: the group's G completions, sampled as a training step samples them. The request's
    seed fixes them; the caller's random state is left as it was."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(request.seed)
        return generate_rollouts(
            model,
            tokenizer,
            [request.prompt] * request.group_size,
            max_new_tokens=cfg.max_new_tokens,
            temperature=request.temperature,
            top_p=cfg.top_p,
            min_new_tokens=cfg.min_new_tokens,
        )


def explore(
    model, tokenizer, request: StepRequest, cfg: GRPOConfig, reward_fns, reward_weights
) -> StepResult:
    """Steps 1-6 of the module docstring for `request`, on `model` (with its LoRA adapter)."""
    t0 = time.perf_counter()
    timings = {}
    G, device = request.group_size, next(model.parameters()).device
    ro = seeded_rollouts(model, tokenizer, request, cfg)  # 1.
    timings["generation"] = time.perf_counter() - t0
    # 2-3. rewards and advantages
    rewards, parts = combine_rewards(
        reward_fns,
        reward_weights,
        [request.prompt] * G,
        ro.completions,
        answer=[request.answer] * G,
        completion_lengths=ro.completion_mask.sum(dim=1).tolist(),
        truncated=ro.truncated.tolist(),
    )
    advantages = reward_advantages(
        torch.stack(list(parts.values()), dim=1).float(), reward_weights, G,
        scale=cfg.scale_rewards, aggregation=cfg.multi_objective_aggregation,
    ).to(device)  # fmt: skip  # [G]
    loss_mask = ro.completion_mask.clone()  # [G, C]
    if cfg.mask_truncated_completions:
        loss_mask[ro.truncated] = 0
    options = loss_options(request, cfg, num_items=int(loss_mask.sum()))
    was_training = model.training
    model.eval()
    try:
        t1 = time.perf_counter()
        with torch.no_grad(), adapters_disabled(model):
            ref_logps = completion_logps(model, ro, request.temperature)  # [G, C]
        timings["reference"] = time.perf_counter() - t1
        step = scratch_step(
            model, ro, ref_logps, advantages, loss_mask, options, request.temperature, cfg, timings
        )
    finally:
        model.train(was_training)
    logps, logps_after = step.logps, step.logps_after
    # what a second pass over the group would see: ratio pi'/pi, and which tokens it would clip
    _, _, after = grpo_loss_terms(logps_after, logps, ref_logps, advantages, loss_mask, **options)
    real = ro.completion_mask  # [G, C]
    change = torch.where(real.bool(), logps_after - logps, 0.0).sum(dim=1)  # [G]
    per_token_ids = _rows(ro.completion_ids, real)
    return StepResult(
        request=request,
        learning_rate=cfg.learning_rate,
        completions=ro.completions,
        tokens=[[tokenizer.decode([i]) for i in ids] for ids in per_token_ids],
        token_ids=per_token_ids,
        truncated=ro.truncated.tolist(),
        reward_parts={name: values.tolist() for name, values in parts.items()},
        reward_weights=dict(zip(parts, map(float, reward_weights), strict=True)),
        rewards=rewards.tolist(),
        reward_mean=rewards.mean().item(),
        reward_std=rewards.std().item(),
        advantages=advantages.tolist(),
        no_signal=bool(constant_groups(rewards, G)[0]),
        loss=step.loss,
        stats=step.stats,
        logps=_rows(logps, real),
        ref_logps=_rows(ref_logps, real),
        kl=_rows(step.kl, real),
        share=_rows(step.share, real),
        in_loss=_rows(loss_mask.bool(), real),
        logps_after=_rows(logps_after, real),
        ratio_after=_rows(after.ratio, real),
        clipped_after=_rows(after.clip_low | after.clip_high, real),
        logp_change=change.tolist(),
        grad_norm=step.grad_norm,
        rollout=ro,
        seconds=time.perf_counter() - t0,
        timings=timings,
    )


@dataclass
class ScratchStep:
    """Steps 5-6 on one group: [G, C] tensors, padding included."""

    logps: torch.Tensor  # the policy's, before the step
    loss: float
    stats: dict[str, float]
    share: torch.Tensor  # each token's share of the loss
    kl: torch.Tensor  # k3 to the reference
    grad_norm: float  # before clipping
    logps_after: torch.Tensor  # under the stepped scratch copy


def scratch_step(
    model,
    ro: Rollout,
    ref_logps: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    options: dict,
    temperature: float,
    cfg: GRPOConfig,
    timings: dict,
) -> ScratchStep:
    """The loss (grpo_loss_terms with `options`) and each token's share on the policy, one
    optimizer step on scratch copies of the LoRA matrices, and the log-probs under the copies.
    `model` runs through WithWeights, so its own weights are never written."""
    t0 = time.perf_counter()
    scratch = {
        name: w.detach().clone().requires_grad_(True) for name, w in lora_weights(model).items()
    }
    policy = WithWeights(model, scratch)
    with torch.enable_grad():
        logps = completion_logps(policy, ro, temperature)  # [G, C]
        # on-policy (old = logps): the first pass of a step, as GRPOTrainer.update's
        loss, stats, terms = grpo_loss_terms(
            logps, None, ref_logps, advantages, loss_mask, **options
        )
        (d_per_token,) = torch.autograd.grad(loss, terms.per_token, retain_graph=True)
        share = (terms.per_token * d_per_token).detach()  # [G, C], sums to the loss
        loss.backward()
    params = list(scratch.values())
    grad_norm = float(clip_grad_norm_(params, cfg.max_grad_norm or math.inf))
    AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay).step()
    timings["loss_and_update"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    # with gradients on, as the first forward: the same kernels, so an unmoved weight gives an
    # unmoved log-prob exactly (the no-gradient decode path rounds differently)
    with torch.enable_grad():
        logps_after = completion_logps(policy, ro, temperature).detach()  # [G, C]
    timings["after_update"] = time.perf_counter() - t1
    return ScratchStep(
        logps.detach(), loss.item(), stats, share, terms.kl.detach(), grad_norm, logps_after
    )  # the scratch copies go with this frame; the served weights were never written


# ---- the numbers as files -----------------------------------------------------------------------

TOKEN_COLUMNS = (
    "completion",
    "position",
    "token_id",
    "token",
    "in_loss",
    "logp",
    "ref_logp",
    "kl",
    "share",
    "logp_after",
    "ratio_after",
    "clipped_after",
    "advantage",
    "reward",
)


def token_rows(step: StepResult) -> list[dict]:
    """One dict per completion token, TOKEN_COLUMNS keys; `completion` counts from 0."""
    rows = []
    for i, toks in enumerate(step.tokens):
        for t, tok in enumerate(toks):
            rows.append(
                {
                    "completion": i,
                    "position": t,
                    "token_id": step.token_ids[i][t],
                    "token": tok,
                    "in_loss": step.in_loss[i][t],
                    "logp": step.logps[i][t],
                    "ref_logp": step.ref_logps[i][t],
                    "kl": step.kl[i][t],
                    "share": step.share[i][t],
                    "logp_after": step.logps_after[i][t],
                    "ratio_after": step.ratio_after[i][t],
                    "clipped_after": step.clipped_after[i][t],
                    "advantage": step.advantages[i],
                    "reward": step.rewards[i],
                }
            )
    return rows


def completion_rows(step: StepResult) -> list[dict]:
    """One dict per completion: text, each reward part, total, advantage, log-prob change."""
    return [
        {
            "completion": i,
            "text": text,
            "tokens": len(step.tokens[i]),
            "truncated": step.truncated[i],
            **{name: values[i] for name, values in step.reward_parts.items()},
            "reward": step.rewards[i],
            "advantage": step.advantages[i],
            "logp_change": step.logp_change[i],
        }
        for i, text in enumerate(step.completions)
    ]


def to_json(step: StepResult) -> dict:
    """Everything the tab shows, as plain JSON values."""
    return {
        "settings": {**asdict(step.request), "learning_rate": step.learning_rate},
        "group": {
            "reward_mean": step.reward_mean,
            "reward_std": step.reward_std,
            "no_signal": step.no_signal,
            "reward_weights": step.reward_weights,
            "loss": step.loss,
            "grad_norm": step.grad_norm,
            **step.stats,
        },
        "completions": completion_rows(step),
        "tokens": token_rows(step),
    }


def write_downloads(step: StepResult, directory: str | Path) -> list[Path]:
    """explorer-tokens.csv (a row per token) and explorer-step.json (everything) in `directory`,
    each written atomically."""
    directory = Path(directory)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TOKEN_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(token_rows(step))
    csv_path = atomic_write_text(directory / "explorer-tokens.csv", buffer.getvalue())
    json_path = atomic_write_text(
        directory / "explorer-step.json", json.dumps(to_json(step), indent=1) + "\n"
    )
    return [csv_path, json_path]
