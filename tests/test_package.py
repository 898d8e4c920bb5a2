"""The package's shape: no grpo module imports itself back through another; the config is at the
bottom and the step above the loss, rollouts and rewards; the trainer never reaches the tiny
model's warm-up; qlora stands alone; no two modules of the project share a name."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_names(package: str) -> list[str]:
    """Every module of `package`, subpackages included (a package as its dotted name)."""
    names = []
    for p in (ROOT / package).rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(names)


def module_path(module: str):
    path = ROOT / (module.replace(".", "/") + ".py")
    return path if path.is_file() else ROOT / module.replace(".", "/") / "__init__.py"


def imports_of(module: str, packages: tuple[str, ...] = ("grpo", "qlora")) -> set[str]:
    """Every module of `packages` that `module` imports anywhere (top level or in a function)."""
    path = module_path(module)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
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
            if name.split(".")[0] in packages and module_path(name).is_file():
                found.add(name)
    return found - {module}


def test_no_import_cycle_in_grpo():
    graph = {m: imports_of(m) for m in module_names("grpo")}
    assert graph["grpo.trainer"] >= {"grpo.loss", "grpo.rollout", "grpo.rewards"}
    assert graph["grpo.checkpoint"] >= {"grpo.distributed", "grpo.policy"}
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


def reachable(module: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for n in graph.get(todo.pop(), ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def test_config_is_at_the_bottom_and_the_trainer_is_handed_its_model():
    graph = {m: imports_of(m) for m in module_names("grpo")}
    assert reachable("grpo.config", graph) <= {"grpo.choices", "qlora", "qlora.model"} | {
        m for m in module_names("qlora")
    }
    below_step = reachable("grpo.trainer", graph)
    assert {"grpo.loss", "grpo.rollout", "grpo.rewards", "grpo.config"} <= below_step
    assert not {m for m in below_step if m.startswith(("grpo.tiny", "grpo.tasks."))}
    for low in ("grpo.loss", "grpo.rollout", "grpo.rewards", "grpo.config"):
        assert "grpo.trainer" not in reachable(low, graph)


def test_no_library_module_imports_the_tooling():
    for package in ("grpo", "qlora", "app"):
        for m in module_names(package):
            assert not imports_of(m, ("bench",)), m


def test_module_names_are_unique_across_packages():
    stems: dict[str, list[str]] = {}
    for package in ("grpo", "qlora", "app", "bench"):
        for p in (ROOT / package).rglob("*.py"):
            if p.stem not in ("__init__", "__main__"):
                stems.setdefault(p.stem, []).append(str(p.relative_to(ROOT)))
    assert {s: ps for s, ps in stems.items() if len(ps) > 1} == {}
