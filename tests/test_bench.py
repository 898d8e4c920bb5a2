"""`make bench`'s wiring: `python -m bench.run --quick` runs the training-side parts on tiny shapes
and writes both files with the expected keys; the serving and kernel parts (Phi-2-sized, minutes
each) are rendered from results built by their own summarize code on hand-made samples; the README
blocks are replaced between their markers only. Nothing here asserts a speed: timings on a shared
machine are not a test."""

import copy
import json
import os
import subprocess
import sys

import pytest
from torch import nn

from bench import kernel_speed, serve
from bench.measure import exact, figure, paired_ratio, ratio_of
from bench.report import (
    README_END,
    README_START,
    SERVE_END,
    SERVE_START,
    ReadmeError,
    kernel_lines,
    kernel_table,
    render_markdown,
    update_readme,
)
from bench.run import PARTS, main, merge_into

pytestmark = pytest.mark.slow  # trains, spawns processes, builds the kernel or drives a browser

TRAINING_PARTS = "layers,quality,grpo_step,logprob_memory"

FIGURE_KEYS = {"unit", "median", "min", "max", "repeats"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["--quick", "--parts", TRAINING_PARTS, "--out-dir", str(out), "--no-readme"]) == 0
    return out, json.loads((out / "results.json").read_text())


def figures(tree):
    """Every figure dict in the results tree."""
    if isinstance(tree, dict):
        if "unit" in tree:
            yield tree
        else:
            for value in tree.values():
                yield from figures(value)


def test_quick_run_writes_both_files_with_every_part(quick):
    out, r = quick
    assert r["quick"] is True and r["partial"] is True
    assert r["measured"].keys() == set(TRAINING_PARTS.split(","))
    assert "kernel" not in r and "serve" not in r and "machine" not in r
    for key in ("torch", "threads", "cpu_model", "bitsandbytes", "date_utc"):
        assert r["environment"][key] not in (None, "")
    for part in ("layers", "quality", "grpo_step", "logprob_memory", "total"):
        assert r["wall_seconds"][part] >= 0

    layers = r["layers"]
    assert len(layers["shapes"]) == 3
    for shape in layers["shapes"].values():
        assert set(shape["fwd_bwd"]) == {"ours", "bnb", "fp32"}
        for name in ("ours_vs_bnb", "ours_vs_fp32"):
            ratio = shape["ratios"][name]
            assert ratio["numerator"] and ratio["denominator"] and "met" not in ratio
    for deq in layers["dequantize"].values():
        assert deq["max_abs_diff_vs_bnb"]["median"] == 0.0

    q = r["quality"]
    assert q["normal"]["bytes_identical_to_bnb"] and q["tiny"]["bytes_identical_to_bnb"]
    assert q["normal"]["max_abs_diff_ours_vs_bnb"]["median"] == 0.0
    assert q["bits_per_param"]["nf4_no_double_quant"]["median"] == 4.5
    assert q["bits_per_param"]["bnb_nf4_double_quant"] == q["bits_per_param"]["nf4_double_quant"]
    phi2 = q["phi2"]
    assert phi2["total_params"]["median"] == 2_779_683_840  # Phi-2's parameter count
    assert phi2["quantized_modules"]["median"] == 32 * 6
    assert 1.80 < phi2["nf4_GB"]["median"] < 1.85
    assert phi2["bnb_nf4_GB"]["median"] == phi2["nf4_GB"]["median"]  # the same bytes, measured

    g = r["grpo_step"]
    assert set(g["configs"]) == {"nf4_beta0", "nf4_beta0.04", "fp32_beta0", "fp32_beta0.04"}
    for c in g["configs"].values():
        for key in (
            "generation_seconds",
            "reference_seconds",
            "policy_fwd_bwd_seconds",
            "optimizer_seconds",
            "other_seconds",
            "generated_tokens_per_second",
            "trained_tokens_per_second",
            "peak_rss",
        ):
            assert c[key]["median"] >= 0
        assert c["peak_rss"]["median"] > 50  # MiB: a Python process with torch
    assert set(g["ratios"]) >= {"step_nf4_vs_fp32_beta0", "step_beta0.04_vs_beta0_nf4"}

    m = r["logprob_memory"]
    assert set(m["methods"]) == {"selective", "naive"}
    assert m["methods"]["naive"]["kept_for_backward"]["median"] > 0  # the full log-softmax

    for fig in figures({k: v for k, v in r.items() if k not in ("environment", "settings")}):
        assert FIGURE_KEYS <= set(fig), fig
        assert fig.get("exact") or fig["repeats"] >= 5, fig

    md = (out / "results.md").read_text()
    assert "QUICK MODE" in md and "## Training side" in md and "## Serving side" not in md
    for heading in ("### layers", "### quality", "### grpo_step", "### logprob_memory"):
        assert heading in md
    # every figure of results.json has its row, e.g. the GRPO step's generation phase
    gen = g["configs"]["nf4_beta0"]["generation_seconds"]
    row = "| configs › nf4_beta0 › generation_seconds | "
    assert row in md and md.split(row)[1].startswith(f"{gen['median']:.4g}")


