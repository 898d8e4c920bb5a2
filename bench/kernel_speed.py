"""The NF4 CPU kernel (qlora/kernel.py) layer by layer, against the machine and the peers.

    machine   read bandwidth (sum of a 1 GiB float32 tensor) and GEMM peak (torch.mm, 3072^3,
              float32 and bfloat16), on the same threads
    decode    Phi-2's three shapes, 1 and 2 bfloat16 input rows: ours (kernel.nf4_linear: the
              exact fused kernel), ours int16 (int16_decode: int16 activations and code table, the
              repacked weight) vs bitsandbytes Linear4bit (nf4, double quant, its fused
              AVX512-BF16 CPU gemv in eval/no_grad) vs our pure-PyTorch path (decode, cast,
              F.linear); read bandwidth = bytes each reads (codes and scales) / time, and its
              fraction of the probe
    lm_head   a 51200 x 2560 bfloat16 weight with bias, 1 and 2 rows: torch's F.linear vs our
              GEMV (int16_decode.gemv)
    prefill   300 rows: fused vs decode + torch GEMM, float32 and bfloat16, and the int16 kernel;
              GFLOP/s and the fraction of the GEMM peak
    switch    fused / (decode + GEMM) time for 2..64 bfloat16 rows: where nf4_linear switches

Decode and switch calls rotate through copies of the layer (distinct memory, >= 96 MiB in all,
three times the 32 MiB L3 of the machine this was tuned on), so every call reads its weight from
DRAM, as a decode step through 32 layers does; prefill is compute-bound and reuses one weight.
The paths run interleaved (repeat i of each back to back) and ratios pair the samples, so load
from other processes hits both sides alike.

    python -m bench.kernel_speed [--threads 2] [--repeats 7] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from bench.qlora_timing import bnb_linear4bit
from qlora import int16_decode, kernel
from qlora.nf4 import NF4Weight, dequantize_into, quantize_nf4

from .measure import MIN_REPEATS, exact, figure, paired_ratio, ratio_of

PHI2_SHAPES = ((2560, 2560), (10240, 2560), (2560, 10240))  # (out, in): attention, fc1, fc2
DECODE_ROWS = (1, 2)
PREFILL_ROWS = 300
SWITCH_ROWS = (2, 4, 8, 16, 24, 32, 64)
LM_HEAD = (51200, 2560)  # Phi-2's vocabulary x hidden size
GEMM_SIZE = 3072
PROBE_BYTES = 2**30
WORKING_SET = 96 * 2**20  # bytes of weight copies a rotation cycles through: 3x a 32 MiB L3


def shape_key(out_f: int, in_f: int) -> str:
    return f"{out_f}x{in_f}"


def interleaved(calls: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call for each of `calls`: one untimed warm-up each, then `repeats` rounds in
    which every call runs once."""
    for call in calls.values():
        call()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)
    return seconds


class Rotate:
    """fn(copy, *args) with the next of `copies` on every call: a working set larger than the
    last-level cache, so that each call reads its weight from memory."""

    def __init__(self, fn, copies: list, *args):
        self.fn, self.copies, self.args, self.calls = fn, copies, args, 0

    def __call__(self):
        self.calls += 1
        return self.fn(self.copies[self.calls % len(self.copies)], *self.args)


