"""What every part of the bench shares: figures, ratios, timing, memory, the machine, child
processes.

A figure is a dict with the same keys everywhere in results.json:

    {"unit": "ms", "median": 12.3, "min": 11.9, "max": 14.0, "repeats": 7, "samples": [...]}

A computed quantity (a byte count) has "exact": true and median = min = max. A ratio adds
"numerator" and "denominator", the names of what was divided by what.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from grpo.summary import cpu_model

REPO_ROOT = Path(__file__).resolve().parents[1]
MIN_REPEATS = 5


def _round(x: float) -> float | int:
    """6 significant digits for floats; counts and byte sizes stay exact ints."""
    return x if isinstance(x, int) else float(f"{x:.6g}")


def figure(samples: list[float], unit: str, **extra) -> dict:
    """Median, min and max of >= MIN_REPEATS measured samples."""
    if len(samples) < MIN_REPEATS:
        raise ValueError(f"{len(samples)} samples; every measured figure needs >= {MIN_REPEATS}")
    return {
        "unit": unit,
        "median": _round(statistics.median(samples)),
        "min": _round(min(samples)),
        "max": _round(max(samples)),
        "repeats": len(samples),
        "samples": [_round(s) for s in samples],
        **extra,
    }


def exact(value: float, unit: str, **extra) -> dict:
    """A computed quantity (bytes, bits per parameter, an error on fixed weights): no spread."""
    v = _round(value)
    return {"unit": unit, "median": v, "min": v, "max": v, "repeats": 1, "exact": True, **extra}


def paired_ratio(numerator: list[float], denominator: list[float], num: str, den: str) -> dict:
    """numerator_i / denominator_i of samples taken back to back (repeat i of each side), so
    load from other processes cancels; median, min and max of those ratios."""
    ratios = [n / d for n, d in zip(numerator, denominator, strict=True)]
    return figure(ratios, "x", numerator=num, denominator=den, ratio="paired")


def ratio_of(numerator: dict, denominator: dict, num: str, den: str) -> dict:
    """median / median of figures measured apart (separate processes); min and max are the
    extreme bounds min/max and max/min. None where a side is 0 (below a probe's resolution)."""

    def div(a: float, b: float) -> float | None:
        return _round(a / b) if b > 0 else None

    fig = {
        "unit": "x",
        "median": div(numerator["median"], denominator["median"]),
        "min": div(numerator["min"], denominator["max"]),
        "max": div(numerator["max"], denominator["min"]),
        "repeats": min(numerator["repeats"], denominator["repeats"]),
        "numerator": num,
        "denominator": den,
        "ratio": "of medians",
    }
    if numerator.get("exact") and denominator.get("exact"):
        fig["exact"] = True
    return fig


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(calls: dict, repeats: int, device: torch.device | str = "cpu") -> dict:
    """Seconds per call of each of `calls`: one untimed warm-up each, then `repeats` rounds in
    which every call runs once, back to back, so load from other processes hits all alike."""
    for call in calls.values():
        call()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            sync(device)
            start = time.perf_counter()
            call()
            sync(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


@contextlib.contextmanager
def torch_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise RuntimeError(f"/proc/self/status has no {field} line; the bench needs Linux")


def current_rss_bytes() -> int:
    return _proc_status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """The process's peak resident set (VmHWM) since it started or since MemoryProbe.reset()."""
    return _proc_status_bytes("VmHWM")


class MemoryProbe:
    """The process's memory in bytes: the resident set on CPU (Linux), the caching allocator on
    CUDA. reset() forgets the peak (on CPU by writing 5 to /proc/self/clear_refs, which sets
    VmHWM to VmRSS) and returns the memory held now."""

    def __init__(self, device: torch.device):
        self.device = device

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return current_rss_bytes()

    def reset(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError as err:
                raise RuntimeError(
                    f"cannot reset the peak RSS ({err}); measuring peak memory on CPU needs "
                    "Linux >= 4.0 with a writable /proc/self/clear_refs"
                ) from err
        return self.current()

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return peak_rss_bytes()


# ---------------------------------------------------------------------------------------------
# The machine and the software
# ---------------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def environment(device: torch.device) -> dict:
    env = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "bitsandbytes": _version("bitsandbytes"),
        "peft": _version("peft"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "loadavg_1min_start": round(os.getloadavg()[0], 2),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


# ---------------------------------------------------------------------------------------------
# Child processes: each configuration of parts 3, 4 and 6 has its own peak memory
# ---------------------------------------------------------------------------------------------


def run_child(module: str, args: dict, timeout: float = 600) -> dict:
    """Run `python -m <module> --child '<json args>'` in a fresh interpreter and return the JSON
    object it prints on its last stdout line."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, "-m", module, "--child", json.dumps(args)]
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-20:])
        raise RuntimeError(
            f"bench child `python -m {module}` failed (exit {proc.returncode}) with "
            f"{json.dumps(args)}:\n{tail}"
        )
    return json.loads(lines[-1])


def child_main(run) -> None:
    """Entry point of a child: parse `--child '<json>'`, call run(args), print the JSON result."""
    if len(sys.argv) != 3 or sys.argv[1] != "--child":
        raise SystemExit(
            f"usage: python -m {sys.argv[0]} --child '<json args>' (started by bench.run; "
            "run `python -m bench.run` instead)"
        )
    args = json.loads(sys.argv[2])
    torch.set_num_threads(args["threads"])
    print(json.dumps(run(args)), flush=True)
