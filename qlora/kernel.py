"""The NF4 CPU kernel (csrc/nf4_cpu.cpp): a fused matmul for few input rows, a fast dequantize.

    nf4_linear(x, q, bias)   y = x W^T + b in x.dtype: fused_matmul for at most FUSED_MAX_ROWS
                             input rows, decode + torch's GEMM above (prefill, training);
                             lora=LoraUpdate(A, B, s, rows) adds s B A x inside the fused call
    fused_matmul(x, q)       y = x W^T in float32; W is decoded block by block inside the dot
                             products and never written to memory (decoding, small batches)
    dequantize(q, dtype)     W = NF4_CODE[q] * absmax, bit for bit nf4.dequantize_nf4
    decode(q, dtype)         the same, into a reused per-thread buffer
    quantize(weight)         nf4.quantize_nf4(weight), bit for bit, in one pass per block
                             (the streaming loader quantizes Phi-2 with it)

The extension is compiled on first use (never at import) by torch.utils.cpp_extension for the
machine it runs on (-march=native: the CPU's flags are hashed into its name, so a cache shared
across CPUs never loads a foreign binary) and cached in TORCH_EXTENSIONS_DIR (default
~/.cache/torch_extensions). If it cannot be built, one warning line says why and everything runs
the pure-PyTorch path of nf4.py, with the same results (bit for bit for dequantize).
Environment, read once per process: QLORA_KERNEL=0 forces the pure-PyTorch path;
QLORA_KERNEL=avx512|avx2|scalar forces one code path (tests call load(isa) instead).

The fused result is within float32 rounding of F.linear(x.float(), dequantize_nf4(q)): the same
weights, summed in another order (tests/test_kernel.py gives the bound). Each output row is
computed from its own input row in an order fixed by the weight's shape, so a row gets the same
bits alone, in a batch, and on any number of threads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from .nf4 import (
    ABSMAX_BLOCKSIZE,
    NF4_CODE,
    NF4Weight,
    _check_blocksize,
    _dynamic_code,
    _nf4_midpoints,
    dequantize_into,
    quantize_dynamic_8bit,
    quantize_nf4,
)

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "nf4_cpu.cpp"
ISAS = {"avx512": 3, "avx2": 2, "scalar": 0}  # name -> QLORA_ISA in the C++ source
ENV = "QLORA_KERNEL"
KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what the C++ code reads and writes

# Input rows up to which nf4_linear runs the fused kernel; above, decode + torch's GEMM is
# faster. `make bench` measures the crossover at Phi-2's three shapes (bench/kernel_speed.py,
# `switch` in bench/results.md).
FUSED_MAX_ROWS = 16


# ---------------------------------------------------------------------------------------------
# Building and loading
# ---------------------------------------------------------------------------------------------


def _cpu_signature() -> str:
    """A short hash of what a -march=native binary depends on: the CPU's model and feature
    flags, and the torch and Python it links against."""
    text = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features", "CPU part")):
                text += line + "\n"
            if line.startswith(("flags", "Features")):
                break  # the first processor's lines are enough
    except OSError:
        pass
    text += f"{platform.machine()} {platform.processor()} {torch.__version__} {sys.version}"
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def extension_name(isa: str | None) -> str:
    """qlora_nf4_<native|avx512|avx2|scalar>_<_cpu_signature()>."""
    return f"qlora_nf4_{isa or 'native'}_{_cpu_signature()}"


def _build_flags(isa: str | None, name: str) -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for one build of SOURCE."""
    cflags = ["-O3", "-march=native", "-ffp-contract=off", f"-DQLORA_NAMESPACE={name}"]
    if isa is not None:
        cflags.append(f"-DQLORA_ISA={ISAS[isa]}")
        if isa == "avx2":
            cflags.append("-mno-avx512f")  # the AVX2 path must not lean on AVX-512 encodings
    # at::parallel_for is a header template: without -fopenmp it compiles to a serial loop. The
    # extension then shares torch's libgomp (same soname, already loaded), so it follows
    # torch.set_num_threads. macOS' clang has no -fopenmp: serial there.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    return cflags + openmp, openmp


class _HoldLogs(logging.Filter):
    """Holds back cpp_extension's log lines during a build (its compiler checks warn about an
    unusual CXX), so that a failure is reported in one line, not several."""

    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; the pip package installs it into the venv's bin,
    which is not on PATH when the venv's python is called directly (as `make test` does)."""
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), bin_dir])


# A build holds its directory's `lock` file for the length of one compile; the file carries no
# owner, so its age is the sign that the build holding it was killed.
STALE_LOCK_SECONDS = 600


