"""The two layers of QLoRA: a frozen 4-bit linear layer and a LoRA adapter around any linear layer.

    NF4Linear:   y = x W^T + b,   W = dequantize_nf4(qweight), never stored: on CPU without a
                 gradient to x, kernel.nf4_linear (the fused NF4 kernel for few rows, decode +
                 GEMM for many); otherwise decoded on every call (in backward again)
    LoRALinear:  y = base(x) + s * B A dropout(x),   A [r, in], B [out, r],
                 s = alpha / r (LoRA, Hu et al. 2021)
                   or alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023);
                 decoding on CPU over an NF4 base: base and update in one kernel call

Only A and B train. B starts at zero, so a fresh adapter leaves the base model's output unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import int16_decode, kernel
from .nf4 import NF4Weight, dequantize_nf4


class _NF4LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W decoded in forward and decoded again in backward (the QLoRA way).

    Nothing weight-sized is saved for backward: autograd keeps only the 4-bit codes it already
    has. grad_x = grad_y W; W itself never gets a gradient. kernel.decode gives W bit for bit
    as dequantize_nf4 (SIMD on CPU when the kernel is built), into a reused per-thread buffer.
    """

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, layer: NF4Linear) -> Tensor:
        ctx.layer = layer
        weight = kernel.decode(layer.qweight, x.dtype)  # [out, in]
        return nn.functional.linear(x, weight, bias)  # [..., out]

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = kernel.decode(ctx.layer.qweight, grad_y.dtype)  # [out, in]
            grad_x = grad_y @ weight  # [..., in]
        if ctx.needs_input_grad[1]:  # only if someone unfreezes the bias
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, grad_bias, None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4: y = x W^T + b, W = dequantize(qweight).

    x is cast to `compute_dtype` (float32 on CPU; bfloat16 for a bf16 model or on GPU), and the
    output cast back to the input's dtype. Two paths, the same W:

        no gradient to x, on CPU   kernel.nf4_linear: for <= kernel.FUSED_MAX_ROWS input rows
                                   the fused kernel, y = fl32(sum_k x_k W_nk) + b rounded once
                                   to compute_dtype; for more rows F.linear(x, W, b). With
                                   int16_decode switched on, its int16 path where it applies
        otherwise (training, CUDA) _NF4LinearFunction: F.linear(x, W, b), W decoded again in
                                   backward; grad_x = grad_y W

    `qweight` is plain storage, not a parameter or a buffer: `model.to(dtype)` must never cast
    quantized bytes or the float32 block scales.
    """

    def __init__(self, qweight: NF4Weight, bias: Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        if len(qweight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D [out, in] weight, got shape {qweight.shape}")
        self.qweight = qweight
        self.out_features, self.in_features = qweight.shape
        self.compute_dtype = compute_dtype
        if bias is not None:
            bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        self.bias = bias

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = torch.float32,
    ) -> NF4Linear:
        """Quantize `linear.weight` (compute_dtype None: keep the weight's own dtype) with
        kernel.quantize: nf4.quantize_nf4's bytes, in one pass per block on CPU."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        qweight = kernel.quantize(linear.weight, blocksize=blocksize, double_quant=double_quant)
        return cls(qweight, linear.bias, compute_dtype or linear.weight.dtype)

    def compute_bias(self) -> Tensor | None:
        """The bias in compute_dtype (None without one)."""
        bias = self.bias
        if bias is not None and bias.dtype != self.compute_dtype:
            bias = bias.to(self.compute_dtype)
        return bias

    def forward(self, x: Tensor) -> Tensor:
        bias = self.compute_bias()
        xc = x.to(self.compute_dtype)
        if self.qweight.device.type == "cpu" and not (torch.is_grad_enabled() and xc.requires_grad):
            y = None
            if int16_decode.applies(xc, self.qweight):  # float32, or None: the exact path
                y = int16_decode.linear(xc, self.qweight, bias)
            if y is None:
                y = kernel.nf4_linear(xc, self.qweight, bias)
        else:
            y = _NF4LinearFunction.apply(xc, bias, self)
        return y.to(x.dtype)

    def dequantize(self) -> Tensor:
        """The weight as a fresh float tensor in its original dtype, [out, in]."""
        return dequantize_nf4(self.qweight)

    def _apply(self, fn, recurse=True):
        # Module.to / .cuda / .half funnel through here: follow device moves only. Applying fn to
        # an empty uint8 tensor reveals the target device and, being an integer, never the dtype.
        device = fn(torch.empty(0, dtype=torch.uint8, device=self.qweight.device)).device
        if device != self.qweight.device:
            self.qweight = self.qweight.to(device)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        q = self.qweight
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, blocksize={q.blocksize}, "
            f"double_quant={q.double_quant}, compute_dtype={self.compute_dtype}"
        )


