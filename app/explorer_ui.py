"""The "Inside one GRPO step" tab: one group of completions, its rewards and advantages, every
token's share of the loss, and what one optimizer step on the group would do (app/explorer.py
computes it all; this module only lays it out).

Clicking "Run one step" runs three queued events in a chain: clear the outputs and disable the
button; `run_explorer` (the public API endpoint `/explore`: gradio_client's `predict(prompt,
answer, G, temperature, beta, epsilon_low, epsilon_high, loss_type, seed, api_name="/explore")`
returns (notice, summary, completions_html, tokens_html, files)); enable the button. The step runs
on the demo's model thread (app/worker.py), under the generator's lock, so it never interleaves
with a streaming answer of the other tab.
"""

from __future__ import annotations

import html
import tempfile

import gradio as gr

from grpo.choices import LOSS_TYPES
from grpo.config import GRPOConfig

from .explorer import (
    G_MAX,
    G_MIN,
    NO_SIGNAL,
    ExplorerInputError,
    StepRequest,
    StepResult,
    check_request,
    explore,
    write_downloads,
)
from .serving import Demo

TAB_TITLE = "Inside one GRPO step"
POSITIVE, NEGATIVE = "#16a34a", "#dc2626"  # green: lowers the loss / rises; red: the opposite

INTRO = f"""# {TAB_TITLE}
One prompt, G completions sampled from the served policy exactly as a training step samples them,
scored with the run's rewards, and taken through the loss the trainer minimises (`grpo.loss`).
Then one optimizer step on a scratch copy of the LoRA weights shows what the update would do.
The served adapter never changes."""

LEGEND = (
    f'<span style="background:{POSITIVE}33">green</span>: the token lowers the loss (its '
    f'completion scored above the group mean: its gradient pushes it up) · <span style="'
    f'background:{NEGATIVE}33">red</span>: it raises the loss (below the mean, or beta × KL to the '
    'base) · <span class="xp-clipped">outlined</span>: after the step its ratio is outside the '
    "clip range, so a second pass over this group would give it no gradient · "
    '<span class="xp-masked">struck</span>: not in the loss (a truncated completion, when the '
    "run masks them). Hover a token for its numbers."
)

CSS = """
.xp-table { border-collapse: collapse; width: 100%; font-size: 0.9em; }
.xp-table th, .xp-table td { border-bottom: 1px solid #e5e7eb; padding: 3px 6px;
                             text-align: right; }
.xp-table td.xp-text { text-align: left; font-family: monospace; white-space: pre-wrap; }
.xp-bar { display: inline-block; position: relative; width: 120px; height: 12px;
          background: #f3f4f6; vertical-align: middle; margin-right: 6px; }
.xp-bar .xp-zero { position: absolute; left: 50%; top: 0; bottom: 0; width: 1px;
                   background: #6b7280; }
.xp-bar .xp-fill { position: absolute; top: 1px; bottom: 1px; }
.xp-row { font-family: monospace; line-height: 1.9; margin: 2px 0; }
.xp-row .xp-label { display: inline-block; min-width: 11em; color: #374151; }
.xp-tok { white-space: pre; padding: 1px 0; border: 1px solid transparent; }
.xp-clipped { border: 1px dashed #111827; }
.xp-masked { text-decoration: line-through; color: #6b7280; }
"""


def signed_bar(value: float, scale: float) -> str:
    """A bar from the centre: right and green for value > 0, left and red for < 0, its length
    |value| / scale of the half-width; the number beside it."""
    half = 50 * min(1.0, abs(value) / scale) if scale > 0 else 0.0
    side = f"left:50%;width:{half:.1f}%" if value >= 0 else f"right:50%;width:{half:.1f}%"
    colour = POSITIVE if value >= 0 else NEGATIVE
    return (
        f'<span class="xp-bar"><span class="xp-zero"></span><span class="xp-fill" '
        f'style="{side};background:{colour}"></span></span>{value:+.3f}'
    )


def summary_markdown(step: StepResult) -> str:
    """The group's line: reward mean and std, loss, KL, the update's settings, the time; and the
    no-signal line when every completion scored the same."""
    r = step.request
    parts = [
        f"G = {len(step.completions)}",
        f"reward mean **{step.reward_mean:.3g}**, std **{step.reward_std:.3g}**",
        f"loss ({r.loss_type}) **{step.loss:.4g}**",
        f"mean KL to the base {step.stats.get('kl', 0.0):.3g} (beta {r.beta:g})",
        f"one AdamW step at lr {step.learning_rate:g}: gradient norm {step.grad_norm:.3g}",
        f"{step.seconds:.2f} s",
    ]
    line = " · ".join(parts)
    if step.no_signal:
        line = (
            f"**{NO_SIGNAL}**: every advantage is 0, so the step learns nothing from this group "
            "(only the KL term, if beta > 0, moves the weights).\n\n" + line
        )
    return line


