"""Benchmark: forward + backward of a LoRA (r=16) linear layer at Phi-2 shapes, three bases.

    ours   LoRALinear(NF4Linear)                          hand-written NF4, double quant
    bnb    LoRALinear(bitsandbytes.nn.Linear4bit)         nf4, double quant, same LoRA
    fp32   LoRALinear(frozen nn.Linear)                   no quantization

Each timed step is y = layer(x); y.backward(g) on 512 tokens with x.requires_grad (as inside a
network, so grad_x is computed too). The three run interleaved, median of --repeats. Also
printed: bytes autograd saves for backward (ours saves no weight-sized tensor).

    python -m qlora.bench [--tokens 512] [--repeats 7] [--device cpu|cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from .layers import LoRALinear, NF4Linear

PHI2_SHAPES = ((2560, 2560), (2560, 10240), (10240, 2560))  # (in, out): attention, fc1, fc2


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


def step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    layer(x).backward(grad)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error(f"--repeats={args.repeats}: use at least 5 for a meaningful median")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(
        f"device={device} dtype={args.dtype} tokens={args.tokens} threads={torch.get_num_threads()}"
    )
    results = {}
    for in_f, out_f in PHI2_SHAPES:
        torch.manual_seed(0)
        linear = nn.Linear(in_f, out_f, device=device, dtype=dtype)
        layers = {
            "ours": NF4Linear.from_linear(linear, compute_dtype=dtype),
            "bnb": bnb_linear4bit(linear, dtype),
            "fp32": linear.requires_grad_(False),
        }
        layers = {name: LoRALinear(base, r=16, alpha=32) for name, base in layers.items()}
        x = torch.randn(args.tokens, in_f, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(args.tokens, out_f, device=device, dtype=dtype)
        times: dict[str, list[float]] = {name: [] for name in layers}
        for layer in layers.values():
            step(layer, x, grad)  # warm-up: allocations, lazy init
        for _ in range(args.repeats):
            for name, layer in layers.items():
                times[name].append(step(layer, x, grad))
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        saved = {name: saved_bytes(layer, x) / 2**20 for name, layer in layers.items()}
        results[(in_f, out_f)] = {"ms": ms, "saved_MiB": saved}
        print(
            f"{in_f:>5}->{out_f:<5}  ours {ms['ours']:7.1f} ms  bnb {ms['bnb']:7.1f} ms  "
            f"fp32 {ms['fp32']:7.1f} ms  | ours/bnb {ms['ours'] / ms['bnb']:.2f}x  "
            f"ours/fp32 {ms['ours'] / ms['fp32']:.2f}x  | saved for backward MiB: "
            + " ".join(f"{k} {v:.1f}" for k, v in saved.items())
        )
    return results


if __name__ == "__main__":
    main()
