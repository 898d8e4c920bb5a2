"""Part 5: the NF4 CPU kernels (qlora/kernel.py, qlora/int16_decode.py) at Phi-2's shapes, against
the machine and the peers.

    machine   read bandwidth (sum of a 1 GiB float32 tensor) and GEMM peak (torch.mm 3072^3,
              float32 and bfloat16), on the same threads
    decode    1 and 2 bfloat16 rows: kernel.nf4_linear (the exact fused kernel), the int16 kernel
              (int16 activations and code table) on the repacked weight, bitsandbytes Linear4bit
              (its CPU gemv) and our pure-PyTorch path (decode, cast, F.linear); GB/s = the bytes
              each reads / time
    lm_head   a 51200 x 2560 bfloat16 weight with bias: torch's F.linear vs our GEMV
    prefill   300 rows: fused vs decode + torch GEMM (float32, bfloat16), and the int16 kernel
    switch    fused / (decode + GEMM) for 2..64 bfloat16 rows: where nf4_linear switches

Decode and switch calls rotate through copies of the weight (>= 96 MiB in all, more than a
last-level cache), so every call reads its weight from memory as a decode step through 32 layers
does; prefill is compute-bound and reuses one weight.

    python -m bench.kernel_speed [--threads 2] [--repeats 7] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from statistics import median
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from qlora import int16_decode, kernel
from qlora.atomic import atomic_write_text
from qlora.nf4 import NF4Weight, dequantize_into, quantize_nf4

from .layer_speed import bnb_linear4bit
from .measure import MIN_REPEATS, exact, figure, interleaved, paired_ratio, ratio_of, torch_threads
from .phi2 import PHI2_SHAPES

DECODE_ROWS = (1, 2)
PREFILL_ROWS = 300
SWITCH_ROWS = (2, 4, 8, 16, 24, 32, 64)
LM_HEAD = (51200, 2560)  # Phi-2's vocabulary x hidden size
GEMM_SIZE = 3072
PROBE_BYTES = 2**30
WORKING_SET = 96 * 2**20  # bytes of weight copies a rotation cycles through


class Rotate:
    """fn(x, weight) with the next of `copies` as the weight on every call."""

    def __init__(self, fn, copies: list, x: torch.Tensor):
        self.fn, self.copies, self.x, self.calls = fn, copies, x, 0

    def __call__(self):
        self.calls += 1
        return self.fn(self.x, self.copies[self.calls % len(self.copies)])


class Way(NamedTuple):
    """One decode path: fn(x, weight), the weight's copies, the bytes a call reads, a label."""

    fn: Callable
    copies: list
    nbytes: int
    label: str


