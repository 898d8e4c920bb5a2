"""Part 1: one LoRA layer, forward + backward, on three frozen bases, and dequantization alone.

The timing itself lives in bench/qlora_timing.py (`python -m bench.qlora_timing` prints the same
comparison); this turns its samples into figures and two paired ratios:

    NF4Linear+LoRA (ours) / bitsandbytes Linear4bit+LoRA    the same job on the peer's NF4
    NF4Linear+LoRA (ours) / frozen fp32 nn.Linear+LoRA      what 4-bit storage costs in time
"""

from __future__ import annotations

import torch

from bench.qlora_timing import time_dequantize, time_layers

from .measure import exact, figure, paired_ratio

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


def shape_key(in_f: int, out_f: int) -> str:
    return f"{in_f}->{out_f}"


def run(shapes, tokens: int, rank: int, repeats: int, device: torch.device, log=print) -> dict:
    per_shape, dequant = {}, {}
    for in_f, out_f in shapes:
        key = shape_key(in_f, out_f)
        res = time_layers(in_f, out_f, tokens, repeats, device, torch.float32, rank)
        s = res["seconds"]
        ms = {name: [1e3 * t for t in s[name]] for name in s}
        per_shape[key] = {
            "fwd_bwd": {
                name: figure(ms[name], "ms", label=LAYER_LABELS[name]) for name in LAYER_LABELS
            },
            "ratios": {
                "ours_vs_bnb": paired_ratio(
                    s["ours"], s["bnb"], LAYER_LABELS["ours"], LAYER_LABELS["bnb"]
                ),
                "ours_vs_fp32": paired_ratio(
                    s["ours"], s["fp32"], LAYER_LABELS["ours"], LAYER_LABELS["fp32"]
                ),
            },
            "saved_for_backward": {
                name: exact(b / 2**20, "MiB", label=LAYER_LABELS[name])
                for name, b in res["saved_bytes"].items()
            },
        }
        deq = time_dequantize(in_f, out_f, repeats, device)
        d = deq["seconds"]
        dequant[key] = {
            "seconds": {
                name: figure([1e3 * t for t in d[name]], "ms", label=DEQUANT_LABELS[name])
                for name in DEQUANT_LABELS
            },
            "ratios": {
                "ours_vs_bnb": paired_ratio(
                    d["ours"], d["bnb"], DEQUANT_LABELS["ours"], DEQUANT_LABELS["bnb"]
                ),
                "ours_reused_vs_bnb": paired_ratio(
                    d["ours_reused"], d["bnb"], DEQUANT_LABELS["ours_reused"], DEQUANT_LABELS["bnb"]
                ),
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
