"""results.json -> bench/results.md (every table) and the README's Performance section (the ratios).

The README section is whatever lies between the two marker lines below; it is replaced whole and
nothing else in the README is touched. Every ratio is "ours / peer": below 1 means ours is
faster, smaller or more accurate.
"""

from __future__ import annotations

import re
from pathlib import Path

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"


class ReadmeError(RuntimeError):
    """The README cannot take the generated section (missing file or markers)."""


# ---------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------


def num(x: float, digits: int = 3) -> str:
    """`digits` significant digits, no exponent for everyday magnitudes."""
    if x == 0:
        return "0"
    if abs(x) >= 10 ** (digits - 1):
        return f"{x:,.0f}"
    return f"{x:.{digits}g}" if abs(x) >= 1e-3 else f"{x:.2e}"


def cell(fig: dict, digits: int = 3) -> str:
    """'median (min–max)' for a measured figure, the value alone for an exact one."""
    if fig["median"] is None:
        return "n/a"
    median = num(fig["median"], digits)
    if fig.get("exact") or fig["min"] is None or fig["max"] is None:
        return median
    low, high = num(fig["min"], digits), num(fig["max"], digits)
    return median if low == high else f"{median} ({low}–{high})"


def ratio_cell(fig: dict) -> str:
    if fig["median"] is None:
        return "n/a (a side measured 0)"
    text = cell(fig, 3).replace(" (", "x (", 1)
    text = text if "x (" in text else text + "x"
    if "target" in fig:
        text += f" — target ≤ {fig['target']:g}x: **{'met' if fig['met'] else 'not met'}**"
    return text


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def arrow(key: str) -> str:
    return key.replace("->", "→")


def machine_line(r: dict) -> str:
    e = r["environment"]
    where = e.get("gpu") or f"{e['cpu_model']}, {e['cpu_count']} cores"
    threads = f"{e['threads']} torch thread{'s' if e['threads'] != 1 else ''}"
    line = (
        f"{where}; {threads}; torch {e['torch']}, bitsandbytes {e['bitsandbytes']}, "
        f"transformers {e['transformers']}; {e['date_utc']}"
    )
    if "loadavg_1min_start" in e:
        line += (
            f"; load average {e['loadavg_1min_start']} at start, "
            f"{e.get('loadavg_1min_end', '?')} at end"
        )
    return line


# ---------------------------------------------------------------------------------------------
# results.md
# ---------------------------------------------------------------------------------------------


def layers_md(p: dict) -> list[str]:
    out = [
        f"## 1. NF4 layer: forward + backward, {p['tokens']} tokens, LoRA r={p['lora_r']}, "
        f"{p['dtype']}",
        "",
        f"Step: `{p['step']}`. The three layers run interleaved; ratios are the median (min–max) "
        "of per-repeat ratios.",
        "",
    ]
    rows = []
    for key, s in p["shapes"].items():
        f, r = s["fwd_bwd"], s["ratios"]
        rows.append(
            [
                arrow(key),
                cell(f["ours"]),
                cell(f["bnb"]),
                cell(f["fp32"]),
                ratio_cell(r["ours_vs_bnb"]),
                ratio_cell(r["ours_vs_fp32"]),
            ]
        )
    out += table(
        [
            "in → out",
            "NF4Linear+LoRA (ours) ms",
            "bitsandbytes Linear4bit+LoRA ms",
            "frozen fp32 Linear+LoRA ms",
            "ours / bitsandbytes",
            "ours / fp32",
        ],
        rows,
    )
    t = p["targets"]
    out += [
        "",
        f"Targets: ours / bitsandbytes ≤ {t['ours_vs_bnb']['target']:g}x met at "
        f"{t['ours_vs_bnb']['met_at']} of {t['ours_vs_bnb']['shapes']} shapes; ours / fp32 ≤ "
        f"{t['ours_vs_fp32']['target']:g}x met at {t['ours_vs_fp32']['met_at']} of "
        f"{t['ours_vs_fp32']['shapes']} shapes.",
        "",
        "Saved for backward by autograd (MiB): "
        + "; ".join(
            f"{arrow(k)}: ours {cell(s['saved_for_backward']['ours'])}, bitsandbytes "
            f"{cell(s['saved_for_backward']['bnb'])}, fp32 {cell(s['saved_for_backward']['fp32'])}"
            for k, s in p["shapes"].items()
        )
        + ".",
        "",
        "### Dequantize one float32 weight",
        "",
    ]
    rows = []
    for key, d in p["dequantize"].items():
        sec, r = d["seconds"], d["ratios"]
        rows.append(
            [
                arrow(key),
                cell(sec["ours"]),
                cell(sec["ours_reused"]),
                cell(sec["bnb"]),
                ratio_cell(r["ours_vs_bnb"]),
                ratio_cell(r["ours_reused_vs_bnb"]),
                cell(d["max_abs_diff_vs_bnb"]),
            ]
        )
    out += table(
        [
            "out × in",
            "dequantize_nf4 (ours) ms",
            "dequantize_into, reused buffers (ours, as in NF4Linear) ms",
            "bitsandbytes dequantize_4bit ms",
            "dequantize_nf4 / dequantize_4bit",
            "dequantize_into / dequantize_4bit",
            "max abs diff",
        ],
        rows,
    )
    return out


