"""Part 1: forward + backward of one LoRA layer on three frozen bases, and dequantization alone.

    ours   LoRALinear(NF4Linear)                      hand-written NF4, double quant
    bnb    LoRALinear(bitsandbytes.nn.Linear4bit)     nf4, double quant, the same LoRA
    fp32   LoRALinear(frozen nn.Linear)               no quantization

A step is y = layer(x); y.backward(g) with x.requires_grad (as inside a network, so grad_x is
computed too). The three run interleaved and each ratio pairs repeat i of both sides. Also: the
bytes autograd saves for backward (ours saves no weight-sized tensor), and the decode of one
float32 weight, ours (fresh and into reused buffers, as NF4Linear does) against bitsandbytes'
`dequantize_4bit`.
"""

from __future__ import annotations

import torch
from torch import nn

from qlora.layers import LoRALinear, NF4Linear
from qlora.nf4 import dequantize_into, dequantize_nf4, quantize_nf4

from .measure import exact, figure, interleaved, paired_ratio

LAYER_LABELS = {
    "ours": "NF4Linear+LoRA (ours)",
    "bnb": "bitsandbytes Linear4bit+LoRA",
    "fp32": "frozen fp32 nn.Linear+LoRA",
}
DEQUANT_LABELS = {
    "ours": "dequantize_nf4 (ours)",
    "ours_reused": "dequantize_into, reused buffers (ours, as NF4Linear)",
    "bnb": "bitsandbytes dequantize_4bit",
}


def bnb_linear4bit(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """bitsandbytes' Linear4bit (nf4, double quant) holding `linear`'s weight and bias."""
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


def bnb_nf4_config():
    """transformers' BitsAndBytesConfig of the peer: NF4, double quant, bf16 compute."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


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


def fwd_bwd(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad)

    return step


def time_layers(out_f: int, in_f: int, tokens: int, r: int, repeats: int, device) -> dict:
    """{"seconds": {name: [repeats]}, "saved_bytes": {name: int}} of the three layers, all on
    the same random base weight (seed 0)."""
    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f, device=device)
    bases = {
        "ours": NF4Linear.from_linear(linear),
        "bnb": bnb_linear4bit(linear, torch.float32),
        "fp32": linear.requires_grad_(False),
    }
    layers = {name: LoRALinear(base, r=r, alpha=2 * r) for name, base in bases.items()}
    x = torch.randn(tokens, in_f, device=device, requires_grad=True)
    grad = torch.randn(tokens, out_f, device=device)
    steps = {name: fwd_bwd(layer, x, grad) for name, layer in layers.items()}
    seconds = interleaved(steps, repeats, device)
    return {"seconds": seconds, "saved_bytes": {n: saved_bytes(m, x) for n, m in layers.items()}}


def time_dequantize(out_f: int, in_f: int, repeats: int, device) -> dict:
    """Seconds to decode one float32 [out, in] weight each way, and max |ours - bnb|."""
    import bitsandbytes.functional as bnbf

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
    max_abs_diff = (decoders["ours"]() - decoders["bnb"]()).abs().max().item()
    return {"seconds": interleaved(decoders, repeats, device), "max_abs_diff": max_abs_diff}


def ms_figures(seconds: dict[str, list[float]], labels: dict[str, str]) -> dict:
    return {n: figure([1e3 * t for t in seconds[n]], "ms", label=labels[n]) for n in labels}


def ours_vs(seconds: dict, labels: dict, peer: str, ours: str = "ours") -> dict:
    return paired_ratio(seconds[ours], seconds[peer], labels[ours], labels[peer])


def run(shapes, tokens: int, rank: int, repeats: int, device: torch.device, log=print) -> dict:
    """`shapes`: (out, in) pairs; results are keyed "in->out"."""
    per_shape, dequant = {}, {}
    for out_f, in_f in shapes:
        key = f"{in_f}->{out_f}"
        res = time_layers(out_f, in_f, tokens, rank, repeats, device)
        s = res["seconds"]
        per_shape[key] = {
            "fwd_bwd": ms_figures(s, LAYER_LABELS),
            "ratios": {
                "ours_vs_bnb": ours_vs(s, LAYER_LABELS, "bnb"),
                "ours_vs_fp32": ours_vs(s, LAYER_LABELS, "fp32"),
            },
            "saved_for_backward": {
                name: exact(b / 2**20, "MiB", label=LAYER_LABELS[name])
                for name, b in res["saved_bytes"].items()
            },
        }
        deq = time_dequantize(out_f, in_f, repeats, device)
        d = deq["seconds"]
        dequant[key] = {
            "seconds": ms_figures(d, DEQUANT_LABELS),
            "ratios": {
                "ours_vs_bnb": ours_vs(d, DEQUANT_LABELS, "bnb"),
                "ours_reused_vs_bnb": ours_vs(d, DEQUANT_LABELS, "bnb", "ours_reused"),
            },
            "max_abs_diff_vs_bnb": exact(deq["max_abs_diff"], "absolute"),
        }
        r = per_shape[key]["ratios"]
        log(
            f"  {key:>12}: ours/bnb {r['ours_vs_bnb']['median']:.2f}x, "
            f"ours/fp32 {r['ours_vs_fp32']['median']:.2f}x, dequantize ours/bnb "
            f"{dequant[key]['ratios']['ours_vs_bnb']['median']:.2f}x"
        )
    return {
        "tokens": tokens,
        "lora_r": rank,
        "dtype": "float32",
        "step": "y = layer(x); y.backward(g), x.requires_grad (grad_x computed), LoRA trainable",
        "shapes": per_shape,
        "dequantize": dequant,
    }
