"""Tests for grpo/summary.py: the machine a run records, the plots and the before/after report."""

import json

from bench.results import machine_text
from grpo.summary import held_out_points, machine, write_plots


def test_machine_reads_this_machine():
    m = machine(3)
    assert m["torch_threads"] == 3 and m["cpu_count"] >= 1 and m["cpu_model"]
    assert machine_text(m).endswith(", 3 torch threads")


def test_held_out_points_put_the_base_first_and_plots_are_written(tmp_path):
    assert held_out_points(tmp_path) == []
    (tmp_path / "eval_before.json").write_text(json.dumps({"accuracy": 0.42}))
    assert held_out_points(tmp_path) == []  # no GRPO evaluation yet: nothing to draw
    (tmp_path / "eval.jsonl").write_text('{"step": 50, "accuracy": 0.8}\n')
    (tmp_path / "eval_before.json").write_text(json.dumps({"accuracy": 0.5}))
    assert held_out_points(tmp_path) == [
        {"step": 0, "accuracy": 0.5},
        {"step": 50, "accuracy": 0.8},
    ]
    rows = [{"step": s, "reward": 0.1 * s, "accuracy": 0.5, "completion_length": 4} for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_plots(tmp_path / "metrics.jsonl", tmp_path / "plots.png")
    assert (tmp_path / "plots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "eval.jsonl",
        "eval_before.json",
        "metrics.jsonl",
        "plots.png",
    ]