def quality_md(q: dict) -> list[str]:
    n, t, b = q["normal"], q["tiny"], q["bits_per_param"]
    bits = {
        "ours": b["nf4_double_quant"],
        "bnb": b["bnb_nf4_double_quant"],
        "ours_no_dq": b["nf4_no_double_quant"],
        "int4_absmax": b["int4_absmax"],
    }
    rows = [
        [
            label,
            cell(bits[k], 4),
            cell(n["mae"][k], 4),
            cell(n["rmse"][k], 4),
            cell(t["mae"][k], 4),
            cell(t["rmse"][k], 4),
        ]
        for k, label in q["methods"].items()
    ]
    p = q["phi2"]
    out = [
        "## 2. Quantization quality and size",
        "",
        f"Round trip W → quantize → dequantize, blocks of 64. N(0, 1): {n['data']}. "
        f"Tiny: {t['data']}.",
        "",
        *table(
            [
                "method",
                "stored bits/param",
                "MAE N(0,1)",
                "RMSE N(0,1)",
                "MAE tiny Phi",
                "RMSE tiny Phi",
            ],
            rows,
        ),
        "",
        f"- Ours vs bitsandbytes: stored bytes identical: "
        f"**{'yes' if n['bytes_identical_to_bnb'] and t['bytes_identical_to_bnb'] else 'NO'}**; "
        f"max |ours − bitsandbytes| after dequantize: {cell(n['max_abs_diff_ours_vs_bnb'])} "
        f"(N(0,1)), {cell(t['max_abs_diff_ours_vs_bnb'])} (tiny).",
        f"- RMSE NF4 (ours) / int4 absmax: {ratio_cell(n['ratios']['rmse_ours_vs_int4'])} on "
        f"N(0,1), {ratio_cell(t['ratios']['rmse_ours_vs_int4'])} on the tiny Phi.",
        f"- Bits/param: {b['of']}.",
        "",
        "### Phi-2 footprint, computed from its config alone",
        "",
        f"{p['how']}.",
        "",
        *table(
            ["", "GB (10⁹ bytes)", "parameters"],
            [
                [
                    "fp16, computed (issue: 5.56 GB)",
                    num(p["fp16_GB"]["median"], 4),
                    f"{p['total_params']['median']:,.0f}",
                ],
                [
                    f"NF4 part: {p['quantized_modules']['median']:.0f} linears",
                    num(p["quantized_GB"]["median"], 4),
                    f"{p['quantized_params']['median']:,.0f}",
                ],
                [
                    "fp16 part: embeddings, lm_head, norms, biases",
                    num(p["fp16_kept_GB"]["median"], 4),
                    f"{p['other_params']['median']:,.0f}",
                ],
                [
                    "**NF4 + double quant, total (ours)**",
                    f"**{num(p['nf4_GB']['median'], 4)}** ({num(p['nf4_GiB']['median'], 4)} GiB)",
                    "",
                ],
                ["bitsandbytes nf4 + double quant (issue's reference)", "≈ 1.82", ""],
            ],
        ),
        "",
        f"NF4 (ours) / fp16: {ratio_cell(p['nf4_vs_fp16'])}.",
    ]
    return out


