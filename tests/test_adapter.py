"""Adapters in peft's format: peft loads ours, we load peft's, bad directories fail loudly."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import qlora.adapter
from grpo.policy import load_model
from qlora import AdapterError, LoRALinear, NF4Linear, load_adapter, prepare_qlora, save_adapter

pytestmark = pytest.mark.slow  # trains, spawns processes, builds the kernel or drives a browser

peft = pytest.importorskip("peft")


def base_model(directory):
    model, _ = load_model(directory)
    return model.eval()


def ids(seed=0):
    return torch.randint(4, 90, (2, 10), generator=torch.Generator().manual_seed(seed))


def randomize_lora_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def logits(model):
    with torch.no_grad():
        return model(ids()).logits


@pytest.fixture
def saved(tiny_model_dir, tmp_path):
    """A tiny Phi with a non-zero LoRA (r=8, q_proj/v_proj/fc1, unquantized), saved by us."""
    model = prepare_qlora(
        base_model(tiny_model_dir),
        ("q_proj", "v_proj", "fc1"),
        r=8,
        alpha=16,
        dropout=0.0,
        quantize=False,
    )
    randomize_lora_b(model)
    return model, save_adapter(model, tmp_path / "adapter", str(tiny_model_dir))


def test_save_writes_peft_config_and_keys(saved, tiny_model_dir):
    model, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert [p.name for p in directory.parent.iterdir()] == ["adapter"]  # no temp dir left
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.0)
    assert config["target_modules"] == ["q_proj", "v_proj", "fc1"]
    assert config["bias"] == "none" and config["use_rslora"] is False
    assert config["fan_in_fan_out"] is False and config["inference_mode"] is True
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    tensors = load_file(directory / "adapter_model.safetensors")
    assert len(tensors) == 4 * 3 * 2
    key = "base_model.model.model.layers.0.mlp.fc1"
    assert tensors[f"{key}.lora_A.weight"].shape == (8, 128)
    assert tensors[f"{key}.lora_B.weight"].shape == (512, 8)
    with safe_open(directory / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_loads_our_adapter_with_the_same_logits(tiny_model_dir, tmp_path, use_rslora):
    model = prepare_qlora(
        base_model(tiny_model_dir),
        r=8,
        alpha=16,
        dropout=0.0,
        quantize=False,
        use_rslora=use_rslora,
    )
    randomize_lora_b(model)
    directory = save_adapter(model, tmp_path / "ours", "tiny")
    theirs = peft.PeftModel.from_pretrained(base_model(tiny_model_dir), directory).eval()
    assert torch.allclose(logits(theirs), logits(model), atol=1e-5)
    assert not torch.allclose(logits(base_model(tiny_model_dir)), logits(model), atol=1e-3)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_we_load_an_adapter_peft_wrote_with_the_same_logits(tiny_model_dir, tmp_path, use_rslora):
    config = peft.LoraConfig(
        r=4,
        lora_alpha=12,
        target_modules=["k_proj", "dense", "fc2"],
        lora_dropout=0.0,
        use_rslora=use_rslora,
        task_type="CAUSAL_LM",
    )
    theirs = peft.get_peft_model(base_model(tiny_model_dir), config).eval()
    randomize_lora_b(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    ours = load_adapter(base_model(tiny_model_dir), tmp_path / "peft")
    assert len([m for m in ours.modules() if isinstance(m, LoRALinear)]) == 4 * 3
    assert torch.allclose(logits(ours), logits(theirs), atol=1e-5)
    assert not torch.allclose(logits(base_model(tiny_model_dir)), logits(ours), atol=1e-3)


def test_quantized_round_trip_is_exact(tiny_model_dir, tmp_path):
    model = prepare_qlora(base_model(tiny_model_dir), r=8, alpha=16)
    randomize_lora_b(model)
    directory = save_adapter(model, tmp_path / "adapter", "tiny")
    loaded = load_adapter(base_model(tiny_model_dir), directory, quantize=True)
    assert isinstance(loaded.model.layers[0].mlp.fc2.base, NF4Linear)
    assert torch.equal(logits(loaded), logits(model))
    again = load_adapter(loaded, directory)  # into a model that already has these layers
    assert torch.equal(logits(again), logits(model))


def test_overwrite_is_atomic_and_refuses_foreign_directories(saved, tmp_path, monkeypatch):
    model, directory = saved
    before = (directory / "adapter_model.safetensors").read_bytes()
    randomize_lora_b(model, seed=2)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(qlora.adapter, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, directory, "tiny")
    assert (directory / "adapter_model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # temp dir cleaned up
    monkeypatch.setattr(qlora.adapter, "save_file", save_file)
    save_adapter(model, directory, "tiny")
    assert (directory / "adapter_model.safetensors").read_bytes() != before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(AdapterError, match=r"holds 'todo.txt', which is not an adapter file"):
        save_adapter(model, tmp_path / "notes", "tiny")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


# --- errors name the path or key, and the fix -----------------------------------------------------


def one_line(err):
    message = str(err.value)
    assert "\n" not in message and "fix" in message
    return message


def rewrite_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_pickle_only_directory_is_refused(saved, tiny_model_dir):
    _, directory = saved
    (directory / "adapter_model.safetensors").rename(directory / "adapter_model.bin")
    with pytest.raises(AdapterError, match=r"adapter_model.bin is a pickle file and is never read"):
        load_adapter(base_model(tiny_model_dir), directory)
    assert issubclass(AdapterError, ValueError)


def test_missing_directory_and_wrong_target_names(saved, tiny_model_dir, tmp_path):
    _, directory = saved
    with pytest.raises(AdapterError, match=r"adapter directory .*nowhere does not exist") as err:
        load_adapter(base_model(tiny_model_dir), tmp_path / "nowhere")
    one_line(err)
    rewrite_config(directory, target_modules=["query_key_value"])
    model = base_model(tiny_model_dir)
    pattern = r"adapter_config.json: target module 'query_key_value' matches no module"
    with pytest.raises(AdapterError, match=pattern) as err:
        load_adapter(model, directory)
    one_line(err)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # untouched


def test_wrong_shapes_missing_and_unexpected_keys(saved, tiny_model_dir):
    _, directory = saved
    weights = directory / "adapter_model.safetensors"
    tensors = load_file(weights)
    model = base_model(tiny_model_dir)

    rewrite_config(directory, r=4)
    pattern = r"lora_A.weight has shape \(8, 128\), this model needs \(4, 128\) \(r=4\)"
    with pytest.raises(AdapterError, match=pattern) as err:
        load_adapter(model, directory)
    one_line(err)
    rewrite_config(directory, r=8)

    first = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != first}, weights)
    with pytest.raises(AdapterError, match=rf"key {first} is missing") as err:
        load_adapter(model, directory)
    one_line(err)

    rewrite_config(directory, target_modules=["q_proj", "v_proj"])  # file still has fc1 keys
    save_file(tensors, weights)
    pattern = r"key base_model.model.model.layers.0.mlp.fc1.lora_A.weight names no LoRA layer"
    with pytest.raises(AdapterError, match=pattern) as err:
        load_adapter(model, directory)
    one_line(err)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_unsupported_options_and_mismatched_existing_layers(saved, tiny_model_dir):
    _, directory = saved
    rewrite_config(directory, use_dora=True)
    with pytest.raises(AdapterError, match=r"use_dora=True is not supported"):
        load_adapter(base_model(tiny_model_dir), directory)
    rewrite_config(directory, use_dora=False)
    other = prepare_qlora(base_model(tiny_model_dir), ("q_proj", "v_proj", "fc1"), r=16)
    with pytest.raises(AdapterError, match=r"r=8, lora_alpha=16.*has r=16"):
        load_adapter(other, directory)
    with pytest.raises(AdapterError, match=r"r= comes from .*adapter_config.json"):
        load_adapter(base_model(tiny_model_dir), directory, r=4)
    with pytest.raises(AdapterError, match=r"no LoRA layers to save"):
        save_adapter(base_model(tiny_model_dir), directory, "tiny")
