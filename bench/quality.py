"""Part 2: quantization error and stored size, and Phi-2's NF4 footprint from its config alone.

Error of a round trip W -> quantize -> dequantize -> W':  MAE = mean |W - W'|,
RMSE = sqrt(mean (W - W')^2), for four quantizers, all with blocks of 64 values:

    NF4, double quant (ours)           qlora.quantize_nf4
    NF4, double quant (bitsandbytes)   bitsandbytes.functional.quantize_4bit: must be identical
    NF4, no double quant (ours)        absmax kept in float32
    int4 absmax                        the plain baseline: q = round(7 W / absmax) in [-7, 7],
                                       W' = q absmax / 7, one float32 absmax per block

on N(0, 1) weights (one Phi-2 attention matrix, 2560 x 2560, five seeds) and on the real weights
of the warmed-up tiny Phi (every linear layer QLoRA quantizes, pooled).
"""

from __future__ import annotations

import math

import torch
from transformers import PhiConfig, PhiForCausalLM

from qlora import PHI_TARGETS, dequantize_nf4, quantize_nf4
from qlora.model import find_target_linears

from .measure import exact, figure, paired_ratio
from .phi2 import PHI2_CONFIG

BLOCKSIZE = 64
METHOD_LABELS = {
    "ours": "NF4, double quant (ours)",
    "bnb": "NF4, double quant (bitsandbytes)",
    "ours_no_dq": "NF4, no double quant (ours)",
    "int4_absmax": "int4 absmax (baseline)",
}


def int4_absmax_roundtrip(weight: torch.Tensor, blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """Symmetric absmax int4 per block (15 levels): round(7 x / absmax) * absmax / 7."""
    flat = weight.reshape(-1).float()
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)  # [n_blocks, blocksize]
    scale = blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-38) / 7
    q = torch.clamp(torch.round(blocks / scale), -7, 7)
    return (q * scale).view(-1)[: flat.numel()].view(weight.shape)


def bnb_quantize(weight: torch.Tensor):
    import bitsandbytes.functional as bnbf

    return bnbf.quantize_4bit(
        weight, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4"
    )


def bnb_nbytes(weight: torch.Tensor) -> int:
    """Bytes of bitsandbytes' per-weight tensors: codes, absmax, nested absmax, offset (the
    shared code tables excluded, as in NF4Weight.nbytes)."""
    packed, state = bnb_quantize(weight)
    tensors = (packed, state.absmax, state.state2.absmax, state.offset)
    return sum(t.numel() * t.element_size() for t in tensors)


def same_bytes_as_bnb(weight: torch.Tensor) -> bool:
    """Our codes, 8-bit absmax, absmax scales and offset equal bitsandbytes' byte for byte."""
    q = quantize_nf4(weight, BLOCKSIZE, double_quant=True)
    packed, state = bnb_quantize(weight)
    return (
        torch.equal(q.packed, packed.view(-1))
        and torch.equal(q.absmax, state.absmax)
        and torch.equal(q.absmax_scale, state.state2.absmax)
        and torch.equal(q.absmax_offset.reshape(()), state.offset.reshape(()))
    )


def errors(weights: list[torch.Tensor]) -> dict:
    """MAE, RMSE per method over all weights pooled, max |ours - bnb|, bytes identical."""
    import bitsandbytes.functional as bnbf

    abs_sum = dict.fromkeys(METHOD_LABELS, 0.0)
    sq_sum = dict.fromkeys(METHOD_LABELS, 0.0)
    n, max_diff, identical = 0, 0.0, True
    for w in weights:
        w = w.detach().float()
        approx = {
            "ours": dequantize_nf4(quantize_nf4(w, BLOCKSIZE, double_quant=True)),
            "bnb": bnbf.dequantize_4bit(*bnb_quantize(w)),
            "ours_no_dq": dequantize_nf4(quantize_nf4(w, BLOCKSIZE, double_quant=False)),
            "int4_absmax": int4_absmax_roundtrip(w),
        }
        for name, a in approx.items():
            err = (w - a).double()
            abs_sum[name] += err.abs().sum().item()
            sq_sum[name] += err.square().sum().item()
        max_diff = max(max_diff, (approx["ours"] - approx["bnb"]).abs().max().item())
        identical = identical and same_bytes_as_bnb(w)
        n += w.numel()
    return {
        "mae": {k: v / n for k, v in abs_sum.items()},
        "rmse": {k: math.sqrt(v / n) for k, v in sq_sum.items()},
        "max_abs_diff_ours_vs_bnb": max_diff,
        "bytes_identical_to_bnb": identical,
        "params": n,
    }


def bits_per_param(shape: tuple) -> dict:
    """Stored bits per parameter of one random weight of `shape`, as each method stores it."""
    w, n = torch.randn(shape), math.prod(shape)
    nf4 = {dq: 8 * quantize_nf4(w, BLOCKSIZE, double_quant=dq).nbytes / n for dq in (True, False)}
    return {
        "nf4_double_quant": exact(nf4[True], "bits/param"),
        "nf4_no_double_quant": exact(nf4[False], "bits/param"),
        "bnb_nf4_double_quant": exact(8 * bnb_nbytes(w) / n, "bits/param"),
        "int4_absmax": exact(4 + 32 / BLOCKSIZE, "bits/param"),
        "of": f"one {shape[0]}x{shape[1]} weight, blocks of 64 (4 + 32/64 = 4.5 without, "
        "4 + 8/64 + 32/(64*256) = 4.127 with double quant; the 16- and 256-entry code tables "
        "are shared constants, not counted)",
    }