def clear_stale_lock(build_dir: str | Path) -> bool:
    """Remove `build_dir`/lock, with one warning line, when it is older than STALE_LOCK_SECONDS:
    cpp_extension waits on that file without end, and a killed build leaves it behind.
    Returns whether a lock was removed."""
    lock = Path(build_dir) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_LOCK_SECONDS:
        return False
    log.warning(
        "qlora.kernel: removing the build lock %s, left %.0f min ago by a build that did not "
        "finish",
        lock,
        age / 60,
    )
    lock.unlink(missing_ok=True)
    return True


def build_extension(name: str, source: Path, cflags: list[str], ldflags: list[str]):
    """Build (or reuse the cached build of) the TORCH_LIBRARY extension `name` from `source`,
    clearing a stale build lock first; return its torch.ops namespace."""
    from torch.utils import cpp_extension

    _ninja_on_path()
    clear_stale_lock(cpp_extension._get_build_directory(name, verbose=False))
    hold = _HoldLogs()
    cpp_logger = logging.getLogger(cpp_extension.__name__)
    cpp_logger.addFilter(hold)
    try:
        cpp_extension.load(
            name=name,
            sources=[str(source)],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            is_python_module=False,  # the ops register with torch.ops (TORCH_LIBRARY): no pybind
            verbose=False,
        )
    finally:
        cpp_logger.removeFilter(hold)
    return getattr(torch.ops, name)


def _compile(isa: str | None):
    """Build (or reuse the cached build of) the extension; return its torch.ops namespace."""
    name = extension_name(isa)
    return build_extension(name, SOURCE, *_build_flags(isa, name))


@dataclass(frozen=True)
class LoraUpdate:
    """A LoRA update for the fused kernel: u = scaling * B (A x), on the batch items `rows`
    (int64 indices into dim 0 of x; None: all of them)."""

    a: Tensor  # [r, in] float32, contiguous
    b: Tensor  # [out, r] float32, contiguous
    scaling: float
    rows: Tensor | None = None