class _LoRAFunction(torch.autograd.Function):
    """u = s * (d(x) A^T) B^T with d(x) = dropout(float32(x)); only A and B get gradients.

    Saved for backward: x itself, in its own dtype (q_proj, k_proj, v_proj and fc1 read the same
    x, so it is kept once for all four), the dropout mask as bool, and h = d(x) A^T [..., r].
    Autograd through nn.Dropout and nn.Linear would keep a float32 copy of x per adapter (and the
    dropout output besides): for Phi-2 that is ~60% of a training forward's memory outside
    attention and the MLP. d(x) is rebuilt from x and the mask in backward:

        g = s * grad_u                 grad_B = g^T h          grad_h = g B
        grad_A = grad_h^T d(x)         grad_x = d'(grad_h A)   (d': the same mask and 1/(1-p))
    """

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, b: Tensor, scaling: float, p: float) -> Tensor:
        dx = x.to(a.dtype)  # [..., in], float32
        mask = None
        if p > 0:
            dx, mask = torch.native_dropout(dx, p, True)
        h = dx @ a.t()  # [..., r]
        ctx.save_for_backward(x, mask, h, a, b)
        ctx.scaling, ctx.p = scaling, p
        return (h @ b.t()) * scaling  # [..., out], float32

    @staticmethod
    def backward(ctx, grad_u: Tensor):
        x, mask, h, a, b = ctx.saved_tensors
        g = (grad_u * ctx.scaling).reshape(-1, grad_u.shape[-1])  # [n, out]
        h2 = h.reshape(-1, h.shape[-1])  # [n, r]
        grad_h = g @ b  # [n, r]
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = g.t() @ h2  # [out, r]
        if ctx.needs_input_grad[1]:
            dx = _dropped(x.to(a.dtype), mask, ctx.p).reshape(-1, a.shape[1])  # [n, in]
            grad_a = grad_h.t() @ dx  # [r, in]
        if ctx.needs_input_grad[0]:
            grad_x = _dropped((grad_h @ a).reshape(x.shape), mask, ctx.p).to(x.dtype)  # [..., in]
        return grad_x, grad_a, grad_b, None, None


def _dropped(t: Tensor, mask: Tensor | None, p: float) -> Tensor:
    """t * mask / (1 - p), as native_dropout scales the kept values; t itself when p == 0."""
    return t if mask is None else t * mask * (1.0 / (1.0 - p))


