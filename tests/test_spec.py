"""app/spec.py: a run directory or --model/--adapter resolved into what the demo loads, and the
one-line DemoError for each missing or bad path (nothing is loaded)."""

import json

import pytest

from app.spec import DemoError, resolve_spec
from grpo.config import GRPOConfig


def make_run(tmp_path, **overrides):
    """A run directory as `make train` leaves it: config.yaml, base/, adapter/, summary.json."""
    run = tmp_path / "run"
    (run / "base").mkdir(parents=True)
    (run / "base" / "config.json").write_text("{}")
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    GRPOConfig(**overrides).save_yaml(run / "config.yaml")
    (run / "summary.json").write_text(json.dumps({"accuracy_after": 0.5}))
    return run


def test_a_run_directory_gives_its_base_adapter_task_and_settings(tmp_path):
    run = make_run(tmp_path, max_new_tokens=5)
    spec = resolve_spec(str(run))
    assert spec.model == str(run / "base") and spec.adapter == run / "adapter"
    assert (spec.task, spec.dtype, spec.max_new_tokens) == ("arithmetic", "float32", 5)
    assert spec.summary == {"accuracy_after": 0.5} and spec.config.max_new_tokens == 5
    assert resolve_spec(str(run), task="gsm8k", dtype="bfloat16").task == "gsm8k"


def test_a_bad_summary_is_ignored_with_a_warning(tmp_path, capsys):
    run = make_run(tmp_path)
    (run / "summary.json").write_text("{not json")
    assert resolve_spec(str(run)).summary == {}
    assert "summary.json is not valid JSON; ignored" in capsys.readouterr().err


def test_an_adapter_alone_names_its_base_model(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "a/b"}))
    spec = resolve_spec(None, adapter=str(adapter))
    assert (spec.model, spec.adapter, spec.dtype, spec.max_new_tokens) == (
        "a/b",
        adapter,
        "auto",
        64,
    )


@pytest.mark.parametrize(
    "case, message",
    [
        ("no config", "config.yaml is missing, so .* is not a trained run"),
        ("bad config", "unknown key 'bogus'.*; fix: repair the file or re-run `make train`"),
        ("no adapter dir", "adapter .*adapter_config.json does not exist; fix: run `make train`"),
        ("nothing", "no adapter given; fix: pass --run-dir runs/tiny"),
        ("adapter not json object", "adapter_config.json is not a JSON object"),
        ("adapter without base", "names no base_model_name_or_path; fix: pass --model"),
        ("model dir without config", "model ./nowhere: no config.json there"),
    ],
)
def test_each_bad_path_is_one_demo_error_line(tmp_path, case, message):
    run = make_run(tmp_path)
    adapter = run / "adapter"
    args = {"run_dir": str(run)}
    if case == "no config":
        (run / "config.yaml").unlink()
    elif case == "bad config":
        (run / "config.yaml").write_text("bogus: 1\n")
    elif case == "no adapter dir":
        (adapter / "adapter_config.json").unlink()
    elif case == "nothing":
        args = {"run_dir": None}
    elif case == "adapter not json object":
        (adapter / "adapter_config.json").write_text("[1, 2]")
        args = {"run_dir": None, "adapter": str(adapter)}
    elif case == "adapter without base":
        args = {"run_dir": None, "adapter": str(adapter)}
    else:
        args = {"run_dir": str(run), "model": "./nowhere"}
    with pytest.raises(DemoError, match=message) as err:
        resolve_spec(**args)
    assert "\n" not in str(err.value)
