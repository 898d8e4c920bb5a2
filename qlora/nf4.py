"""NF4: 4-bit NormalFloat block quantization, double quantized (Dettmers et al., QLoRA, 2023).

A weight W with n elements is stored as (blocksize B = 64):

    1. flatten W and cut it into blocks of B values; the last block may be shorter
    2. absmax_b = max_i |W_bi|                                    one float32 per block
    3. q_bi = argmin_k |W_bi / absmax_b - NF4_CODE[k]|            a 4-bit index; a value exactly
                                                                  on a midpoint takes the lower k
    4. byte = q_0 << 4 | q_1                                      two indices per byte, first high

    dequantize:  W_bi ~= NF4_CODE[q_bi] * absmax_b

Double quantization (QLoRA section 3) stores the absmax themselves in 8 bits:

    c   = mean_b(absmax_b)                                  absmax_offset, one float32
    s_j = max_{b in block j} |absmax_b - c|                 absmax_scale, float32; blocks of 256
    a_b = nearest index of (absmax_b - c)/s_j in DYNAMIC_CODE   uint8
    restore:  absmax_b ~= DYNAMIC_CODE[a_b] * s_j + c

Stored bits per parameter: 4 + 32/B = 4.5 without, 4 + 8/B + 32/(256 B) ~= 4.127 with double quant.

Every step copies the floating-point operations of bitsandbytes' CPU path (scaling by a reciprocal,
rounding of the 8-bit code), so our bytes equal bitsandbytes' bytes; tests/test_nf4.py checks it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

# The 16 NF4 values, bitsandbytes' table (index 0 = -1, 7 = 0, 15 = 1); `create_normal_map` derives
# them from N(0, 1) quantiles and tests/test_nf4.py checks this table against the derivation.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the ones bitsandbytes accepts
ABSMAX_BLOCKSIZE = 256  # double quantization groups the absmax in blocks of 256 (QLoRA, bnb)
_GRID = 65536  # bnb's CPU 8-bit quantizer rounds onto a 16-bit grid first (see _dynamic_lut)


def create_normal_map(offset: float = 0.9677083) -> Tensor:
    """NF4_CODE from first principles: equal-probability quantiles of N(0, 1), scaled to [-1, 1].

    With Phi^-1 the normal quantile function (bitsandbytes' `create_normal_map`, use_extra_value):
        positive = Phi^-1(p) for 8 points p evenly spaced from `offset` down to 0.5 (0.5 excluded)
        negative = -Phi^-1(p) for 7 points evenly spaced from `offset` down to 0.5 (0.5 excluded)
        code = sort(negative + [0] + positive) / max
    8 positive and 7 negative values plus an exact zero fill 16 slots. offset = 1 - (1/30 + 1/32)/2
    (QLoRA, appendix) stands in for p = 1, whose quantile is infinite. Returns float32 [16].
    """
    # float32 evaluation points, as bnb builds them with torch.linspace before calling scipy
    p_pos = torch.linspace(offset, 0.5, 9)[:-1].double()  # [8]
    p_neg = torch.linspace(offset, 0.5, 8)[:-1].double()  # [7]
    values = torch.cat(
        [
            torch.special.ndtri(p_pos),
            torch.zeros(1, dtype=torch.float64),
            -torch.special.ndtri(p_neg),
        ]
    ).float()
    values = values.sort().values
    return values / values.max()


def create_dynamic_map(
    signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8
) -> Tensor:
    """bitsandbytes' 8-bit dynamic code (Dettmers 2016, arXiv:1511.04561), written out.

    For exponent e = 0 .. max_exponent_bits-1 the code holds the midpoints of a linear grid on
    [0.1, 1] with 2^e (signed) intervals, scaled by 10^(e - max_exponent_bits + 1); small
    exponents get few values, large ones many. Signed adds each value's negative; 0 and 1 close
    the table. Signed default: sum_e 2 * 2^e + 2 = 256 sorted float32 values in [-0.993, 1].
    """
    non_sign_bits = total_bits - 1
    values = []
    for e in range(max_exponent_bits):
        n_intervals = 2 ** (e + non_sign_bits - max_exponent_bits + (0 if signed else 1))
        bounds = torch.linspace(0.1, 1, n_intervals + 1, dtype=torch.float32)
        mids = (bounds[:-1] + bounds[1:]) / 2.0
        scaled = (10 ** (-(max_exponent_bits - 1) + e)) * mids  # float32, as bnb computes it
        values += scaled.tolist() + ((-scaled).tolist() if signed else [])
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1  # 0 for the default 7 exponent bits
    if extra > 0:
        bounds = torch.linspace(0.1, 1, extra + 1, dtype=torch.float32)
        mids = (bounds[:-1] + bounds[1:]) / 2.0
        values += mids.tolist() + ((-mids).tolist() if signed else [])  # at 10^0, the top exponent
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


@dataclass
class NF4Weight:
    """A quantized weight: everything `dequantize_nf4` needs, nothing else."""

    packed: Tensor  # uint8 [ceil(n/2)], two 4-bit codes per byte, the first in the high nibble
    absmax: Tensor  # float32 [n_blocks]; uint8 [n_blocks] with double quant
    shape: torch.Size
    dtype: torch.dtype  # the original weight's dtype, what dequantize_nf4 returns
    blocksize: int = 64
    absmax_scale: Tensor | None = None  # float32 [ceil(n_blocks/256)], double quant only
    absmax_offset: Tensor | None = None  # float32 [], the mean subtracted before double quant

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def n_blocks(self) -> int:
        return self.absmax.numel()

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: codes + absmax (+ scales and offset). The two code tables are
        shared constants, not per-weight storage."""
        tensors = (self.packed, self.absmax, self.absmax_scale, self.absmax_offset)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to(self, device: torch.device | str) -> NF4Weight:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return NF4Weight(
            move(self.packed),
            move(self.absmax),
            self.shape,
            self.dtype,
            self.blocksize,
            move(self.absmax_scale),
            move(self.absmax_offset),
        )


# ---------------------------------------------------------------------------------------------
# Quantize
# ---------------------------------------------------------------------------------------------


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize!r} is not supported; use one of {BLOCKSIZES}")


