"""What a finished run leaves for a reader: plots.png, the before/after report on stdout, and the
machine it ran on (recorded in summary.json)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from qlora.atomic import atomic_path

PLOTTED = [
    ("reward", "reward (mean)"),
    ("accuracy", "sampled accuracy"),
    ("kl", "KL (k3)"),
    ("completion_length", "completion length (tokens)"),
]


def held_out_points(run_dir: Path) -> list[dict]:
    """The held-out greedy accuracies of a run: eval.jsonl, with the base GRPO started from
    (eval_before.json) as step 0 when there is at least one later point."""
    eval_path = run_dir / "eval.jsonl"
    evals = (
        [json.loads(x) for x in eval_path.read_text().splitlines() if x.strip()]
        if eval_path.is_file()
        else []
    )
    before_path = run_dir / "eval_before.json"
    if evals and before_path.is_file():
        evals.insert(0, {"step": 0, "accuracy": json.loads(before_path.read_text())["accuracy"]})
    return evals


def write_plots(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    evals = held_out_points(metrics_path.parent)
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4 * len(PLOTTED), 3.2))
    for ax, (key, title) in zip(axes, PLOTTED, strict=True):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), lw=1, label="sampled (per step)")
        elif key == "kl":
            ax.text(
                0.5,
                0.5,
                "beta = 0: no reference,\nKL not computed",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        if key == "accuracy" and evals:
            ax.plot(
                [e["step"] for e in evals],
                [e["accuracy"] for e in evals],
                "o-",
                color="C3",
                label="held-out greedy",
            )
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def print_report(records, before: dict, acc_after: float, comps_after: list[str]) -> None:
    n = len(records)
    print("\n              held-out greedy accuracy")
    print(f"  before GRPO  {before['accuracy']:7.1%}")
    print(
        f"  after GRPO   {acc_after:7.1%}   "
        f"({(acc_after - before['accuracy']) * 100:+.1f} points, n={n})"
    )
    print("\n  prompt              base -> tuned        (gold)")
    shown = 0
    for rec, b, a in zip(records, before["completions"], comps_after, strict=True):
        if b.strip() != a.strip() and shown < 6:
            print(
                f"  {rec['prompt'][-16:]!r:<18}{b.strip()[-8:]!r:>8} -> {a.strip()[-8:]!r:<10}"
                f"({rec['answer']})"
            )
            shown += 1


def cpu_model(cpuinfo: str | None = None) -> str:
    r"""The CPU's model name from /proc/cpuinfo (platform.processor() where there is none), with
    its x86 family and model numbers where the name alone does not tell generations apart.

    >>> cpu_model("model name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: 17\n")
    'AMD EPYC (family 25, model 17)'
    """
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
        if not line.strip() and fields:
            break  # the first processor's lines are enough
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    if fields.get("cpu family") and fields.get("model"):
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def machine(torch_threads: int) -> dict:
    """What a run records about where it ran: {"cpu_model", "cpu_count", "torch_threads"}."""
    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch_threads}
