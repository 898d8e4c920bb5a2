"""qlora/loading.py: a checkpoint read tensor by tensor into NF4 equals load + prepare_qlora."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from grpo.policy import ModelLoadError, load_model
from grpo.tiny.build import build_tiny_phi, save_model_dir
from qlora import (
    PHI_TARGETS,
    CheckpointError,
    NF4Linear,
    load_adapter,
    load_quantized,
    prepare_qlora,
    save_adapter,
)
from qlora.loading import INDEX_FILE, SINGLE_FILE, checkpoint_files, stored_parameters


def nf4_layers(model) -> dict[str, NF4Linear]:
    """{path of the linear: its NF4Linear}; inside a LoRALinear the NF4Linear is `<path>.base`."""
    return {
        n.removesuffix(".base"): m for n, m in model.named_modules() if isinstance(m, NF4Linear)
    }


def assert_same_quantized_model(ours, reference):
    ours_layers, ref_layers = nf4_layers(ours), nf4_layers(reference)
    assert ours_layers.keys() == ref_layers.keys() and len(ours_layers) == 4 * 6
    for name, layer in ours_layers.items():
        q, r = layer.qweight, ref_layers[name].qweight
        assert torch.equal(q.packed, r.packed), name
        assert torch.equal(q.absmax, r.absmax), name
        assert torch.equal(q.absmax_scale, r.absmax_scale), name
        assert torch.equal(q.absmax_offset, r.absmax_offset), name
        assert (q.shape, q.dtype, layer.compute_dtype) == (
            r.shape,
            r.dtype,
            ref_layers[name].compute_dtype,
        )
    ours_params = {n.replace(".base.", "."): p for n, p in ours.named_parameters()}
    for name, p in reference.named_parameters():
        if "lora_" not in name:
            assert torch.equal(ours_params[name.replace(".base.", ".")], p), name
    assert all(not p.requires_grad for p in ours.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_bytes_and_logits_as_load_then_prepare(tiny_model_dir, dtype):
    reference, _ = load_model(tiny_model_dir, dtype)
    # prepare_qlora wraps NF4Linear in LoRALinear; compare the NF4 bases
    prepare_qlora(reference, compute_dtype=None)
    ours = load_quantized(tiny_model_dir, dtype=dtype)
    assert_same_quantized_model(ours, reference)
    ids = torch.tensor([[5, 9, 12, 40, 7]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, reference(ids).logits)  # fresh LoRA B = 0


def test_sharded_checkpoint_loads_the_same(tmp_path, tiny_model_dir):
    model, tokenizer = build_tiny_phi(seed=0)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    files = checkpoint_files(tmp_path / "sharded")
    assert len(files) > 2 and (tmp_path / "sharded" / INDEX_FILE).is_file()
    assert stored_parameters(tmp_path / "sharded") == sum(p.numel() for p in model.parameters())
    assert_same_quantized_model(
        load_quantized(tmp_path / "sharded", dtype=torch.float32),
        load_quantized(tiny_model_dir, dtype=torch.float32),
    )


def test_tied_embeddings_are_tied(tmp_path):
    model, tokenizer = build_tiny_phi(seed=0, tie_word_embeddings=True)
    save_model_dir(model, tokenizer, tmp_path / "tied")
    ours = load_quantized(tmp_path / "tied", dtype=torch.float32)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert torch.equal(ours.lm_head.weight, model.model.embed_tokens.weight)


def test_adapter_on_the_streamed_base_gives_the_usual_logits(tiny_model_dir, tmp_path):
    trained, _ = load_model(tiny_model_dir)
    prepare_qlora(trained, r=8, alpha=16)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    save_adapter(trained, tmp_path / "adapter", str(tiny_model_dir))
    model, _ = load_model(tiny_model_dir, nf4_targets=PHI_TARGETS)
    load_adapter(model, tmp_path / "adapter", quantize=True)
    ids = torch.tensor([[5, 9, 12, 40, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, trained(ids).logits)
    assert model.qlora_config.quantize


def corrupt(tmp_path, tiny_model_dir, edit) -> str:
    """A copy of the tiny checkpoint whose tensors `edit` changed; returns the directory."""
    directory = tmp_path / "broken"
    model, tokenizer = build_tiny_phi(seed=0)
    save_model_dir(model, tokenizer, directory)
    tensors = load_file(directory / SINGLE_FILE)
    edit(tensors)
    save_file(tensors, directory / SINGLE_FILE, metadata={"format": "pt"})
    return str(directory)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda t: t.pop("model.layers.1.mlp.fc2.weight"), "model.layers.1.mlp.fc2.weight"),
        (lambda t: t.pop("model.final_layernorm.bias"), "model.final_layernorm.bias"),
        (lambda t: t.update(extra=torch.zeros(3)), "'extra' is no parameter"),
        (
            lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)}),
            "model.layers.0.self_attn.q_proj.weight has shape (4, 4)",
        ),
    ],
)
def test_a_broken_checkpoint_names_the_tensor(tmp_path, tiny_model_dir, edit, needle):
    directory = corrupt(tmp_path, tiny_model_dir, edit)
    with pytest.raises(CheckpointError, match="fix:") as err:
        load_quantized(directory)
    assert needle in str(err.value)
    with pytest.raises(ModelLoadError, match="fix:"):  # the one loader says it in one line
        load_model(directory, nf4_targets=PHI_TARGETS)


def test_pickled_weights_are_never_read(tmp_path, tiny_model_dir):
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never read"):
        load_quantized(directory)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_quantized(tmp_path / "nowhere")


def test_a_target_the_model_lacks_is_named(tiny_model_dir):
    with pytest.raises(ValueError, match="'wq' matches no module.*fc1"):
        load_quantized(tiny_model_dir, target_modules=("q_proj", "wq"))


def test_index_lists_every_shard(tmp_path):
    model, _ = build_tiny_phi(seed=0)
    model.save_pretrained(tmp_path / "s", max_shard_size="200KB")
    index = json.loads((tmp_path / "s" / INDEX_FILE).read_text())
    assert {p.name for p in checkpoint_files(tmp_path / "s")} == set(index["weight_map"].values())


RETENTION_PROBE = """
import sys, torch
from qlora import return_large_frees_to_os
from bench.measure import current_rss_bytes
if sys.argv[1] == "set":
    assert return_large_frees_to_os()
torch.ones(1)
base = current_rss_bytes()
# a training step's pattern: many 8-30 MB tensors, each freed soon, a few kept a while
kept = []
for i in range(120):
    t = torch.ones((2 + i % 6) * 1024 * 1024)  # 8-28 MB of float32
    if i % 10 == 0:
        kept.append(torch.ones(1024))  # small long-lived blocks between the large ones
    del t
print((current_rss_bytes() - base) / 1e6)
"""


@pytest.mark.slow
def test_large_frees_go_back_to_the_os(tmp_path):
    """With the fixed mmap threshold, memory freed by large tensors leaves the resident set;
    glibc's default keeps it as free heap (the control run shows the probe can see that)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]

    def retained_mb(mode: str) -> float:
        out = subprocess.run(
            [sys.executable, "-c", RETENTION_PROBE, mode],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        )
        return float(out.stdout.strip())

    assert retained_mb("set") < 10
    assert retained_mb("default") > 20
