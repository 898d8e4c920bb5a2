"""What every part of the bench shares: figures with units, ratios naming both sides, peak memory,
the machine description, and running a part in a child process.

A figure is a dict, always with the same keys, so results.json reads the same everywhere:

    {"unit": "ms", "median": 12.3, "min": 11.9, "max": 14.0, "repeats": 7, "samples": [...]}

Computed (not timed) quantities, such as a byte count, have "exact": true, repeats 1 and
median = min = max. A ratio adds "numerator" and "denominator" (what was divided by what).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata, util
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


def paired_ratio(
    numerator: list[float],
    denominator: list[float],
    numerator_name: str,
    denominator_name: str,
) -> dict:
    """numerator_i / denominator_i for samples taken back to back (repeat i of each side), so
    load from other processes cancels; median, min and max of those ratios."""
    if len(numerator) != len(denominator):
        raise ValueError(f"paired samples differ in length: {len(numerator)} vs {len(denominator)}")
    ratios = [n / d for n, d in zip(numerator, denominator, strict=True)]
    return _ratio(figure(ratios, "x"), numerator_name, denominator_name, "paired")


def ratio_of(
    numerator: dict,
    denominator: dict,
    numerator_name: str,
    denominator_name: str,
) -> dict:
    """median(numerator) / median(denominator) for figures measured apart (separate processes);
    min and max are the extreme bounds min/max and max/min."""

    def div(a: float, b: float) -> float | None:
        return _round(a / b) if b > 0 else None  # below the probe's resolution: no ratio

    fig = {
        "unit": "x",
        "median": div(numerator["median"], denominator["median"]),
        "min": div(numerator["min"], denominator["max"]),
        "max": div(numerator["max"], denominator["min"]),
        "repeats": min(numerator["repeats"], denominator["repeats"]),
    }
    if numerator.get("exact") and denominator.get("exact"):
        fig["exact"] = True
    return _ratio(fig, numerator_name, denominator_name, "of medians")


def _ratio(fig: dict, numerator: str, denominator: str, kind: str) -> dict:
    fig.update(numerator=numerator, denominator=denominator, ratio=kind)
    return fig


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise RuntimeError(f"/proc/self/status has no {field} line; the bench needs Linux")


def peak_rss_bytes() -> int:
    """The process's peak resident set (VmHWM) so far."""
    return _proc_status_bytes("VmHWM")


def current_rss_bytes() -> int:
    """The process's resident set now (VmRSS)."""
    return _proc_status_bytes("VmRSS")


class MemoryProbe:
    """Memory above a baseline: resident set on CPU (Linux), the caching allocator on CUDA.

    reset() makes the current usage the baseline and forgets the peak (on CPU by writing 5 to
    /proc/self/clear_refs, which resets VmHWM to VmRSS); peak() and current() are bytes above it.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = 0

    def _current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _proc_status_bytes("VmRSS")

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError as err:
                raise RuntimeError(
                    f"cannot reset the peak RSS ({err}); the log-prob memory part needs Linux "
                    ">= 4.0 with a writable /proc/self/clear_refs, or a CUDA device"
                ) from err
        self.baseline = self._current()

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        return _proc_status_bytes("VmHWM") - self.baseline

    def current(self) -> int:
        return self._current() - self.baseline


# ---------------------------------------------------------------------------------------------
# Machine and run description
# ---------------------------------------------------------------------------------------------


def cpu_simd_flags() -> list[str]:
    """The vector extensions the kernels may use (avx2, avx512*, amx*), from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx2", "avx512", "amx")))
    except OSError:
        pass
    return []


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
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "bitsandbytes": _version("bitsandbytes"),
        "peft": _version("peft"),
        # bitsandbytes' fused CPU 4-bit kernel (bf16 inference only) comes from this optional
        # package; the training path measured here never uses it
        "kernels_package_installed": util.find_spec("kernels") is not None,
        "cpu_model": cpu_model(),
        "cpu_simd": cpu_simd_flags(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    if hasattr(os, "getloadavg"):
        env["loadavg_1min_start"] = round(os.getloadavg()[0], 2)
    return env


# ---------------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------------


def run_child(module: str, args: dict, timeout: float = 600) -> dict:
    """Run `python -m <module> --child '<json args>'` in a fresh interpreter and return the JSON
    object it prints on its last stdout line. A fresh process has its own peak RSS."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, "-m", module, "--child", json.dumps(args)]
    start = time.perf_counter()
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
    result = json.loads(lines[-1])
    result["child_wall_seconds"] = round(time.perf_counter() - start, 2)
    return result


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
