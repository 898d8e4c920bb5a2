"""The NF4 CPU kernel against its reference: F.linear(x.float(), dequantize_nf4(q)), and
dequantize_nf4 itself, on every code path this machine can run (AVX-512, AVX2, scalar).

Tolerance of the fused matmul. An output is a float32 sum of K products x_k W_nk; any order of
summation rounds it by at most about K u S in the worst case (u = 2^-24, S = sum_k |x_k W_nk|)
and by far less in practice. We compare with the float64 sum of the same float32 weights and
require |y - y64| <= TOL_U * u * S per output, TOL_U = 16. Measured maxima at Phi-2's shapes:
0.4 on the SIMD paths (blocked sums), 3.9 on the scalar path (one sequential sum), 1.5 for
torch's own float32 F.linear. One mis-decoded weight moves y by ~S / K ~ 1e-4 S, hundreds of
times the bound, so the check has teeth.
"""

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qlora import NF4Linear, kernel
from qlora.nf4 import BLOCKSIZES, dequantize_nf4, quantize_nf4

pytestmark = pytest.mark.slow  # trains, spawns processes, builds the kernel or drives a browser

U = 2.0**-24
TOL_U = 16
PHI2_SHAPES = [(2560, 2560), (10240, 2560), (2560, 10240)]  # (out, in)
REPO = Path(__file__).resolve().parents[1]


def cpu_has_avx512() -> bool:
    try:
        return " avx512f " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


def cpu_has_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2 " in flags.replace("\n", " ") and " fma " in flags.replace("\n", " ")


@pytest.fixture(scope="session")
def kernels() -> dict:
    """isa -> Kernel for every code path this CPU runs. The native build serves its own path;
    the others are built with QLORA_ISA forced (one-time, cached)."""
    native = kernel.load()
    assert native is not None, "the kernel must build here (g++ and ninja are installed)"
    paths = {native.isa: native}
    wanted = ["scalar"] + (["avx2"] if cpu_has_avx2() else []) + (["avx512"] * cpu_has_avx512())
    for isa in wanted:
        if isa not in paths:
            paths[isa] = kernel.load(isa)
            assert paths[isa] is not None and paths[isa].isa == isa
    return paths


ISAS = ["avx512", "avx2", "scalar"]


@pytest.fixture(params=ISAS)
def kern(request, kernels):
    if request.param not in kernels:
        pytest.skip(f"this CPU cannot run the {request.param} path")
    return kernels[request.param]