def n_copies(nbytes: int) -> int:
    return max(2, -(-WORKING_SET // nbytes))


def clone_weight(q: NF4Weight) -> NF4Weight:
    def clone(t):
        return None if t is None else t.clone()

    return NF4Weight(
        q.packed.clone(),
        q.absmax.clone(),
        q.shape,
        q.dtype,
        q.blocksize,
        clone(q.absmax_scale),
        clone(q.absmax_offset),
    )


def rate(seconds: list[float], amount: float, unit: str, **extra) -> dict:
    """A figure of amount / t per sample (GB/s from bytes, GFLOP/s from flops)."""
    return figure([amount / t / 1e9 for t in seconds], unit, **extra)


def ms(seconds: list[float], **extra) -> dict:
    return figure([1e3 * t for t in seconds], "ms", **extra)


def decode_gemm(x: torch.Tensor, q: NF4Weight) -> torch.Tensor:
    """What nf4_linear runs above FUSED_MAX_ROWS: W = kernel.decode(q, x.dtype); x W^T."""
    return F.linear(x, kernel.decode(q, x.dtype))


class PureDecode:
    """Our pure-PyTorch NF4Linear path (QLORA_KERNEL=0): decode into reused buffers, cast,
    F.linear."""

    def __init__(self, q: NF4Weight):
        self.index = torch.empty(q.packed.numel(), dtype=torch.int32)
        self.words = torch.empty(q.n_blocks * q.blocksize // 2, dtype=torch.int64)

    def __call__(self, q: NF4Weight, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_into(q, self.index, self.words).to(x.dtype)
        return F.linear(x, weight)


def call_layer(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer(x)


def ours_linear(q: NF4Weight, x: torch.Tensor) -> torch.Tensor:
    return kernel.nf4_linear(x, q)


def ours_int16(w: int16_decode.Int16Weight, x: torch.Tensor) -> torch.Tensor:
    """The int16 kernel on a repacked weight, bfloat16 out (as nf4_linear for bfloat16 x)."""
    return int16_decode.default_kernel().matmul(x, w, None, x.dtype == torch.bfloat16)


def ours_fused(q: NF4Weight, x: torch.Tensor) -> torch.Tensor:
    return kernel.fused_matmul(x, q)


def ours_decode_gemm(q: NF4Weight, x: torch.Tensor) -> torch.Tensor:
    return decode_gemm(x, q)


def bnb_bytes(layer: nn.Module) -> int:
    """What bitsandbytes' CPU gemv reads: its repacked codes and (bfloat16) block scales."""
    state = layer.weight.quant_state
    tensors = [layer.weight.data, state.absmax]
    if state.nested:
        tensors += [state.state2.absmax]
    return sum(t.numel() * t.element_size() for t in tensors)


def machine(repeats: int, log) -> dict:
    probe = torch.ones(PROBE_BYTES // 4)
    reads = interleaved({"sum": probe.sum}, repeats)["sum"]
    del probe
    g = torch.Generator().manual_seed(0)
    a32 = torch.randn(GEMM_SIZE, GEMM_SIZE, generator=g)
    b32 = torch.randn(GEMM_SIZE, GEMM_SIZE, generator=g)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    gemm = interleaved(
        {"fp32": partial(torch.mm, a32, b32), "bf16": partial(torch.mm, a16, b16)}, repeats
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


def decode(repeats: int, probe: dict, log) -> dict:
    int16 = int16_decode.default_kernel() is not None
    results = {}
    for out_f, in_f in PHI2_SHAPES:
        g = torch.Generator().manual_seed(out_f + in_f)
        linear = nn.Linear(in_f, out_f, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.02)
        q = quantize_nf4(linear.weight, blocksize=64, double_quant=True)
        linear.bias = nn.Parameter(torch.zeros(out_f))  # bnb_linear4bit copies a bias
        theirs = bnb_linear4bit(linear, torch.bfloat16).eval()
        with torch.no_grad():
            theirs(torch.zeros(1, in_f, dtype=torch.bfloat16))  # repacks for its CPU gemv
        ours_copies = [q] + [clone_weight(q) for _ in range(n_copies(q.nbytes) - 1)]
        int16_copies = [int16_decode.repack(c) for c in ours_copies] if int16 else []
        bnb_copies = [theirs] + [copy.deepcopy(theirs) for _ in range(n_copies(q.nbytes) - 1)]
        pure = PureDecode(q)
        per_rows = {}
        for rows in DECODE_ROWS:
            x = torch.randn(rows, in_f, generator=g).bfloat16()
            calls = {
                "ours": Rotate(ours_linear, ours_copies, x),
                "bnb": Rotate(call_layer, bnb_copies, x),
                "pure": Rotate(pure, ours_copies, x),
            }
            if int16:
                calls["int16"] = Rotate(ours_int16, int16_copies, x)
            with torch.no_grad():
                s = interleaved(calls, repeats)
            ours_bw = rate(s["ours"], q.nbytes, "GB/s", label="ours: codes + scales / time")
            per_rows[f"rows={rows}"] = {
                "ms": {
                    "ours": ms(s["ours"], label="kernel.nf4_linear (fused)"),
                    "bnb": ms(s["bnb"], label="bitsandbytes Linear4bit, CPU gemv"),
                    "pure": ms(s["pure"], label="pure PyTorch: decode + F.linear"),
                },
                "read_GBps": {
                    "ours": ours_bw,
                    "bnb": rate(s["bnb"], bnb_bytes(theirs), "GB/s", label="bnb: its bytes"),
                },
                "ratios": {
                    "ours_vs_bnb": paired_ratio(s["ours"], s["bnb"], "ours", "bitsandbytes"),
                    "ours_vs_pure": paired_ratio(s["ours"], s["pure"], "ours", "pure PyTorch"),
                    "bandwidth_fraction": ratio_of(
                        ours_bw, probe, "ours GB/s", "read bandwidth probe"
                    ),
                },
            }
            r = per_rows[f"rows={rows}"]
            if int16:
                int16_bw = rate(
                    s["int16"], int16_copies[0].nbytes, "GB/s", label="int16: its bytes"
                )
                r["ms"]["int16"] = ms(s["int16"], label="int16_decode kernel (repacked weight)")
                r["read_GBps"]["int16"] = int16_bw
                r["ratios"]["int16_vs_bnb"] = paired_ratio(s["int16"], s["bnb"], "int16", "bnb")
                r["ratios"]["int16_vs_ours"] = paired_ratio(s["int16"], s["ours"], "int16", "exact")
                r["ratios"]["int16_bandwidth_fraction"] = ratio_of(
                    int16_bw, probe, "int16 GB/s", "read bandwidth probe"
                )
            log(
                f"  decode {shape_key(out_f, in_f):>10} rows={rows}: ours "
                f"{r['ms']['ours']['median']:.3f} ms ({ours_bw['median']:.1f} GB/s, "
                f"{r['ratios']['bandwidth_fraction']['median']:.2f} of the probe), "
                + (
                    f"int16 {r['ms']['int16']['median']:.3f} ms "
                    f"({r['ratios']['int16_bandwidth_fraction']['median']:.2f}; "
                    f"{r['ratios']['int16_vs_ours']['median']:.2f}x ours), "
                    if int16
                    else ""
                )
                + f"bnb {r['ms']['bnb']['median']:.3f} ms, pure {r['ms']['pure']['median']:.1f} ms"
            )
        results[shape_key(out_f, in_f)] = {
            "bytes": {"ours": exact(q.nbytes, "bytes"), "bnb": exact(bnb_bytes(theirs), "bytes")},
            **per_rows,
        }
        if int16:
            results[shape_key(out_f, in_f)]["bytes"]["int16"] = exact(
                int16_copies[0].nbytes, "bytes"
            )
    return results


def lm_head(repeats: int, probe: dict, log) -> dict:
    out_f, in_f = LM_HEAD
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(out_f, in_f, generator=g) * 0.02).bfloat16()
    bias = torch.randn(out_f, generator=g).bfloat16()
    nbytes = (weight.numel() + bias.numel()) * 2
    results = {"bytes": exact(nbytes, "bytes")}
    gemv = int16_decode.default_kernel() is not None
    for rows in DECODE_ROWS:
        x = torch.randn(rows, in_f, generator=g).bfloat16()
        calls = {"F.linear": partial(F.linear, x, weight, bias)}
        if gemv:
            calls["gemv"] = partial(int16_decode.gemv, x, weight, bias)
        with torch.no_grad():
            s = interleaved(calls, repeats)
        bw = rate(s["F.linear"], nbytes, "GB/s", label="bf16 weight + bias / time")
        r = results[f"rows={rows}"] = {
            "ms": ms(s["F.linear"], label="torch bf16 F.linear 51200x2560 + bias"),
            "read_GBps": bw,
            "bandwidth_fraction": ratio_of(bw, probe, "F.linear GB/s", "read bandwidth probe"),
        }
        line = f"  lm_head bf16 rows={rows}: F.linear {r['ms']['median']:.2f} ms, "
        line += f"{bw['median']:.1f} GB/s"
        if gemv:
            gbw = rate(s["gemv"], nbytes, "GB/s", label="bf16 weight + bias / time")
            r["gemv"] = {
                "ms": ms(s["gemv"], label="int16_decode.gemv (ours) 51200x2560 + bias"),
                "read_GBps": gbw,
                "bandwidth_fraction": ratio_of(gbw, probe, "gemv GB/s", "read bandwidth probe"),
                "vs_F.linear": paired_ratio(s["gemv"], s["F.linear"], "gemv", "F.linear"),
            }
            line += (
                f"; ours {r['gemv']['ms']['median']:.2f} ms, {gbw['median']:.1f} GB/s "
                f"({r['gemv']['bandwidth_fraction']['median']:.2f} of the probe)"
            )
        log(line)
    return results


def prefill(repeats: int, peak: dict, log) -> dict:
    results = {}
    for out_f, in_f in PHI2_SHAPES:
        g = torch.Generator().manual_seed(out_f * 3 + in_f)
        q = quantize_nf4(torch.randn(out_f, in_f, generator=g) * 0.02)
        x32 = torch.randn(PREFILL_ROWS, in_f, generator=g)
        x16 = x32.bfloat16()
        calls = {
            "fused_fp32": partial(kernel.fused_matmul, x32, q),
            "decode_gemm_fp32": partial(decode_gemm, x32, q),
            "decode_gemm_bf16": partial(decode_gemm, x16, q),
            "decode_bf16": partial(kernel.decode, q, torch.bfloat16),
        }
        int16 = int16_decode.default_kernel() is not None
        if int16:
            calls["int16_bf16"] = partial(ours_int16, int16_decode.repack(q), x16)
        with torch.no_grad():
            s = interleaved(calls, repeats)
        flops = 2 * PREFILL_ROWS * out_f * in_f
        gflops = {
            name: rate(s[name], flops, "GFLOP/s")
            for name in ("fused_fp32", "decode_gemm_fp32", "decode_gemm_bf16", "int16_bf16")
            if name in s
        }
        results[shape_key(out_f, in_f)] = {
            "ms": {name: ms(t) for name, t in s.items()},
            "GFLOPs": gflops,
            "ratios": {
                "fused_vs_decode_gemm_fp32": paired_ratio(
                    s["fused_fp32"], s["decode_gemm_fp32"], "fused", "decode + GEMM fp32"
                ),
                "bf16_fraction_of_peak": ratio_of(
                    gflops["decode_gemm_bf16"],
                    peak["gemm_bf16"],
                    "decode + GEMM bf16",
                    "torch.mm bf16 peak",
                ),
            },
        }
        r = results[shape_key(out_f, in_f)]
        if int16:
            r["ratios"]["int16_vs_decode_gemm_bf16"] = paired_ratio(
                s["int16_bf16"], s["decode_gemm_bf16"], "int16", "decode + GEMM bf16"
            )
        log(
            f"  prefill {shape_key(out_f, in_f):>10} rows={PREFILL_ROWS}: fused fp32 "
            f"{r['ms']['fused_fp32']['median']:.1f} ms, decode+GEMM fp32 "
            f"{r['ms']['decode_gemm_fp32']['median']:.1f} ms, bf16 "
            f"{r['ms']['decode_gemm_bf16']['median']:.1f} ms "
            f"({gflops['decode_gemm_bf16']['median']:.0f} GFLOP/s, "
            f"{r['ratios']['bf16_fraction_of_peak']['median']:.2f} of peak; decode alone "
            f"{r['ms']['decode_bf16']['median']:.1f} ms)"
            + (f", int16 {r['ms']['int16_bf16']['median']:.1f} ms" if int16 else "")
        )
    return results


def switch(repeats: int, log) -> dict:
    results = {}
    weights = {}
    for out_f, in_f in PHI2_SHAPES:
        g = torch.Generator().manual_seed(out_f * 5 + in_f)
        q = quantize_nf4(torch.randn(out_f, in_f, generator=g))
        weights[shape_key(out_f, in_f)] = [q] + [
            clone_weight(q) for _ in range(n_copies(q.nbytes) - 1)
        ]
    for rows in SWITCH_ROWS:
        per_shape = {}
        for key, copies in weights.items():
            x = torch.randn(rows, copies[0].shape[1]).bfloat16()
            with torch.no_grad():
                s = interleaved(
                    {
                        "fused": Rotate(ours_fused, copies, x),
                        "decode_gemm": Rotate(ours_decode_gemm, copies, x),
                    },
                    repeats,
                )
            per_shape[key] = paired_ratio(s["fused"], s["decode_gemm"], "fused", "decode + GEMM")
        results[f"rows={rows}"] = per_shape
        log(
            f"  switch rows={rows:>3}: fused / (decode + GEMM) bf16 = "
            + ", ".join(f"{k} {v['median']:.2f}" for k, v in per_shape.items())
        )
    return results


def run(threads: int, repeats: int, log=print, machine_probe: dict | None = None) -> dict:
    """All five measurements on `threads` torch threads; figures in bench/measure.py's format.
    `machine_probe`: a `machine()` result measured earlier in the same run (bench.run measures it
    once for this part and the serving part), else measured here."""
    if repeats < MIN_REPEATS:
        raise ValueError(f"repeats={repeats}: every measured figure needs >= {MIN_REPEATS}")
    k = kernel.default_kernel()
    if k is None:
        raise RuntimeError(
            "the NF4 CPU kernel is not available (QLORA_KERNEL=0, or it failed to build: see "
            "the warning above); this part measures it, so it cannot run without it"
        )
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        k16 = int16_decode.default_kernel()
        results = {
            "threads": threads,
            "isa": k.isa,
            "kernel_load_seconds": exact(k.load_seconds, "s"),
            "int16_isa": None if k16 is None else k16.isa,
        }
        results["machine"] = machine_probe or machine(repeats, log)
        probe = results["machine"]["read_bandwidth"]
        results["decode"] = decode(repeats, probe, log)
        results["lm_head"] = lm_head(repeats, probe, log)
        results["prefill"] = prefill(repeats, results["machine"], log)
        results["switch"] = switch(repeats, log)
        results["fused_max_rows"] = kernel.FUSED_MAX_ROWS
        results["wall_seconds"] = round(time.perf_counter() - start, 1)
    finally:
        torch.set_num_threads(previous)
    return results


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
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
