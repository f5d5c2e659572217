"""The layout's rule: a stage module only orchestrates its stage. No stage imports another stage,
directly or through the shared modules it imports (shared code lives in modules named for what
they hold: tasks/models, tasks/training.py, tasks/onnx_export.py, tasks/qdq.py, ...)."""

import ast
import re
from pathlib import Path

from tasks.project import ROOT

TASKS = ROOT / "tasks"


def stages() -> set[str]:
    """The modules dvc.yaml runs (`python -m tasks.<stage>`)."""
    return set(re.findall(r"python -m tasks\.(\w+)", (ROOT / "dvc.yaml").read_text()))


def module_file(name: str) -> Path | None:
    """The file of module `tasks.a.b` (a package's __init__), or None if there is none."""
    path = TASKS.joinpath(*name.split(".")[1:])
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imports(name: str) -> set[str]:
    """Every `tasks.*` module that module `name` imports, at the top or inside a function."""
    path = module_file(name)
    if path is None:
        return set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}")}
    return {m for m in found if m.split(".")[0] == "tasks" and module_file(m)}


def stage_of(module: str, names: set[str]) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in names else None


def crossings(names: set[str]) -> list[str]:
    """`stage -> ... -> other stage` import chains, following shared modules transitively."""
    found = []
    for stage in sorted(names):
        seen, todo = set(), [f"tasks.{stage}"]
        while todo:
            module = todo.pop()
            for dep in imports(module) - seen:
                seen.add(dep)
                other = stage_of(dep, names)
                if other is not None and other != stage:
                    found.append(f"tasks.{stage} -> ... {module} -> {dep}")
                else:
                    todo.append(dep)
    return found


def test_no_stage_imports_another_stage():
    names = stages()
    assert {"train", "prune", "distill", "export", "quantize", "evaluate"} <= names
    assert not crossings(names), "\n".join(crossings(names))


def test_the_walk_finds_a_stage_reaching_a_stage_through_shared_code(tmp_path, monkeypatch):
    fake = tmp_path / "tasks"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "a.py").write_text("from tasks import shared\n")
    (fake / "shared.py").write_text("def f():\n    from tasks.b import g\n")
    (fake / "b.py").write_text("def g(): ...\n")
    monkeypatch.setitem(globals(), "TASKS", fake)
    assert crossings({"a", "b"}) == ["tasks.a -> ... tasks.shared -> tasks.b"]
    (fake / "shared.py").write_text("def f(): ...\n")
    assert crossings({"a", "b"}) == []
