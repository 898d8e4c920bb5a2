"""results.json -> the README's two Performance blocks and bench/results.md.

Each README block lies between its two marker lines and is replaced whole; nothing else in the
README changes. results.md holds the same tables, then every figure of results.json, one table
per part. A ratio is ours / peer: below 1 means ours is faster, smaller or more accurate, except
the decode tokens/s ratios, where above 1 means faster (their column says so).
"""

from __future__ import annotations

from pathlib import Path

from bench.results import ReadmeError, check_block, read_checked, rewrite_block

README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
SERVE_START, SERVE_END = "<!-- bench-serve:start -->", "<!-- bench-serve:end -->"
TRAINING_PARTS = ("layers", "quality", "grpo_step", "logprob_memory")
SERVING_PARTS = ("serve", "kernel")

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


def med(fig: dict, digits: int = 3) -> str:
    return num(fig["median"], digits)


def cell(fig: dict | None, digits: int = 3) -> str:
    """'median (min–max)' for a measured figure, the value alone for an exact one."""
    if fig is None or fig["median"] is None:
        return "n/a"
    if fig.get("exact") or fig["min"] is None or fig["max"] is None:
        return med(fig, digits)
    low, high = num(fig["min"], digits), num(fig["max"], digits)
    return med(fig, digits) if low == high else f"{med(fig, digits)} ({low}–{high})"


def ratio_cell(fig: dict) -> str:
    if fig["median"] is None:
        return "n/a (a side measured 0)"
    text = cell(fig).replace(" (", "x (", 1)
    return text if "x (" in text else text + "x"


def percent(fig: dict) -> str:
    return f"{fig['median']:.0%}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def machine_line(r: dict, threads: bool = True) -> str:
    """The machine and the software, from the run's own environment record."""
    e = r["environment"]
    where = e.get("gpu") or f"{e['cpu_model']}, {e['cpu_count']} cores"
    if threads:
        where += f"; {plural(e['threads'], 'torch thread')}"
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
# The training side: one "what | ours | peer | ours / peer" table
# ---------------------------------------------------------------------------------------------


def layer_rows(p: dict) -> list[list[str]]:
    rows = []
    for key, s in p["shapes"].items():
        what = f"NF4 layer fwd+bwd {key.replace('->', '→')}, {p['tokens']} tokens, r={p['lora_r']}"
        ms, ratios = s["fwd_bwd"], s["ratios"]
        ours = f"NF4Linear+LoRA {med(ms['ours'])} ms"
        bnb = f"bitsandbytes Linear4bit+LoRA {med(ms['bnb'])} ms"
        rows.append([what, ours, bnb, ratio_cell(ratios["ours_vs_bnb"])])
        fp32 = f"frozen fp32 Linear+LoRA {med(ms['fp32'])} ms"
        rows.append([what, ours, fp32, ratio_cell(ratios["ours_vs_fp32"])])
    for key, d in p["dequantize"].items():
        ms, ratios = d["seconds"], d["ratios"]
        ours = (
            f"dequantize_nf4 {med(ms['ours'])} ms; into reused buffers, as NF4Linear does: "
            f"{med(ms['ours_reused'])} ms"
        )
        both = (
            f"{ratio_cell(ratios['ours_vs_bnb'])}; reused buffers "
            f"{ratio_cell(ratios['ours_reused_vs_bnb'])}"
        )
        bnb = f"bitsandbytes dequantize_4bit {med(ms['bnb'])} ms"
        rows.append([f"dequantize {key.replace('->', '→')} weight", ours, bnb, both])
    return rows