def readme_text(body="old"):
    return (
        f"# Title\n\n## Performance\n{README_START}\n{body}\n{README_END}\n\nServing:\n"
        f"{SERVE_START}\n{body}\n{SERVE_END}\n\nAfter.\n"
    )


def test_readme_blocks_are_replaced_between_the_markers_only(quick, tmp_path):
    _, r = quick
    published = copy.deepcopy(r)
    published["quick"] = False
    readme = tmp_path / "README.md"
    readme.write_text(readme_text())
    assert update_readme(readme, published) == [README_START]  # no serving part: block kept
    text = readme.read_text()
    assert text.startswith(f"# Title\n\n## Performance\n{README_START}\nMeasured by")
    assert text.endswith(f"Serving:\n{SERVE_START}\nold\n{SERVE_END}\n\nAfter.\n")
    assert "ours / peer" in text and "bitsandbytes' bytes" in text
    for banned in ("target", "met", "issue", "≈"):
        assert banned not in text.split(README_START)[1].split(README_END)[0]
    update_readme(readme, published)  # idempotent: the markers survive
    assert readme.read_text() == text

    with pytest.raises(ReadmeError, match="quick"):
        update_readme(readme, r)
    readme.write_text("# No markers\n")
    with pytest.raises(ReadmeError, match="bench:start"):
        update_readme(readme, published)
    readme.write_text(f"{README_START}\n{README_END}\n")  # the serving block missing
    with pytest.raises(ReadmeError, match="bench-serve:start"):
        update_readme(readme, published)