def completions_html(step: StepResult) -> str:
    """A row per completion: its text, each reward part, the weighted total, the advantage as a
    signed bar, and the change of its log-probability after the scratch step."""
    names = list(step.reward_parts)
    adv_scale = max((abs(a) for a in step.advantages), default=0.0)
    change_scale = max((abs(c) for c in step.logp_change), default=0.0)
    head = "".join(f"<th>{html.escape(n)} (×{step.reward_weights[n]:g})</th>" for n in names)
    rows = []
    for i, text in enumerate(step.completions):
        cells = "".join(f"<td>{step.reward_parts[n][i]:.3g}</td>" for n in names)
        cut = " <em>(truncated)</em>" if step.truncated[i] else ""
        rows.append(
            f"<tr><td>{i}</td><td class='xp-text'>{html.escape(text)}{cut}</td>{cells}"
            f"<td><b>{step.rewards[i]:.3g}</b></td>"
            f"<td>{signed_bar(step.advantages[i], adv_scale)}</td>"
            f"<td>{signed_bar(step.logp_change[i], change_scale)}</td></tr>"
        )
    return (
        "<table class='xp-table' id='explorer-table'><thead><tr><th>#</th>"
        f"<th style='text-align:left'>completion</th>{head}<th>reward</th><th>advantage</th>"
        "<th>Δ log-prob after one step</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def _token_title(step: StepResult, i: int, t: int) -> str:
    clipped = " (a second pass would clip it)" if step.clipped_after[i][t] else ""
    masked = " · not in the loss" if not step.in_loss[i][t] else ""
    return (
        f"{step.tokens[i][t]!r} · logp {step.logps[i][t]:.4f} · ref logp "
        f"{step.ref_logps[i][t]:.4f} · KL {step.kl[i][t]:.3g} · share of the loss "
        f"{step.share[i][t]:+.3g}{masked} · after the step: logp {step.logps_after[i][t]:.4f}, "
        f"ratio {step.ratio_after[i][t]:.4f}{clipped}"
    )


def tokens_html(step: StepResult) -> str:
    """Each completion's tokens, the background coloured by the token's share of the loss (the
    same scale for the whole group), its numbers in the title (shown on hover)."""
    scale = max((abs(s) for row in step.share for s in row), default=0.0) or 1.0
    lines = []
    for i, toks in enumerate(step.tokens):
        spans = []
        for t, tok in enumerate(toks):
            share = step.share[i][t]
            colour = NEGATIVE if share > 0 else POSITIVE
            alpha = int(round(200 * min(1.0, abs(share) / scale)))
            classes = ["xp-tok"]
            if step.clipped_after[i][t]:
                classes.append("xp-clipped")
            if not step.in_loss[i][t]:
                classes.append("xp-masked")
            shown = html.escape(tok.replace("\n", "⏎")) or "∅"
            spans.append(
                f'<span class="{" ".join(classes)}" style="background:{colour}{alpha:02x}" '
                f'title="{html.escape(_token_title(step, i, t))}">{shown}</span>'
            )
        label = f"#{i} A = {step.advantages[i]:+.3f}"
        lines.append(
            f'<div class="xp-row"><span class="xp-label">{label}</span>{"".join(spans)}</div>'
        )
    return f'<div id="explorer-token-view"><p>{LEGEND}</p>{"".join(lines)}</div>'


def run_config(demo: Demo) -> GRPOConfig:
    """The run's config (sampling limits, rewards' settings, optimizer), or the defaults with the
    demo's max_new_tokens when the demo serves an adapter without a run."""
    return demo.spec.config or GRPOConfig(max_new_tokens=demo.spec.max_new_tokens)


def _whole(value):
    """A number box's value as an int when it is a whole number; as it came otherwise."""
    try:
        return int(value) if float(value).is_integer() else value
    except (TypeError, ValueError):
        return value


def run_explorer(
    demo: Demo,
    prompt: str,
    answer: str,
    group_size,
    temperature: float,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    loss_type: str,
    seed,
) -> tuple[str, str, str, str, list[str] | None]:
    """(notice, summary, completions_html, tokens_html, [csv, json]); for a request that cannot
    run, the notice says why and the rest is empty."""
    answer = (answer or "").strip() or demo.answers.get(prompt, "")
    cfg, generator = run_config(demo), demo.generator
    prompt = prompt or ""
    request = StepRequest(
        # what the model reads, as the side-by-side tab feeds it (a task question -> its prompt)
        prompt=generator.format_prompt(prompt) if prompt.strip() else prompt,
        answer=answer,
        group_size=_whole(group_size),
        temperature=float(temperature),
        beta=float(beta),
        epsilon_low=float(epsilon_low),
        epsilon_high=float(epsilon_high),
        loss_type=loss_type,
        seed=_whole(seed) if isinstance(_whole(seed), int) else 0,
    )
    try:
        check_request(request, generator.tokenizer, cfg, generator.context_length, demo.reward_fns)
        with generator.lock:
            step = generator.runner(
                explore,
                generator.base_model,
                generator.tokenizer,
                request,
                cfg,
                demo.reward_fns,
                demo.reward_weights,
            )
    except ExplorerInputError as err:
        return str(err), "", "", "", None
    files = write_downloads(step, tempfile.mkdtemp(prefix="grpo-explorer-"))
    return (
        "",
        summary_markdown(step),
        completions_html(step),
        tokens_html(step),
        [str(f) for f in files],
    )


def step_settings(cfg: GRPOConfig) -> list:
    """A row of the step's settings, starting at the run's: G, temperature, beta, epsilon low and
    high, loss type, seed (in run_explorer's order)."""
    with gr.Row():
        return [
            gr.Number(
                value=min(max(cfg.num_generations, G_MIN), G_MAX),
                precision=0,
                label=f"G (completions, {G_MIN}-{G_MAX})",
                elem_id="explorer-g",
            ),
            gr.Slider(0.05, 2.0, value=cfg.temperature, step=0.05, label="Temperature"),
            gr.Slider(0.0, 1.0, value=cfg.beta, step=0.01, label="beta (KL weight)"),
            gr.Slider(0.0, 0.99, value=cfg.epsilon_low, step=0.01, label="epsilon low"),
            gr.Slider(0.0, 1.0, value=cfg.epsilon_high, step=0.01, label="epsilon high"),
            gr.Dropdown(list(LOSS_TYPES), value=cfg.loss_type, label="Loss type"),
            gr.Number(value=0, precision=0, label="Seed (sampling)"),
        ]


def add_explorer_tab(demo: Demo) -> None:
    """Add the tab's components and events to the gr.Blocks (or gr.Tab) being built."""
    cfg = run_config(demo)
    gr.Markdown(INTRO)
    with gr.Row():
        prompt = gr.Textbox(
            label="Prompt",
            lines=2,
            max_lines=12,
            scale=4,
            elem_id="explorer-prompt",
            placeholder=demo.examples[0] if demo.examples else "Type a prompt",
        )
        answer = gr.Textbox(
            label="Gold answer (what the rewards compare with)",
            scale=2,
            elem_id="explorer-answer",
        )
        run = gr.Button("Run one step", variant="primary", scale=1, elem_id="explorer-run")
    settings = step_settings(cfg)
    if demo.examples:
        gr.Examples(
            [[p, demo.answers.get(p, "")] for p in demo.examples],
            inputs=[prompt, answer],
            label="Held-out evaluation prompts",
            cache_examples=False,
        )
    notice = gr.Markdown(elem_id="explorer-notice")
    summary = gr.Markdown(elem_id="explorer-summary")
    completions = gr.HTML(elem_id="explorer-completions", css_template=CSS)
    tokens = gr.HTML(elem_id="explorer-tokens", css_template=CSS)
    downloads = gr.File(
        label="The numbers: one row per token (CSV), everything (JSON)",
        file_count="multiple",
        interactive=False,
        elem_id="explorer-downloads",
    )

    def start():
        return "", "", "", "", None, gr.Button(interactive=False)

    def step(
        prompt, answer, group_size, temperature, beta, epsilon_low, epsilon_high, loss_type, seed
    ):
        return run_explorer(
            demo, prompt, answer, group_size, temperature, beta, epsilon_low, epsilon_high,
            loss_type, seed,
        )  # fmt: skip

    run.click(
        start,
        outputs=[notice, summary, completions, tokens, downloads, run],
        api_visibility="private",
        show_progress="hidden",
    ).then(
        step,
        inputs=[prompt, answer, *settings],
        outputs=[notice, summary, completions, tokens, downloads],
        api_name="explore",
        show_progress="minimal",
    ).then(
        lambda: gr.Button(interactive=True),
        outputs=[run],
        api_visibility="private",
        show_progress="hidden",
    )