def quality_rows(q: dict) -> list[list[str]]:
    n, t, p = q["normal"], q["tiny"], q["phi2"]
    same = n["bytes_identical_to_bnb"] and t["bytes_identical_to_bnb"]
    diff = max(n["max_abs_diff_ours_vs_bnb"]["median"], t["max_abs_diff_ours_vs_bnb"]["median"])
    what = "NF4 bytes vs bitsandbytes (N(0,1) and tiny Phi weights)"
    verdict = f"{'identical' if same else 'DIFFERENT'}, max abs diff {num(diff)}"
    rows = [[what, "ours", "bitsandbytes quantize_4bit", verdict]]
    for data, d in (("N(0,1)", n), ("tiny Phi weights", t)):
        ours, int4 = (
            f"NF4 {med(d['rmse']['ours'], 4)}",
            f"int4 absmax {med(d['rmse']['int4_absmax'], 4)}",
        )
        rows.append(
            [f"quantization RMSE, {data}", ours, int4, ratio_cell(d["ratios"]["rmse_ours_vs_int4"])]
        )
    ours = (
        f"NF4 + double quant {med(p['nf4_GB'])} GB (bitsandbytes' bytes: {med(p['bnb_nf4_GB'])} GB)"
    )
    fp16 = f"fp16 {med(p['fp16_GB'])} GB"
    rows.append(["Phi-2 weights, from its config", ours, fp16, ratio_cell(p["nf4_vs_fp16"])])
    return rows


def grpo_rows(g: dict) -> list[list[str]]:
    rows = []
    for beta in ("0", "0.04"):
        nf4, fp32 = g["configs"][f"nf4_beta{beta}"], g["configs"][f"fp32_beta{beta}"]
        ours, peer = (
            f"NF4 base {med(nf4['step_seconds'])} s",
            f"fp32 base {med(fp32['step_seconds'])} s",
        )
        ratio = ratio_cell(g["ratios"][f"step_nf4_vs_fp32_beta{beta}"])
        rows.append([f"GRPO step, tiny default config, beta {beta}", ours, peer, ratio])
    return rows


def logprob_rows(m: dict) -> list[list[str]]:
    s, sel, naive = m["shape"], m["methods"]["selective"], m["methods"]["naive"]
    return [
        [
            f"log-prob peak memory fwd+bwd, {s['batch']}×{s['seq']}, vocab {s['vocab']:,}",
            f"selective_log_softmax {med(sel['fwd_bwd_peak'])} MiB",
            f"log_softmax().gather() {med(naive['fwd_bwd_peak'])} MiB",
            ratio_cell(m["ratios"]["fwd_bwd_peak_selective_vs_naive"]),
        ]
    ]


def training_table(r: dict) -> list[str]:
    renderers = (layer_rows, quality_rows, grpo_rows, logprob_rows)
    rows = [
        row
        for part, rows_of in zip(TRAINING_PARTS, renderers, strict=True)
        if part in r
        for row in rows_of(r[part])
    ]
    return table(["what", "ours", "peer", "ours / peer"], rows)


def readme_section(r: dict) -> list[str]:
    """The README block between README_START and README_END."""
    return [
        f"Measured by `make bench` (`{r['command']}`, {r['wall_seconds']['total']:.0f} s) on "
        f"{machine_line(r)}. Median (min–max) of ≥ 5 repeats; ours / peer below 1 means ours is "
        "faster, smaller or more accurate. Every figure, with the GRPO step split into "
        "generation, reference, policy forward/backward and optimizer: "
        "[bench/results.md](bench/results.md); raw samples: bench/results.json.",
        "",
        *training_table(r),
    ]


# ---------------------------------------------------------------------------------------------
# The serving side: a Phi-2-sized model served on CPU, and the NF4 kernel at Phi-2's shapes
# ---------------------------------------------------------------------------------------------

SERVE_HEADER = (
    "path | rows | decode tokens/s per side | prefill = first token s | peak RSS GB | load s | "
    "decode vs bitsandbytes, 1 row (above 1: faster)"
).split(" | ")
KERNEL_HEADER = (
    "weight (out × in) | rows | ours, fused ms | bitsandbytes Linear4bit ms | pure PyTorch "
    "(decode + F.linear) ms | ours GB/s (of the read probe) | ours / bitsandbytes | ours / pure "
    "PyTorch"
).split(" | ")
INT16_HEADER = [
    "ours, int16 ms",
    "int16 GB/s (of the read probe)",
    "int16 / bitsandbytes",
    "int16 / exact",
]


