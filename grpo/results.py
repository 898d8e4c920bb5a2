"""`python -m grpo.results runs/tiny`: the README's results table, rendered from summary.json.

Every figure in the README's results section comes from a run directory written by
`make train`; this rewrites the block between `<!-- results:start -->` and `<!-- results:end -->`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"


def render(run_dir: Path) -> str:
    s = json.loads((run_dir / "summary.json").read_text())
    cfg = (run_dir / "config.yaml").read_text()
    warm = run_dir / "base" / "warmup.json"
    warm_s = json.loads(warm.read_text())["warmup_seconds"] if warm.is_file() else None
    gain = (s["accuracy_after"] - s["accuracy_before"]) * 100
    lines = [
        f"Measured with `make train` (config [`examples/tiny.yaml`](examples/tiny.yaml)) on a "
        f"2-core CPU, {s.get('torch_threads', '?')} torch thread(s); figures from "
        f"`{run_dir}/summary.json`, rendered by `python -m grpo.results {run_dir}`.",
        "",
        "| held-out greedy accuracy (n = {}) | value |".format(s["n_eval"]),
        "|---|---|",
    ]
    if s.get("accuracy_dense_base") is not None:
        lines.append(
            f"| warm-up model, unquantized (for reference) | {s['accuracy_dense_base']:.1%} |"
        )
    lines += [
        f"| **before GRPO**: the NF4 base GRPO starts from | **{s['accuracy_before']:.1%}** |",
        f"| **after GRPO** ({s['grpo_steps']} steps, LoRA on NF4) "
        f"| **{s['accuracy_after']:.1%}** |",
        f"| gain | {gain:+.1f} points |",
    ]
    evals = run_dir / "eval.jsonl"
    if evals.is_file():
        points = [json.loads(x) for x in evals.read_text().splitlines() if x.strip()]
        if points:
            lines.append(
                "| during GRPO (`eval.jsonl`) | "
                + ", ".join(f"step {p['step']}: {p['accuracy']:.1%}" for p in points)
                + " |"
            )
    lines += [
        "",
        "| time | seconds |",
        "|---|---|",
    ]
    if warm_s is not None:
        lines.append(f"| supervised warm-up (cached in `{run_dir}/base`) | {warm_s:.0f} |")
    lines += [
        f"| GRPO ({s['grpo_steps']} steps) | {s['grpo_seconds']:.0f} |",
        f"| whole run (`total_seconds`) | {s['total_seconds']:.0f} |",
        "",
        f"Trainable parameters: {s['trainable_parameters']:,} of {s['total_parameters']:,}; "
        f"stored model {s['bytes'] / 2**20:.2f} MiB. Config: "
        + ", ".join(
            line.replace(": ", "=")
            for line in cfg.splitlines()
            if line.split(":")[0]
            in {
                "max_steps",
                "learning_rate",
                "num_generations",
                "prompts_per_step",
                "lora_r",
                "temperature",
                "loss_type",
            }
        )
        + ".",
    ]
    return "\n".join(line for line in lines).rstrip() + "\n"


def update_readme(readme: Path, run_dir: Path) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"error: {readme} lacks the {START} / {END} markers; add them first")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    tmp = readme.with_name(f".{readme.name}.tmp")
    tmp.write_text(f"{head}{START}\n{render(run_dir)}{END}{tail}")
    os.replace(tmp, readme)


if __name__ == "__main__":
    run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny")
    if not (run / "summary.json").is_file():
        raise SystemExit(f"error: {run}/summary.json does not exist; run `make train` first")
    update_readme(Path("README.md"), run)
    print(f"README.md results updated from {run}/summary.json")
