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
from qlora.nf4 import ABSMAX_BLOCKSIZE

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


def bnb_roundtrip(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, object]:
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        weight, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4"
    )
    return bnbf.dequantize_4bit(packed, state), packed, state


def same_bytes_as_bnb(weight: torch.Tensor) -> bool:
    """Our codes, 8-bit absmax, absmax scales and offset equal bitsandbytes' byte for byte."""
    q = quantize_nf4(weight, BLOCKSIZE, double_quant=True)
    _, packed, state = bnb_roundtrip(weight)
    return (
        torch.equal(q.packed, packed.view(-1))
        and torch.equal(q.absmax, state.absmax)
        and torch.equal(q.absmax_scale, state.state2.absmax)
        and torch.equal(q.absmax_offset.reshape(()), state.offset.reshape(()))
    )


def roundtrips(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "ours": dequantize_nf4(quantize_nf4(weight, BLOCKSIZE, double_quant=True)),
        "bnb": bnb_roundtrip(weight)[0],
        "ours_no_dq": dequantize_nf4(quantize_nf4(weight, BLOCKSIZE, double_quant=False)),
        "int4_absmax": int4_absmax_roundtrip(weight),
    }


def errors(weights: list[torch.Tensor]) -> dict:
    """MAE, RMSE per method over all weights pooled, max |ours - bnb|, bytes identical."""
    abs_sum = dict.fromkeys(METHOD_LABELS, 0.0)
    sq_sum = dict.fromkeys(METHOD_LABELS, 0.0)
    n, max_diff, identical = 0, 0.0, True
    for w in weights:
        w = w.detach().float()
        approx = roundtrips(w)
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


# ---------------------------------------------------------------------------------------------
# Stored size
# ---------------------------------------------------------------------------------------------