def serve_setup(v: dict) -> str:
    st = v["settings"]
    layers = st.get("num_layers", 32)
    size = "Phi-2 (2.78 B parameters)" if layers == 32 else f"Phi-2's shapes cut to {layers} layers"
    return (
        f"{size} built from its config with random bf16 weights (`bench/phi2.py`), a random "
        f"peft LoRA r=16 on all six linears of every block; greedy, a {st['prompt_tokens']}-token "
        f"prompt, {st['steps']} steps per call x {st['calls']} calls per path (prefill: one per "
        f"call; decode: every later step), {plural(st['threads'], 'torch thread')}, each process "
        "measured alone"
    )


SERVERS = ("server", "server_int16")  # bench/serve.py's SERVERS, in table order


def serve_rows(v: dict) -> list[list[str]]:
    rows = []
    for key, p in v["paths"].items():
        ratio = v["ratios"].get(f"{key}_decode_vs_bnb")
        speed = "1x (the peer)" if ratio is None else ratio_cell(ratio)
        row = [p["label"], str(p["rows"]), cell(p["decode_tokens_per_second_per_side"])]
        row += [cell(p["prefill_seconds"]), med(p["peak_rss_GB"]), med(p["load_seconds"]), speed]
        rows.append(row)
    for key in SERVERS:
        if key not in v:
            continue
        srv, ratio = v[key], v["ratios"].get(f"{key}_decode_vs_bnb")
        command = srv.get("command", "python -m app --model DIR --adapter DIR")
        row = [f"{srv['label']} (`{command}`, one /compare call)", "2"]
        row += [cell(srv["tokens_per_second_per_side"])]
        row += [cell(srv["first_token_seconds"]) + " (first token in both panes)"]
        row += [med(srv["peak_rss_GB"]), med(srv["ready_seconds"]) + " (until it answers HTTP)"]
        rows.append(row + ["" if ratio is None else ratio_cell(ratio)])
    return rows


def serve_derived(v: dict) -> list[str]:
    d, ratios, m = v["derived"], v["ratios"], v["machine"]
    read, bf16 = m["read_bandwidth"], m["gemm_bf16"]
    prefill_s = med(v["paths"]["ours_rows2"]["prefill_seconds"])
    return [
        f"- Decode, 2 rows: each step reads {med(d['step_GB'])} GB of weights (NF4 codes and "
        "block scales, lm_head and the other 16-bit parameters; one embedding row), "
        f"{med(d['decode_read_GBps'])} GB/s at the median step, "
        f"{percent(d['decode_bandwidth_fraction'])} of the machine's measured read bandwidth "
        f"({med(read)} GB/s, {read['label']}): a ceiling of "
        f"{med(d['decode_steps_per_second_ceiling'])} steps/s.",
        *int16_bandwidth(d),
        f"- Prefill, 2 rows: {med(d['prefill_TFLOP'])} TFLOP in {prefill_s} s, "
        f"{med(d['prefill_GFLOPs'])} GFLOP/s, {percent(d['prefill_peak_fraction'])} of the "
        f"measured bf16 matmul peak ({med(bf16)} GFLOP/s, {bf16['label']}).",
        "- A side-by-side demo on bitsandbytes runs one pass per side for each token: "
        f"{med(d['bnb_side_by_side_tokens_per_second'])} tokens/s per side (its two 1-row median "
        f"steps); ours with both sides in one pass gives "
        f"{med(d['ours_rows2_vs_bnb_side_by_side'])}x that.",
        "- Peak RSS / bitsandbytes + peft's: "
        + ", ".join(
            f"{name} {ratio_cell(ratios[f'{key}_peak_rss_vs_bnb'])}"
            for key, name in RSS_NAMES
            if f"{key}_peak_rss_vs_bnb" in ratios
        )
        + ".",
    ]


RSS_NAMES = (
    ("ours_rows2", "ours"),
    ("ours_int16_rows2", "ours, int16"),
    ("server", "the demo server"),
    ("server_int16", "the demo server --int16"),
    ("dense_bf16_rows1", "dense bf16"),
)


