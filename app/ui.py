"""The Gradio Blocks app: one prompt, the base and the GRPO-tuned answer side by side; a second
tab, "Inside one GRPO step", is app/explorer_ui.py.

Clicking "Compare" runs three queued events in a chain:

    1. start    check the prompt; show a notice (empty prompt, truncated prompt); clear outputs
    2. compare  stream both answers token by token, in one batch (app/streaming.py); the public
                API endpoint `/compare`: gradio_client's `predict(prompt, max_new_tokens,
                temperature, top_p, greedy, api_name="/compare")` returns the final
                (base_text, tuned_text, base_speed, tuned_speed), a speed line such as
                "<n> tokens · first after <t> s · <r> tokens/s" for each side
    3. score    each answer's reward breakdown, when the prompt has a known gold answer

The queue runs at most `concurrency_limit` of each event at once (1 by default: users are
served in turn, and each generation gets all the CPU cores).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import gradio as gr

from .explorer_ui import TAB_TITLE, add_explorer_tab
from .serving import Demo, reward_breakdown
from .streaming import Sampling

EMPTY_PROMPT = "Type a prompt first (or click one of the examples below)."
CSS = "#notice p { color: #b45309; font-weight: 600; }"


def info_markdown(demo: Demo) -> str:
    """The info panel: model, adapter, parameter counts, footprint, the run's accuracies."""
    info = demo.info
    lora = info["lora"]
    storage = "NF4 4-bit base (double quantization)" if info["quantized"] else "not quantized"
    rows = [
        ("Model", f"`{info['model']}` ({info['dtype']}, {storage})"),
        (
            "Adapter",
            f"`{info['adapter']}`: LoRA r={lora['r']}, alpha={lora['lora_alpha']}, "
            f"targets {', '.join(lora['target_modules'])}",
        ),
        (
            "Trainable / total parameters",
            f"{info['trainable_params']:,} / {info['total_params']:,} "
            f"({100 * info['trainable_params'] / max(1, info['total_params']):.2f}%)",
        ),
        (
            "Quantized footprint" if info["quantized"] else "Footprint",
            f"{info['footprint_mb']:.2f} MB, {info['bits_per_param']:.2f} bits/parameter "
            "(everything stored: 4-bit codes, scales, LoRA, embeddings)",
        ),
    ]
    if info.get("quantized"):
        rows.append(
            (
                "NF4 matmul",
                f"hand-written fused CPU kernel ({info['kernel']})"
                if info.get("kernel")
                else "pure PyTorch (decode the weight, then multiply)",
            )
        )
    if "merged_footprint_mb" in info:
        rows.append(
            (
                "GRPO-tuned runs on",
                f"a merged copy, W + s·B·A in {info['dtype']} ({info['merged_footprint_mb']:.2f} "
                "MB, --merge)",
            )
        )
    summary = info["summary"]
    if "accuracy_before" in summary and "accuracy_after" in summary:
        extra = ", ".join(
            f"{label} {summary[key]}"
            for key, label in (("n_eval", "n ="), ("grpo_steps", "steps:"))
            if key in summary
        )
        rows.append(
            (
                "Held-out accuracy (greedy)",
                f"before GRPO **{summary['accuracy_before']:.1%}** → after "
                f"**{summary['accuracy_after']:.1%}**" + (f" ({extra})" if extra else ""),
            )
        )
    else:
        rows.append(("Held-out accuracy", "no summary.json in the run directory"))
    return "\n".join(f"- **{k}**: {v}" for k, v in rows)


def build_app(demo: Demo, concurrency_limit: int = 1) -> gr.Blocks:
    """The Blocks app over a loaded Demo, with its queue set; launch it with `.launch(...)`."""
    with gr.Blocks(title="GRPO: base vs tuned", analytics_enabled=False) as compare_tab:
        widgets = compare_layout(demo)
        wire_events(widgets, *handlers(demo))
    with gr.Blocks(title="GRPO: base vs tuned", analytics_enabled=False) as app:
        with gr.Tab("Base vs tuned"):
            compare_tab.render()
        with gr.Tab(TAB_TITLE):
            add_explorer_tab(demo)
    app.queue(default_concurrency_limit=concurrency_limit)
    return app