def nf4_nbytes(numel: int, blocksize: int = BLOCKSIZE, double_quant: bool = True) -> int:
    """Bytes qlora stores for one NF4 weight of `numel` values (NF4Weight.nbytes, from shapes):

    codes ceil(n/2) uint8 + absmax per block (uint8 with double quant, else float32)
    + with double quant: a float32 scale per 256 absmax and one float32 offset.
    run() checks this against NF4Weight.nbytes of real weights.
    """
    n_blocks = -(-numel // blocksize)
    if not double_quant:
        return -(-numel // 2) + 4 * n_blocks
    return -(-numel // 2) + n_blocks + 4 * -(-n_blocks // ABSMAX_BLOCKSIZE) + 4


def bnb_nbytes(weight: torch.Tensor) -> int:
    """Bytes of bitsandbytes' per-weight tensors: packed codes, absmax, nested absmax, offset (the
    shared 16- and 256-entry code tables excluded, as in NF4Weight.nbytes)."""
    _, packed, state = bnb_roundtrip(weight)
    tensors = (packed, state.absmax, state.state2.absmax, state.offset)
    return sum(t.numel() * t.element_size() for t in tensors)


def phi_footprint(config: PhiConfig, other_bytes_per_param: int = 2) -> dict:
    """NF4 (double quant) size of a Phi model from its config: the model is built on the meta
    device (shapes, no memory), every linear QLoRA targets (q_proj, k_proj, v_proj, dense, fc1,
    fc2 in each layer) counts nf4_nbytes, every other parameter (embeddings, lm_head and its bias,
    layer norms, the targets' biases) `other_bytes_per_param` (2: fp16)."""
    with torch.device("meta"):
        model = PhiForCausalLM(config)
    targets = find_target_linears(model, PHI_TARGETS)
    quantized = {id(m.weight): m.weight.numel() for m in targets.values()}
    total_params = sum(p.numel() for p in model.parameters())
    quantized_params = sum(quantized.values())
    quantized_bytes = sum(nf4_nbytes(n) for n in quantized.values())
    other_params = total_params - quantized_params
    return {
        "total_params": total_params,
        "quantized_modules": len(targets),
        "quantized_params": quantized_params,
        "quantized_bytes": quantized_bytes,
        "other_params": other_params,
        "other_bytes": other_params * other_bytes_per_param,
        "total_bytes": quantized_bytes + other_params * other_bytes_per_param,
    }


def phi2_bnb_bytes(config: PhiConfig, other_bytes_per_param: int = 2) -> int:
    """Phi-2's size as bitsandbytes stores it: bnb_nbytes measured once per distinct shape of the
    quantized linears (a random weight: the size does not depend on the values), summed over all
    of them, plus every other parameter at `other_bytes_per_param`."""
    with torch.device("meta"):
        model = PhiForCausalLM(config)
    shapes = [tuple(m.weight.shape) for m in find_target_linears(model, PHI_TARGETS).values()]
    per_shape = {shape: bnb_nbytes(torch.randn(shape)) for shape in set(shapes)}
    quantized = sum(math.prod(shape) for shape in shapes)
    other = sum(p.numel() for p in model.parameters()) - quantized
    return sum(per_shape[shape] for shape in shapes) + other * other_bytes_per_param


def footprint_section(tiny_model, check_shapes, bits_shape) -> dict:
    # nf4_nbytes against the real NF4Weight.nbytes, on the layer part's (in, out) shapes (Phi-2's
    # in the full run) and on the tiny model's weights
    checks = [torch.randn(out_f, in_f) for in_f, out_f in check_shapes]
    checks += [m.weight for m in find_target_linears(tiny_model, PHI_TARGETS).values()]
    for w in checks:
        for dq in (True, False):
            real = quantize_nf4(w, BLOCKSIZE, double_quant=dq).nbytes
            if real != nf4_nbytes(w.numel(), BLOCKSIZE, dq):
                raise AssertionError(
                    f"nf4_nbytes({w.numel()}, double_quant={dq}) = "
                    f"{nf4_nbytes(w.numel(), BLOCKSIZE, dq)} but NF4Weight.nbytes = {real}; "
                    "update bench/quality.py to qlora's storage layout"
                )
    phi2 = phi_footprint(PhiConfig(**PHI2_CONFIG))
    fp16_bytes = 2 * phi2["total_params"]
    n = math.prod(bits_shape)
    return {
        "bits_per_param": {
            "nf4_double_quant": exact(8 * nf4_nbytes(n, BLOCKSIZE, True) / n, "bits/param"),
            "nf4_no_double_quant": exact(8 * nf4_nbytes(n, BLOCKSIZE, False) / n, "bits/param"),
            "bnb_nf4_double_quant": exact(
                8 * bnb_nbytes(torch.randn(bits_shape)) / n, "bits/param"
            ),
            "int4_absmax": exact(4 + 32 / BLOCKSIZE, "bits/param"),
            "of": f"one {bits_shape[0]}x{bits_shape[1]} weight, blocks of 64 (4 + 32/64 = 4.5 "
            "without, 4 + 8/64 + 32/(64*256) = 4.127 with double quant; the 16- and 256-entry "
            "code tables are shared constants, not counted)",
        },
        "phi2": {
            "config": PHI2_CONFIG,
            "how": "PhiForCausalLM built on the meta device from the config alone; the 6 linears "
            "of each of the 32 layers (q_proj, k_proj, v_proj, dense, fc1, fc2) in NF4 with "
            "double quant, everything else (token embeddings, lm_head and its bias, layer norms, "
            "the linears' biases) in fp16, as QLoRA keeps them",
            **{k: exact(v, "count") for k, v in phi2.items() if not k.endswith("bytes")},
            "nf4_bytes": exact(phi2["total_bytes"], "bytes"),
            "quantized_GB": exact(phi2["quantized_bytes"] / 1e9, "GB"),
            "fp16_kept_GB": exact(phi2["other_bytes"] / 1e9, "GB"),
            "nf4_GB": exact(phi2["total_bytes"] / 1e9, "GB"),
            "nf4_GiB": exact(phi2["total_bytes"] / 2**30, "GiB"),
            "fp16_GB": exact(fp16_bytes / 1e9, "GB"),
            "bnb_nf4_GB": exact(
                phi2_bnb_bytes(PhiConfig(**PHI2_CONFIG)) / 1e9,
                "GB",
                how="bitsandbytes quantize_4bit (nf4, double quant) run on a random weight of "
                "each quantized shape, its bytes summed over the linears, plus the same fp16 rest",
            ),
            "nf4_vs_fp16": exact(
                phi2["total_bytes"] / fp16_bytes,
                "x",
                numerator="Phi-2 in NF4 + double quant (ours)",
                denominator="Phi-2 in fp16",
            ),
        },
        "formula_checked_on": [list(w.shape) for w in checks],
    }


def run(quality_shape, seeds: int, tiny_model, check_shapes, log=print) -> dict:
    normal = {"mae": {k: [] for k in METHOD_LABELS}, "rmse": {k: [] for k in METHOD_LABELS}}
    max_diff, identical = 0.0, True
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(seed)
        e = errors([torch.randn(*quality_shape, generator=gen)])
        for metric in ("mae", "rmse"):
            for k, v in e[metric].items():
                normal[metric][k].append(v)
        max_diff = max(max_diff, e["max_abs_diff_ours_vs_bnb"])
        identical = identical and e["bytes_identical_to_bnb"]
    tiny_weights = [m.weight for m in find_target_linears(tiny_model, PHI_TARGETS).values()]
    t = errors(tiny_weights)
    result = {
        "normal": {
            "data": f"{quality_shape[0]}x{quality_shape[1]} values, {seeds} seeds",
            **{
                metric: {k: figure(v, "absolute", label=METHOD_LABELS[k]) for k, v in d.items()}
                for metric, d in normal.items()
            },
            "max_abs_diff_ours_vs_bnb": exact(max_diff, "absolute"),
            "bytes_identical_to_bnb": identical,
            "ratios": {
                "rmse_ours_vs_int4": paired_ratio(
                    normal["rmse"]["ours"],
                    normal["rmse"]["int4_absmax"],
                    "RMSE " + METHOD_LABELS["ours"],
                    "RMSE " + METHOD_LABELS["int4_absmax"],
                )
            },
        },
        "tiny": {
            "data": f"tiny Phi after warm-up: {len(tiny_weights)} linears "
            f"({', '.join(PHI_TARGETS)}), {t['params']:,} weights pooled",
            **{
                metric: {k: exact(v, "absolute", label=METHOD_LABELS[k]) for k, v in d.items()}
                for metric, d in (("mae", t["mae"]), ("rmse", t["rmse"]))
            },
            "max_abs_diff_ours_vs_bnb": exact(t["max_abs_diff_ours_vs_bnb"], "absolute"),
            "bytes_identical_to_bnb": t["bytes_identical_to_bnb"],
            "ratios": {
                "rmse_ours_vs_int4": exact(
                    t["rmse"]["ours"] / t["rmse"]["int4_absmax"],
                    "x",
                    numerator="RMSE " + METHOD_LABELS["ours"],
                    denominator="RMSE " + METHOD_LABELS["int4_absmax"],
                )
            },
        },
        "methods": METHOD_LABELS,
        **footprint_section(tiny_model, check_shapes, quality_shape),
    }
    phi2 = result["phi2"]
    log(
        f"  N(0,1) RMSE ours {result['normal']['rmse']['ours']['median']:.5f} "
        f"int4 {result['normal']['rmse']['int4_absmax']['median']:.5f}; max |ours-bnb| "
        f"{max(max_diff, t['max_abs_diff_ours_vs_bnb'])}; Phi-2 NF4 {phi2['nf4_GB']['median']:.3f} "
        f"GB vs fp16 {phi2['fp16_GB']['median']:.3f} GB"
    )
    return result