def grpo_md(g: dict) -> list[str]:
    rows = []
    for c in g["configs"].values():
        rows.append(
            [
                c["label"],
                cell(c["step_seconds"]),
                cell(c["generation_seconds"]),
                cell(c["reference_seconds"]),
                cell(c["policy_fwd_bwd_seconds"]),
                cell(c["optimizer_seconds"]),
                cell(c["other_seconds"]),
                cell(c["generated_tokens_per_second"]),
                cell(c["trained_tokens_per_second"]),
                cell(c["peak_rss"], 4),
            ]
        )
    r = g["ratios"]
    return [
        "## 3. GRPO step, tiny default config",
        "",
        f"Config: {g['config']}; {next(iter(g['configs'].values()))['completions_per_step']} "
        f"completions per step; {g['steps_untimed']} untimed + {g['steps_timed']} timed steps, "
        "each config in its own process. Step = the whole `train_step()` call; policy fwd/bwd = "
        "the update minus the optimizer (forward, loss, backward, gradient clipping); rewards "
        "etc. = the rest (rewards, metrics, bookkeeping); trained tokens/s = completion "
        "tokens in the loss / (fwd/bwd + optimizer) seconds.",
        "",
        *table(
            [
                "config",
                "step s",
                "generation s",
                "reference s",
                "policy fwd/bwd s",
                "optimizer s",
                "rewards etc. s",
                "generated tokens/s",
                "trained tokens/s",
                "peak RSS MiB",
            ],
            rows,
        ),
        "",
        f"- Step time, NF4 base / fp32 base: {ratio_cell(r['step_nf4_vs_fp32_beta0'])} at beta 0, "
        f"{ratio_cell(r['step_nf4_vs_fp32_beta0.04'])} at beta 0.04.",
        f"- Step time, beta 0.04 / beta 0 (NF4): {ratio_cell(r['step_beta0.04_vs_beta0_nf4'])}.",
        f"- Peak RSS, NF4 base / fp32 base (beta 0): {ratio_cell(r['peak_rss_nf4_vs_fp32_beta0'])}"
        " (the tiny model is ~0.8M parameters: the process's RSS is mostly Python and torch).",
        "- Ratios between configs are ratios of medians (separate processes); the range is "
        "min/max to max/min.",
    ]


def logprob_md(m: dict) -> list[str]:
    s = m["shape"]
    rows = [
        [
            v["label"],
            cell(v["forward_peak"], 4),
            cell(v["kept_for_backward"], 4),
            cell(v["fwd_bwd_peak"], 4),
            cell(v["fwd_bwd_time"]),
        ]
        for v in m["methods"].values()
    ]
    r = m["ratios"]
    return [
        f"## 4. Log-prob memory: batch {s['batch']} × {s['seq']} tokens, vocab {s['vocab']:,}, "
        f"{s['dtype']}",
        "",
        f"Memory above the inputs (the logits alone are {num(m['logits_MiB'], 4)} MiB), measured "
        f"as {m['measured_as']}. The fwd+bwd peak includes the logits' gradient, which both must "
        "produce.",
        "",
        *table(
            [
                "method",
                "forward peak MiB",
                "kept for backward MiB",
                "fwd+bwd peak MiB",
                "fwd+bwd ms",
            ],
            rows,
        ),
        "",
        f"- selective / naive: forward peak {ratio_cell(r['forward_peak_selective_vs_naive'])}, "
        f"fwd+bwd peak {ratio_cell(r['fwd_bwd_peak_selective_vs_naive'])}, time "
        f"{ratio_cell(r['fwd_bwd_time_selective_vs_naive'])}.",
    ]


def render_markdown(r: dict) -> str:
    lines = ["# Benchmark results", ""]
    if r["quick"]:
        lines += [
            "**QUICK MODE: tiny shapes for a smoke test; these are not the published figures.**",
            "",
        ]
    lines += [
        f"`{r['command']}` — {machine_line(r)}. Wall time {r['wall_seconds']['total']:.0f} s.",
        "",
        "Figures: median (min–max) over the repeats in bench/results.json (≥ 5 for anything "
        "timed or measured; computed quantities have one value). Ratios are ours / peer: below 1 "
        "means ours is faster, smaller or more accurate.",
        "",
    ]
    parts = (
        ("layers", layers_md),
        ("quality", quality_md),
        ("grpo_step", grpo_md),
        ("logprob_memory", logprob_md),
    )
    for key, render in parts:
        if key in r:
            lines += render(r[key]) + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# README section
# ---------------------------------------------------------------------------------------------