def int16_bandwidth(d: dict) -> list[str]:
    """The int16 route's decode line, when it was measured."""
    if "int16_step_GB" not in d:
        return []
    return [
        f"- Decode, 2 rows, int16: each step reads {med(d['int16_step_GB'])} GB (the repacked "
        f"codes and their scales instead of the NF4 bytes), {med(d['int16_decode_read_GBps'])} "
        f"GB/s at the median step, {percent(d['int16_decode_bandwidth_fraction'])} of the read "
        f"probe: a ceiling of {med(d['int16_decode_steps_per_second_ceiling'])} steps/s."
    ]


def kernel_setup(k: dict) -> str:
    m = k["machine"]
    int16 = f" and `qlora/int16_decode.py` ({k['int16_isa']} build)" if k.get("int16_isa") else ""
    return (
        f"`qlora/kernel.py` ({k['isa']} build, loaded in {med(k['kernel_load_seconds'])} s){int16}"
        f", {plural(k['threads'], 'torch thread')}, bfloat16 inputs, Phi-2's shapes, each call "
        "reading its weight from memory (copies rotated past the last-level cache). Machine "
        f"probes on the same threads: read {cell(m['read_bandwidth'])} GB/s "
        f"({m['read_bandwidth']['label']}), GEMM {cell(m['gemm_fp32'])} GFLOP/s fp32 and "
        f"{cell(m['gemm_bf16'])} GFLOP/s bf16 ({m['gemm_bf16']['label']}). Ratios are of times: "
        "below 1 means ours is faster"
    )


def kernel_table(k: dict) -> list[str]:
    """One row per shape and row count; the int16 kernel's columns when it was measured."""
    int16 = any(
        "int16" in d["ms"] for per in k["decode"].values() for d in per.values() if "ms" in d
    )
    rows = []
    for shape, per in k["decode"].items():
        for key, d in per.items():
            if not key.startswith("rows="):
                continue
            ms, gbps, ratios = d["ms"], d["read_GBps"], d["ratios"]
            row = [shape.replace("x", " × "), key.split("=")[1], cell(ms["ours"]), cell(ms["bnb"])]
            bw = f"{med(gbps['ours'])} ({percent(ratios['bandwidth_fraction'])})"
            row += [cell(ms["pure"]), bw, ratio_cell(ratios["ours_vs_bnb"])]
            row += [ratio_cell(ratios["ours_vs_pure"])]
            if int16:
                bw = f"{med(gbps['int16'])} ({percent(ratios['int16_bandwidth_fraction'])})"
                row += [cell(ms["int16"]), bw, ratio_cell(ratios["int16_vs_bnb"])]
                row += [ratio_cell(ratios["int16_vs_ours"])]
            rows.append(row)
    return table(KERNEL_HEADER + (INT16_HEADER if int16 else []), rows)


def kernel_lines(k: dict) -> list[str]:
    """The output layer (when our GEMV was measured beside F.linear) and the prefill."""
    lines = []
    heads = [(key, v) for key, v in k["lm_head"].items() if key.startswith("rows=") and "gemv" in v]
    if heads:
        lines.append(
            "- lm_head (51,200 × 2,560, bf16), torch's F.linear vs our GEMV: "
            + "; ".join(
                f"{plural(int(key.split('=')[1]), 'row')} {cell(v['ms'])} ms, "
                f"{med(v['read_GBps'])} GB/s ({percent(v['bandwidth_fraction'])}) vs "
                f"{cell(v['gemv']['ms'])} ms, {med(v['gemv']['read_GBps'])} GB/s "
                f"({percent(v['gemv']['bandwidth_fraction'])})"
                for key, v in heads
            )
            + "."
        )
    prefill = []
    for shape, p in k["prefill"].items():
        ratios = p["ratios"]
        text = (
            f"{shape.replace('x', ' × ')} {med(p['ms']['decode_gemm_bf16'])} ms, "
            f"{med(p['GFLOPs']['decode_gemm_bf16'])} GFLOP/s "
            f"({percent(ratios['bf16_fraction_of_peak'])} of the bf16 peak); fused / (decode + "
            f"GEMM) fp32 {ratio_cell(ratios['fused_vs_decode_gemm_fp32'])}"
        )
        if "int16_vs_decode_gemm_bf16" in ratios:
            text += (
                f", int16 / (decode + GEMM) bf16 {ratio_cell(ratios['int16_vs_decode_gemm_bf16'])}"
            )
        prefill.append(text)
    lines.append("- Prefill (300 rows), decode + bf16 GEMM: " + "; ".join(prefill) + ".")
    return lines


