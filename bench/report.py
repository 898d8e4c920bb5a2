"""results.json -> bench/results.md (every table) and the README's Performance section (the ratios).

The README section is whatever lies between the two marker lines below; it is replaced whole and
nothing else in the README is touched. Every ratio is "ours / peer": below 1 means ours is
faster, smaller or more accurate.
"""

from __future__ import annotations

from pathlib import Path

from bench.results import ReadmeError, check_block, read_checked, rewrite_block

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
SERVE_START = "<!-- bench-serve:start -->"
SERVE_END = "<!-- bench-serve:end -->"

__all__ = ["ReadmeError", "check_readme", "render_markdown", "update_readme"]


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
    return text if "x (" in text else text + "x"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def arrow(key: str) -> str:
    return key.replace("->", "→")


def machine_line(r: dict, threads: bool = True) -> str:
    """The machine and the software, from the run's own environment record."""
    e = r["environment"]
    where = e.get("gpu") or f"{e['cpu_model']}, {e['cpu_count']} cores"
    if threads:
        where += f"; {e['threads']} torch thread{'s' if e['threads'] != 1 else ''}"
    line = (
        f"{where}; torch {e['torch']}, bitsandbytes {e['bitsandbytes']}, "
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
    out += [
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
                    "fp16, computed",
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
                *(
                    [
                        [
                            "bitsandbytes nf4 + double quant, its bytes measured per shape",
                            num(p["bnb_nf4_GB"]["median"], 4),
                            "",
                        ]
                    ]
                    if "bnb_nf4_GB" in p
                    else []
                ),
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
        ("serve", serve_md),
        ("kernel", kernel_md),
    )
    for key, render in parts:
        if key in r:
            lines += render(r[key]) + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# README section
# ---------------------------------------------------------------------------------------------


def readme_section(r: dict) -> list[str]:
    """The README block between README_START and README_END: the training side's ratios."""
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
                f"NF4 + double quant {num(p['nf4_GB']['median'], 3)} GB"
                + (
                    f" (bitsandbytes' bytes: {num(p['bnb_nf4_GB']['median'], 3)} GB)"
                    if "bnb_nf4_GB" in p
                    else ""
                ),
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
    return [
        f"Measured by `make bench` (`{r['command']}`, {r['wall_seconds']['total']:.0f} s) on "
        f"{machine_line(r)}. Median (min–max) of ≥ 5 repeats; ours / peer below 1 means ours is "
        "faster, smaller or more accurate. Every table, with the GRPO step split into "
        "generation, reference, policy forward/backward and optimizer: "
        "[bench/results.md](bench/results.md); raw samples: bench/results.json.",
        "",
        *table(["what", "ours", "peer", "ours / peer"], rows),
    ]


# ---------------------------------------------------------------------------------------------
# Serving a Phi-2-sized model, and the NF4 CPU kernel
# ---------------------------------------------------------------------------------------------


def fig_cell(fig: dict | None, digits: int = 3) -> str:
    return "n/a" if fig is None else cell(fig, digits)


def speed_ratio_cell(fig: dict | None) -> str:
    """A tokens/s ratio: above 1 means faster than the peer."""
    return "1x (the peer)" if fig is None else ratio_cell(fig)


def serve_setup(v: dict) -> str:
    st = v["settings"]
    layers = st.get("num_layers", 32)
    size = "Phi-2 (2.78 B parameters)" if layers == 32 else f"Phi-2's shapes cut to {layers} layers"
    return (
        f"{size} built from its config with random bf16 weights (`bench/phi2.py`), a random "
        f"peft LoRA r=16 on all six linears of every block; greedy, a {st['prompt_tokens']}-token "
        f"prompt, {st['steps']} steps per call x {st['calls']} calls per path (prefill: one per "
        f"call; decode: every later step), {st['threads']} torch "
        f"thread{'s' if st['threads'] != 1 else ''}, each process measured alone"
    )


def serve_rows(v: dict) -> list[list[str]]:
    rows = []
    for key, p in v["paths"].items():
        rows.append(
            [
                p["label"],
                str(p["rows"]),
                fig_cell(p["decode_tokens_per_second_per_side"]),
                fig_cell(p["prefill_seconds"]),
                num(p["peak_rss_GB"]["median"]),
                num(p["load_seconds"]["median"]),
                speed_ratio_cell(v["ratios"].get(f"{key}_decode_vs_bnb")),
            ]
        )
    srv = v["server"]
    rows.append(
        [
            srv["label"] + " (`python -m app --model DIR --adapter DIR`, one /compare call)",
            "2",
            fig_cell(srv["tokens_per_second_per_side"]),
            fig_cell(srv["first_token_seconds"]) + " (first token in both panes)",
            num(srv["peak_rss_GB"]["median"]),
            num(srv["ready_seconds"]["median"]) + " (until it answers HTTP)",
            "",
        ]
    )
    return rows


SERVE_HEADER = [
    "path",
    "rows",
    "decode tokens/s per side",
    "prefill = first token s",
    "peak RSS GB",
    "load s",
    "decode vs bitsandbytes, 1 row (above 1: faster)",
]


def serve_derived(v: dict) -> list[str]:
    d, ratios = v["derived"], v["ratios"]
    lines = [
        f"- Decode, 2 rows: each step reads {num(d['step_GB']['median'])} GB of weights (NF4 codes "
        f"and block scales, lm_head and the other 16-bit parameters; one embedding row), "
        f"{num(d['decode_read_GBps']['median'])} GB/s at the median step"
        + (
            f", {d['decode_bandwidth_fraction']['median']:.0%} of the machine's measured read "
            f"bandwidth ({num(v['machine']['read_bandwidth']['median'])} GB/s, "
            f"{v['machine']['read_bandwidth']['label']}): a ceiling of "
            f"{num(d['decode_steps_per_second_ceiling']['median'])} steps/s"
            if "decode_bandwidth_fraction" in d
            else ""
        )
        + ".",
        f"- Prefill, 2 rows: {num(d['prefill_TFLOP']['median'])} TFLOP in "
        f"{num(v['paths']['ours_rows2']['prefill_seconds']['median'])} s, "
        f"{num(d['prefill_GFLOPs']['median'])} GFLOP/s"
        + (
            f", {d['prefill_peak_fraction']['median']:.0%} of the measured bf16 matmul peak "
            f"({num(v['machine']['gemm_bf16']['median'])} GFLOP/s, "
            f"{v['machine']['gemm_bf16']['label']})"
            if "prefill_peak_fraction" in d
            else ""
        )
        + ".",
        "- A side-by-side demo on bitsandbytes runs one pass per side for each token: "
        f"{num(d['bnb_side_by_side_tokens_per_second']['median'])} tokens/s per side (its "
        "two 1-row median steps); ours with both sides in one pass gives "
        f"{num(d['ours_rows2_vs_bnb_side_by_side']['median'])}x that.",
        "- Peak RSS / bitsandbytes + peft's: ours "
        + ratio_cell(ratios["ours_rows2_peak_rss_vs_bnb"])
        + ", the demo server "
        + ratio_cell(ratios["server_peak_rss_vs_bnb"])
        + ", dense bf16 "
        + ratio_cell(ratios["dense_bf16_rows1_peak_rss_vs_bnb"])
        + ".",
    ]
    return lines


def serve_md(v: dict) -> list[str]:
    return [
        "## 5. Serving a Phi-2-sized model on CPU",
        "",
        serve_setup(v) + ". Peak RSS is the process's VmHWM (ours: 2 rows and 1 row measured in "
        "one process; bitsandbytes: with and without peft in one process).",
        "",
        *table(SERVE_HEADER, serve_rows(v)),
        "",
        *serve_derived(v),
        f"- The server's panes: base `{v['raw']['server']['base_speed']}`, tuned "
        f"`{v['raw']['server']['tuned_speed']}`.",
    ]


def kernel_decode_rows(k: dict) -> list[list[str]]:
    rows = []
    for shape, per in k["decode"].items():
        for key, d in per.items():
            if not key.startswith("rows="):
                continue
            rows.append(
                [
                    shape.replace("x", " × "),
                    key.split("=")[1],
                    cell(d["ms"]["ours"]),
                    cell(d["ms"]["bnb"]),
                    cell(d["ms"]["pure"]),
                    f"{num(d['read_GBps']['ours']['median'])} "
                    f"({d['ratios']['bandwidth_fraction']['median']:.0%})",
                    ratio_cell(d["ratios"]["ours_vs_bnb"]),
                    ratio_cell(d["ratios"]["ours_vs_pure"]),
                    *int8_cells(d),
                ]
            )
    return rows


def int8_cells(d: dict) -> list[str]:
    """The int8 kernel's columns of a decode row ("—" in results measured without it)."""
    if "int8" not in d["ms"]:
        return ["—", "—", "—"]
    return [
        cell(d["ms"]["int8"]),
        f"{num(d['read_GBps']['int8']['median'])} "
        f"({d['ratios']['int8_bandwidth_fraction']['median']:.0%})",
        ratio_cell(d["ratios"]["int8_vs_bnb"]),
    ]


KERNEL_HEADER = [
    "weight (out × in)",
    "rows",
    "ours, fused ms",
    "bitsandbytes Linear4bit ms",
    "pure PyTorch (decode + F.linear) ms",
    "ours GB/s (of the read probe)",
    "ours / bitsandbytes",
    "ours / pure PyTorch",
    "ours, int8 ms",
    "int8 GB/s (of the read probe)",
    "int8 / bitsandbytes",
]


def kernel_setup(k: dict) -> str:
    m = k["machine"]
    return (
        f"`qlora/kernel.py` ({k['isa']} build, loaded in {num(k['kernel_load_seconds']['median'])}"
        f" s)"
        + (f" and `qlora/int8_decode.py` ({k['int8_isa']} build)" if k.get("int8_isa") else "")
        + f", {k['threads']} torch thread{'s' if k['threads'] != 1 else ''}, bfloat16 inputs, "
        f"Phi-2's shapes, each call reading its weight from memory (copies rotated past the "
        f"last-level cache). Machine probes on the same threads: read "
        f"{cell(m['read_bandwidth'])} GB/s ({m['read_bandwidth']['label']}), GEMM "
        f"{cell(m['gemm_fp32'])} GFLOP/s fp32 and {cell(m['gemm_bf16'])} GFLOP/s bf16 "
        f"({m['gemm_bf16']['label']}). Ratios are of times: below 1 means ours is faster"
    )


def kernel_prefill_line(k: dict) -> str:
    return (
        "- Prefill (300 rows), decode + bf16 GEMM: "
        + "; ".join(
            f"{shape.replace('x', ' × ')} {num(p['ms']['decode_gemm_bf16']['median'])} ms, "
            f"{num(p['GFLOPs']['decode_gemm_bf16']['median'])} GFLOP/s "
            f"({p['ratios']['bf16_fraction_of_peak']['median']:.0%} of the bf16 peak); fused / "
            f"(decode + GEMM) fp32 {ratio_cell(p['ratios']['fused_vs_decode_gemm_fp32'])}"
            + (
                f", int8 / (decode + GEMM) bf16 "
                f"{ratio_cell(p['ratios']['int8_vs_decode_gemm_bf16'])}"
                if "int8_vs_decode_gemm_bf16" in p["ratios"]
                else ""
            )
            for shape, p in k["prefill"].items()
        )
        + "."
    )


def kernel_switch_line(k: dict) -> str:
    return (
        f"- Fused / (decode + GEMM), bf16, by rows (`nf4_linear` uses the fused kernel up to "
        f"{k['fused_max_rows']} rows): "
        + "; ".join(
            f"{key.split('=')[1]}: " + ", ".join(f"{num(v['median'])}x" for v in per_shape.values())
            for key, per_shape in k["switch"].items()
        )
        + f" (shapes {', '.join(next(iter(k['switch'].values())))})."
    )


def kernel_lm_head_line(k: dict) -> str:
    h = k["lm_head"]
    return (
        "- lm_head (51,200 × 2,560, bf16), torch's F.linear vs our GEMV: "
        + "; ".join(
            f"{key.split('=')[1]} row{'s' if key != 'rows=1' else ''} {cell(v['ms'])} ms, "
            f"{num(v['read_GBps']['median'])} GB/s ({v['bandwidth_fraction']['median']:.0%})"
            + (
                f" vs {cell(v['gemv']['ms'])} ms, {num(v['gemv']['read_GBps']['median'])} GB/s "
                f"({v['gemv']['bandwidth_fraction']['median']:.0%})"
                if "gemv" in v
                else ""
            )
            for key, v in h.items()
            if key.startswith("rows=")
        )
        + "."
    )


def kernel_md(k: dict) -> list[str]:
    return [
        "## 6. The NF4 CPU kernel, layer by layer",
        "",
        kernel_setup(k) + ".",
        "",
        *table(KERNEL_HEADER, kernel_decode_rows(k)),
        "",
        kernel_lm_head_line(k),
        kernel_prefill_line(k),
        kernel_switch_line(k),
    ]


def serve_section(r: dict) -> list[str]:
    """The README block between SERVE_START and SERVE_END."""
    lines = [
        f"Measured by `make bench` (`{r['command']}`) on {machine_line(r, threads=False)}; "
        "tables with every sample's spread: [bench/results.md](bench/results.md).",
        "",
    ]
    if "serve" in r:
        v = r["serve"]
        lines += [
            "**Serving a Phi-2-sized model on CPU.** " + serve_setup(v) + ".",
            "",
            *table(SERVE_HEADER, serve_rows(v)),
            "",
            *serve_derived(v),
            "",
        ]
    if "kernel" in r:
        k = r["kernel"]
        lines += [
            "**The NF4 kernel at Phi-2's shapes.** " + kernel_setup(k) + ".",
            "",
            *table(KERNEL_HEADER, kernel_decode_rows(k)),
            "",
            kernel_lm_head_line(k),
            kernel_prefill_line(k),
        ]
    return lines


# ---------------------------------------------------------------------------------------------
# The README blocks
# ---------------------------------------------------------------------------------------------

# (start, end, the parts whose results the block shows, renderer)
BLOCKS = (
    (
        README_START,
        README_END,
        ("layers", "quality", "grpo_step", "logprob_memory"),
        readme_section,
    ),
    (SERVE_START, SERVE_END, ("serve", "kernel"), serve_section),
)


def check_readme(readme: Path) -> str:
    """The README's text, or ReadmeError naming the markers to add."""
    text = read_checked(readme, README_START, README_END)
    check_block(text, SERVE_START, SERVE_END, str(readme))
    return text


def update_readme(readme: Path, results: dict, parts=None) -> list[str]:
    """Rewrite each README block that shows one of `parts` (default: every part in `results`);
    the other blocks stay as they are. Returns the start markers of the blocks written."""
    if results.get("quick"):
        raise ReadmeError(
            "results.json comes from `--quick` (tiny shapes); run the full `python -m bench.run` "
            "before publishing to the README"
        )
    check_readme(readme)
    chosen, written = parts, []
    for start, end, parts, render in BLOCKS:
        if any(part in results and part in (chosen or results) for part in parts):
            rewrite_block(readme, start, end, "\n".join(render(results)))
            written.append(start)
    return written
