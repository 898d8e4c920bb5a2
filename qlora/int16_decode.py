"""Decoding with int16 dot products over NF4 weights (csrc/nf4_int16.cpp), and a bfloat16 GEMV.

The exact path (kernel.py) computes y = x W^T in float32 from the NF4 weight itself. This path
sums integer products instead, with AVX-512 VNNI's vpdpwssd (two int16 x int16 products per
32-bit lane): the 16 NF4 levels become int16, the activations are quantized to int16 once per
call, and the products of each 64-weight block are summed as exact integers.

    T[q]        = round(16383 NF4_CODE[q])                                  INT16_CODE, int16 [16]
    scale[n, s] = fp32(absmax(row n, k in [64s, 64s+64)) / 16383)           repack (once)
    dx_s        = amax_s / 16383,  xq_k = round_even(x_k 16383 / amax_s)    per block s of 64 k
    D[s]        = sum_{k in block s} T[q_nk] xq_k                           exact integers
    y_n         = sum_s scale[n, s] dx_s D[s]   (+ bias_n)                   float32

(D[s] is summed in eight lanes of eight products, |lane| <= 8 16383^2 < 2^31.) `reference_matmul`
computes exactly the C++ kernel's float32 operations in its order (lanes, fused multiply-adds,
the final sums), so the two agree bit for bit; `tests/test_int16_decode.py` checks it on every
code path this CPU runs and bounds the error against the exact path.

Error. T rounds each level by at most 0.5/16383 of absmax, xq each activation by at most half a
step dx_s (the float32 scales and sums add roundings of 2^-24 each). Per output the worst case is

    |y - y_exact| <= 0.5/16383 (sum_k |x_k| absmax_b(k) + sum_k |W'_k| amax_s(k)) + fp32

(tests/test_int16_decode.py checks it at Phi-2's shapes); typically about 6e-5 of y, far below
the bfloat16 rounding of a layer's output (2^-9).

Use. Off by default: training and every exactness test run the exact kernel. `set_enabled(True)`
(the demo does with `--int16`) routes no-grad CPU calls of 1..MAX_ROWS float32/bfloat16 rows
through this path; any input the kernel does not take (shape not a multiple of 4 rows x 64, a
blocksize that is not a multiple of 64, non-finite activations, CUDA, ...) takes the exact path
instead. The repacked weight is built on first use and kept beside the NF4 bytes (which stay as
they are, for saving, training and the exact path).

Serving. A model that only decodes (the demo) need not keep both layouts: `serve_repacked`
replaces each NF4 linear's weight by a RepackedNF4Weight, which holds the repacked codes and
float32 scales beside the NF4 block scales and rebuilds the element-order bytes (`packed`) when
the exact path asks for them (prefill, inputs the int16 path declines), so the exact path's
results stay the same bits and the NF4 bytes are not held twice.

    linear(x, q, bias)       the int16 path for one NF4 weight, or None (then: exact path)
    gemv(x, w, bias)         y = x w^T for a bfloat16 weight and 1..GEMV_MAX_ROWS rows, or None
    GemvLinear               an nn.Linear whose no-grad CPU calls use gemv (output layers)
    serve_repacked(model)    every NF4 weight stored in the repacked layout only
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import kernel as exact_kernel
from .nf4 import NF4_CODE, NF4Weight, restore_absmax

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "nf4_int16.cpp"
ISAS = {"vnni": 3, "avx2": 2, "scalar": 0}  # name -> QLORA_ISA in nf4_int16.cpp
ENV = "QLORA_INT16"  # 0: never build (the exact path everywhere); vnni|avx2|scalar: force a path

ROWS = 4  # output rows interleaved per group
SUPER = 64  # weights per stored scale, activations per int16 scale
LEVEL = 16383  # the largest |T| and |xq|: eight products per lane stay below 2^31
MAX_ROWS = 16  # input rows up to which the int16 path runs (above: prefill, exact path)
GEMV_MAX_ROWS = 16

# The 16 NF4 levels as int16: T[q] = round(16383 NF4_CODE[q]), in [-16383, 16383].
INT16_CODE = torch.round(LEVEL * NF4_CODE.double()).to(torch.int16)


# ---------------------------------------------------------------------------------------------
# The switch
# ---------------------------------------------------------------------------------------------

_enabled = [False]


def set_enabled(on: bool) -> None:
    """Route no-grad CPU decoding through the int16 path (True) or keep the exact path (False)."""
    _enabled[0] = bool(on)


def enabled() -> bool:
    return _enabled[0]


# ---------------------------------------------------------------------------------------------
# Repacking
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Int16Weight:
    """A repacked NF4 weight [N, K]: codes uint8 [N/4 * K/32 * 64] (see nf4_int16.cpp's layout),
    scales float32 [N/4, K/64, 4]."""

    codes: Tensor
    scales: Tensor
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scales.numel() * 4


def repack_reason(q: NF4Weight) -> str | None:
    """Why q cannot be repacked (None: it can)."""
    if len(q.shape) != 2 or q.numel == 0:
        return f"shape {tuple(q.shape)} is not a non-empty 2-D weight"
    n, k = q.shape
    if n % ROWS or k % SUPER:
        return f"shape {(n, k)}: out_features must be a multiple of {ROWS}, in_features of {SUPER}"
    if q.blocksize % SUPER:
        return f"blocksize {q.blocksize} is not a multiple of {SUPER}"
    if q.device.type != "cpu":
        return f"the weight is on {q.device}"
    return None


def nibble_codes(q: NF4Weight) -> Tensor:
    """uint8 [N, K]: the 4-bit code of every weight, in element order."""
    packed = q.packed.view(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)  # [2 * bytes]
    return codes[: q.numel].view(q.shape)


def repack(q: NF4Weight) -> Int16Weight:
    """The interleaved layout of nf4_int16.cpp: byte 16r + p of block (g, j) holds row 4g+r's
    codes for k = 32j + p (low nibble) and 32j + 16 + p (high nibble)."""
    reason = repack_reason(q)
    if reason is not None:
        raise ValueError(f"cannot repack this NF4 weight: {reason}")
    n, k = q.shape
    g, j, s = n // ROWS, k // 32, k // SUPER
    codes = nibble_codes(q).view(g, ROWS, j, 2, 16)  # [g, r, j, half, p]
    byte = codes[:, :, :, 0, :] | (codes[:, :, :, 1, :] << 4)  # [g, r, j, p]
    packed = byte.permute(0, 2, 1, 3).contiguous().view(-1)  # [g, j, r, p]
    absmax = restore_absmax(q).double()  # [n_blocks]
    first = torch.arange(n * s, dtype=torch.int64) * SUPER  # flat index of each 64-block
    block_scale = absmax[first // q.blocksize].view(n, s)  # [N, S]
    if not torch.isfinite(block_scale).all():
        raise ValueError("cannot repack this NF4 weight: a block scale is not finite")
    scales = (block_scale / LEVEL).float()  # [N, S], one rounding (float64 -> float32)
    scales = scales.view(g, ROWS, s).permute(0, 2, 1).contiguous()  # [g, S, r]
    return Int16Weight(packed, scales, (n, k))


def unpack(w: Int16Weight) -> tuple[Tensor, Tensor]:
    """(codes uint8 [N, K], scales float32 [N, K/64]) back from the repacked layout."""
    n, k = w.shape
    g, j, s = n // ROWS, k // 32, k // SUPER
    byte = w.codes.view(g, j, ROWS, 16).permute(0, 2, 1, 3)  # [g, r, j, p]
    codes = torch.stack([byte & 0xF, byte >> 4], dim=3)  # [g, r, j, half, p]
    scales = w.scales.permute(0, 2, 1).reshape(n, s)
    return codes.reshape(n, k), scales


def element_order_bytes(w: Int16Weight) -> Tensor:
    """uint8 [N K / 2]: the NF4 bytes in element order (NF4Weight.packed) back from the repacked
    layout: element 2i in the high nibble of byte i, 2i + 1 in the low one."""
    k = default_kernel()
    if k is not None and w.codes.device.type == "cpu":
        return k.ops.nf4_bytes(w.codes, *w.shape)
    codes = unpack(w)[0].view(-1, 2)  # [N K / 2, 2]
    return (codes[:, 0] << 4) | codes[:, 1]


class RepackedNF4Weight(NF4Weight):
    """An NF4 weight stored only in the repacked layout (plus its own block scales): the int16
    path reads `repacked`; `packed`, what the exact path, dequantize_nf4 and `to` read, is
    rebuilt from it on each access (element_order_bytes), a temporary N K / 2 bytes."""

    def __init__(self, q: NF4Weight, w: Int16Weight):
        # NF4Weight's fields but `packed` (a property here)
        self.absmax, self.shape, self.dtype, self.blocksize = (
            q.absmax,
            q.shape,
            q.dtype,
            q.blocksize,
        )
        self.absmax_scale, self.absmax_offset = q.absmax_scale, q.absmax_offset
        self.repacked = w

    @property
    def packed(self) -> Tensor:
        return element_order_bytes(self.repacked)

    @property
    def device(self) -> torch.device:
        return self.repacked.codes.device

    @property
    def nbytes(self) -> int:
        tensors = (self.absmax, self.absmax_scale, self.absmax_offset)
        return self.repacked.nbytes + sum(
            t.numel() * t.element_size() for t in tensors if t is not None
        )


def serve_repacked(model: nn.Module) -> int:
    """Replace, one layer at a time, the weight of every NF4 linear in `model` that the int16
    path takes by a RepackedNF4Weight (its NF4 bytes are freed once nothing else holds them).
    For models that only decode: training reads `packed` on every step. Returns the count."""
    from .layers import NF4Linear  # layers imports this module
    from .loading import release_freed_memory

    count = 0
    for module in model.modules():
        if isinstance(module, NF4Linear) and not isinstance(module.qweight, RepackedNF4Weight):
            w = repacked(module.qweight)
            if w is not None:
                module.qweight = RepackedNF4Weight(module.qweight, w)
                count += 1
                # the freed bytes and repack's temporaries back to the OS now, not at the end:
                # glibc's heap would otherwise hold them (a peak of both layouts)
                release_freed_memory()
    return count


_repacked: dict[int, tuple[weakref.ref, Int16Weight | None]] = {}
_repack_lock = threading.Lock()


def repacked(q: NF4Weight) -> Int16Weight | None:
    """q's repacked copy, built on first use and kept while q lives; None if q cannot be."""
    if isinstance(q, RepackedNF4Weight):
        return q.repacked
    key = id(q)
    entry = _repacked.get(key)
    if entry is not None and entry[0]() is q:
        return entry[1]
    with _repack_lock:
        w = None if repack_reason(q) is not None else repack(q)
        _repacked[key] = (weakref.ref(q, lambda _, key=key: _repacked.pop(key, None)), w)
    return w


# ---------------------------------------------------------------------------------------------
# The reference: the kernel's arithmetic in PyTorch
# ---------------------------------------------------------------------------------------------


def quantize_activations(x: Tensor) -> tuple[Tensor, Tensor] | None:
    """(xq int16 [M, K], dx float32 [M, K/64]) for x [M, K], K % 64 == 0:

        amax_s = max_k |x_k|,  dx_s = amax_s / 16383,  xq_k = round_even(x_k * (16383 / amax_s))

    (a zero block: xq = 0, dx = 0). None where the kernel declines: x not finite, or a block
    with 0 < amax < 1e-30."""
    m, k = x.shape
    xb = x.float().view(m, k // SUPER, SUPER)  # [M, S, 64]
    amax = xb.abs().amax(-1)  # [M, S]
    if not torch.isfinite(amax).all() or ((amax > 0) & (amax < 1e-30)).any():
        return None
    inv = torch.where(amax > 0, torch.full_like(amax, float(LEVEL)) / amax, torch.zeros_like(amax))
    xq = torch.round(xb * inv[..., None]).clamp(-LEVEL, LEVEL).to(torch.int16)
    return xq.view(m, k), amax / LEVEL


def _fma32(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """fl32(a b + c) with one rounding, for float32 a, b, c (a b is exact in float64, and so is
    its sum with c in every case these sums meet, so float64 -> float32 is the one rounding)."""
    return (a.double() * b.double() + c.double()).float()


def lane_sums(codes: Tensor, xq: Tensor) -> Tensor:
    """D float64 [M, N, S, 8] (exact integers): lane c of block s of row n sums the eight
    products at k = 64s + 32h + 16i + 2c + t (h, i, t in {0, 1}), nf4_int16.cpp's D[s, c]."""
    n, k = codes.shape
    m, s = xq.shape[0], k // SUPER
    t = INT16_CODE.double()[codes.long()].view(n, s, 2, 2, 8, 2)  # [n, s, h, i, c, t]
    xd = xq.double().view(m, s, 2, 2, 8, 2)
    return torch.einsum("nshict,mshict->mnsc", t, xd)


def reference_matmul(x: Tensor, w: Int16Weight, bias: Tensor | None = None) -> Tensor | None:
    """y float32 [M, N] for x [M, K]: nf4_int16.cpp's int16_matmul, the same float32 operations
    in the same order (see its header); None where it declines (quantize_activations)."""
    quantized = quantize_activations(x)
    if quantized is None:
        return None
    xq, dx = quantized
    n, k = w.shape
    m, s = x.shape[0], k // SUPER
    codes, scales = unpack(w)  # [N, K], [N, S]
    lanes = lane_sums(codes, xq).float()  # [M, N, S, 8], rounded to nearest like cvtdq2ps
    f = scales[None] * dx[:, None, :]  # [M, N, S] float32
    acc = torch.zeros(m, n, 8)
    for ss in range(s):
        acc = _fma32(lanes[:, :, ss], f[:, :, ss, None], acc)
    a = acc.unbind(-1)
    y = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
    return y if bias is None else y + bias.float()


# ---------------------------------------------------------------------------------------------
# Building and loading
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Int16Kernel:
    ops: object  # its torch.ops namespace: int16_matmul, quantize_activations, gemv_bf16, isa
    isa: str  # "vnni", "avx2" or "scalar"
    bf16_dot: bool  # the GEMV uses AVX-512 BF16's vdpbf16ps
    load_seconds: float

    def matmul(self, x: Tensor, w: Int16Weight, bias: Tensor | None, bf16_out: bool) -> Tensor:
        """int16_matmul on contiguous float32/bfloat16 x [M, K]; 0 elements if it declines."""
        n = w.shape[0]
        return self.ops.int16_matmul(x, w.codes, w.scales, INT16_CODE, n, bias, bf16_out)


def extension_name(isa: str | None) -> str:
    """qlora_int16_<native|vnni|avx2|scalar>_<the exact kernel's CPU signature>."""
    return f"qlora_int16_{isa or 'native'}_{exact_kernel._cpu_signature()}"


def _compile(isa: str | None):
    name = extension_name(isa)
    cflags = ["-O3", "-march=native", "-ffp-contract=off", f"-DQLORA_NAMESPACE={name}"]
    if isa is not None:
        cflags.append(f"-DQLORA_ISA={ISAS[isa]}")
        if isa == "avx2":
            cflags.append("-mno-avx512f")
    openmp = [] if os.uname().sysname == "Darwin" else ["-fopenmp"]
    return exact_kernel.build_extension(name, SOURCE, cflags + openmp, openmp)


_loaded: dict[str | None, Int16Kernel | None] = {}


def _wrap(ops, isa: str, seconds: float) -> Int16Kernel:
    return Int16Kernel(ops, isa, bool(ops.bf16_dot()), seconds)


def load(isa: str | None = None) -> Int16Kernel | None:
    """The int16 kernel built for `isa` (None: the best path this CPU has), built on first call
    and kept; None, after one warning line, when it cannot be built."""
    return exact_kernel.load_build(
        isa, _loaded, _compile, _wrap,
        isas=ISAS, name="int16 kernel", env=ENV, fallback="decoding uses the exact kernel",
        logger=log,
    )  # fmt: skip


_default: list[Int16Kernel | None] = []


def default_kernel() -> Int16Kernel | None:
    """This process's int16 kernel: None with QLORA_INT16=0 or when the build failed."""
    if not _default:
        _default.append(exact_kernel.choose_build(ENV, ISAS, load, "never"))
    return _default[0]


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def applies(x: Tensor, q: NF4Weight) -> bool:
    """Whether the int16 path may take nf4 calls on x: switched on, CPU, float32/bfloat16 x
    without a gradient to carry, 1..MAX_ROWS rows."""
    if not _enabled[0] or q.device.type != "cpu" or x.device.type != "cpu":
        return False
    if x.dtype not in (torch.float32, torch.bfloat16) or x.shape[-1] != q.shape[-1]:
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    return 0 < x.numel() // max(x.shape[-1], 1) <= MAX_ROWS


def linear(
    x: Tensor, q: NF4Weight, bias: Tensor | None = None, kernel: Int16Kernel | None = None
) -> Tensor | None:
    """y = x W^T + b in float32 [..., out] by the int16 path, or None where it does not run (no
    kernel, a weight it cannot repack, activations it declines): the caller takes the exact
    path. `kernel`: a build from load(isa); None: the process's default."""
    k = kernel if kernel is not None else default_kernel()
    if k is None or x.dtype not in (torch.float32, torch.bfloat16) or x.shape[-1] != q.shape[1]:
        return None
    if x.numel() == 0 or x.device.type != "cpu":
        return None
    w = repacked(q)
    if w is None:
        return None
    if bias is not None and (bias.dtype not in (torch.float32, torch.bfloat16)):
        bias = bias.float()
    x2 = x.reshape(-1, q.shape[1]).contiguous()  # [M, K]
    y = k.matmul(x2, w, None if bias is None else bias.contiguous(), False)
    if y.numel() != x2.shape[0] * q.shape[0]:
        return None
    return y.view(*x.shape[:-1], q.shape[0])


def gemv(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor | None:
    """y = x weight^T (+ bias) in bfloat16 for bfloat16 x [..., K] with 1..GEMV_MAX_ROWS rows
    and a bfloat16 weight [N, K] on CPU; None where it does not apply (then: F.linear)."""
    k = default_kernel()
    rows = x.numel() // max(x.shape[-1], 1)
    if (
        k is None
        or not 0 < rows <= GEMV_MAX_ROWS
        or x.dtype != torch.bfloat16
        or weight.dtype != torch.bfloat16
        or x.device.type != "cpu"
        or weight.device.type != "cpu"
        or not weight.is_contiguous()
        or weight.dim() != 2
        or x.shape[-1] != weight.shape[1]
        or (bias is not None and bias.dtype not in (torch.float32, torch.bfloat16))
    ):
        return None
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = k.ops.gemv_bf16(x2, weight, None if bias is None else bias.contiguous(), True)
    return y.view(*x.shape[:-1], weight.shape[0])


class GemvLinear(nn.Linear):
    """nn.Linear whose no-grad CPU calls with a bfloat16 weight and 1..GEMV_MAX_ROWS rows run
    `gemv` while the int16 path is switched on; F.linear otherwise. from_linear shares the
    original's parameters (tied embeddings stay tied; state_dict keys are unchanged)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> GemvLinear:
        layer = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    def forward(self, x: Tensor) -> Tensor:
        if _enabled[0] and not (
            torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        ):
            y = gemv(x, self.weight, self.bias)
            if y is not None:
                return y
        return F.linear(x, self.weight, self.bias)


def use_gemv_head(model: nn.Module) -> bool:
    """Replace model's output layer (get_output_embeddings) by a GemvLinear sharing its
    parameters; False if it has none or it is not a plain nn.Linear."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return isinstance(head, GemvLinear)
    model.set_output_embeddings(GemvLinear.from_linear(head))
    return True