def assert_within_rounding(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """|y - x W^T (float64)| <= TOL_U u sum_k |x_k W_nk| for every output."""
    assert y.dtype == torch.float32
    x64, w64 = x.double().reshape(-1, x.shape[-1]), weight.double()
    exact = (x64 @ w64.T).view(y.shape)
    scale = (x64.abs() @ w64.abs().T).view(y.shape)
    err = (y.double() - exact).abs()
    assert torch.all(err <= TOL_U * U * scale), f"max err / (u S) = {(err / (U * scale)).max()}"


# --- fused matmul at Phi-2's shapes ---------------------------------------------------------------


@pytest.fixture(scope="module", params=[True, False], ids=["dq", "plain"])
def phi2_weights(request):
    g = torch.Generator().manual_seed(0)
    out = []
    for n, k in PHI2_SHAPES:
        w = torch.randn(n, k, generator=g) * 0.02
        q = quantize_nf4(w, 64, double_quant=request.param)
        out.append((q, dequantize_nf4(q)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matmul_at_phi2_shapes(phi2_weights, kern, dtype):
    g = torch.Generator().manual_seed(1)
    for q, weight in phi2_weights:
        x = torch.randn(2, q.shape[1], generator=g).to(dtype)
        y = kernel.fused_matmul(x, q, kernel=kern)
        assert y.shape == (2, q.shape[0])
        assert_within_rounding(y, x.float(), weight)  # bf16 widens exactly
        # and against the float32 reference itself: both within the bound of the exact sum
        reference = F.linear(x.float(), weight)
        assert torch.all(
            (y - reference).abs() <= 2 * TOL_U * U * (x.float().abs() @ weight.abs().T)
        )


def test_fused_matmul_bf16_output_within_one_bf16_ulp(phi2_weights):
    """NF4Linear in bfloat16: the float32 sum rounded once, so within 1 bf16 ulp of the
    reference rounded (they differ only where the float32 sums straddle a rounding boundary)."""
    q, weight = phi2_weights[0]
    layer = NF4Linear(q, bias=None, compute_dtype=torch.bfloat16)
    x = torch.randn(2, q.shape[1], generator=torch.Generator().manual_seed(2)).bfloat16()
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.bfloat16 and kernel.uses_fused(x, q)
    reference = F.linear(x.float(), weight).bfloat16().float()
    ulp = 2.0 ** (torch.frexp(reference).exponent.float() - 8)  # bf16 keeps 8 significant bits
    assert torch.all((y.float() - reference).abs() <= ulp)
    assert (y.float() == reference).float().mean() > 0.95


def test_bias_and_bf16_rounding_happen_once_in_float32(phi2_weights):
    q, _ = phi2_weights[0]
    bias = torch.randn(q.shape[0], generator=torch.Generator().manual_seed(7))
    x = torch.randn(2, q.shape[1], generator=torch.Generator().manual_seed(8))
    fused = kernel.fused_matmul(x, q)
    assert torch.equal(kernel.nf4_linear(x, q, bias), fused + bias)
    x16, bias16 = x.bfloat16(), bias.bfloat16()
    expected = (kernel.fused_matmul(x16, q) + bias16.float()).bfloat16()
    assert torch.equal(kernel.nf4_linear(x16, q, bias16), expected)


# --- odd shapes, every blocksize ------------------------------------------------------------------


@pytest.mark.parametrize(
    "out_f,in_f,blocksize",
    [
        (37, 2560, 64),  # N odd
        (33, 192, 64),  # K not a multiple of the SIMD group (128): the general row loop
        (21, 250, 64),  # K % 64 != 0: blocks straddle rows
        (17, 100, 32),
        (9, 2624, 128),
        (5, 2560, 4096),  # one block spans rows
        (3, 66, 1024),
    ],
)
@pytest.mark.parametrize("dq", [True, False])
def test_fused_matmul_odd_shapes(kern, out_f, in_f, blocksize, dq):
    g = torch.Generator().manual_seed(out_f * in_f)
    q = quantize_nf4(torch.randn(out_f, in_f, generator=g), blocksize, double_quant=dq)
    weight = dequantize_nf4(q)
    for rows in (*range(1, 18), 300):
        x = torch.randn(rows, in_f, generator=g)
        assert_within_rounding(kernel.fused_matmul(x, q, kernel=kern), x, weight)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dq", [True, False])
def test_fused_matmul_every_blocksize(kern, blocksize, dq):
    g = torch.Generator().manual_seed(blocksize)
    q = quantize_nf4(torch.randn(24, 1280, generator=g), blocksize, double_quant=dq)
    x = torch.randn(3, 1280, generator=g)
    assert_within_rounding(kernel.fused_matmul(x, q, kernel=kern), x, dequantize_nf4(q))


def test_rows_are_independent_of_batch_and_threads(kernels):
    """y[m] depends on x[m] only, in a fixed order: the same bits for a row alone, in any batch,
    on 1 or 2 threads (the demo's two sides in one batch get their own answers exactly)."""
    q = quantize_nf4(torch.randn(300, 2560, generator=torch.Generator().manual_seed(3)))
    x = torch.randn(7, 2560, generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    for kern in kernels.values():
        batch = kernel.fused_matmul(x, q, kernel=kern)
        for m in range(7):
            assert torch.equal(kernel.fused_matmul(x[m : m + 1], q, kernel=kern)[0], batch[m])
        assert torch.equal(kernel.fused_matmul(x[2:4], q, kernel=kern), batch[2:4])
        try:
            torch.set_num_threads(2)
            assert torch.equal(kernel.fused_matmul(x, q, kernel=kern), batch)
        finally:
            torch.set_num_threads(threads)


# --- the LoRA update inside the fused kernel ------------------------------------------------------


def lora_factors(q, r=16, seed=11):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, q.shape[1], generator=g) / q.shape[1] ** 0.5  # [r, in]
    b = torch.randn(q.shape[0], r, generator=g) * 0.05  # [out, r]
    return a, b


def assert_lora_within_rounding(y, x, weight, a, b, s):
    """|y - (x W^T + s B A x) in float64| <= 2 TOL_U u S, S the sum of |terms| of both parts."""
    x64 = x.double().reshape(-1, x.shape[-1])
    w64, a64, b64 = weight.double(), a.double(), b.double()
    exact = x64 @ w64.T + s * (x64 @ a64.T) @ b64.T
    scale = x64.abs() @ w64.abs().T + s * (x64.abs() @ a64.abs().T) @ b64.abs().T
    err = (y.double().reshape(exact.shape) - exact).abs()
    assert torch.all(err <= 2 * TOL_U * U * scale), f"max err / (u S) = {(err / (U * scale)).max()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_lora_update_at_phi2_shapes(phi2_weights, kern, dtype):
    g = torch.Generator().manual_seed(12)
    for q, weight in phi2_weights:
        a, b = lora_factors(q)
        x = torch.randn(2, q.shape[1], generator=g).to(dtype)
        y = kern.matmul(x, q, None, False, kernel.LoraUpdate(a, b, 2.0), 1)
        assert_lora_within_rounding(y, x.float(), weight, a, b, 2.0)
        base = kern.matmul(x, q)
        assert (y - base).abs().max() > 1e-3  # the update is there, and large next to rounding


def test_lora_rows_other_rows_bit_identical_and_batch_invariant(kernels):
    """Items not in rows get the base alone, bit for bit; an item's result does not depend on
    the batch around it, on the thread count, or on which other items carry the update."""
    q = quantize_nf4(torch.randn(300, 256, generator=torch.Generator().manual_seed(13)))
    a, b = lora_factors(q)
    x = torch.randn(3, 2, 256, generator=torch.Generator().manual_seed(14))  # 3 items x 2 rows
    threads = torch.get_num_threads()
    for kern in kernels.values():

        def run(xs, rows=None, lora=True, kern=kern):
            update = kernel.LoraUpdate(a, b, 0.5, rows) if lora else None
            return kern.matmul(xs.reshape(-1, 256), q, None, False, update, xs.shape[1])

        y = run(x, torch.tensor([0, 2])).view(3, 2, -1)
        assert torch.equal(y[1], run(x[1:2], lora=False))  # not in rows: the base, exactly
        assert torch.equal(y[0], run(x[0:1]))  # alone, with the update on every row
        assert torch.equal(y[2], run(x[2:3]))
        assert torch.equal(run(x, torch.tensor([2])).view(3, 2, -1)[2], y[2])
        try:
            torch.set_num_threads(2)
            assert torch.equal(run(x, torch.tensor([0, 2])).view(3, 2, -1), y)
        finally:
            torch.set_num_threads(threads)
        with pytest.raises(RuntimeError, match="lora_rows out of range"):
            run(x, torch.tensor([3]))


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_decodes_in_one_kernel_call(monkeypatch, compute_dtype):
    from qlora import LoRALinear

    torch.manual_seed(15)
    lin = nn.Linear(256, 96).to(compute_dtype)
    layer = LoRALinear(NF4Linear.from_linear(lin, compute_dtype=compute_dtype), 8, 16.0, 0.1)
    nn.init.normal_(layer.lora_B.weight, std=0.05)
    calls = []
    matmul = kernel.Kernel.matmul
    monkeypatch.setattr(kernel.Kernel, "matmul", lambda *a: calls.append(a[5]) or matmul(*a))
    x = torch.randn(2, 3, 256).to(compute_dtype)
    layer.eval()
    with torch.no_grad():
        y = layer(x)
        base = layer.base(x).float()
        reference = base + layer.update(x)  # the base rounded to bf16, then the update
    assert len(calls) == 2 and calls[0] is not None and calls[1] is None  # fused; then base
    if compute_dtype == torch.float32:
        w, a, b = dequantize_nf4(layer.base.qweight), layer.lora_A.weight, layer.lora_B.weight
        assert_lora_within_rounding(y - lin.bias, x, w, a, b, layer.scaling)
    else:  # one rounding of the float32 sum against the reference's rounded base: 2 bf16 ulps
        ulp = 2.0 ** (torch.frexp(torch.maximum(base.abs(), reference.abs())).exponent - 8.0)
        assert torch.all((y.float() - reference).abs() <= 2 * ulp)
    calls.clear()
    layer.train()  # dropout active: the unfused path
    with torch.no_grad():
        layer(x)
    xg = x.clone().requires_grad_(True)
    layer.eval()
    layer(xg).sum().backward()  # a gradient to carry: the unfused path
    assert all(c is None for c in calls)
    with pytest.raises(ValueError, match="lora_fusable"):
        bad = kernel.LoraUpdate(layer.lora_A.weight, layer.lora_B.weight.bfloat16(), 1.0)
        kernel.nf4_linear(x, layer.base.qweight, None, bad)


# --- inputs the kernel does not take as they are --------------------------------------------------


def test_noncontiguous_empty_and_other_dtypes():
    q = quantize_nf4(torch.randn(40, 256, generator=torch.Generator().manual_seed(5)))
    weight = dequantize_nf4(q)
    x = torch.randn(256, 6, generator=torch.Generator().manual_seed(6)).T  # [6, 256], strided
    assert not x.is_contiguous()
    assert_within_rounding(kernel.fused_matmul(x, q), x, weight)
    y = kernel.nf4_linear(x, q)
    assert y.dtype == torch.float32 and y.shape == (6, 40)
    assert_within_rounding(y, x, weight)
    x3 = torch.randn(2, 3, 256)[:, :, :]  # [..., in] batches keep their leading shape
    assert kernel.nf4_linear(x3, q).shape == (2, 3, 40)

    empty = torch.empty(0, 256)
    assert kernel.fused_matmul(empty, q).shape == (0, 40)
    assert kernel.nf4_linear(empty, q).shape == (0, 40)
    assert kernel.nf4_linear(torch.empty(2, 0, 256), q).shape == (2, 0, 40)

    # float16 and float64: the pure-PyTorch path, exactly what NF4Linear computed before
    for dtype in (torch.float16, torch.float64):
        xd = torch.randn(3, 256, dtype=dtype)
        assert not kernel.uses_fused(xd, q)
        expected = F.linear(xd, dequantize_nf4(q, dtype))
        assert torch.equal(kernel.nf4_linear(xd, q), expected)
        assert torch.equal(kernel.fused_matmul(xd, q), F.linear(xd.float(), weight))

    with pytest.raises(ValueError, match=r"x has 255 features but the weight \(40, 256\)"):
        kernel.fused_matmul(torch.randn(2, 255), q)


def test_odd_in_features_falls_back_exactly():
    q = quantize_nf4(torch.randn(8, 65), 64)  # odd K: rows start mid-byte, the kernel refuses
    x = torch.randn(2, 65)
    assert not kernel.uses_fused(x, q)
    assert torch.equal(kernel.fused_matmul(x, q), F.linear(x, dequantize_nf4(q)))
    assert torch.equal(kernel.nf4_linear(x, q), F.linear(x, dequantize_nf4(q)))


def test_switch_point_and_gradients_take_the_decode_path():
    q = quantize_nf4(torch.randn(64, 256))
    assert kernel.uses_fused(torch.randn(kernel.FUSED_MAX_ROWS, 256), q)
    assert not kernel.uses_fused(torch.randn(kernel.FUSED_MAX_ROWS + 1, 256), q)
    assert not kernel.uses_fused(torch.randn(2, 256, requires_grad=True), q)
    with torch.no_grad():
        assert kernel.uses_fused(torch.randn(2, 256, requires_grad=True), q)


# --- fast dequantize: bit for bit -----------------------------------------------------------------


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dq", [True, False])
def test_dequantize_is_bit_identical(kern, blocksize, dq):
    g = torch.Generator().manual_seed(blocksize + dq)
    w = torch.randn(37, 333, generator=g)  # odd numel: a partial last block, a padding nibble
    w[3] = 0.0  # a zero block
    w[5] = w[5] * 1e-38  # subnormal products: the bf16 cast must round them as torch does
    q = quantize_nf4(w, blocksize, double_quant=dq)
    for dtype in (torch.float32, torch.bfloat16):
        ours = kernel.dequantize(q, dtype, kernel=kern)
        theirs = dequantize_nf4(q, dtype)
        assert ours.dtype == dtype and ours.shape == w.shape
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(ours.view(bits), theirs.view(bits))


def test_dequantize_into_a_buffer_and_bad_buffers():
    q = quantize_nf4(torch.randn(64, 128).bfloat16())
    buffer = torch.empty(64 * 128 + 10, dtype=torch.bfloat16)
    out = kernel.dequantize(q, out=buffer)  # dtype defaults to the weight's own: bf16
    assert out.data_ptr() == buffer.data_ptr() and out.shape == (64, 128)
    assert torch.equal(out, dequantize_nf4(q))
    with pytest.raises(ValueError, match=r"cannot hold a torch.float32 weight of 8192 elements"):
        kernel.dequantize(q, torch.float32, out=torch.empty(100))
    # float16: through the reference, still into the buffer
    half = kernel.dequantize(q, torch.float16, out=torch.empty(8192, dtype=torch.float16))
    assert torch.equal(half, dequantize_nf4(q, torch.float16))


def test_dequantize_at_a_phi2_shape_every_path(kernels, phi2_weights):
    q, weight = phi2_weights[1]  # 10240 x 2560
    for kern in kernels.values():
        assert torch.equal(kernel.dequantize(q, torch.float32, kernel=kern), weight)


# --- quantize -------------------------------------------------------------------------------------


def assert_same_nf4(ours, theirs) -> None:
    """Every stored tensor of two NF4Weights bit for bit, and the same metadata."""
    for name in ("packed", "absmax", "absmax_scale", "absmax_offset"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), name
    assert (ours.shape, ours.dtype, ours.blocksize) == (
        theirs.shape,
        theirs.dtype,
        theirs.blocksize,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dq", [True, False], ids=["dq", "plain"])
def test_quantize_is_bit_identical_at_phi2_shapes(kernels, dtype, dq):
    g = torch.Generator().manual_seed(1)
    for n, k in PHI2_SHAPES:
        w = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
        assert_same_nf4(
            kernel.quantize(w, 64, dq, kernel=kernels[next(iter(kernels))]), quantize_nf4(w, 64, dq)
        )


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dq", [True, False], ids=["dq", "plain"])
def test_quantize_odd_shapes_ties_and_zero_blocks(kern, blocksize, dq):
    g = torch.Generator().manual_seed(blocksize)
    w = torch.randn(37, 333, generator=g)  # odd numel: a partial last block and a pad nibble
    w[3] = 0.0  # all-zero blocks: absmax 0, every code 7
    w[5] = w[5] * 1e-38  # subnormal values and a subnormal absmax
    # values exactly on a decision boundary: a block with absmax 1 scales them by exactly 1
    midpoints = (kernel.NF4_CODE[:-1] + kernel.NF4_CODE[1:]) / 2
    ties = torch.cat([midpoints, -midpoints, torch.ones(1)])  # [31]
    w.view(-1)[: blocksize * 2] = ties.repeat(blocksize)[: blocksize * 2]
    for dtype in (torch.float32, torch.bfloat16):
        x = w.to(dtype)
        assert_same_nf4(
            kernel.quantize(x, blocksize, dq, kernel=kern), quantize_nf4(x, blocksize, dq)
        )
    short = torch.randn(5, generator=g)  # shorter than one block: the reference alone
    assert_same_nf4(
        kernel.quantize(short, blocksize, dq, kernel=kern), quantize_nf4(short, blocksize, dq)
    )


def test_quantize_other_dtypes_and_bad_input_go_through_the_reference():
    w = torch.randn(64, 96, dtype=torch.float16)
    assert_same_nf4(kernel.quantize(w), quantize_nf4(w))
    for bad in (torch.zeros(0), torch.arange(128)):
        with pytest.raises(ValueError, match="needs a non-empty float tensor"):
            kernel.quantize(bad)
    with pytest.raises(ValueError, match="blocksize=48 is not supported"):
        kernel.quantize(torch.randn(128), blocksize=48)


# --- NF4Linear ------------------------------------------------------------------------------------


def test_nf4linear_inference_runs_the_kernel(monkeypatch):
    torch.manual_seed(0)
    lin = nn.Linear(256, 96)
    layer = NF4Linear.from_linear(lin)
    calls = []
    matmul = kernel.Kernel.matmul
    monkeypatch.setattr(kernel.Kernel, "matmul", lambda *a: calls.append(1) or matmul(*a))
    x = torch.randn(2, 5, 256)
    with torch.no_grad():
        y = layer(x)
    assert calls == [1]
    fused = kernel.fused_matmul(x, layer.qweight)  # float32, no bias
    assert torch.equal(y, fused + lin.bias)  # the bias added once, in float32
    assert_within_rounding(fused, x, dequantize_nf4(layer.qweight))
    with torch.inference_mode():
        assert torch.equal(layer(x), y)
    many = torch.randn(kernel.FUSED_MAX_ROWS + 1, 256)
    with torch.no_grad():  # many rows: decode + GEMM, the pure-PyTorch arithmetic exactly
        assert torch.equal(layer(many), F.linear(many, dequantize_nf4(layer.qweight), lin.bias))
    assert len(calls) == 3  # layer(x) twice and fused_matmul once; not the many-row call


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_nf4linear_gradients_match_the_reference_exactly(compute_dtype):
    """With a gradient to carry, forward and backward decode W bit for bit as dequantize_nf4:
    y and grad_x equal the plain F.linear formulation exactly, so training numerics are
    unchanged by the kernel."""
    torch.manual_seed(1)
    lin = nn.Linear(320, 192)
    layer = NF4Linear.from_linear(lin, compute_dtype=compute_dtype)
    weight = dequantize_nf4(layer.qweight, compute_dtype)
    x = torch.randn(3, 320, requires_grad=True)
    grad = torch.randn(3, 192)
    y = layer(x)
    y.backward(grad)
    xr = x.detach().clone().requires_grad_()
    yr = F.linear(xr.to(compute_dtype), weight, layer.bias).float()
    yr.backward(grad)
    assert torch.equal(y, yr) and torch.equal(x.grad, xr.grad)


# --- building: the name, the fallback -------------------------------------------------------------


def test_extension_name_carries_the_path_and_the_cpu():
    name = kernel.extension_name("avx2")
    assert name.startswith("qlora_nf4_avx2_") and name.endswith(kernel._cpu_signature())
    assert kernel.extension_name(None).startswith("qlora_nf4_native_")
    with pytest.raises(ValueError, match=r"isa='sse' is not a kernel code path"):
        kernel.load("sse")


def age(path: Path, seconds: float) -> None:
    """Set `path`'s modification time `seconds` into the past."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_stale_build_lock_is_cleared_before_the_build(tmp_path, monkeypatch, caplog):
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "qlora_lock_test" / "lock"  # where cpp_extension builds this name
    lock.parent.mkdir()
    lock.touch()
    age(lock, kernel.STALE_LOCK_SECONDS + 60)
    builds = []  # (name, whether the lock was still there when the build began)
    monkeypatch.setattr(
        cpp_extension, "load", lambda name, **_: builds.append((name, lock.exists()))
    )
    with caplog.at_level(logging.WARNING, logger="qlora.kernel"):
        kernel.build_extension("qlora_lock_test", kernel.SOURCE, [], [])
    assert builds == [("qlora_lock_test", False)]
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"qlora.kernel: removing the build lock {lock}, left 11 min ago")


def test_a_recent_build_lock_is_left_to_its_build(tmp_path, caplog):
    lock = tmp_path / "lock"
    lock.touch()
    age(lock, kernel.STALE_LOCK_SECONDS - 60)
    with caplog.at_level(logging.WARNING, logger="qlora.kernel"):
        assert kernel.clear_stale_lock(tmp_path) is False
        assert kernel.clear_stale_lock(tmp_path / "never_built") is False
    assert lock.exists() and caplog.records == []
    age(lock, kernel.STALE_LOCK_SECONDS + 1)
    assert kernel.clear_stale_lock(tmp_path) is True and not lock.exists()


FALLBACK_SCRIPT = textwrap.dedent(
    """
    import torch
    from torch.nn import functional as F
    from qlora import NF4Linear, kernel
    from qlora.nf4 import dequantize_nf4, quantize_nf4

    q = quantize_nf4(torch.randn(48, 256, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(3, 256)
    layer = NF4Linear(q, bias=None, compute_dtype=torch.float32)
    with torch.no_grad():
        ok = torch.equal(layer(x), F.linear(x, dequantize_nf4(q)))
        ok &= torch.equal(kernel.dequantize(q, torch.bfloat16), dequantize_nf4(q, torch.bfloat16))
        ok &= torch.equal(kernel.fused_matmul(x, q), F.linear(x, dequantize_nf4(q)))
    print("kernel" if kernel.default_kernel() else "no kernel", "equal" if ok else "DIFFERENT")
    """
)


def run_fallback(tmp_path, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "QLORA_KERNEL"}
    environment.update(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), PYTHONPATH=str(REPO), **env)
    return subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "env",
    [{"CXX": "/bin/false"}, {"PATH": "/nonexistent"}],
    ids=["compiler-fails", "no-compiler-no-ninja"],
)
def test_no_compiler_means_one_warning_line_and_the_pure_path(tmp_path, env):
    proc = run_fallback(tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no kernel equal"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("qlora.kernel: the NF4 CPU kernel could not be built (")
    assert "using the pure-PyTorch path" in lines[0]


def test_qlora_kernel_0_builds_nothing_and_says_nothing(tmp_path):
    proc = run_fallback(tmp_path, QLORA_KERNEL="0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no kernel equal" and proc.stderr.strip() == ""
    assert not (tmp_path / "ext").exists()
