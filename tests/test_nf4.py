"""NF4 against its oracle: our bytes, statistics and dequantized values equal bitsandbytes'."""

import pytest
import torch

import qlora
from qlora import NF4_CODE, create_dynamic_map, create_normal_map, dequantize_nf4, quantize_nf4
from qlora.nf4 import quantize_dynamic_8bit

bnbf = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture
def eager_bnb():
    """bnb's fallback for an odd last dimension is torch.compile'd; compiling costs seconds and
    cannot change the values of code[i] * absmax, so run it eagerly."""
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


def bnb_quantize(w, dq, blocksize=64):
    return bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=dq)


def assert_matches_bnb(w, dq, blocksize=64):
    q = quantize_nf4(w, blocksize=blocksize, double_quant=dq)
    packed, state = bnb_quantize(w, dq, blocksize)
    assert q.packed.dtype == torch.uint8 and q.packed.shape == ((w.numel() + 1) // 2,)
    assert torch.equal(q.packed, packed.view(-1))
    assert torch.equal(q.absmax, state.absmax)
    if dq:
        assert q.absmax.dtype == torch.uint8
        assert torch.equal(q.absmax_scale, state.state2.absmax)
        assert torch.equal(q.absmax_offset, state.offset)
        assert torch.equal(state.state2.code, create_dynamic_map())
    else:
        assert q.absmax.dtype == torch.float32 and q.absmax_scale is None
    ours, theirs = dequantize_nf4(q), bnbf.dequantize_4bit(packed, state)
    assert ours.dtype == theirs.dtype == w.dtype and ours.shape == w.shape
    assert torch.equal(ours, theirs)  # bit for bit, not allclose
    return q


# --- the two code tables ----------------------------------------------------------------------


def test_nf4_code_is_bitsandbytes_table_in_order():
    assert NF4_CODE.dtype == torch.float32 and NF4_CODE.shape == (16,)
    assert NF4_CODE[0] == -1.0 and NF4_CODE[7] == 0.0 and NF4_CODE[15] == 1.0
    assert torch.all(NF4_CODE[1:] > NF4_CODE[:-1])
    assert torch.equal(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"))


def test_nf4_code_derives_from_normal_quantiles_with_scipy():
    norm = pytest.importorskip("scipy.stats").norm
    offset = 0.9677083
    # 8 positive and 7 negative quantiles, equally spaced in probability, plus an exact zero
    positive = norm.ppf(torch.linspace(offset, 0.5, 9)[:-1].double().numpy())
    negative = -norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].double().numpy())
    values = torch.tensor(sorted([*negative, 0.0, *positive]), dtype=torch.float64)
    derived = values / values.max()
    assert (derived.float() - NF4_CODE).abs().max() < 1e-6
    assert (create_normal_map(offset) - NF4_CODE).abs().max() < 1e-6  # torch.special.ndtri
    # and bitsandbytes' own derivation (a 256-slot table with zeros as padding)
    bnb_map = bnbf.create_normal_map(offset)
    assert (bnb_map[bnb_map != 0] - NF4_CODE[NF4_CODE != 0]).abs().max() < 1e-6


def test_dynamic_map_written_by_hand_equals_bitsandbytes():
    ours = create_dynamic_map()
    assert ours.shape == (256,) and ours.dtype == torch.float32
    assert torch.equal(ours, bnbf.create_dynamic_map(signed=True))
    assert ours.max() == 1.0 and ours.min() == pytest.approx(-0.99297, abs=1e-5)
    assert torch.equal(create_dynamic_map(signed=False), bnbf.create_dynamic_map(signed=False))


# --- quantize / dequantize: the oracle tests ----------------------------------------------------


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("shape", [(64, 64), (256, 2560), (1000, 333)])
def test_normal_weights_match_bitsandbytes(shape, dq, eager_bnb):
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=g) * 0.02
    q = assert_matches_bnb(w, dq)
    assert q.n_blocks == -(-w.numel() // 64)  # (1000, 333): the partial last block has its own


@pytest.mark.parametrize("dq", [False, True])
def test_zero_and_constant_blocks_match_bitsandbytes(dq):
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    w[3] = 0.0  # one all-zero block: absmax 0, every code 7 (the exact 0.0)
    w[5] = 0.3  # one constant block: everything at the block's absmax
    q = assert_matches_bnb(w, dq)
    assert torch.all(q.packed[3 * 32 : 4 * 32] == 0x77)
    assert torch.all(q.packed[5 * 32 : 6 * 32] == 0xFF)
    assert torch.all(dequantize_nf4(q)[3] == 0.0)
    assert_matches_bnb(torch.zeros(64, 64), dq)  # every block zero: absmax deviations all 0
    assert_matches_bnb(torch.full((64, 64), -0.5), dq)


@pytest.mark.parametrize("dq", [False, True])
def test_midpoints_round_to_the_lower_code(dq, eager_bnb):
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # float32, exactly representable
    block = torch.cat([torch.tensor([1.0]), midpoints, -midpoints, torch.zeros(33)])  # 64 values
    w = torch.stack([block, block.flip(0)])  # absmax 1.0: x / absmax == x exactly
    q = assert_matches_bnb(w, dq)
    codes = torch.stack([q.packed >> 4, q.packed & 0xF], dim=1).view(-1).long()
    on_midpoint = codes[1:16]
    assert on_midpoint.tolist() == list(range(15))  # midpoint k|k+1 -> k, the lower code
    # the same with a partial last block (divided, not multiplied, in bnb) of odd length
    assert_matches_bnb(torch.cat([block, block[:31]]).view(1, 95), dq)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_match_bitsandbytes(dtype):
    w = torch.randn(128, 192, generator=torch.Generator().manual_seed(2)).to(dtype)
    assert_matches_bnb(w, dq=True)


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_other_blocksizes_match_bitsandbytes(blocksize):
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(3))
    assert_matches_bnb(w, dq=True, blocksize=blocksize)