@dataclass(frozen=True)
class Kernel:
    """One loaded build. `matmul` and `dequantize_flat` call its ops with no checks: use the
    module's functions, which check and fall back."""

    ops: object  # its torch.ops namespace: matmul, dequantize, isa, group_size
    isa: str  # the code path compiled: "avx512", "avx2" or "scalar"
    group_size: int  # in_features that run the SIMD row kernel are multiples of it (0: none)
    load_seconds: float  # compile + load on a cold cache, load only on a warm one

    def matmul(
        self,
        x: Tensor,
        q: NF4Weight,
        bias: Tensor | None = None,
        bf16_out: bool = False,
        lora: LoraUpdate | None = None,
        span: int = 1,
    ) -> Tensor:
        """[M, out] = x W^T (+ bias, added in float32) (+ the LoRA update, see nf4_linear) for a
        contiguous float32/bfloat16 x [M, in] with in even: float32, or rounded once to
        bfloat16 if bf16_out. `span`: input rows per batch item, for lora.rows."""
        args = _scale_args(q)
        if lora is None:
            return self.ops.matmul(x, q.packed, *args, q.shape[0], q.blocksize, bias, bf16_out)
        return self.ops.matmul(
            x, q.packed, *args, q.shape[0], q.blocksize, bias, bf16_out,
            lora.a, lora.b, lora.scaling, lora.rows, span,
        )  # fmt: skip

    def dequantize_flat(self, q: NF4Weight, out: Tensor) -> None:
        """Decode q into out, a contiguous float32/bfloat16 tensor of exactly q.numel elements."""
        self.ops.dequantize(q.packed, *_scale_args(q), q.blocksize, out)

    def quantize_blocks(self, flat: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
        """(packed uint8 [n/2], absmax float32 [n/blocksize]) of a contiguous float32/bfloat16
        flat [n], n a multiple of blocksize."""
        packed = torch.empty(flat.numel() // 2, dtype=torch.uint8)
        absmax = torch.empty(flat.numel() // blocksize, dtype=torch.float32)
        self.ops.quantize(flat, _nf4_midpoints(flat.device), blocksize, packed, absmax)
        return packed, absmax


def _scale_args(q: NF4Weight) -> tuple:
    """The ops' block-scale arguments: absmax, nf4_code, dynamic_code, absmax_scale,
    absmax_offset, absmax_group."""
    if q.double_quant:
        dynamic = _dynamic_code(q.device)
        return (q.absmax, NF4_CODE, dynamic, q.absmax_scale, q.absmax_offset, ABSMAX_BLOCKSIZE)
    return (q.absmax, NF4_CODE, None, None, None, ABSMAX_BLOCKSIZE)


_loaded: dict[str | None, Kernel | None] = {}
_lock = threading.RLock()  # one build at a time, of either kernel


def _one_line(err: BaseException) -> str:
    """The most telling line of a build error: the compiler's first `error`, else the last."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() and not ln.startswith(("[", "FAILED"))]
    text = errors[0] if errors else lines[-1] if lines else ""
    return f"{type(err).__name__}: {text[:200]}"


def load_build(isa, cache: dict, compile, wrap, *, isas, name, env, fallback, logger):
    """cache[isa] if there, else the build compiled for `isa` (None: the best path the compiler
    targets here), kept in cache: compile(isa) gives its torch.ops namespace, wrap(ops, the path
    compiled, seconds taken) the kernel object. None when it cannot be built, after one warning
    line on `logger`: what runs instead (`fallback`) and the fix (a compiler, or `env`=0). Both
    NF4 kernels, this module's and qlora/int16_decode.py's, load through it."""
    if isa is not None and isa not in isas:
        raise ValueError(
            f"isa={isa!r} is not a kernel code path of the {name}; use one of {sorted(isas)}"
        )
    with _lock:
        if isa in cache:
            return cache[isa]
        start = time.perf_counter()
        built = None
        try:
            ops = compile(isa)
            compiled = {v: k for k, v in isas.items()}[int(ops.isa())]
            built = wrap(ops, compiled, time.perf_counter() - start)
            logger.info("%s (%s) ready in %.1f s", name, compiled, built.load_seconds)
        except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as err:
            logger.warning(
                "%s: the %s could not be built (%s); %s. Fix: install g++ and ninja, or set %s=0.",
                logger.name, name, _one_line(err), fallback, env,
            )  # fmt: skip
        cache[isa] = built
        return built


def choose_build(env: str, isas: dict, load, off: str):
    """The build the environment variable `env` asks for: none for 0/off/false/no, the best path
    for this CPU when unset or 1/on/auto/native, else the path it names."""
    choice = os.environ.get(env, "").strip().lower()
    if choice in ("0", "off", "false", "no"):
        return None
    if choice in ("", "1", "on", "auto", "native"):
        return load(None)
    if choice in isas:
        return load(choice)
    raise ValueError(
        f"{env}={choice!r} is not understood; use 0 ({off}), 1 (the best path for this CPU) or "
        f"one of {sorted(isas)}"
    )


def _wrap(ops, isa: str, seconds: float) -> Kernel:
    return Kernel(ops, isa, int(ops.group_size()), seconds)


def load(isa: str | None = None) -> Kernel | None:
    """The kernel compiled for `isa` (None: the best path the compiler targets here), built on
    the first call and kept; None, after one warning line, when it cannot be built."""
    fallback = "using the pure-PyTorch path (same results, slower)"
    return load_build(
        isa, _loaded, _compile, _wrap,
        isas=ISAS, name="NF4 CPU kernel", env=ENV, fallback=fallback, logger=log,
    )  # fmt: skip


_default: list[Kernel | None] = []  # the process's choice, resolved on first use


def default_kernel() -> Kernel | None:
    """This process's kernel: None with QLORA_KERNEL=0 or when the build failed."""
    if not _default:
        _default.append(choose_build(ENV, ISAS, load, "pure PyTorch"))
    return _default[0]


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def _cpu_kernel(q: NF4Weight, kernel: Kernel | None) -> Kernel | None:
    """The build to run on q: `kernel`, else the default; None for CUDA or no kernel."""
    if q.device.type != "cpu":
        return None
    return kernel if kernel is not None else default_kernel()


def fused_matmul(x: Tensor, q: NF4Weight, kernel: Kernel | None = None) -> Tensor:
    """y = x W^T, float32 [..., out], for x [..., in]; inference only (no autograd).

    The fused kernel for float32 or bfloat16 x (bfloat16 is widened exactly) with an even
    in_features on CPU; otherwise the reference F.linear(x.float(), dequantize(q, float32)).
    A strided x is copied to contiguous first. `kernel`: a build from load(isa); None: the
    process's default.
    """
    if x.shape[-1] != q.shape[1]:
        raise ValueError(
            f"x has {x.shape[-1]} features but the weight {tuple(q.shape)} takes {q.shape[1]}; "
            "pass x [..., in_features]"
        )
    k = _cpu_kernel(q, kernel)
    if k is None or x.dtype not in KERNEL_DTYPES or x.device != q.device or q.shape[1] % 2:
        return F.linear(x.float(), dequantize(q, torch.float32, kernel=kernel))
    y = k.matmul(x.reshape(-1, q.shape[1]).contiguous(), q)  # [M, out]
    return y.view(*x.shape[:-1], q.shape[0])


def dequantize(
    q: NF4Weight,
    dtype: torch.dtype | None = None,
    out: Tensor | None = None,
    kernel: Kernel | None = None,
) -> Tensor:
    """W = NF4_CODE[q] * absmax, shape q.shape, dtype q.dtype unless given: bit for bit
    nf4.dequantize_nf4(q, dtype), the same float32 products and round-to-nearest-even cast.

    out: a contiguous buffer of >= q.numel elements of `dtype` to decode into (the result is a
    view of it); None: a fresh tensor. float16/float64 and CUDA go through nf4.dequantize_nf4.
    """
    from .nf4 import dequantize_nf4

    target = q.dtype if dtype is None else dtype
    if out is not None and (
        out.dtype != target or not out.is_contiguous() or out.numel() < q.numel
    ):
        raise ValueError(
            f"out (dtype {out.dtype}, {out.numel()} elements, contiguous={out.is_contiguous()}) "
            f"cannot hold a {target} weight of {q.numel} elements; pass a contiguous buffer "
            "that large, or out=None"
        )
    k = _cpu_kernel(q, kernel)
    if k is None or target not in KERNEL_DTYPES or (out is not None and out.device != q.device):
        weight = dequantize_nf4(q, target)
        if out is None:
            return weight
        return out.view(-1)[: q.numel].copy_(weight.view(-1)).view(q.shape)
    flat = torch.empty(q.numel, dtype=target) if out is None else out.view(-1)[: q.numel]
    k.dequantize_flat(q, flat)
    return flat.view(q.shape)


def quantize(
    weight: Tensor, blocksize: int = 64, double_quant: bool = True, kernel: Kernel | None = None
) -> NF4Weight:
    """nf4.quantize_nf4(weight, blocksize, double_quant), bit for bit (weights without NaN).

    The kernel quantizes the full blocks of a CPU float32/bfloat16 weight in one pass each
    (absmax, scale, nearest code, pack), where the tensor ops make a pass per step;
    a partial last block, the double quantization of the absmax vector, other dtypes and CUDA
    go through nf4.py's own code.
    """
    _check_blocksize(blocksize)
    k = _cpu_kernel(weight, kernel)
    if (
        k is None
        or not weight.is_floating_point()
        or weight.dtype not in KERNEL_DTYPES
        or weight.numel() < blocksize
    ):
        return quantize_nf4(weight, blocksize, double_quant)
    flat = weight.detach().reshape(-1).contiguous()  # [n]
    full = flat.numel() - flat.numel() % blocksize
    packed, absmax = k.quantize_blocks(flat if full == flat.numel() else flat[:full], blocksize)
    if full < flat.numel():  # the tail block: the reference's own arithmetic, appended
        tail = quantize_nf4(flat[full:], blocksize, double_quant=False)
        packed = torch.cat([packed, tail.packed])
        absmax = torch.cat([absmax, tail.absmax])
    q = NF4Weight(packed, absmax, weight.shape, weight.dtype, blocksize)
    if double_quant:
        q.absmax_offset = absmax.mean()
        q.absmax, q.absmax_scale = quantize_dynamic_8bit(absmax - q.absmax_offset)
    return q


class _Scratch(threading.local):
    """Per-thread decode buffers, grown to the largest weight seen.

    A fresh tensor per call pays a page fault for every page of it, a cost of the order of the
    decode itself; one buffer per thread (a Gradio server may run two generations at once) avoids
    that. The decoded weight lives only until the matmul that reads it returns, so reuse is safe
    within a thread.
    """

    def __init__(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.uint8)  # the kernel's output, any dtype
        self.index = torch.empty(0, dtype=torch.int32)  # the pure-PyTorch path's two buffers
        self.words = torch.empty(0, dtype=torch.int64)

    def decode(self, q: NF4Weight, dtype: torch.dtype) -> Tensor:
        if q.device.type != "cpu":  # CUDA's caching allocator already recycles blocks
            from .nf4 import dequantize_nf4

            return dequantize_nf4(q, dtype)
        k = default_kernel()
        # buffers born under inference_mode could not be written outside it later
        with torch.inference_mode(False):
            if k is not None and dtype in KERNEL_DTYPES:
                nbytes = q.numel * dtype.itemsize
                if self.buffer.numel() < nbytes:
                    self.buffer = torch.empty(nbytes, dtype=torch.uint8)
            else:
                if self.index.numel() < q.packed.numel():
                    self.index = torch.empty(q.packed.numel(), dtype=torch.int32)
                if self.words.numel() < q.n_blocks * q.blocksize // 2:
                    self.words = torch.empty(q.n_blocks * q.blocksize // 2, dtype=torch.int64)
        if k is not None and dtype in KERNEL_DTYPES:
            flat = self.buffer[: q.numel * dtype.itemsize].view(dtype)
            k.dequantize_flat(q, flat)
            return flat.view(q.shape)
        weight = dequantize_into(q, self.index, self.words)  # float32, a view of self.words
        return weight if dtype == torch.float32 else weight.to(dtype)


_scratch = _Scratch()


def decode(q: NF4Weight, dtype: torch.dtype) -> Tensor:
    """dequantize(q, dtype) into this thread's reused buffer, valid until the thread's next
    decode: the weight NF4Linear multiplies with when it does not run the fused kernel."""
    return _scratch.decode(q, dtype)


def _fused_kernel(x: Tensor, q: NF4Weight) -> Kernel | None:
    """The kernel nf4_linear(x, q) runs fused, or None: see uses_fused."""
    rows = x.numel() // max(x.shape[-1], 1)
    if not (0 < rows <= FUSED_MAX_ROWS and x.dtype in KERNEL_DTYPES and x.device == q.device):
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        return None
    k = _cpu_kernel(q, None)
    if k is None:
        return None
    in_features = q.shape[1]
    runs = in_features % k.group_size == 0 if k.group_size else in_features % 2 == 0
    return k if runs else None


def uses_fused(x: Tensor, q: NF4Weight) -> bool:
    """Whether nf4_linear(x, q) runs the fused kernel: CPU, float32/bfloat16 x without a
    gradient to carry, 1..FUSED_MAX_ROWS input rows, and an in_features the kernel's SIMD row
    loop takes (a multiple of its group size; any even size for the scalar build)."""
    return _fused_kernel(x, q) is not None


def lora_fusable(x: Tensor, q: NF4Weight, lora: LoraUpdate) -> bool:
    """Whether nf4_linear(x, q, lora=lora) runs in one kernel call: uses_fused(x, q), float32
    contiguous CPU adapter matrices of matching shapes, and rows only for an x with a batch dim."""
    return uses_fused(x, q) and _lora_matches(x, q, lora)


def _lora_matches(x: Tensor, q: NF4Weight, lora: LoraUpdate) -> bool:
    """lora_fusable's conditions on the adapter itself (uses_fused aside)."""
    a, b = lora.a, lora.b
    return (
        a.dtype == b.dtype == torch.float32
        and a.device == b.device == q.device
        and a.is_contiguous()
        and b.is_contiguous()
        and a.shape == (b.shape[1], q.shape[1])
        and b.shape[0] == q.shape[0]
        and (lora.rows is None or (x.dim() >= 2 and lora.rows.dtype == torch.long))
    )


def nf4_linear(
    x: Tensor, q: NF4Weight, bias: Tensor | None = None, lora: LoraUpdate | None = None
) -> Tensor:
    """y = x W^T + b in x.dtype, x [..., in] -> [..., out].

    uses_fused(x, q): the fused kernel, y = fl32(sum_k x_k W_nk) + b in float32, rounded once to
    x.dtype. Otherwise F.linear(x, decode(q, x.dtype), b), the pure-PyTorch NF4Linear's
    arithmetic exactly (also when x carries a gradient: autograd sees a plain F.linear with a
    constant weight).

    lora (only where lora_fusable): the LoRA update joins the same call, before the rounding:
    y = fl32(fl32(sum_k x_k W_nk + b) + fl32(s * sum_j B_nj h_j)), h = A x in float32, on the
    rows lora.rows (the others: the line above, bit for bit).
    """
    k = _fused_kernel(x, q)
    if lora is not None and (k is None or not _lora_matches(x, q, lora)):
        raise ValueError("nf4_linear: this LoRA update cannot join the fused kernel (lora_fusable)")
    if k is None:
        return F.linear(x, decode(q, x.dtype), bias)
    if bias is not None and (bias.dtype not in KERNEL_DTYPES or bias.device != q.device):
        bias = bias.to(device=q.device, dtype=torch.float32)
    x2 = x.reshape(-1, q.shape[1]).contiguous()  # [M, in]; a copy only if x was strided
    span = x2.shape[0] // x.shape[0] if x.dim() >= 2 and x.shape[0] else 1  # rows per item
    bias = bias.contiguous() if bias is not None else None
    y = k.matmul(x2, q, bias, x.dtype == torch.bfloat16, lora, span)
    return y.view(*x.shape[:-1], q.shape[0])