class LoRALinear(nn.Module):
    """y = base(x) + scaling * lora_B(lora_A(dropout(x))), base frozen (nn.Linear or NF4Linear).

    lora_A: nn.Linear(in, r), Kaiming-uniform with a = sqrt(5) (peft's init); lora_B: nn.Linear
    (r, out), zeros. Both are float32 whatever the base's dtype (peft's default too): the input
    is cast to float32 for the adapter path and the sum cast back to the base output's dtype.
    The attribute names are peft's, so `<path>.lora_A.weight` is the key peft saves and loads.
    `disabled = True` (see adapters_disabled) returns base(x) exactly. `rows` (see adapter_rows)
    limits the update to some rows of the batch: y[b] = base(x)[b] + s B A x[b] for b in rows,
    base(x)[b] exactly for every other b, so one batch can hold the base and the tuned model.
    """

    def __init__(
        self,
        base: nn.Linear | NF4Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ):
        super().__init__()
        if not isinstance(base, (nn.Linear, NF4Linear)):
            raise TypeError(f"LoRALinear wraps nn.Linear or NF4Linear, got {type(base).__name__}")
        if not (isinstance(r, int) and r > 0):
            raise ValueError(f"LoRA rank r={r!r} must be a positive int (QLoRA uses 8 to 64)")
        if not alpha > 0:
            raise ValueError(f"lora alpha={alpha!r} must be > 0 (a common choice is 2 * r)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora dropout={dropout!r} must be in [0, 1)")
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        # rsLoRA: alpha / sqrt(r) keeps the update's scale stable as r grows
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.qweight.device if isinstance(base, NF4Linear) else base.weight.device
        kwargs = dict(bias=False, device=device, dtype=torch.float32)
        self.lora_A = nn.Linear(base.in_features, r, **kwargs)
        self.lora_B = nn.Linear(r, base.out_features, **kwargs)
        self.disabled = False
        self.rows: Tensor | None = None  # int64 [k] batch rows that get the update; None: all
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def dropout(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def update(self, x: Tensor) -> Tensor:
        """s * B A dropout(x), in the adapter's float32: [..., in] -> [..., out]."""
        a, b = self.lora_A.weight, self.lora_B.weight
        if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad):
            p = self.dropout if self.training else 0.0
            return _LoRAFunction.apply(x, a, b, self.scaling, p)
        h = self.lora_A(self.lora_dropout(x.to(a.dtype)))  # [..., r]
        return self.lora_B(h) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        if self.disabled:
            return self.base(x)
        fused = self._fused_decode(x)
        if fused is not None:
            return fused
        y = self.base(x)  # [..., out]
        if self.rows is None:
            return y + self.update(x).to(y.dtype)
        # y[rows] + update(x[rows]): the same single addition as above, for those rows only,
        # copied back in place of those rows (index_copy is a memcpy; index_add's scatter-add of
        # a 16-bit tensor on CPU took longer than the NF4 matmul itself)
        rows = self.rows
        update = self.update(x.index_select(0, rows)).to(y.dtype)
        return y.index_copy(0, rows, y.index_select(0, rows) + update)

    def _fused_decode(self, x: Tensor) -> Tensor | None:
        """Decoding on CPU (no gradient, no dropout, few rows, an NF4 base): base and update in
        one call of the NF4 kernel, kernel.nf4_linear(x, W, b, lora=...), added in float32 before
        the one rounding to the output dtype (with int16_decode switched on: the int16 base, then
        the update); None where that path does not apply."""
        base, a, b = self.base, self.lora_A.weight, self.lora_B.weight
        if not isinstance(base, NF4Linear) or (self.training and self.dropout > 0):
            return None
        if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad):
            return None
        xc = x.to(base.compute_dtype)
        if int16_decode.applies(xc, base.qweight):
            y = int16_decode.linear(xc, base.qweight, base.compute_bias())  # float32 [..., out]
            if y is not None:  # + s B A x on self.rows (all rows: None), in float32
                xs = xc if self.rows is None else xc.index_select(0, self.rows)
                u = self.lora_B(self.lora_A(xs.to(a.dtype))) * self.scaling
                y = y + u if self.rows is None else y.index_add_(0, self.rows, u)
                return y.to(x.dtype)
        lora = kernel.LoraUpdate(a, b, self.scaling, self.rows)
        if not kernel.lora_fusable(xc, base.qweight, lora):
            return None
        return kernel.nf4_linear(xc, base.qweight, base.compute_bias(), lora).to(x.dtype)

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """W + scaling * B A in float32, [out, in] (the base weight dequantized if NF4)."""
        if isinstance(self.base, NF4Linear):
            weight = dequantize_nf4(self.base.qweight, torch.float32)
        else:
            weight = self.base.weight.to(torch.float32, copy=True)
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()  # [out, in]
        return weight.add_(delta.mul_(self.scaling))  # W + s * (B A), in place: one fp32 copy

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, disabled={self.disabled}"