def test_dequantize_in_bfloat16_equals_bitsandbytes_bf16_output():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    packed, state = bnb_quantize(w, dq=True)
    state.dtype = torch.bfloat16  # ask bnb for bf16 output from the same bytes
    theirs = bnbf.dequantize_4bit(packed, state)
    assert torch.equal(dequantize_nf4(quantize_nf4(w), torch.bfloat16), theirs)


def test_docstring_worked_example():
    q = quantize_nf4(torch.tensor([[0.5, -1.0, 0.0, 0.25]]), blocksize=32, double_quant=False)
    assert q.packed.tolist() == [0xC0, 0x7A] and q.absmax.tolist() == [1.0]


def test_second_level_code_matches_bitsandbytes_on_every_grid_point():
    """bnb's CPU 8-bit quantizer rounds onto a 65536-point grid before its table lookup;
    sweep all grid points (each block's first value 1.0 pins the scale at 1)."""
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535
    grid = torch.nn.functional.pad(grid, (0, 255 * 258 - grid.numel())).view(258, 255)
    x = torch.cat([torch.ones(258, 1), grid], dim=1).view(-1)  # [258 * 256]
    ours_codes, ours_scale = quantize_dynamic_8bit(x)
    theirs_codes, state = bnbf.quantize_blockwise(x, blocksize=256)
    assert torch.equal(ours_codes, theirs_codes) and torch.equal(ours_scale, state.absmax)
    g = torch.Generator().manual_seed(5)
    for scale in (1.0, 1e-3, 37.0):  # random values, partial last block
        x = torch.randn(12345, generator=g) * scale
        ours_codes, ours_scale = quantize_dynamic_8bit(x)
        theirs_codes, state = bnbf.quantize_blockwise(x, blocksize=256)
        assert torch.equal(ours_codes, theirs_codes) and torch.equal(ours_scale, state.absmax)


# --- quality and footprint ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def normal_4096():
    return torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))


def test_mean_absolute_error_on_normal_data_is_the_qlora_figure(normal_4096):
    w = normal_4096
    mae = (dequantize_nf4(quantize_nf4(w, 64, double_quant=False)) - w).abs().mean().item()
    assert mae == pytest.approx(0.0728, rel=0.01)
    mae_dq = (dequantize_nf4(quantize_nf4(w, 64, double_quant=True)) - w).abs().mean().item()
    assert mae_dq == pytest.approx(0.0728, rel=0.01)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="fp4")  # for contrast
    fp4_mae = (bnbf.dequantize_4bit(packed, state, quant_type="fp4") - w).abs().mean().item()
    assert fp4_mae == pytest.approx(0.0965, rel=0.01)


def test_footprint_bits_per_parameter(normal_4096):
    n = normal_4096.numel()
    plain = quantize_nf4(normal_4096, 64, double_quant=False)
    assert plain.nbytes * 8 / n == 4.5  # 4 + 32/64
    nested = quantize_nf4(normal_4096, 64, double_quant=True)
    expected = 4 + 8 / 64 + 32 / (64 * 256) + 32 / n  # the last term: the one float32 offset
    assert nested.nbytes * 8 / n == pytest.approx(expected, rel=1e-12)
    assert nested.nbytes * 8 / n == pytest.approx(4.127, abs=5e-4)
    layer = qlora.NF4Linear(nested, bias=None, compute_dtype=torch.float32)
    stats = qlora.footprint(layer)
    assert stats["params"] == n and stats["bytes"] == qlora.stored_bytes(layer) == nested.nbytes
    assert stats["bits_per_param"] == pytest.approx(expected, rel=1e-12)


def test_bad_inputs_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"blocksize=48 .* use one of"):
        quantize_nf4(torch.randn(4, 64), blocksize=48)
    with pytest.raises(ValueError, match=r"non-empty float tensor, got dtype=torch.int64"):
        quantize_nf4(torch.ones(4, 64, dtype=torch.long))