def handlers(demo: Demo) -> tuple[Callable, Callable, Callable]:
    """The three events of a click, in order: start, compare, score (module docstring)."""
    generator = demo.generator

    def start(prompt: str, max_new_tokens: float):
        notice = (
            EMPTY_PROMPT if not prompt.strip() else generator.prepare(prompt, max_new_tokens).notice
        )
        return notice, "", "", "", "", "", "", gr.Button(interactive=False)

    def compare(
        prompt: str, max_new_tokens: float, temperature: float, top_p: float, greedy: bool
    ) -> Iterator[tuple[str, str, str, str]]:
        """(base_text, tuned_text, base_speed, tuned_speed), streamed; a side's speed line
        appears when its answer has ended. All "" for an empty prompt."""
        if not prompt.strip():
            yield "", "", "", ""
            return
        prepared = generator.prepare(prompt, int(max_new_tokens))
        sampling = Sampling(
            prepared.max_new_tokens,
            greedy=bool(greedy),
            temperature=max(float(temperature), 1e-3),  # Sampling needs T > 0, 0 < top_p <= 1
            top_p=min(max(float(top_p), 1e-3), 1.0),
        )
        for base, tuned in generator.stream(prepared, sampling):
            yield (
                generator.decode(base),
                generator.decode(tuned),
                base.speed_line() if base.done else "",
                tuned.speed_line() if tuned.done else "",
            )

    def score(prompt: str, base_text: str, tuned_text: str):
        if not prompt.strip():
            return "", "", gr.Button(interactive=True)
        return (
            reward_breakdown(demo, prompt, base_text),
            reward_breakdown(demo, prompt, tuned_text),
            gr.Button(interactive=True),
        )

    return start, compare, score


@dataclass
class Answer:
    """One side's outputs: the streamed text, its speed line, its reward breakdown."""

    text: gr.Textbox
    speed: gr.Markdown
    reward: gr.Markdown


@dataclass
class Widgets:
    """The components of the comparison tab that the events read or write."""

    prompt: gr.Textbox
    run: gr.Button
    notice: gr.Markdown
    base: Answer
    tuned: Answer
    max_new_tokens: gr.Slider
    greedy: gr.Checkbox
    temperature: gr.Slider
    top_p: gr.Slider


def answer_column(label: str, side: str) -> Answer:
    """A column with one side's answer box, speed line and reward breakdown."""
    with gr.Column():
        text = gr.Textbox(
            label=label, lines=4, interactive=False, buttons=["copy"], elem_id=f"{side}-output"
        )
        return Answer(
            text, gr.Markdown(elem_id=f"{side}-speed"), gr.Markdown(elem_id=f"{side}-reward")
        )


def compare_layout(demo: Demo) -> Widgets:
    """The comparison tab's components, laid out top to bottom (inside an open gr.Blocks)."""
    cap = demo.generator.max_new_tokens_cap
    gr.Markdown(
        "# Base vs GRPO-tuned\nThe same prompt, answered by the base model (LoRA adapter "
        "switched off) and by the GRPO-tuned adapter. Tokens stream into both."
    )
    with gr.Accordion("Model and run", open=True):
        gr.Markdown(info_markdown(demo), elem_id="info")
    with gr.Row():
        prompt = gr.Textbox(
            label="Prompt",
            lines=2,
            max_lines=12,
            scale=5,
            elem_id="prompt",
            placeholder=demo.examples[0] if demo.examples else "Ask something",
        )
        run = gr.Button("Compare", variant="primary", scale=1, elem_id="run")
    notice = gr.Markdown(elem_id="notice")
    with gr.Row(equal_height=True):
        base = answer_column("Base", "base")
        tuned = answer_column("GRPO-tuned", "tuned")
    with gr.Accordion("Generation settings", open=False), gr.Row():
        max_new_tokens = gr.Slider(
            1,
            cap,
            value=min(demo.spec.max_new_tokens, cap),
            step=1,
            label=f"Max new tokens (cap {cap})",
        )
        greedy = gr.Checkbox(value=True, label="Greedy (ignore temperature and top_p)")
        temperature = gr.Slider(
            0.05, 2.0, value=1.0, step=0.05, label="Temperature", interactive=False
        )
        top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top_p", interactive=False)
    if demo.examples:
        gr.Examples(
            demo.examples,
            inputs=[prompt],
            label="Held-out evaluation prompts",
            cache_examples=False,
        )
    return Widgets(prompt, run, notice, base, tuned, max_new_tokens, greedy, temperature, top_p)


def wire_events(w: Widgets, start: Callable, compare: Callable, score: Callable) -> None:
    """Greedy greys out the sampling sliders; a click or Enter runs start, compare, score."""
    w.greedy.change(
        lambda g: (gr.Slider(interactive=not g), gr.Slider(interactive=not g)),
        inputs=w.greedy,
        outputs=[w.temperature, w.top_p],
        queue=False,
        api_visibility="private",
    )
    answers = [w.base.text, w.tuned.text]
    gr.on(
        [w.run.click, w.prompt.submit],
        start,
        inputs=[w.prompt, w.max_new_tokens],
        outputs=[
            w.notice,
            *answers,
            w.base.speed,
            w.tuned.speed,
            w.base.reward,
            w.tuned.reward,
            w.run,
        ],
        api_visibility="private",
        show_progress="hidden",
    ).then(
        compare,
        inputs=[w.prompt, w.max_new_tokens, w.temperature, w.top_p, w.greedy],
        outputs=[*answers, w.base.speed, w.tuned.speed],
        api_name="compare",
        show_progress="minimal",
    ).then(
        score,
        inputs=[w.prompt, *answers],
        outputs=[w.base.reward, w.tuned.reward, w.run],
        api_visibility="private",
        show_progress="hidden",
    )
