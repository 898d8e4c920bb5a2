"""The int16 decode path (qlora/int16_decode.py, csrc/nf4_int16.cpp) against its reference, the
exact path and F.linear, on every code path this CPU runs (AVX-512 VNNI, AVX2, scalar).

The kernel and reference_matmul compute the same float32 operations in the same order, so they
must agree bit for bit. Against the exact path (float32 sums of the NF4 weights themselves) the
difference is the int16 rounding, bounded per output by

    B_n = 0.5/16383 (sum_k |x_k| absmax_b(n,k) + sum_k |w'_nk| amax_s(k)) + fp32

(the table rounds a level by <= 0.5/16383 of absmax, the activation by <= half a step dx =
amax/16383; w' = T/16383 * absmax, |w'| <= absmax; fp32: the float32 scales and sums).
Independent roundings make the typical error far smaller: modelled as uniform noise, the
relative RMS error over outputs of Gaussian x and W is about
sqrt((0.29/16383 / 0.4)^2 + (2.6/16383/sqrt(12))^2) ~ 6e-5 (0.29: the RMS rounding of the 16
levels, in units of 1/16383; 0.4: the RMS of NF4 levels for Gaussian blocks of 64; 2.6:
E[amax / sigma] over blocks of 64); RMS_BOUND = 1.2e-4 allows for the spread.
"""

import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qlora import NF4Linear, int16_decode, kernel
from qlora.layers import LoRALinear
from qlora.nf4 import NF4_CODE, dequantize_nf4, quantize_nf4, restore_absmax

PHI2_SHAPES = [(2560, 2560), (10240, 2560), (2560, 10240)]  # (out, in)
RMS_BOUND = 1.2e-4
U = 2.0**-24


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@pytest.fixture(scope="session")
def kernels() -> dict:
    """isa -> Int16Kernel for every code path this CPU runs."""
    flags = cpu_flags()
    wanted = ["scalar"]
    if {"avx2", "fma", "f16c"} <= flags:
        wanted.append("avx2")
    if {"avx512f", "avx512bw", "avx512_vnni"} <= flags:
        wanted.append("vnni")
    out = {}
    for isa in wanted:
        k = int16_decode.load(isa)
        assert k is not None and k.isa == isa, f"the {isa} build must compile here"
        out[isa] = k
    return out


@pytest.fixture
def int16_on():
    int16_decode.set_enabled(True)
    yield
    int16_decode.set_enabled(False)


def weight(out_f: int, in_f: int, seed: int = 0, blocksize: int = 64):
    g = torch.Generator().manual_seed(seed)
    return quantize_nf4(torch.randn(out_f, in_f, generator=g) * 0.02, blocksize=blocksize)


def test_int16_code_table():
    # round(16383 * NF4_CODE): the two ends are exactly -16383 and 16383, code 7 is exactly 0
    assert int16_decode.INT16_CODE.dtype == torch.int16
    assert int16_decode.INT16_CODE.tolist() == [
        -16383, -11406, -8602, -6470, -4660, -3027, -1492, 0,
        1304, 2637, 4032, 5536, 7220, 9217, 11844, 16383,
    ]  # fmt: skip
    err = int16_decode.INT16_CODE.double() / 16383 - NF4_CODE.double()
    assert err.abs().max() <= 0.5 / 16383
    # eight products of the largest magnitudes still fit an int32 lane
    assert 8 * 16383**2 < 2**31 - 1


def test_repack_layout_by_hand():
    q = weight(4, 64, seed=1)
    w = int16_decode.repack(q)
    codes = int16_decode.nibble_codes(q)  # [4, 64]
    # block (g=0, j=1), row r=2, p=5: low nibble k = 32 + 5, high nibble k = 32 + 16 + 5
    byte = w.codes[1 * 64 + 16 * 2 + 5].item()
    assert byte & 0xF == codes[2, 37].item() and byte >> 4 == codes[2, 53].item()
    # one nibble of the NF4 bytes: element 2i is the high nibble of byte i
    assert codes[0, 10].item() == q.packed[5].item() >> 4
    assert codes[0, 11].item() == q.packed[5].item() & 0xF
    # scales: absmax / 16383 in float32, [N/4, S, 4]
    absmax = restore_absmax(q).double()  # one block of 64 per row
    assert w.scales.shape == (1, 1, 4) and w.scales.dtype == torch.float32
    assert torch.equal(w.scales[0, 0], (absmax / 16383).float())