def phi2_footprint() -> dict:
    """Phi-2 in NF4 + double quant from its config: the model built on the meta device (shapes,
    no memory); each linear QLoRA targets costs what quantizing a random weight of its shape
    stores (ours, and bitsandbytes'), every other parameter 2 bytes (fp16)."""
    with torch.device("meta"):
        model = PhiForCausalLM(PhiConfig(**PHI2_CONFIG))
    shapes = [tuple(m.weight.shape) for m in find_target_linears(model, PHI_TARGETS).values()]
    ours = {s: quantize_nf4(torch.randn(s), BLOCKSIZE).nbytes for s in set(shapes)}
    bnb = {s: bnb_nbytes(torch.randn(s)) for s in set(shapes)}
    total = sum(p.numel() for p in model.parameters())
    quantized = sum(math.prod(s) for s in shapes)
    fp16_rest = 2 * (total - quantized)
    nf4_bytes = sum(ours[s] for s in shapes) + fp16_rest
    return {
        "config": PHI2_CONFIG,
        "how": "PhiForCausalLM built on the meta device from the config alone; the 6 linears "
        "of each of the 32 layers (q_proj, k_proj, v_proj, dense, fc1, fc2) in NF4 with "
        "double quant, everything else (token embeddings, lm_head and its bias, layer norms, "
        "the linears' biases) in fp16, as QLoRA keeps them",
        "total_params": exact(total, "count"),
        "quantized_modules": exact(len(shapes), "count"),
        "quantized_params": exact(quantized, "count"),
        "quantized_GB": exact(sum(ours[s] for s in shapes) / 1e9, "GB"),
        "fp16_kept_GB": exact(fp16_rest / 1e9, "GB"),
        "nf4_GB": exact(nf4_bytes / 1e9, "GB"),
        "nf4_GiB": exact(nf4_bytes / 2**30, "GiB"),
        "fp16_GB": exact(2 * total / 1e9, "GB"),
        "bnb_nf4_GB": exact((sum(bnb[s] for s in shapes) + fp16_rest) / 1e9, "GB"),
        "nf4_vs_fp16": exact(
            nf4_bytes / (2 * total),
            "x",
            numerator="Phi-2 in NF4 + double quant (ours)",
            denominator="Phi-2 in fp16",
        ),
    }


def labelled(values: dict, make) -> dict:
    return {k: make(v, "absolute", label=METHOD_LABELS[k]) for k, v in values.items()}


def normal_errors(shape: tuple, seeds: int) -> dict:
    """Errors on `seeds` N(0, 1) weights of `shape`: a figure per method over the seeds."""
    gens = [torch.Generator().manual_seed(seed) for seed in range(seeds)]
    per_seed = [errors([torch.randn(*shape, generator=g)]) for g in gens]
    mae = {k: [e["mae"][k] for e in per_seed] for k in METHOD_LABELS}
    rmse = {k: [e["rmse"][k] for e in per_seed] for k in METHOD_LABELS}
    max_diff = max(e["max_abs_diff_ours_vs_bnb"] for e in per_seed)
    ours, int4 = "RMSE " + METHOD_LABELS["ours"], "RMSE " + METHOD_LABELS["int4_absmax"]
    return {
        "data": f"{shape[0]}x{shape[1]} values, {seeds} seeds",
        "mae": labelled(mae, figure),
        "rmse": labelled(rmse, figure),
        "max_abs_diff_ours_vs_bnb": exact(max_diff, "absolute"),
        "bytes_identical_to_bnb": all(e["bytes_identical_to_bnb"] for e in per_seed),
        "ratios": {
            "rmse_ours_vs_int4": paired_ratio(rmse["ours"], rmse["int4_absmax"], ours, int4)
        },
    }


def tiny_errors(tiny_model) -> dict:
    """Errors on every linear of the tiny Phi that QLoRA quantizes, pooled."""
    weights = [m.weight for m in find_target_linears(tiny_model, PHI_TARGETS).values()]
    e = errors(weights)
    ours, int4 = "RMSE " + METHOD_LABELS["ours"], "RMSE " + METHOD_LABELS["int4_absmax"]
    ratio = exact(
        e["rmse"]["ours"] / e["rmse"]["int4_absmax"], "x", numerator=ours, denominator=int4
    )
    return {
        "data": f"tiny Phi after warm-up: {len(weights)} linears ({', '.join(PHI_TARGETS)}), "
        f"{e['params']:,} weights pooled",
        "mae": labelled(e["mae"], exact),
        "rmse": labelled(e["rmse"], exact),
        "max_abs_diff_ours_vs_bnb": exact(e["max_abs_diff_ours_vs_bnb"], "absolute"),
        "bytes_identical_to_bnb": e["bytes_identical_to_bnb"],
        "ratios": {"rmse_ours_vs_int4": ratio},
    }


def run(shape: tuple, seeds: int, tiny_model, log=print) -> dict:
    result = {
        "normal": normal_errors(shape, seeds),
        "tiny": tiny_errors(tiny_model),
        "methods": METHOD_LABELS,
        "bits_per_param": bits_per_param(shape),
        "phi2": phi2_footprint(),
    }
    n, phi2 = result["normal"], result["phi2"]
    log(
        f"  N(0,1) RMSE ours {n['rmse']['ours']['median']:.5f} int4 "
        f"{n['rmse']['int4_absmax']['median']:.5f}; bytes identical to bitsandbytes: "
        f"{n['bytes_identical_to_bnb'] and result['tiny']['bytes_identical_to_bnb']}; Phi-2 NF4 "
        f"{phi2['nf4_GB']['median']:.3f} GB vs fp16 {phi2['fp16_GB']['median']:.3f} GB"
    )
    return result
