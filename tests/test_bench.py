"""Smoke test of `make bench`: `python -m bench.run --quick` runs every part on tiny shapes and
writes both files with the expected keys; the README section is replaced between its markers only.
Nothing here asserts a speed (issue 7: no timed assertions in `make test`)."""

import copy
import json

import pytest

from bench.report import README_END, README_START, ReadmeError, update_readme
from bench.run import main

FIGURE_KEYS = {"unit", "median", "min", "max", "repeats"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["--quick", "--out-dir", str(out), "--no-readme"]) == 0
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
    assert r["quick"] is True and r["partial"] is False
    for key in ("torch", "threads", "cpu_model", "bitsandbytes", "date_utc"):
        assert r["environment"][key] not in (None, "")
    for part in ("layers", "quality", "grpo_step", "logprob_memory", "total"):
        assert r["wall_seconds"][part] >= 0

    layers = r["layers"]
    assert len(layers["shapes"]) == 3
    for shape in layers["shapes"].values():
        assert set(shape["fwd_bwd"]) == {"ours", "bnb", "fp32"}
        for name, target in (("ours_vs_bnb", 1.0), ("ours_vs_fp32", 1.3)):
            ratio = shape["ratios"][name]
            assert ratio["target"] == target and isinstance(ratio["met"], bool)
            assert ratio["numerator"] and ratio["denominator"]
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
    assert "QUICK MODE" in md
    for heading in ("## 1. NF4 layer", "## 2. Quantization", "## 3. GRPO step", "## 4. Log-prob"):
        assert heading in md


def test_readme_section_is_replaced_between_the_markers_only(quick, tmp_path):
    _, r = quick
    published = copy.deepcopy(r)
    published["quick"] = False
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n## Performance\n{README_START}\nold\n{README_END}\n\nAfter.\n")
    update_readme(readme, published)
    text = readme.read_text()
    assert text.startswith("# Title\n\n## Performance\n") and text.endswith("\n\nAfter.\n")
    assert "old" not in text and "ours / peer" in text and "bitsandbytes" in text
    update_readme(readme, published)  # idempotent: the markers survive
    assert readme.read_text() == text

    with pytest.raises(ReadmeError, match="quick"):
        update_readme(readme, r)
    readme.write_text("# No markers\n")
    with pytest.raises(ReadmeError, match="bench:start"):
        update_readme(readme, published)


def test_missing_markers_fail_before_measuring(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# No markers\n")
    assert main(["--readme", str(readme), "--out-dir", str(tmp_path)]) == 2
    assert "bench:start" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()
