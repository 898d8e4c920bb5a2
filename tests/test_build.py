import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PhiForCausalLM

from grpo.tiny.build import CHARACTERS, build_char_tokenizer, build_tiny_phi, save_tiny_phi

PHI2_LINEARS = {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2", "lm_head"}


def test_tiny_phi_is_transformers_phi_with_phi2_module_names():
    model, tok = build_tiny_phi(seed=0)
    assert type(model) is PhiForCausalLM
    linears = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    assert linears == PHI2_LINEARS
    n_params = sum(p.numel() for p in model.parameters())
    assert 500_000 < n_params < 2_000_000  # ~0.8M: a GRPO step well under a second on 2 cores
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.4  # as Phi-2
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert int(head_dim * 0.4) % 2 == 0


def test_tokenizer_special_tokens_and_exact_round_trip():
    tok = build_char_tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 4 + len(CHARACTERS)
    for text in [
        "47+35=",
        "12-99=-87",
        "Instruct: What is 3*4?\nOutput: <answer>12</answer>",
        "  two  spaces\n\nand lines ",
        CHARACTERS,
    ]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert tok.decode(ids) == text
    assert tok.decode([tok.eos_token_id, 5], skip_special_tokens=True) == tok.decode([5])
    assert tok("~", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_save_and_from_pretrained_round_trip(tmp_path):
    model, tok = build_tiny_phi(seed=3)
    path = save_tiny_phi(tmp_path / "tiny", seed=3)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in path.iterdir()
    }
    assert not list(tmp_path.glob(".tiny.tmp-*"))  # atomic: no temp dir left behind
    loaded = AutoModelForCausalLM.from_pretrained(path)
    loaded_tok = AutoTokenizer.from_pretrained(path)
    assert type(loaded) is PhiForCausalLM
    text = "58-13=45"
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    assert loaded_tok(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded_tok.decode(ids[0]) == text
