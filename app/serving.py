"""Load what a DemoSpec names: the model (the project's one loader), NF4 quantization, the
adapter, the task's examples and gold answers. No Gradio here."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

from grpo.config import GRPOConfig
from grpo.policy import ModelLoadError, load_model
from grpo.reward_funcs import build_rewards
from grpo.rewards import RewardError, combine_rewards
from grpo.tasks import Task, load_task
from qlora import (
    AdapterError,
    footprint,
    int16_decode,
    kernel,
    load_adapter,
    merge_adapters,
    read_adapter_config,
    release_freed_memory,
    trainable_parameters,
)

from .cpu_attention import use_cpu_decode_attention
from .spec import DemoError, DemoSpec
from .streaming import PairGenerator

N_EXAMPLES = 8


@dataclass
class Demo:
    """The loaded demo: a generator over the two models, and what the UI shows about them."""

    generator: PairGenerator
    spec: DemoSpec
    info: dict  # model, adapter, parameter counts, footprint, accuracies
    examples: list[str]  # held-out evaluation prompts
    answers: dict[str, str]  # prompt -> gold answer, every prompt of the task
    reward_fns: dict = field(default_factory=dict)  # the run's reward functions, by name
    reward_weights: list[float] = field(default_factory=list)
    task: Task | None = None  # judges the answers (None: no task, no gold answers)


def load_demo(spec: DemoSpec, runner=None) -> Demo:
    """Load the model with the project's loader, NF4-quantize it (unless --no-quantize), load the
    adapter, optionally merge it into a dequantized copy, and gather the task's examples.
    `runner` is handed to the PairGenerator: what runs each forward pass (see app/worker.py)."""
    try:
        adapter_config = read_adapter_config(spec.adapter)
        # NF4 while reading the checkpoint: the 16-bit model is never whole in memory
        targets = tuple(adapter_config["target_modules"]) if spec.quantize else None
        model, tokenizer = load_model(spec.model, spec.dtype, nf4_targets=targets)
        model.eval()
        load_adapter(model, spec.adapter, quantize=spec.quantize)
        use_cpu_decode_attention(model)  # bf16 decode attention in float32 on CPU: faster
    except ModelLoadError as err:
        raise DemoError(str(err)) from err
    except AdapterError as err:
        raise DemoError(str(err)) from err  # names the file, the bad key or shape, and the fix
    trainable, total = trainable_parameters(model)  # LoRA matrices are the trainable ones
    model.requires_grad_(False)
    stored = footprint(model)
    # built now (once per machine, cached), not inside the first request
    cpu_kernel = kernel.default_kernel() if spec.quantize and _on_cpu(model) else None
    int16_kernel = int16_decode.default_kernel() if cpu_kernel and spec.int16 else None
    int16_decode.set_enabled(int16_kernel is not None)  # --int16; else the exact kernel decodes
    info = {
        "model": spec.model,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "quantized": spec.quantize,
        "adapter": str(spec.adapter),
        "lora": {k: adapter_config.get(k) for k in ("r", "lora_alpha", "target_modules")},
        "trainable_params": trainable,
        "total_params": total,
        "footprint_mb": stored["bytes"] / 1e6,
        "bits_per_param": stored["bits_per_param"],
        "summary": spec.summary,
        "kernel": cpu_kernel.isa if cpu_kernel is not None else None,
        "decode": f"int16 ({int16_kernel.isa})" if int16_kernel is not None else "exact",
    }
    tuned = model
    if spec.merge:
        tuned = merge_adapters(model).eval()
        info["merged_footprint_mb"] = footprint(tuned)["bytes"] / 1e6
    if int16_kernel is not None:  # the 16-bit output layer as our GEMV while decoding
        for m in {id(model): model, id(tuned): tuned}.values():
            int16_decode.use_gemv_head(m)
            int16_decode.serve_repacked(m)  # the demo never trains: one layout, not two
    release_freed_memory()
    generator = PairGenerator(model, tuned, tokenizer, spec.max_new_tokens_cap, runner)

    task = demo_task(spec)
    examples, answers = task_examples(spec, task)
    generator.format_prompt = chat_formatter(task, tokenizer)
    reward_fns, reward_weights = run_rewards(spec.config, task)
    return Demo(generator, spec, info, examples, answers, reward_fns, reward_weights, task)


def _on_cpu(model) -> bool:
    return next(model.parameters()).device.type == "cpu"


def demo_task(spec: DemoSpec) -> Task | None:
    """The spec's task, or None when there is none or it cannot be loaded (a warning, not a
    failure: the demo still runs)."""
    if spec.task is None:
        return None
    cfg = spec.config or GRPOConfig(task=spec.task)
    try:
        return load_task(dataclasses.replace(cfg, task=spec.task))
    except (OSError, ValueError, ImportError) as err:
        print(
            f"demo: warning: task {spec.task!r} could not be loaded ({err}); no examples",
            file=sys.stderr,
        )
        return None


def run_rewards(cfg: GRPOConfig | None, task: Task | None) -> tuple[dict, list[float]]:
    """Every reward function the run used, built-in or by import path, with its weight, built as
    the trainer builds them; none without a run config, or when one does not resolve in this
    process (a warning: the demo still judges correctness)."""
    if cfg is None or task is None:
        return {}, []
    try:
        return build_rewards(cfg, task)
    except RewardError as err:
        print(f"demo: warning: the run's rewards cannot be built here ({err})", file=sys.stderr)
        return {}, []


def task_examples(spec: DemoSpec, task: Task | None = None) -> tuple[list[str], dict[str, str]]:
    """(the first held-out prompts, {prompt: gold answer} over both splits) of `task` (default:
    the spec's, `demo_task`); empty without a task."""
    task = task if task is not None else demo_task(spec)
    if task is None:
        return [], {}
    answers = {shown(r): r["answer"] for r in task.train + task.eval}
    return [shown(r) for r in task.eval[:N_EXAMPLES]], answers


def shown(record: dict) -> str:
    """What the demo shows of a record: its question when its prompt is chat-formatted (the
    word-problem task), else the prompt itself."""
    return record.get("question", record["prompt"])


def chat_formatter(task: Task | None, tokenizer):
    """Typed text -> what the model reads: a task question -> the task's own prompt (chat
    template and instruction, as in training); other text -> the tokenizer's chat template as
    one user turn when it has one (an instruct model), else the text as it is."""
    records = task.train + task.eval if task is not None else []
    prompts = {r["question"]: r["prompt"] for r in records if "question" in r}
    template = getattr(tokenizer, "chat_template", None)

    def format_prompt(text: str) -> str:
        if text in prompts:
            return prompts[text]
        if template and not text.lstrip().startswith(tokenizer.bos_token or "\0"):
            messages = [{"role": "user", "content": text}]
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        return text

    return format_prompt


def truncated_column(demo: Demo, n_tokens: int) -> dict:
    """{"truncated": [the run's length limit reached, so cut off rather than ended by the end
    token]}; {} when there is no run (no limit to compare with)."""
    if demo.spec is None:
        return {}
    return {"truncated": [n_tokens >= demo.spec.max_new_tokens]}


def reward_breakdown(demo: Demo, prompt: str, completion: str) -> str:
    """Markdown line: is the answer correct (the task judges), is it well formatted (only for a
    task whose prompts ask for <answer> tags), each reward the run used and the weighted total;
    or why not. The overlong penalty counts the completion's tokens by re-encoding its text."""
    gold = demo.answers.get(prompt)
    if gold is None or demo.task is None:
        return "_No gold answer for this prompt (pick an example to see rewards)._"
    parts = [
        f"correct: **{'yes' if demo.task.is_correct(completion, gold) else 'no'}** (gold {gold})"
    ]
    if "format" in demo.task.rewards:  # a task whose prompts ask for <answer> tags
        formatted = demo.task.rewards["format"]([prompt], [completion])[0] == 1.0
        parts.append(f"format: **{'yes' if formatted else 'no'}**")
    if demo.reward_fns:
        tokens = demo.generator.tokenizer(completion, add_special_tokens=False)["input_ids"]
        try:
            total, per_fn = combine_rewards(
                demo.reward_fns,
                demo.reward_weights,
                [prompt],
                [completion],
                answer=[gold],
                completion_lengths=[len(tokens)],
                **truncated_column(demo, len(tokens)),
            )
        except RewardError as err:
            return " · ".join([*parts, f"reward: _{err}_"])
        parts += [f"{name} = {values.item():.3g}" for name, values in per_fn.items()]
        terms = " + ".join(
            f"{w:g}·{n}" for n, w in zip(demo.reward_fns, demo.reward_weights, strict=True)
        )
        parts.append(f"reward {terms} = **{total.item():.3g}**")
    return " · ".join(parts)