def copies_of(weight, nbytes: int) -> list:
    """`weight` and deep copies of it: at least two, WORKING_SET bytes in all."""
    return [weight] + [copy.deepcopy(weight) for _ in range(max(1, -(-WORKING_SET // nbytes) - 1))]


def rate(seconds: list[float], amount: float, unit: str, **extra) -> dict:
    """A figure of amount / t per sample (GB/s from bytes, GFLOP/s from flops)."""
    return figure([amount / t / 1e9 for t in seconds], unit, **extra)


def ms(seconds: list[float], **extra) -> dict:
    return figure([1e3 * t for t in seconds], "ms", **extra)


def decode_gemm(x: torch.Tensor, q: NF4Weight) -> torch.Tensor:
    """What nf4_linear runs above FUSED_MAX_ROWS: x W^T with W = kernel.decode(q, x.dtype)."""
    return F.linear(x, kernel.decode(q, x.dtype))


def pure_pytorch(q: NF4Weight):
    """Our NF4Linear path without the kernel (QLORA_KERNEL=0): decode into reused buffers, cast,
    F.linear."""
    index = torch.empty(q.packed.numel(), dtype=torch.int32)
    words = torch.empty(q.n_blocks * q.blocksize // 2, dtype=torch.int64)
    return lambda x, w: F.linear(x, dequantize_into(w, index, words).to(x.dtype))


def call_layer(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    return layer(x)


def int16_matmul(x: torch.Tensor, w: int16_decode.Int16Weight) -> torch.Tensor:
    return int16_decode.default_kernel().matmul(x, w, None, x.dtype == torch.bfloat16)


def bnb_bytes(layer: nn.Module) -> int:
    """What bitsandbytes' CPU gemv reads: its repacked codes and block scales."""
    state = layer.weight.quant_state
    tensors = [layer.weight.data, state.absmax] + ([state.state2.absmax] if state.nested else [])
    return sum(t.numel() * t.element_size() for t in tensors)


def machine(repeats: int, log=print) -> dict:
    probe = torch.ones(PROBE_BYTES // 4)
    reads = interleaved({"sum": probe.sum}, repeats)["sum"]
    del probe
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(GEMM_SIZE, GEMM_SIZE, generator=g) for _ in range(2))
    gemm = interleaved(
        {"fp32": partial(torch.mm, a, b), "bf16": partial(torch.mm, a.bfloat16(), b.bfloat16())},
        repeats,
    )
    flops = 2 * GEMM_SIZE**3
    out = {
        "read_bandwidth": rate(reads, PROBE_BYTES, "GB/s", label="sum of a 1 GiB float32 tensor"),
        "gemm_fp32": rate(gemm["fp32"], flops, "GFLOP/s", label=f"torch.mm {GEMM_SIZE}^3 fp32"),
        "gemm_bf16": rate(gemm["bf16"], flops, "GFLOP/s", label=f"torch.mm {GEMM_SIZE}^3 bf16"),
    }
    log(
        f"  machine: read {out['read_bandwidth']['median']:.1f} GB/s, GEMM fp32 "
        f"{out['gemm_fp32']['median']:.0f} / bf16 {out['gemm_bf16']['median']:.0f} GFLOP/s"
    )
    return out


def decode_shape(out_f: int, in_f: int, repeats: int, probe: dict, log) -> dict:
    """Every decode path on one weight shape, 1 and 2 rows."""
    int16 = int16_decode.default_kernel() is not None
    g = torch.Generator().manual_seed(out_f + in_f)
    linear = nn.Linear(in_f, out_f)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.02)
        linear.bias.zero_()
    q = quantize_nf4(linear.weight, blocksize=64, double_quant=True)
    theirs = bnb_linear4bit(linear, torch.bfloat16).eval()
    with torch.no_grad():
        theirs(torch.zeros(1, in_f, dtype=torch.bfloat16))  # repacks for its CPU gemv
    ours = copies_of(q, q.nbytes)
    bnb = copies_of(theirs, q.nbytes)
    ways = {
        "ours": Way(kernel.nf4_linear, ours, q.nbytes, "kernel.nf4_linear (fused)"),
        "bnb": Way(call_layer, bnb, bnb_bytes(theirs), "bitsandbytes Linear4bit, CPU gemv"),
        "pure": Way(pure_pytorch(q), ours, q.nbytes, "pure PyTorch: decode + F.linear"),
    }
    if int16:
        repacked = [int16_decode.repack(c) for c in ours]
        ways["int16"] = Way(int16_matmul, repacked, repacked[0].nbytes, "int16 kernel, repacked")
    result = {"bytes": {name: exact(w.nbytes, "bytes") for name, w in ways.items()}}
    for rows in DECODE_ROWS:
        x = torch.randn(rows, in_f, generator=g).bfloat16()
        with torch.no_grad():
            s = interleaved({n: Rotate(w.fn, w.copies, x) for n, w in ways.items()}, repeats)
        gbps = {n: rate(s[n], w.nbytes, "GB/s", label="its bytes / time") for n, w in ways.items()}
        ratios = {
            "ours_vs_bnb": paired_ratio(s["ours"], s["bnb"], "ours", "bitsandbytes"),
            "ours_vs_pure": paired_ratio(s["ours"], s["pure"], "ours", "pure PyTorch"),
            "bandwidth_fraction": ratio_of(gbps["ours"], probe, "ours GB/s", "read probe"),
        }
        if int16:
            ratios["int16_vs_bnb"] = paired_ratio(s["int16"], s["bnb"], "int16", "bitsandbytes")
            ratios["int16_vs_ours"] = paired_ratio(s["int16"], s["ours"], "int16", "exact")
            ratios["int16_bandwidth_fraction"] = ratio_of(
                gbps["int16"], probe, "int16 GB/s", "read probe"
            )
        times = {n: ms(s[n], label=w.label) for n, w in ways.items()}
        result[f"rows={rows}"] = {"ms": times, "read_GBps": gbps, "ratios": ratios}
        log(
            f"  decode {out_f}x{in_f} rows={rows}: "
            + ", ".join(f"{n} {t['median']:.3f} ms" for n, t in times.items())
            + (f" (int16 {ratios['int16_vs_ours']['median']:.2f}x ours)" if int16 else "")
        )
    return result


def lm_head_figures(seconds: list[float], nbytes: int, probe: dict, label: str) -> dict:
    bw = rate(seconds, nbytes, "GB/s", label="bf16 weight + bias / time")
    fraction = ratio_of(bw, probe, "GB/s", "read bandwidth probe")
    return {"ms": ms(seconds, label=label), "read_GBps": bw, "bandwidth_fraction": fraction}


def lm_head(repeats: int, probe: dict, log) -> dict:
    out_f, in_f = LM_HEAD
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(out_f, in_f, generator=g) * 0.02).bfloat16()
    bias = torch.randn(out_f, generator=g).bfloat16()
    nbytes = (weight.numel() + bias.numel()) * 2
    gemv = int16_decode.default_kernel() is not None
    results = {"bytes": exact(nbytes, "bytes")}
    for rows in DECODE_ROWS:
        x = torch.randn(rows, in_f, generator=g).bfloat16()
        calls = {"F.linear": partial(F.linear, x, weight, bias)}
        if gemv:
            calls["gemv"] = partial(int16_decode.gemv, x, weight, bias)
        with torch.no_grad():
            s = interleaved(calls, repeats)
        label = "torch bf16 F.linear 51200x2560 + bias"
        r = results[f"rows={rows}"] = lm_head_figures(s["F.linear"], nbytes, probe, label)
        if gemv:
            label = "int16_decode.gemv (ours) 51200x2560 + bias"
            r["gemv"] = lm_head_figures(s["gemv"], nbytes, probe, label)
            r["gemv"]["vs_F.linear"] = paired_ratio(s["gemv"], s["F.linear"], "gemv", "F.linear")
        times = ", ".join(f"{n} {1e3 * median(t):.2f} ms" for n, t in s.items())
        log(f"  lm_head rows={rows}: {times}")
    return results


def prefill(out_f: int, in_f: int, repeats: int, peak: dict, log) -> dict:
    g = torch.Generator().manual_seed(out_f * 3 + in_f)
    q = quantize_nf4(torch.randn(out_f, in_f, generator=g) * 0.02)
    x32 = torch.randn(PREFILL_ROWS, in_f, generator=g)
    x16 = x32.bfloat16()
    calls = {
        "fused_fp32": partial(kernel.fused_matmul, x32, q),
        "decode_gemm_fp32": partial(decode_gemm, x32, q),
        "decode_gemm_bf16": partial(decode_gemm, x16, q),
    }
    if int16_decode.default_kernel() is not None:
        calls["int16_bf16"] = partial(int16_matmul, x16, int16_decode.repack(q))
    with torch.no_grad():
        s = interleaved(calls, repeats)
    flops = 2 * PREFILL_ROWS * out_f * in_f
    gflops = {name: rate(t, flops, "GFLOP/s") for name, t in s.items()}
    ratios = {
        "fused_vs_decode_gemm_fp32": paired_ratio(
            s["fused_fp32"], s["decode_gemm_fp32"], "fused", "decode + GEMM fp32"
        ),
        "bf16_fraction_of_peak": ratio_of(
            gflops["decode_gemm_bf16"], peak["gemm_bf16"], "decode + GEMM bf16", "torch.mm bf16"
        ),
    }
    if "int16_bf16" in s:
        ratios["int16_vs_decode_gemm_bf16"] = paired_ratio(
            s["int16_bf16"], s["decode_gemm_bf16"], "int16", "decode + GEMM bf16"
        )
    log(
        f"  prefill {out_f}x{in_f} rows={PREFILL_ROWS}: "
        + ", ".join(f"{n} {1e3 * median(t):.1f} ms" for n, t in s.items())
    )
    return {"ms": {name: ms(t) for name, t in s.items()}, "GFLOPs": gflops, "ratios": ratios}


def switch(shapes, repeats: int, log) -> dict:
    weights = {}
    for out_f, in_f in shapes:
        q = quantize_nf4(torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(out_f)))
        weights[f"{out_f}x{in_f}"] = copies_of(q, q.nbytes)
    results = {}
    for rows in SWITCH_ROWS:
        per_shape = {}
        for key, copies in weights.items():
            x = torch.randn(rows, copies[0].shape[1]).bfloat16()
            calls = {"fused": Rotate(kernel.fused_matmul, copies, x)}
            calls["decode_gemm"] = Rotate(decode_gemm, copies, x)
            with torch.no_grad():
                s = interleaved(calls, repeats)
            per_shape[key] = paired_ratio(s["fused"], s["decode_gemm"], "fused", "decode + GEMM")
        results[f"rows={rows}"] = per_shape
        log(
            f"  switch rows={rows}, fused / (decode + GEMM): "
            + ", ".join(f"{k} {v['median']:.2f}" for k, v in per_shape.items())
        )
    return results


def run(threads: int, repeats: int, log=print, machine_probe=None, shapes=PHI2_SHAPES) -> dict:
    """Every measurement on `threads` torch threads, on weights of `shapes` (out, in).
    `machine_probe`: a `machine()` result of the same run (bench.run shares it with the serving
    part), else measured here."""
    k = kernel.default_kernel()
    if k is None:
        raise RuntimeError(
            "the NF4 CPU kernel is not available (QLORA_KERNEL=0, or it failed to build: see "
            "the warning above); this part measures it, so it cannot run without it"
        )
    k16 = int16_decode.default_kernel()
    with torch_threads(threads):
        m = machine_probe or machine(repeats, log)
        probe = m["read_bandwidth"]
        return {
            "threads": threads,
            "isa": k.isa,
            "int16_isa": None if k16 is None else k16.isa,
            "kernel_load_seconds": exact(k.load_seconds, "s"),
            "machine": m,
            "decode": {f"{o}x{i}": decode_shape(o, i, repeats, probe, log) for o, i in shapes},
            "lm_head": lm_head(repeats, probe, log),
            "prefill": {f"{o}x{i}": prefill(o, i, repeats, m, log) for o, i in shapes},
            "switch": switch(shapes, repeats, log),
            "fused_max_rows": kernel.FUSED_MAX_ROWS,
        }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.repeats < MIN_REPEATS:
        parser.error(f"--repeats={args.repeats}: use at least {MIN_REPEATS}")
    if args.threads < 1:
        parser.error(f"--threads={args.threads} must be >= 1")
    results = run(args.threads, args.repeats)
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