def test_missing_markers_fail_before_measuring(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# No markers\n")
    assert main(["--readme", str(readme), "--out-dir", str(tmp_path)]) == 2
    assert "bench:start" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_parts_are_checked_before_measuring(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["--parts", "layers,serving", "--out-dir", str(tmp_path), "--no-readme"])
    assert err.value.code == 2
    assert "choose from layers,quality,grpo_step,logprob_memory,kernel,serve" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        main(["--serve-threads", "-1", "--out-dir", str(tmp_path), "--no-readme"])
    assert "--serve-threads -1" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


# ---------------------------------------------------------------------------------------------
# The serving and kernel parts, from hand-made samples
# ---------------------------------------------------------------------------------------------


def rows(step: float, prefill: float, n: int = 7) -> dict:
    # decode samples around `step` (median exactly `step`), prefill samples around `prefill`
    return {
        "decode_step_seconds": [step * (1 + 0.01 * (i - n // 2)) for i in range(n)],
        "prefill_seconds": [prefill * (1 + 0.01 * (i - 2)) for i in range(5)],
    }


GB = 10**9
RAW = {
    "ours": {
        "load_seconds": 16.0,
        "peak_rss_bytes": 2 * GB,
        "step_bytes": 1.56 * GB,
        "prefill_flops_rows2": 1.5e12,
        "rows2": rows(0.125, 3.0),  # 8 tokens/s per side
        "rows1": rows(0.1, 2.0),
    },
    "ours_int16": {
        "load_seconds": 18.0,
        "peak_rss_bytes": 1.8 * GB,
        "step_bytes": 2.028 * GB,  # the repacked codes and their float32 scales
        "prefill_flops_rows2": 1.5e12,
        "rows2": rows(0.1, 3.2),  # 10 tokens/s per side
        "rows1": rows(0.08, 2.1),  # 12.5 tokens/s
    },
    "bitsandbytes": {
        "load_seconds": 40.0,
        "peak_rss_bytes": 8 * GB,
        "rows1": rows(0.2, 2.5),  # 5 tokens/s
        "rows1_peft": rows(0.25, 2.6),
    },
    "dense_bf16": {"load_seconds": 20.0, "peak_rss_bytes": 6 * GB, "rows1": rows(0.5, 4.0)},
    "server": {
        "ready_seconds": 30.0,
        "base_speed": "8 tokens · first after 4.10 s · 7.9 tokens/s",
        "tuned_speed": "8 tokens · first after 4.10 s · 7.8 tokens/s",
        "base": serve.parse_speed_line("8 tokens · first after 4.10 s · 7.9 tokens/s"),
        "tuned": serve.parse_speed_line("8 tokens · first after 4.10 s · 7.8 tokens/s"),
        "peak_rss_bytes": 2.5 * GB,
        "answer_lengths": [8, 8],
    },
    "server_int16": {
        "ready_seconds": 35.0,
        "base_speed": "8 tokens · first after 4.30 s · 9.7 tokens/s",
        "tuned_speed": "8 tokens · first after 4.30 s · 9.6 tokens/s",
        "base": serve.parse_speed_line("8 tokens · first after 4.30 s · 9.7 tokens/s"),
        "tuned": serve.parse_speed_line("8 tokens · first after 4.30 s · 9.6 tokens/s"),
        "peak_rss_bytes": 2.4 * GB,
        "answer_lengths": [8, 8],
    },
}
SETTINGS = dict(adapter_dir="a", calls=5, steps=8, prompt_tokens=150, threads=2, num_layers=32)
MACHINE = {
    "read_bandwidth": exact(31.2, "GB/s", label="sum of a 1 GiB float32 tensor"),
    "gemm_fp32": exact(150.0, "GFLOP/s", label="torch.mm 3072^3 fp32"),
    "gemm_bf16": exact(1000.0, "GFLOP/s", label="torch.mm 3072^3 bf16"),
}


def fake_kernel() -> dict:
    t = [0.001 * (1 + 0.01 * i) for i in range(5)]
    bw = figure([8.0] * 5, "GB/s")
    per_rows = {
        "ms": {k: figure([1e3 * x for x in t], "ms") for k in ("ours", "bnb", "pure")},
        "read_GBps": {"ours": bw, "bnb": bw},
        "ratios": {
            "ours_vs_bnb": paired_ratio(t, [2 * x for x in t], "ours", "bitsandbytes"),
            "ours_vs_pure": paired_ratio(t, [10 * x for x in t], "ours", "pure"),
            "bandwidth_fraction": ratio_of(bw, MACHINE["read_bandwidth"], "ours", "probe"),
        },
    }
    prefill = {
        "ms": {"decode_gemm_bf16": figure([20.0] * 5, "ms")},
        "GFLOPs": {"decode_gemm_bf16": figure([500.0] * 5, "GFLOP/s")},
        "ratios": {
            "fused_vs_decode_gemm_fp32": paired_ratio(t, t, "fused", "decode + GEMM"),
            "bf16_fraction_of_peak": exact(0.5, "x"),
        },
    }
    return {
        "threads": 2,
        "isa": "avx2",
        "kernel_load_seconds": exact(0.5, "s"),
        "machine": MACHINE,
        "decode": {"2560x2560": {"bytes": exact(1, "bytes"), "rows=1": per_rows}},
        "lm_head": {
            "rows=1": {
                "ms": figure([30.0] * 5, "ms"),
                "read_GBps": bw,
                "bandwidth_fraction": exact(0.25, "x"),
            }
        },
        "prefill": {"2560x2560": prefill},
        "switch": {"rows=2": {"2560x2560": paired_ratio(t, t, "fused", "decode + GEMM")}},
        "fused_max_rows": 16,
    }


def with_int16(k: dict) -> dict:
    """fake_kernel() with the int16 kernel's figures: 0.5 ms at 12 GB/s, half bitsandbytes' time
    and 0.5 / (1.00..1.04) of the exact kernel's; the GEMV 20 ms against F.linear's 30; prefill
    at 1.5x decode + bf16 GEMM."""
    t = [0.0005] * 5
    ours = [0.001 * (1 + 0.01 * i) for i in range(5)]  # fake_kernel()'s exact-kernel samples
    per = k["decode"]["2560x2560"]["rows=1"]
    bw = figure([12.0] * 5, "GB/s")
    per["ms"]["int16"] = figure([1e3 * x for x in t], "ms")
    per["read_GBps"]["int16"] = bw
    per["ratios"]["int16_vs_bnb"] = paired_ratio(t, [0.001] * 5, "int16", "bitsandbytes")
    per["ratios"]["int16_vs_ours"] = paired_ratio(t, ours, "int16", "exact")
    per["ratios"]["int16_bandwidth_fraction"] = ratio_of(bw, MACHINE["read_bandwidth"], "i", "p")
    k["lm_head"]["rows=1"]["gemv"] = {
        "ms": figure([20.0] * 5, "ms"),
        "read_GBps": figure([15.0] * 5, "GB/s"),
        "bandwidth_fraction": exact(0.6, "x"),
    }
    prefill = k["prefill"]["2560x2560"]["ratios"]
    prefill["int16_vs_decode_gemm_bf16"] = paired_ratio([0.03] * 5, [0.02] * 5, "int16", "bf16")
    k["int16_isa"] = "vnni"
    return k


def test_kernel_table_shows_the_int16_columns_when_measured():
    header, _, row = kernel_table(fake_kernel())
    assert header.count("|") == 9 and "int16" not in header  # results without the int16 kernel
    assert not any("lm_head" in line for line in kernel_lines(fake_kernel()))
    assert not any("int16" in line for line in kernel_lines(fake_kernel()))
    header, _, row = kernel_table(with_int16(fake_kernel()))
    read = MACHINE["read_bandwidth"]["median"]
    assert header.count("|") == 13 and header.endswith("| int16 / bitsandbytes | int16 / exact |")
    # 0.5 ms; 12 GB/s; 0.5 / 1 ms; 0.5 / (1.00, 1.01, ..., 1.04) ms: median 0.490, 0.481 to 0.5
    assert row.endswith(f"| 0.5 | 12 ({12 / read:.0%}) | 0.5x | 0.49x (0.481–0.5) |")
    lines = kernel_lines(with_int16(fake_kernel()))
    assert any("1 row 30 ms, 8 GB/s (25%) vs 20 ms, 15 GB/s (60%)" in line for line in lines)
    assert any("int16 / (decode + GEMM) bf16 1.5x" in line for line in lines)
    env = {"cpu_model": "X", "cpu_count": 2, "threads": 1, "date_utc": "d"}
    env |= {"torch": "t", "bitsandbytes": "b", "transformers": "tr"}
    bare = {"quick": False, "command": "c", "environment": env, "wall_seconds": {"total": 1}}
    md = render_markdown({**fake_results(bare), "kernel": with_int16(fake_kernel())})
    assert "`qlora/int16_decode.py` (vnni build)" in md


def fake_results(r: dict) -> dict:
    out = copy.deepcopy(r)
    out.update(quick=False, command="python -m bench.run --parts serve,kernel")
    out["serve"] = serve.summarize(copy.deepcopy(RAW), SETTINGS, lambda *_: None, MACHINE)
    out["kernel"] = fake_kernel()
    return out


def test_serve_summary_figures_and_derived_fractions():
    v = serve.summarize(copy.deepcopy(RAW), SETTINGS, lambda *_: None, MACHINE)
    p = v["paths"]
    assert p["ours_rows2"]["decode_tokens_per_second_per_side"]["median"] == 8.0
    assert p["bitsandbytes_rows1"]["decode_tokens_per_second_per_side"]["median"] == 5.0
    assert p["ours_rows2"]["prefill_seconds"]["median"] == 3.0
    assert p["ours_rows2"]["peak_rss_GB"]["median"] == 2.0
    assert v["ratios"]["ours_rows2_decode_vs_bnb"]["median"] == 1.6  # 8 / 5 tokens/s
    assert v["ratios"]["dense_bf16_rows1_decode_vs_bnb"]["median"] == 0.4
    assert v["ratios"]["ours_rows2_peak_rss_vs_bnb"]["median"] == 0.25
    assert v["ratios"]["server_peak_rss_vs_bnb"]["median"] == 0.3125
    assert v["server"]["tokens_per_second_per_side"]["median"] == 7.8  # the slower pane
    assert v["server"]["first_token_seconds"]["median"] == 4.1
    assert p["ours_int16_rows2"]["decode_tokens_per_second_per_side"]["median"] == 10.0
    assert v["ratios"]["ours_int16_rows2_decode_vs_bnb"]["median"] == 2.0  # 10 / 5 tokens/s
    assert v["ratios"]["ours_int16_rows1_decode_vs_bnb"]["median"] == 2.5  # 12.5 / 5
    assert v["ratios"]["ours_int16_rows2_peak_rss_vs_bnb"]["median"] == 0.225  # 1.8 / 8 GB
    assert v["server_int16"]["tokens_per_second_per_side"]["median"] == 9.6
    assert v["server_int16"]["first_token_seconds"]["median"] == 4.3
    assert v["server_int16"]["command"] == "python -m app --model DIR --adapter DIR --int16"
    assert v["ratios"]["server_int16_decode_vs_bnb"]["median"] == 1.92  # 9.6 / 5
    assert v["ratios"]["server_int16_peak_rss_vs_bnb"]["median"] == 0.3  # 2.4 / 8 GB
    d = v["derived"]
    assert d["decode_read_GBps"]["median"] == pytest.approx(1.56 / 0.125)  # 12.48 GB/s
    assert d["decode_bandwidth_fraction"]["median"] == pytest.approx(12.48 / 31.2)
    assert d["decode_steps_per_second_ceiling"]["median"] == pytest.approx(20.0)
    assert d["int16_decode_read_GBps"]["median"] == pytest.approx(20.28)  # 2.028 GB / 0.1 s
    assert d["int16_decode_bandwidth_fraction"]["median"] == pytest.approx(0.65)
    assert d["int16_decode_steps_per_second_ceiling"]["median"] == pytest.approx(31.2 / 2.028)
    assert d["prefill_GFLOPs"]["median"] == pytest.approx(500.0)  # 1.5 TFLOP / 3 s
    assert d["prefill_peak_fraction"]["median"] == pytest.approx(0.5)
    assert d["bnb_side_by_side_tokens_per_second"]["median"] == pytest.approx(1 / 0.45, rel=1e-5)
    assert d["ours_rows2_vs_bnb_side_by_side"]["median"] == pytest.approx(8 * 0.45)


def test_speed_lines_of_the_demo_parse():
    from app.streaming import Side

    side = Side()
    for i, t in enumerate((0.5, 0.75, 1.0, 1.25)):
        side.add(10 + i, eos_token_id=2, elapsed=t)
    parsed = serve.parse_speed_line(side.speed_line())
    assert parsed == {"first_token_seconds": 0.5, "tokens_per_second": 4.0}
    assert serve.parse_speed_line("") == {"first_token_seconds": None, "tokens_per_second": None}


def test_prefill_flops_follow_the_formula():
    from transformers import PhiConfig

    from qlora import NF4Linear

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = PhiConfig(hidden_size=64, num_hidden_layers=2, vocab_size=100)
            self.a = NF4Linear.from_linear(nn.Linear(64, 128))
            self.b = NF4Linear.from_linear(nn.Linear(128, 64))

    flops = serve.prefill_flops(Tiny(), rows=2, tokens=10)
    linear = 2 * 64 * 128
    assert flops == 2 * (2 * 10 * linear + 4 * 2 * 10 * 10 * 64 + 2 * 64 * 100)


def test_serving_and_kernel_tables_render(quick, tmp_path):
    r = fake_results(quick[1])
    md = render_markdown(r)
    assert "**Serving a Phi-2-sized model on CPU.**" in md and "### serve" in md
    assert "**The NF4 kernel at Phi-2's shapes.**" in md and "### kernel" in md
    readme = tmp_path / "README.md"
    readme.write_text(readme_text())
    assert update_readme(readme, r, ["serve", "kernel"]) == [SERVE_START]
    text = readme.read_text()
    block = text.split(SERVE_START)[1].split(SERVE_END)[0]
    assert text.split(README_START)[1].split(README_END)[0] == "\nold\n"  # not measured: kept
    assert "Phi-2 (2.78 B parameters)" in block and "150-token prompt" in block
    assert "8 steps per call x 5 calls" in block and "2 torch threads" in block
    for row in (
        "| ours: NF4Linear + LoRA, base + tuned in one pass | 2 | 8 (7.77–8.25) | 3 (2.94–3.06) "
        "| 2 | 16 | 1.6x",
        "| bitsandbytes load_in_4bit | 1 | 5 (4.85–5.15) | 2.5 (2.45–2.55) | 8 | 40 | 1x",
        "| dense bf16 (no quantization) | 1 | 2 (1.94–2.06) | 4 (3.92–4.08) | 6 | 20 | 0.4x",
        "| 7.8 | 4.1 (first token in both panes) | 2.5 | 30 (until it answers HTTP) | 1.56x",
        "| ours, int16 decode: base + tuned in one pass | 2 | 10 (9.71–10.3) | 3.2 (3.14–3.26) "
        "| 1.8 | 18 | 2x",
        "| ours, int16 decode: tuned alone | 1 | 12.5 (12.1–12.9) | 2.1 (2.06–2.14) | 1.8 | 18 "
        "| 2.5x",
        "| ours, int16 decode: the demo server (`python -m app --model DIR --adapter DIR "
        "--int16`, one /compare call) | 2 | 9.6 | 4.3 (first token in both panes) | 2.4 | 35 "
        "(until it answers HTTP) | 1.92x",
    ):
        assert row in block, row
    assert "each step reads 1.56 GB" in block and "12.5 GB/s at the median step, 40%" in block
    assert "a ceiling of 20 steps/s" in block
    assert "1.5 TFLOP in 3 s, 500 GFLOP/s, 50% of the measured bf16 matmul peak" in block
    assert (
        "ours 0.25x, ours, int16 0.225x, the demo server 0.312x, the demo server --int16 0.3x, "
        "dense bf16 0.75x" in block
    )
    assert "- Decode, 2 rows, int16: each step reads 2.03 GB" in block
    assert "20.3 GB/s at the median step, 65% of the read probe: a ceiling of 15.4" in block
    assert "2.22 tokens/s per side (its two 1-row median steps); ours" in block
    assert "one pass gives 3.6x that" in block
    assert "| 2560 × 2560 | 1 | 1.02 (1–1.04) |" in block and "| 8 (26%) | 0.5x | 0.1x |" in block
    for banned in ("target", " met", "issue", "≈"):
        assert banned not in block


def test_a_partial_run_keeps_the_other_parts_of_the_last_run():
    env = {"cpu_model": "X", "cpu_count": 2, "date_utc": "d1"}
    previous = {
        "quick": False,
        "command": "python -m bench.run",
        "environment": env,
        "wall_seconds": {"layers": 10.0, "serve": 99.0, "total": 200.0},
        **{p: {"old": p} for p in PARTS},
    }
    new = {
        "quick": False,
        "command": "python -m bench.run --parts serve",
        "environment": {**env, "date_utc": "d2"},
        "wall_seconds": {"serve": 300.0, "total": 310.0},
        "serve": {"new": 1},
    }
    merged = merge_into(copy.deepcopy(previous), copy.deepcopy(new), ["serve"])
    assert merged["serve"] == {"new": 1} and merged["layers"] == {"old": "layers"}
    assert merged["partial"] is False and merged["wall_seconds"]["serve"] == 300.0
    assert merged["measured"]["serve"]["command"] == "python -m bench.run --parts serve"
    assert merged["measured"]["layers"] == {"command": "python -m bench.run", "date_utc": "d1"}
    other = {**previous, "environment": {**env, "cpu_model": "Y"}}
    alone = merge_into(copy.deepcopy(other), copy.deepcopy(new), ["serve"])
    assert "layers" not in alone  # another machine's figures are never mixed in
    assert merge_into(None, copy.deepcopy(new), ["serve"])["measured"].keys() == {"serve"}


def test_without_the_kernel_its_part_is_refused_before_measuring(tmp_path):
    env = {**os.environ, "QLORA_KERNEL": "0"}
    cmd = [sys.executable, "-m", "bench.run", "--parts", "kernel", "--no-readme"]
    proc = subprocess.run(
        [*cmd, "--out-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert (
        "the NF4 CPU kernel is not available" in proc.stderr and "leave out kernel" in proc.stderr
    )
    assert not (tmp_path / "results.json").exists()


def test_the_kernel_part_runs_on_small_shapes_and_renders():
    from qlora import kernel

    if kernel.default_kernel() is None:
        pytest.fail("the NF4 CPU kernel did not build; this test measures it")
    k = kernel_speed.run(1, 5, lambda *_: None, MACHINE, shapes=((1024, 2048),))
    d = k["decode"]["1024x2048"]
    # 1024 x 2048 NF4 + double quant: 2^20 code bytes, 32,768 uint8 absmax, 128 float32 scales
    # (one per 256 absmax) and one float32 offset
    assert d["bytes"]["ours"]["median"] == 2**20 + 32768 + 128 * 4 + 4
    for rows in ("rows=1", "rows=2"):
        assert d[rows]["ms"]["ours"]["repeats"] == 5
        assert d[rows]["ratios"]["ours_vs_bnb"]["denominator"] == "bitsandbytes"
    assert set(k["switch"]) == {f"rows={n}" for n in kernel_speed.SWITCH_ROWS}
    lines = kernel_table(k)
    assert len(lines) == 4 and lines[2].startswith("| 1024 × 2048 | 1 | ")
    prefill = kernel_lines(k)[-1]
    assert prefill.startswith("- Prefill (300 rows), decode + bf16 GEMM: 1024 × 2048 ")