def readme_section(r: dict) -> str:
    rows = []
    if "layers" in r:
        p = r["layers"]
        for key, s in p["shapes"].items():
            f, ra = s["fwd_bwd"], s["ratios"]
            what = f"NF4 layer fwd+bwd {arrow(key)}, {p['tokens']} tokens, r={p['lora_r']}"
            rows.append(
                [
                    what,
                    f"NF4Linear+LoRA {num(f['ours']['median'])} ms",
                    f"bitsandbytes Linear4bit+LoRA {num(f['bnb']['median'])} ms",
                    ratio_cell(ra["ours_vs_bnb"]),
                ]
            )
            rows.append(
                [
                    what,
                    f"NF4Linear+LoRA {num(f['ours']['median'])} ms",
                    f"frozen fp32 Linear+LoRA {num(f['fp32']['median'])} ms",
                    ratio_cell(ra["ours_vs_fp32"]),
                ]
            )
        for key, d in p["dequantize"].items():
            sec = d["seconds"]
            rows.append(
                [
                    f"dequantize {arrow(key)} weight",
                    f"dequantize_nf4 {num(sec['ours']['median'])} ms; into reused buffers, as "
                    f"NF4Linear does: {num(sec['ours_reused']['median'])} ms",
                    f"bitsandbytes dequantize_4bit {num(sec['bnb']['median'])} ms",
                    f"{ratio_cell(d['ratios']['ours_vs_bnb'])}; reused buffers "
                    f"{ratio_cell(d['ratios']['ours_reused_vs_bnb'])}",
                ]
            )
    if "quality" in r:
        q = r["quality"]
        n, t = q["normal"], q["tiny"]
        same = n["bytes_identical_to_bnb"] and t["bytes_identical_to_bnb"]
        diff = max(n["max_abs_diff_ours_vs_bnb"]["median"], t["max_abs_diff_ours_vs_bnb"]["median"])
        rows.append(
            [
                "NF4 bytes vs bitsandbytes (N(0,1) and tiny Phi weights)",
                "ours",
                "bitsandbytes quantize_4bit",
                f"{'identical' if same else 'DIFFERENT'}, max abs diff {num(diff)}",
            ]
        )
        for data, d in (("N(0,1)", n), ("tiny Phi weights", t)):
            rows.append(
                [
                    f"quantization RMSE, {data}",
                    f"NF4 {num(d['rmse']['ours']['median'], 4)}",
                    f"int4 absmax {num(d['rmse']['int4_absmax']['median'], 4)}",
                    ratio_cell(d["ratios"]["rmse_ours_vs_int4"]),
                ]
            )
        p = q["phi2"]
        rows.append(
            [
                "Phi-2 weights, from its config",
                f"NF4 + double quant {num(p['nf4_GB']['median'], 3)} GB (bitsandbytes ≈ 1.82 GB)",
                f"fp16 {num(p['fp16_GB']['median'], 3)} GB",
                ratio_cell(p["nf4_vs_fp16"]),
            ]
        )
    if "grpo_step" in r:
        g = r["grpo_step"]
        for beta in ("0", "0.04"):
            nf4, fp32 = g["configs"][f"nf4_beta{beta}"], g["configs"][f"fp32_beta{beta}"]
            rows.append(
                [
                    f"GRPO step, tiny default config, beta {beta}",
                    f"NF4 base {num(nf4['step_seconds']['median'])} s",
                    f"fp32 base {num(fp32['step_seconds']['median'])} s",
                    ratio_cell(g["ratios"][f"step_nf4_vs_fp32_beta{beta}"]),
                ]
            )
    if "logprob_memory" in r:
        m = r["logprob_memory"]
        s, sel, nai = m["shape"], m["methods"]["selective"], m["methods"]["naive"]
        rows.append(
            [
                f"log-prob peak memory fwd+bwd, {s['batch']}×{s['seq']}, vocab {s['vocab']:,}",
                f"selective_log_softmax {num(sel['fwd_bwd_peak']['median'])} MiB",
                f"log_softmax().gather() {num(nai['fwd_bwd_peak']['median'])} MiB",
                ratio_cell(m["ratios"]["fwd_bwd_peak_selective_vs_naive"]),
            ]
        )
    lines = [
        README_START,
        f"Measured by `make bench` (`{r['command']}`, {r['wall_seconds']['total']:.0f} s) on "
        f"{machine_line(r)}. Median (min–max) of ≥ 5 repeats; ours / peer below 1 means ours is "
        "faster, smaller or more accurate. Every table, with the GRPO step split into "
        "generation, reference, policy forward/backward and optimizer: "
        "[bench/results.md](bench/results.md); raw samples: bench/results.json.",
        "",
        *table(["what", "ours", "peer", "ours / peer"], rows),
        README_END,
    ]
    return "\n".join(lines)


def check_readme(readme: Path) -> str:
    """The README's text, or ReadmeError saying what to add."""
    fix = (
        f"add a Performance section with the two marker lines {README_START} and {README_END} "
        "(each on its own line) where the generated table should go, or pass --no-readme"
    )
    if not readme.is_file():
        raise ReadmeError(f"{readme} does not exist; {fix}")
    text = readme.read_text()
    starts, ends = text.count(README_START), text.count(README_END)
    if starts != 1 or ends != 1 or text.index(README_START) > text.index(README_END):
        raise ReadmeError(
            f"{readme} must hold {README_START} once, then {README_END} once (found {starts} "
            f"and {ends}); {fix}"
        )
    return text


def update_readme(readme: Path, results: dict) -> None:
    """Replace the README's text between the markers (markers included) with readme_section."""
    if results.get("quick"):
        raise ReadmeError(
            "results.json comes from `--quick` (tiny shapes); run the full `python -m bench.run` "
            "before publishing to the README"
        )
    text = check_readme(readme)
    pattern = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.DOTALL)
    section = readme_section(results)
    readme.write_text(pattern.sub(lambda _: section, text, count=1))