@pytest.mark.parametrize("shape,blocksize", [((8, 128), 64), ((12, 576), 64), ((64, 512), 256)])
def test_repack_round_trip(shape, blocksize):
    q = weight(*shape, blocksize=blocksize)
    before = q.packed.clone()
    w = int16_decode.repack(q)
    codes, scales = int16_decode.unpack(w)
    assert torch.equal(codes, int16_decode.nibble_codes(q))
    assert torch.equal(q.packed, before)  # the stored bytes stay as they are
    absmax = restore_absmax(q).double()
    n, k = shape
    first = torch.arange(n * (k // 64)) * 64
    expect = (absmax[first // blocksize] / 16383).float().view(n, -1)
    assert torch.equal(scales, expect)


def test_scales_keep_tiny_and_huge_weights():
    for factor in (1e-7, 1e5):
        q = quantize_nf4(torch.randn(8, 128, generator=torch.Generator().manual_seed(2)) * factor)
        w = int16_decode.repack(q)
        restored = int16_decode.unpack(w)[1].double() * 16383  # [8, 2]
        absmax = restore_absmax(q).double().view(8, 2)
        assert torch.allclose(restored, absmax, rtol=2**-24, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_activations_matches_reference(kernels, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 256, generator=g)
    x[0, :64] = 0  # a zero block: xq = 0, dx = 0
    # amax 8191.5: 16383 / amax = 2 exactly, and x = i + 0.25 lands on .5 ties
    x[1, 64:128] = torch.arange(64) - 31.75
    x[1, 127] = 8191.5
    x = x.to(dtype)
    xq, dx = int16_decode.quantize_activations(x)
    assert dx[0, 0] == 0 and (xq[0, :64] == 0).all()
    if dtype == torch.float32:
        assert dx[1, 1] == 0.5
        assert xq[1, 64:68].tolist() == [-64, -62, -60, -58]  # round_even(-63.5, -61.5, ...)
    for k in kernels.values():
        cq, cdx = k.ops.quantize_activations(x)
        assert torch.equal(cq, xq) and torch.equal(cdx, dx)
    # by hand: a block holding only 1.0 and -0.5 -> 16383 and round_even(-8191.5) = -8192
    y = torch.zeros(1, 64)
    y[0, 0], y[0, 1] = 1.0, -0.5
    q1, d1 = int16_decode.quantize_activations(y)
    assert q1[0, :3].tolist() == [16383, -8192, 0]
    assert d1.item() == pytest.approx(1 / 16383, rel=1e-7)


def test_lanes_hold_the_products_the_kernel_header_names():
    # one weight row of 128 codes, all 15 (T = 16383); x one-hot at k0: only lane
    # c = (k0 % 16) // 2 of block s = k0 // 64 sees it, with D = 16383^2
    codes = torch.full((1, 128), 15, dtype=torch.uint8)
    for k0 in (0, 1, 2, 15, 16, 17, 31, 32, 47, 63, 64, 100, 127):
        xq = torch.zeros(1, 128, dtype=torch.int16)
        xq[0, k0] = 16383
        d = int16_decode.lane_sums(codes, xq)  # [1, 1, 2, 8]
        expect = torch.zeros(2, 8, dtype=torch.float64)
        expect[k0 // 64, (k0 % 16) // 2] = 16383**2
        assert torch.equal(d[0, 0], expect), k0


@pytest.mark.parametrize(
    "shape", [(4, 64), (12, 192), (64, 576), (192, 576), (20, 1536), (8, 2560)]
)
def test_kernel_matches_reference_bit_for_bit(kernels, shape):
    q = weight(*shape, seed=shape[0] + shape[1])
    w = int16_decode.repack(q)
    g = torch.Generator().manual_seed(4)
    bias = torch.randn(shape[0], generator=g)
    for rows in (1, 2, 3, 5, 9):
        x = torch.randn(rows, shape[1], generator=g)
        for xx in (x, x.bfloat16()):
            ref = int16_decode.reference_matmul(xx, w)
            ref_b = int16_decode.reference_matmul(xx, w, bias)
            for isa, k in kernels.items():
                assert torch.equal(k.matmul(xx, w, None, False), ref), (isa, shape, rows)
                assert torch.equal(k.matmul(xx, w, bias, False), ref_b), (isa, shape, rows)
                out16 = k.matmul(xx, w, bias.bfloat16(), True)
                assert torch.equal(out16, (ref + bias.bfloat16().float()).bfloat16())


def worst_case_bound(x: torch.Tensor, q) -> torch.Tensor:
    """B_n of the module docstring for x [M, K] and an NF4 weight q with blocksize 64."""
    n, k = q.shape
    absmax = restore_absmax(q).double().view(n, k // 64).repeat_interleave(64, dim=1)  # [N, K]
    xd = x.double()
    amax = xd.abs().view(x.shape[0], -1, 64).amax(-1).repeat_interleave(64, dim=1)  # [M, K]
    table = (0.5 / 16383) * (xd.abs() @ absmax.T)
    act = (0.5 / 16383) * (amax @ absmax.T)  # |w'| <= absmax
    s = xd.abs() @ dequantize_nf4(q, torch.float32).double().abs().T
    return table + act + 16 * k * U * s


@pytest.mark.parametrize("out_f,in_f", PHI2_SHAPES)
def test_error_against_exact_path_at_phi2_shapes(kernels, out_f, in_f):
    q = weight(out_f, in_f, seed=out_f + 7 * in_f)
    w = int16_decode.repack(q)
    x = torch.randn(2, in_f, generator=torch.Generator().manual_seed(5))
    exact = F.linear(x.double(), dequantize_nf4(q, torch.float32).double())
    bound = worst_case_bound(x, q)
    for isa, k in kernels.items():
        y = k.matmul(x, w, None, False).double()
        err = (y - exact).abs()
        assert (err <= bound).all(), (isa, (err / bound).max())
        rms = (err.square().mean() / exact.square().mean()).sqrt().item()
        assert rms <= RMS_BOUND, (isa, rms)
        assert rms > 1e-5  # the int16 path really rounds: the exact path would give ~1e-7


def exact_layer(out_f=64, in_f=128, bias=True, seed=6) -> NF4Linear:
    torch.manual_seed(seed)
    return NF4Linear.from_linear(nn.Linear(in_f, out_f, bias=bias))


def test_switch_routes_decoding_and_leaves_training_exact(int16_on):
    layer = exact_layer()
    x = torch.randn(2, 128)
    with torch.no_grad():
        y = layer(x)
    w = int16_decode.repacked(layer.qweight)
    assert torch.equal(y, int16_decode.reference_matmul(x, w, layer.bias))
    int16_decode.set_enabled(False)
    with torch.no_grad():
        assert torch.equal(layer(x), kernel.nf4_linear(x, layer.qweight, layer.bias))
    int16_decode.set_enabled(True)
    xg = x.clone().requires_grad_(True)  # a gradient to carry: the exact path
    expect = F.linear(x, dequantize_nf4(layer.qweight, torch.float32), layer.bias)
    assert torch.equal(layer(xg).detach(), expect)


@pytest.mark.parametrize(
    "case", ["rows_not_4", "in_not_64", "blocksize_32", "float16", "too_many_rows", "empty"]
)
def test_inputs_it_does_not_take_go_the_exact_path(int16_on, case):
    out_f, in_f, blocksize, rows, dtype = 64, 128, 64, 2, torch.float32
    if case == "rows_not_4":
        out_f = 66
    elif case == "in_not_64":
        in_f = 96
    elif case == "blocksize_32":
        blocksize = 32
    elif case == "float16":
        dtype = torch.float16
    elif case == "too_many_rows":
        rows = int16_decode.MAX_ROWS + 1
    elif case == "empty":
        rows = 0
    torch.manual_seed(7)
    linear = nn.Linear(in_f, out_f)
    layer = NF4Linear.from_linear(linear, blocksize=blocksize, compute_dtype=dtype)
    x = torch.randn(rows, in_f).to(dtype)
    assert int16_decode.linear(x, layer.qweight) is None or rows > int16_decode.MAX_ROWS
    with torch.no_grad():
        y = layer(x)
        int16_decode.set_enabled(False)
        expect = layer(x)
    assert torch.equal(y, expect)


def test_non_finite_activations_go_the_exact_path(int16_on):
    layer = exact_layer()
    x = torch.randn(2, 128)
    x[0, 3] = float("inf")
    x[1, 64:128] = 0
    x[1, 100] = 1e-35  # a block of one tiny value: 16383 / amax would overflow
    with torch.no_grad():
        y = layer(x)
        assert int16_decode.linear(x, layer.qweight) is None
        int16_decode.set_enabled(False)
        torch.testing.assert_close(y, layer(x), rtol=0, atol=0, equal_nan=True)
    assert y.isnan().any() and y[1].isfinite().all()  # inf * (weights of both signs) -> NaN


def test_strided_input_gives_the_contiguous_result(int16_on):
    layer = exact_layer()
    x = torch.randn(128, 3).t()  # [3, 128], not contiguous
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x.contiguous()))


def test_lora_update_joins_the_int16_base(int16_on):
    torch.manual_seed(8)
    lora = LoRALinear(exact_layer(), r=4, alpha=8)
    nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(3, 2, 128)
    w = int16_decode.repacked(lora.base.qweight)
    with torch.no_grad():
        base = int16_decode.reference_matmul(x.view(-1, 128), w, lora.base.bias).view(3, 2, 64)
        update = lora.lora_B(lora.lora_A(x)) * lora.scaling
        assert torch.equal(lora(x), base + update)
        lora.rows = torch.tensor([0, 2])
        y = lora(x)
        assert torch.equal(y[1], base[1])
        assert torch.equal(y[0], base[0] + update[0]) and torch.equal(y[2], base[2] + update[2])


def test_build_failure_is_one_warning_and_the_exact_path(monkeypatch, caplog):
    def broken(isa):
        raise RuntimeError("Error building extension: g++: error: unrecognized option")

    monkeypatch.setattr(int16_decode, "_compile", broken)
    monkeypatch.setattr(int16_decode, "_loaded", {})
    monkeypatch.setattr(int16_decode, "_default", [])
    with caplog.at_level(logging.WARNING, logger="qlora.int16_decode"):
        assert int16_decode.default_kernel() is None
    lines = [r for r in caplog.records if r.name == "qlora.int16_decode"]
    assert len(lines) == 1 and "exact kernel" in lines[0].getMessage()
    layer = exact_layer()
    x = torch.randn(1, 128)
    int16_decode.set_enabled(True)
    try:
        with torch.no_grad():
            assert torch.equal(layer(x), kernel.nf4_linear(x, layer.qweight, layer.bias))
    finally:
        int16_decode.set_enabled(False)


@pytest.mark.parametrize("in_f,out_f", [(2560, 1030), (100, 37), (576, 8)])
def test_gemv_matches_float64_within_float32_rounding(kernels, in_f, out_f):
    g = torch.Generator().manual_seed(in_f + out_f)
    w = (torch.randn(out_f, in_f, generator=g) * 0.05).bfloat16()
    bias = torch.randn(out_f, generator=g)
    for rows in (1, 2, 5, 16):
        x = torch.randn(rows, in_f, generator=g).bfloat16()
        exact = x.double() @ w.double().T + bias.double()
        s = x.double().abs() @ w.double().abs().T
        for isa, k in kernels.items():
            y = k.ops.gemv_bf16(x, w, bias, False).double()
            assert ((y - exact).abs() <= 16 * in_f * U * s + 1e-6).all(), (isa, rows)
            y16 = k.ops.gemv_bf16(x, w, bias.bfloat16(), True)
            ref16 = F.linear(x, w, bias.bfloat16())
            # two roundings to bfloat16 of float32 sums that differ by < the bound above
            assert ((y16.float() - ref16.float()).abs() <= 2**-7 * ref16.float().abs() + 1e-3).all()


def test_gemv_head_shares_parameters_and_switches(int16_on):
    torch.manual_seed(9)
    model = nn.Module()
    model.lm_head = nn.Linear(64, 300, bias=False, dtype=torch.bfloat16)
    model.get_output_embeddings = lambda: model.lm_head
    model.set_output_embeddings = lambda m: setattr(model, "lm_head", m)
    original = model.lm_head.weight
    assert int16_decode.use_gemv_head(model)
    assert model.lm_head.weight is original and isinstance(model.lm_head, int16_decode.GemvLinear)
    assert list(model.lm_head.state_dict()) == ["weight"]
    x = torch.randn(2, 64).bfloat16()
    with torch.no_grad():
        y = model.lm_head(x)
        assert torch.equal(y, int16_decode.default_kernel().ops.gemv_bf16(x, original, None, True))
        int16_decode.set_enabled(False)
        assert torch.equal(model.lm_head(x), F.linear(x, original))


@pytest.mark.parametrize("shape,blocksize", [((4, 64), 64), ((12, 192), 64), ((64, 512), 256)])
def test_element_order_bytes_undo_the_repacking(kernels, shape, blocksize):
    q = weight(*shape, blocksize=blocksize)
    w = int16_decode.repack(q)
    for k in kernels.values():
        assert torch.equal(k.ops.nf4_bytes(w.codes, *shape), q.packed)
    assert torch.equal(int16_decode.element_order_bytes(w), q.packed)


def test_serving_from_the_repacked_layout_gives_the_same_bits(int16_on):
    torch.manual_seed(10)
    model = nn.Sequential(
        LoRALinear(exact_layer(64, 128, seed=11), r=4, alpha=8), nn.GELU(), exact_layer(128, 64)
    )
    nn.init.normal_(model[0].lora_B.weight)
    model.append(NF4Linear.from_linear(nn.Linear(128, 30)))  # 30 rows: not repackable, stays
    x_decode, x_prefill = torch.randn(2, 128), torch.randn(40, 128)
    with torch.no_grad():
        before = [model(x_decode), model(x_prefill)]
        int16_decode.set_enabled(False)
        before.append(model(x_decode))
        int16_decode.set_enabled(True)
    q0 = model[0].base.qweight
    nbytes = q0.nbytes
    assert int16_decode.serve_repacked(model) == 2
    served = model[0].base.qweight
    assert isinstance(served, int16_decode.RepackedNF4Weight) and served.device.type == "cpu"
    assert not isinstance(model[3].qweight, int16_decode.RepackedNF4Weight)
    # the element-order bytes are gone: the repacked codes (the same size) and the float32
    # scales, 4 bytes per 64 weights, replace them
    assert served.nbytes == nbytes + 64 * 128 // 64 * 4
    assert torch.equal(served.packed, q0.packed) and torch.equal(served.absmax, q0.absmax)
    assert torch.equal(dequantize_nf4(served), dequantize_nf4(q0))
    with torch.no_grad():
        assert torch.equal(model(x_decode), before[0])  # the int16 path
        assert torch.equal(model(x_prefill), before[1])  # the exact path, rebuilt bytes
        int16_decode.set_enabled(False)
        assert torch.equal(model(x_decode), before[2])
