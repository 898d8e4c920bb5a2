"""Benchmark: forward + backward of a LoRA (r=16) linear layer at Phi-2 shapes, three bases.

    ours   LoRALinear(NF4Linear)                          hand-written NF4, double quant
    bnb    LoRALinear(bitsandbytes.nn.Linear4bit)         nf4, double quant, same LoRA
    fp32   LoRALinear(frozen nn.Linear)                   no quantization

Each timed step is y = layer(x); y.backward(g) on 512 tokens with x.requires_grad (as inside a
network, so grad_x is computed too). The three run interleaved (repeat i of each back to back, so
load from other processes hits all three alike), median of --repeats. Also printed: bytes autograd
saves for backward (ours saves no weight-sized tensor), and dequantization alone, ours against
bitsandbytes' `dequantize_4bit`.

    python -m bench.qlora_timing [--tokens 512] [--repeats 7] [--device cpu|cuda] [--dtype bfloat16]

`bench/run.py` (`make bench`) calls `time_layers` and `time_dequantize` and publishes the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from qlora.layers import LoRALinear, NF4Linear
from qlora.nf4 import dequantize_into, dequantize_nf4, quantize_nf4

PHI2_SHAPES = ((2560, 2560), (2560, 10240), (10240, 2560))  # (in, out): attention, fc1, fc2
LAYER_NAMES = ("ours", "bnb", "fp32")


def bnb_linear4bit(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=True,
        quant_type="nf4",
    )
    layer.weight.data = linear.weight.data.clone()
    layer.bias.data = linear.bias.data.clone()
    return layer.to(linear.weight.device)  # the first .to() quantizes


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward during one forward (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(seen.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Seconds for one forward + backward."""
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    _sync(x.device)
    start = time.perf_counter()
    layer(x).backward(grad)
    _sync(x.device)
    return time.perf_counter() - start


def make_layers(
    in_f: int, out_f: int, device: torch.device, dtype: torch.dtype, r: int = 16
) -> dict[str, LoRALinear]:
    """The three LoRA layers of the comparison, on the same random base weight (seed 0)."""
    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f, device=device, dtype=dtype)
    bases = {
        "ours": NF4Linear.from_linear(linear, compute_dtype=dtype),
        "bnb": bnb_linear4bit(linear, dtype),
        "fp32": linear.requires_grad_(False),
    }
    return {name: LoRALinear(base, r=r, alpha=2 * r) for name, base in bases.items()}


def time_layers(
    in_f: int,
    out_f: int,
    tokens: int = 512,
    repeats: int = 7,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    r: int = 16,
) -> dict:
    """{"seconds": {name: [repeats floats]}, "saved_bytes": {name: int}} for ours, bnb, fp32.

    One untimed warm-up step per layer (allocations, lazy init), then `repeats` rounds in which
    the three layers run back to back.
    """
    device = torch.device(device)
    layers = make_layers(in_f, out_f, device, dtype, r)
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, out_f, device=device, dtype=dtype)
    seconds: dict[str, list[float]] = {name: [] for name in layers}
    for layer in layers.values():
        step(layer, x, grad)
    for _ in range(repeats):
        for name, layer in layers.items():
            seconds[name].append(step(layer, x, grad))
    saved = {name: saved_bytes(layer, x) for name, layer in layers.items()}
    return {"seconds": seconds, "saved_bytes": saved}


def time_dequantize(
    in_f: int, out_f: int, repeats: int = 7, device: str | torch.device = "cpu"
) -> dict:
    """Seconds to decode one float32 [out, in] weight, interleaved like `time_layers`:

    ours         dequantize_nf4(q): fresh output buffer, as bitsandbytes
    ours_reused  dequantize_into(q, ...) into reused buffers: what NF4Linear does on every call
    bnb          bitsandbytes.functional.dequantize_4bit(packed, quant_state)

    Also "max_abs_diff": max |ours - bnb| over the weight (0.0: bit-identical results).
    """
    import bitsandbytes.functional as bnbf

    device = torch.device(device)
    torch.manual_seed(0)
    weight = torch.randn(out_f, in_f, device=device)
    q = quantize_nf4(weight)
    packed, state = bnbf.quantize_4bit(
        weight, blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    index = torch.empty(q.packed.numel(), dtype=torch.int32, device=device)
    words = torch.empty(q.n_blocks * q.blocksize // 2, dtype=torch.int64, device=device)
    decoders = {
        "ours": lambda: dequantize_nf4(q),
        "ours_reused": lambda: dequantize_into(q, index, words),
        "bnb": lambda: bnbf.dequantize_4bit(packed, state),
    }
    max_abs_diff = (decoders["ours"]() - decoders["bnb"]()).abs().max().item()  # also a warm-up
    decoders["ours_reused"]()
    seconds: dict[str, list[float]] = {name: [] for name in decoders}
    for _ in range(repeats):
        for name, decode in decoders.items():
            _sync(device)
            start = time.perf_counter()
            decode()
            _sync(device)
            seconds[name].append(time.perf_counter() - start)
    return {"seconds": seconds, "max_abs_diff": max_abs_diff}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error(f"--repeats={args.repeats}: use at least 5 for a meaningful median")
    dtype = getattr(torch, args.dtype)
    print(
        f"device={args.device} dtype={args.dtype} tokens={args.tokens} "
        f"threads={torch.get_num_threads()}"
    )
    results = {}
    for in_f, out_f in PHI2_SHAPES:
        res = time_layers(in_f, out_f, args.tokens, args.repeats, args.device, dtype)
        deq = time_dequantize(in_f, out_f, args.repeats, args.device)
        ms = {name: 1e3 * statistics.median(t) for name, t in res["seconds"].items()}
        deq_ms = {name: 1e3 * statistics.median(t) for name, t in deq["seconds"].items()}
        saved = {name: b / 2**20 for name, b in res["saved_bytes"].items()}
        results[(in_f, out_f)] = {"ms": ms, "saved_MiB": saved, "dequantize_ms": deq_ms}
        print(
            f"{in_f:>5}->{out_f:<5}  ours {ms['ours']:7.1f} ms  bnb {ms['bnb']:7.1f} ms  "
            f"fp32 {ms['fp32']:7.1f} ms  | ours/bnb {ms['ours'] / ms['bnb']:.2f}x  "
            f"ours/fp32 {ms['ours'] / ms['fp32']:.2f}x  | saved for backward MiB: "
            + " ".join(f"{k} {v:.1f}" for k, v in saved.items())
            + f"  | dequantize ms: ours {deq_ms['ours']:.1f} (reused buffers "
            f"{deq_ms['ours_reused']:.1f}) bnb {deq_ms['bnb']:.1f}"
        )
    return results


if __name__ == "__main__":
    main()
