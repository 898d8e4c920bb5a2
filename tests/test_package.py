"""The package's shape: no grpo module imports itself back through another; qlora stands alone."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_names(package: str) -> list[str]:
    return sorted(
        f"{package}.{p.stem}" for p in (ROOT / package).glob("*.py") if p.stem != "__init__"
    )


def imports_of(module: str, packages: tuple[str, ...] = ("grpo", "qlora")) -> set[str]:
    """Every module of `packages` that `module` imports anywhere (top level or in a function)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    package = module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x / from .x import y
                base = package + ("." + base if base else "")
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if (
                name.split(".")[0] in packages
                and (ROOT / (name.replace(".", "/") + ".py")).is_file()
            ):
                found.add(name)
    return found - {module}


def test_no_import_cycle_in_grpo():
    graph = {m: imports_of(m) for m in module_names("grpo")}
    assert graph["grpo.trainer"] >= {"grpo.loss", "grpo.rollout", "grpo.warmup"}
    assert graph["grpo.checkpoint"] >= {"grpo.atomic", "grpo.distributed", "grpo.model"}
    state: dict[str, str] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                cycles.append(path[path.index(n) :] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_qlora_never_imports_grpo():
    offenders = {m: imports_of(m, ("grpo",)) for m in module_names("qlora")}
    assert {m: i for m, i in offenders.items() if i} == {}