def serving_tables(r: dict) -> list[str]:
    lines = []
    if "serve" in r:
        v = r["serve"]
        lines += ["**Serving a Phi-2-sized model on CPU.** " + serve_setup(v) + ".", ""]
        lines += [*table(SERVE_HEADER, serve_rows(v)), "", *serve_derived(v), ""]
    if "kernel" in r:
        k = r["kernel"]
        lines += ["**The NF4 kernel at Phi-2's shapes.** " + kernel_setup(k) + ".", ""]
        lines += [*kernel_table(k), "", *kernel_lines(k)]
    return lines


def serve_section(r: dict) -> list[str]:
    """The README block between SERVE_START and SERVE_END."""
    return [
        f"Measured by `make bench` (`{r['command']}`) on {machine_line(r, threads=False)}; "
        "tables with every sample's spread: [bench/results.md](bench/results.md).",
        "",
        *serving_tables(r),
    ]


# ---------------------------------------------------------------------------------------------
# results.md: the tables above, then every figure
# ---------------------------------------------------------------------------------------------


def figure_rows(tree: dict, path: str = ""):
    """(path, figure) for every figure under `tree`, depth first, in the order of results.json."""
    for key, value in tree.items():
        if not isinstance(value, dict) or key in ("machine", "raw"):
            continue
        name = f"{path} › {key}" if path else key
        if "unit" in value:
            yield name, value
        else:
            yield from figure_rows(value, name)


def about(fig: dict) -> str:
    if "numerator" in fig:
        kind = f" ({fig['ratio']})" if "ratio" in fig else ""
        return f"{fig['numerator']} / {fig['denominator']}{kind}"
    return fig.get("label") or fig.get("of") or fig.get("how") or ""


def every_figure(name: str, part: dict) -> list[str]:
    """A part's settings (its plain values) and one row per figure."""
    plain = [f"{k}: {v}" for k, v in part.items() if not isinstance(v, (dict, list))]
    rows = [[path, cell(fig, 4), fig["unit"], about(fig)] for path, fig in figure_rows(part)]
    header = ["figure", "median (min–max)", "unit", "what"]
    return [f"### {name}", "", *(["; ".join(plain), ""] if plain else []), *table(header, rows)]


def render_markdown(r: dict) -> str:
    lines = ["# Benchmark results", ""]
    if r["quick"]:
        lines += ["**QUICK MODE: tiny shapes for a smoke test; not the published figures.**", ""]
    lines += [
        f"`{r['command']}` — {machine_line(r)}. Wall time {r['wall_seconds']['total']:.0f} s.",
        "",
        "Figures: median (min–max) over the repeats in bench/results.json (≥ 5 for anything "
        "timed or measured; computed quantities have one value). Ratios are ours / peer: below 1 "
        "means ours is faster, smaller or more accurate.",
        "",
    ]
    if any(part in r for part in TRAINING_PARTS):
        lines += ["## Training side", "", *training_table(r), ""]
    if any(part in r for part in SERVING_PARTS):
        lines += ["## Serving side", "", *serving_tables(r), ""]
    lines += ["## Every figure", ""]
    for name in ("machine", *TRAINING_PARTS, *SERVING_PARTS):
        if name in r:
            lines += [*every_figure(name, r[name]), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The README blocks
# ---------------------------------------------------------------------------------------------

# (start, end, the parts whose results the block shows, renderer)
BLOCKS = (
    (README_START, README_END, TRAINING_PARTS, readme_section),
    (SERVE_START, SERVE_END, SERVING_PARTS, serve_section),
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
    chosen = parts or results
    written = []
    for start, end, shown, render in BLOCKS:
        if any(part in results and part in chosen for part in shown):
            rewrite_block(readme, start, end, "\n".join(render(results)))
            written.append(start)
    return written