def _scale_by_block_absmax(flat: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """absmax per block [n_blocks] and flat / absmax in [-1, 1] [n], both float32.

    Copies bnb's arithmetic: full blocks are multiplied by 1/absmax (absmax clamped at 1e-38 so
    an all-zero block gives 0, stored absmax 0), the partial last block is divided by its own
    absmax clamped at 1e-38 (and that clamped value is what bnb stores).
    """
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # [n_full, blocksize]
    absmax = blocks.abs().max(dim=-1)[0]  # [n_full]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).view(-1)
    if full < n:
        tail_absmax = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_absmax, -1, 1)])
    return absmax, scaled


@functools.cache
@torch.inference_mode(False)  # a table first built under inference_mode must serve outside it too
def _nf4_midpoints(device: torch.device) -> Tensor:
    code = NF4_CODE.to(device)
    return (code[:-1] + code[1:]) / 2  # float32 [15], the decision boundaries


def quantize_nf4(weight: Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a float tensor to NF4 (module docstring, steps 1-4), optionally double quantized.

    Example: a block [0.5, -1.0, 0.0, 0.25] has absmax 1.0 and codes [12, 0, 7, 10]
    (0.5 is nearest 0.4407, 0.25 nearest 0.2461), packed as bytes [0xC0, 0x7A].
    """
    _check_blocksize(blocksize)
    if not weight.is_floating_point() or weight.numel() == 0:
        raise ValueError(
            f"quantize_nf4 needs a non-empty float tensor, got dtype={weight.dtype} "
            f"shape={tuple(weight.shape)}; pass a Linear layer's weight"
        )
    flat = weight.detach().reshape(-1).float()  # [n]
    absmax, scaled = _scale_by_block_absmax(flat, blocksize)  # [n_blocks], [n]
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # the pad value 0.0 is code 7, as bnb
    # bucketize(right=False) gives the number of midpoints strictly below x: the nearest code,
    # and the lower one for x exactly on a midpoint
    codes = torch.bucketize(scaled, _nf4_midpoints(flat.device), out_int32=True).to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]  # uint8 [ceil(n/2)]
    q = NF4Weight(packed, absmax, weight.shape, weight.dtype, blocksize)
    if double_quant:
        q.absmax_offset = absmax.mean()
        q.absmax, q.absmax_scale = quantize_dynamic_8bit(absmax - q.absmax_offset)
    return q


@functools.cache
@torch.inference_mode(False)  # a table first built under inference_mode must serve outside it too
def _dynamic_code(device: torch.device) -> Tensor:
    return create_dynamic_map().to(device)  # float32 [256]


@functools.cache
@torch.inference_mode(False)  # a table first built under inference_mode must serve outside it too
def _dynamic_lut(device: torch.device) -> Tensor:
    """uint8 [65536]: grid point g_i = -1 + 2i/65535 -> index of the nearest DYNAMIC_CODE value.

    bitsandbytes' CPU 8-bit quantizer does not search the code for every value: it rounds x in
    [-1, 1] to the grid index i = trunc(((x + 1) * 0.5) * 65535 + 0.5) and looks up this table,
    built as lut[i] = #{midpoints of the code < g_i}. Byte equality needs the same two steps.
    """
    code = _dynamic_code(device)
    midpoints = 0.5 * (code[:-1] + code[1:])  # [255]
    grid = -1.0 + (2.0 * torch.arange(_GRID, dtype=torch.float32, device=device)) / (_GRID - 1)
    return torch.searchsorted(midpoints, grid).to(torch.uint8)


def quantize_dynamic_8bit(x: Tensor, blocksize: int = ABSMAX_BLOCKSIZE) -> tuple[Tensor, Tensor]:
    """Blockwise 8-bit quantization of a float32 vector with the dynamic code.

    Per block j: s_j = max |x_i|, a_i = lut[trunc(((clamp(x_i * (1/s_j), -1, 1) + 1) * 0.5)
    * 65535 + 0.5)] (see _dynamic_lut); an all-zero block stores s_j = 0, a_i = 0.
    Returns (a: uint8 [n], s: float32 [ceil(n/blocksize)]).
    """
    n = x.numel()
    n_blocks = -(-n // blocksize)
    # zero padding changes no block's max and its codes are cut off below
    blocks = torch.nn.functional.pad(x.reshape(-1), (0, n_blocks * blocksize - n))
    blocks = blocks.view(n_blocks, blocksize)
    scale = blocks.abs().amax(dim=1)  # [n_blocks]
    inverse = 1.0 / scale
    inverse[scale == 0] = 0.0  # an all-zero block: 0 * inf would be NaN, an invalid grid index
    normed = torch.clamp(blocks * inverse.view(-1, 1), -1.0, 1.0)
    grid_index = (((normed + 1.0) * 0.5) * (_GRID - 1) + 0.5).to(torch.int32)  # trunc, as C's cast
    codes = _dynamic_lut(x.device)[grid_index]
    codes[scale == 0] = 0  # bnb writes index 0 for an all-zero block
    return codes.view(-1)[:n], scale


# ---------------------------------------------------------------------------------------------
# Dequantize
# ---------------------------------------------------------------------------------------------


def restore_absmax(q: NF4Weight) -> Tensor:
    """float32 [n_blocks]: absmax_b, or DYNAMIC_CODE[a_b] * s_j + c with double quant."""
    if not q.double_quant:
        return q.absmax
    n = q.n_blocks
    values = _dynamic_code(q.device).index_select(0, q.absmax.int())  # [n_blocks]
    if n % ABSMAX_BLOCKSIZE:  # pad the partial last group so every group is one row
        values = torch.nn.functional.pad(values, (0, (-n) % ABSMAX_BLOCKSIZE))
    values = values.view(-1, ABSMAX_BLOCKSIZE)  # [n_groups, 256]
    return (values * q.absmax_scale.view(-1, 1)).view(-1)[:n] + q.absmax_offset


@functools.cache
@torch.inference_mode(False)  # a table first built under inference_mode must serve outside it too
def _byte_lut(device: torch.device) -> Tensor:
    """int64 [256]: byte -> its two NF4 values (high nibble's first) as one 8-byte word.

    One 8-byte copy per byte decodes both nibbles: roughly twice as fast as gathering rows of a
    float32 [256, 2] table, and no shift/mask pass over the codes is needed.
    """
    byte = torch.arange(256)
    pairs = torch.stack([NF4_CODE[byte >> 4], NF4_CODE[byte & 0xF]], dim=1)  # float32 [256, 2]
    return pairs.contiguous().view(torch.int64).view(256).to(device)


def dequantize_into(q: NF4Weight, index: Tensor, out: Tensor) -> Tensor:
    """Decode q into caller-owned scratch and return the float32 weight, a view of `out`.

    index: int32 [>= len(packed)]; out: int64 [>= n_blocks * blocksize / 2]. Reusing them saves
    the page faults of fresh buffers, which cost as much as the decoding itself on CPU.
    """
    n_bytes = q.packed.numel()
    padded = q.n_blocks * q.blocksize  # >= n: the partial last block is padded to a full one
    idx = index[:n_bytes]
    idx.copy_(q.packed)  # uint8 -> int32: index_select wants int32/int64 indices
    words = out[: padded // 2]
    torch.index_select(_byte_lut(q.device), 0, idx, out=words[:n_bytes])
    values = words.view(torch.float32).view(q.n_blocks, q.blocksize)  # [n_blocks, blocksize]
    values.mul_(restore_absmax(q).view(-1, 1))  # pad values are never read
    return values.view(-1)[: q.numel].view(q.shape)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> Tensor:
    """W ~= NF4_CODE[q] * absmax per block, shape q.shape, dtype q.dtype unless given.

    Products are formed in float32 and then cast, as bitsandbytes does: for float32 the result
    equals `bitsandbytes.functional.dequantize_4bit` bit for bit.
    """
    index = torch.empty(q.packed.numel(), dtype=torch.int32, device=q.device)
    out = torch.empty(q.n_blocks * q.blocksize // 2, dtype=torch.int64, device=q.device)
    weight = dequantize_into(q, index, out)
    target = q.dtype if dtype is None else dtype
    return weight if target == torch.float32 else weight.to(target)
