"""bench/decode_profile.py: operator self times grouped into the rows of the README's table."""

from types import SimpleNamespace

import pytest

from bench import decode_profile
from qlora import int16_decode

pytestmark = pytest.mark.slow  # builds the kernels and a 2-layer random Phi-2


def event(name, parent=None):
    return SimpleNamespace(name=name, cpu_parent=parent)


def test_operators_group_by_name_and_the_output_layer_by_its_range():
    head = event(decode_profile.OUTPUT)
    cases = {
        "qlora_int16_native_x::int16_matmul": "NF4 matmuls, int16 kernel",
        "qlora_nf4_native_x::matmul": "NF4 matmuls, exact kernel",
        "aten::_scaled_dot_product_flash_attention_for_cpu": decode_profile.GROUPS[2][0],
        "aten::mm": "LoRA (two small matmuls per linear)",
        "aten::add": decode_profile.OTHER,
    }
    for name, row in cases.items():
        assert decode_profile.group_of(event(name)) == row
    # under the output layer's range every operator is the output layer's, aten::mm included
    assert (
        decode_profile.group_of(event("aten::mm", event("aten::linear", head)))
        == decode_profile.OUTPUT
    )


def test_render_gives_shares_of_operator_time_and_the_matmuls_read_rate():
    groups = {
        "NF4 matmuls, int16 kernel": 30.0,
        decode_profile.OUTPUT: 10.0,
        decode_profile.OTHER: 20.0,
    }
    text = decode_profile.render({"step_ms": 80.0, "groups": groups, "bytes": 1.5e9}, 100.0)
    assert (
        "median step 80 ms (12.5 tokens/s per side" in text and "60 ms of it in operators" in text
    )
    assert (
        "| NF4 matmuls, int16 kernel | 50% | 30.0 ms: 1.50 GB, 50 GB/s, 0.50 of the read probe |"
        in text
    )
    assert f"| {decode_profile.OUTPUT} | 17% | 10.0 ms |" in text


def test_int16_profile_of_a_two_layer_phi2_has_every_row(capsys):
    if int16_decode.default_kernel() is None:
        pytest.fail("the int16 kernel did not build; the demo's --int16 route cannot be profiled")
    assert (
        decode_profile.main(["--int16", "--layers", "2", "--steps", "3", "--prompt-tokens", "16"])
        == 0
    )
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "share" not in line]
    shares = [int(line.split(" | ")[1].rstrip("%")) for line in rows]
    assert 97 <= sum(shares) <= 103  # rounded shares of all operator time
    names = {line.split(" | ")[0][2:] for line in rows}
    assert {
        "NF4 matmuls, int16 kernel",
        decode_profile.OUTPUT,
        "LoRA (two small matmuls per linear)",
    } <= names


def test_bad_arguments_are_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        decode_profile.main(["--steps", "0"])
    assert exit_info.value.code == 2
    assert "--steps 0 must be >= 1" in capsys.readouterr().err
