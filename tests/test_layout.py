"""The layout's rule: a stage module only orchestrates its stage. No stage imports another stage,
directly or through the shared modules it imports (shared code lives in modules named for what
they hold: tasks/models, tasks/models/training.py, tasks/models/onnx_export.py,
tasks/quantization/qdq.py, ...)."""

import ast
import functools
import re
from pathlib import Path
from typing import get_args

import yaml

from tasks.harness.project import ROOT

TASKS = ROOT / "tasks"
PROJECT = ("tasks", "flows")  # the project's own packages (the rest is third-party)


@functools.cache
def parse(text: str) -> ast.Module:
    """A module's syntax tree (cached by its text: the walks visit shared modules often)."""
    return ast.parse(text)


def stages() -> set[str]:
    """The modules dvc.yaml runs (`python -m tasks.<stage>`)."""
    return set(re.findall(r"python -m tasks\.(\w+)", (ROOT / "dvc.yaml").read_text()))


def module_file(name: str) -> Path | None:
    """The file of project module `tasks.a.b` or `flows.a` (a package's __init__), or None."""
    top, *rest = name.split(".")
    if top not in PROJECT:
        return None
    path = (TASKS if top == "tasks" else ROOT / top).joinpath(*rest)
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imports(name: str) -> set[str]:
    """Every project module (tasks.*, flows.*) that module `name` imports, at the top or
    inside a function."""
    path = module_file(name)
    if path is None:
        return set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}")}
    return {m for m in found if module_file(m)}


def stage_of(module: str, names: set[str]) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "tasks" and parts[1] in names else None


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


# --- dvc.yaml deps are exactly the code each stage runs ------------------------------------
#
# A stage's code is its entry module (`python -m tasks.<stage>`; a package's __init__ and
# __main__), every project module (tasks.*, flows.*) it imports at any depth, at the top or
# inside a function (the walk cannot tell which functions run, so it counts all), and the
# __init__ of every package on the way (Python runs them). The harness every stage imports
# (tasks/harness/: stage.py, config/, errors.py, io.py, tracking.py, and what they
# import) is no exception: a change to the config loader can change what any stage does.
#
# Modules loaded by name: `tasks.engines.get(target)` and `tasks.models.adapter_for(cfg)` import
# a module of their package chosen at run time. A module that uses such a loader (a function of
# the package's __init__ calling importlib.import_module, or one calling those) makes the whole
# package folder a dep (`tasks/engines`, `tasks/models`), and every module in it part of the
# stage's code. Importing the package for anything else (a constant, a type) is a file dep.
# One narrowing: where a stage's config fixes which names it may load (prune.engine:
# Literal["onnxruntime", "openvino"]), the package's __init__ and those engines' modules are
# enough; the narrowing is read from the config's own Literal, not written here.
#
# A folder dep must be earned: a loader's package the stage uses, or a folder all of whose
# modules the stage runs. A user's `model.factory` module lives outside the project: it is a
# params value (section `model`), not a code dep this test can see.


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def package_modules(package: str) -> set[str]:
    """Every module under a package's folder (recursively), as dotted names."""
    folder = module_file(package).parent
    return {
        ".".join([package, *f.relative_to(folder).with_suffix("").parts]).removesuffix(".__init__")
        for f in folder.rglob("*.py")
    }


def loaders(package: str) -> set[str]:
    """The functions of a package's __init__ that import a module by name: those calling
    importlib.import_module, and (transitively) those calling them."""
    tree = parse(module_file(package).read_text())
    funcs = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}

    def calls(f: ast.FunctionDef) -> set[str]:
        out = set()
        for node in ast.walk(f):
            if isinstance(node, ast.Call):
                fn = node.func
                if isinstance(fn, ast.Attribute) and fn.attr == "import_module":
                    out.add("import_module")
                elif isinstance(fn, ast.Name):
                    out.add(fn.id)
        return out

    found = {n for n, f in funcs.items() if "import_module" in calls(f)}
    while True:
        more = {n for n, f in funcs.items() if calls(f) & found} - found
        if not more:
            return found
        found |= more


def dynamic_packages() -> dict[str, set[str]]:
    """{package: its loader functions} for every project package whose __init__ has any."""
    out = {}
    for top in PROJECT:
        base = TASKS if top == "tasks" else ROOT / top
        for init in base.rglob("__init__.py"):
            name = ".".join([top, *init.parent.relative_to(base).parts])
            if found := loaders(name):
                out[name] = found
    return out


def uses_loader(module: str, package: str, names: set[str]) -> bool:
    """Whether `module` imports one of `package`'s loaders or calls one through the package."""
    path = module_file(module)
    if path is None or module == package:
        return False
    tree = parse(path.read_text())
    aliases = set()  # local names bound to the package itself
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module == package
            and {a.name for a in node.names} & names
        ):
            return True
        if isinstance(node, ast.ImportFrom) and f"{node.module}." in f"{package}.":
            aliases |= {
                a.asname or a.name for a in node.names if f"{node.module}.{a.name}" == package
            }
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == package and a.asname}
    return any(
        isinstance(n, ast.Attribute)
        and n.attr in names
        and (
            (isinstance(n.value, ast.Name) and n.value.id in aliases)
            or ast.unparse(n.value) == package
        )
        for n in ast.walk(tree)
    )


def siblings_read(module: str) -> set[str]:
    """Modules that `module` hands on as files (`Path(__file__).with_name("x.py")`: MLflow's
    models-from-code reads the file at promote time), as dotted names."""
    path = module_file(module)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "with_name"
            and "__file__" in ast.unparse(node.func.value)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and str(node.args[0].value).endswith(".py")
        ):
            found.add(f"{package}.{node.args[0].value.removesuffix('.py')}")
    return {m for m in found if module_file(m)}


def entry_modules(cmd: str) -> list[str]:
    """The project modules a stage's command runs (`python -m pkg.mod`; a package's __main__)."""
    out = []
    for name in re.findall(r"python -m ((?:tasks|flows)(?:\.\w+)+)", cmd):
        out.append(name)
        path = module_file(name)
        if path is not None and path.name == "__init__.py":
            out.append(f"{name}.__main__")
    return out


def narrowed(stage: str) -> dict[str, set[str]]:
    """{package: the modules a stage's config lets it load by name}, where its config fixes them."""
    if stage != "prune":
        return {}
    from tasks.engines import MODULES
    from tasks.harness.config import PruneCfg

    names = get_args(PruneCfg.model_fields["engine"].annotation)
    return {"tasks.engines": {f"tasks.engines.{MODULES[n]}" for n in names}}


def stage_code(
    modules: list[str], narrow: dict[str, set[str]] | None = None, follow_loaders: bool = True
):
    """(files the stage runs, loader packages it needs as a folder) from its entry modules;
    with `follow_loaders` False, only what it imports by name (no module a loader may load)."""
    dynamic = dynamic_packages()
    narrow = narrow or {}
    files, folders, seen, todo = set(), set(), set(), list(modules)
    while todo:
        module = todo.pop()
        if module in seen or module_file(module) is None:
            continue
        seen.add(module)
        files.add(module_file(module))
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # the packages' __init__
        todo += sorted(imports(module) | siblings_read(module))
        for package, names in dynamic.items():
            if follow_loaders and uses_loader(module, package, names):
                if package in narrow:
                    todo += sorted(narrow[package])
                else:
                    folders.add(package)
                    todo += sorted(package_modules(package))
    return files, folders


def stage_definitions() -> dict[str, dict]:
    """dvc.yaml's stages, a foreach stage by its `do` (its code deps do not use ${item})."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: s.get("do", s) for name, s in stages.items()}


def code_dep_mismatches(name: str, stage: dict) -> list[str]:
    """What `stage`'s deps miss of the code it runs, and what they list that it does not run."""
    modules = entry_modules(stage["cmd"])
    if not modules:
        return []
    files, folders = stage_code(modules, narrowed(name))
    declared = [d for d in stage.get("deps", []) if d.split("/")[0] in PROJECT]
    dfiles = {ROOT / d for d in declared if d.endswith(".py")}
    dfolders = {ROOT / d for d in declared if not d.endswith(".py")}
    problems = []
    for f in sorted(files):
        if f not in dfiles and not any(d in f.parents for d in dfolders):
            problems.append(f"{name}: runs {rel(f)}, not in its deps")
    for package in sorted(folders):
        folder = module_file(package).parent
        if not any(d == folder or d in folder.parents for d in dfolders):
            problems.append(
                f"{name}: loads modules of {package} by name: needs the folder {rel(folder)}"
            )
    for d in sorted(dfiles - files):
        problems.append(f"{name}: lists {rel(d)}, which it does not run")
    for d in sorted(dfolders):
        if not d.is_dir():
            problems.append(f"{name}: lists {rel(d)}, which is not a project folder")
            continue
        earned = any(module_file(p).parent == d for p in folders)
        unrun = sorted(rel(f) for f in d.rglob("*.py") if f not in files)
        if not earned and unrun:
            problems.append(f"{name}: lists {rel(d)}/, but does not run {', '.join(unrun)}")
    return problems


def test_dvc_deps_are_exactly_the_code_each_stage_runs():
    stages = stage_definitions()
    assert {"train", "evaluate", "reference", "promote", "label_qa"} <= set(stages)
    problems = [p for name, s in stages.items() for p in code_dep_mismatches(name, s)]
    assert not problems, "\n".join(problems)


def test_the_deps_walk_follows_loaders_packages_and_function_imports(tmp_path, monkeypatch):
    """On a fake tree: a loader makes its package a folder dep, a constant from the same
    package does not; function-level imports and package __init__s count."""
    fake = tmp_path / "tasks"
    (fake / "plugins").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "plugins" / "__init__.py").write_text(
        "import importlib\nLIMIT = 3\n"
        "def load(n):\n    return importlib.import_module(f'tasks.plugins.{n}')\n"
        "def get(n):\n    return load(n).thing\n"
    )
    (fake / "plugins" / "one.py").write_text("thing = 1\n")
    (fake / "helper.py").write_text("def f():\n    from tasks.plugins import LIMIT\n")
    (fake / "a.py").write_text("from tasks import helper\n")
    (fake / "b.py").write_text("from tasks import plugins\nx = plugins.get('one')\n")
    monkeypatch.setitem(globals(), "TASKS", fake)
    assert loaders("tasks.plugins") == {"load", "get"}
    files, folders = stage_code(["tasks.a"])
    names = {f.relative_to(tmp_path).as_posix() for f in files}
    assert names == {
        "tasks/__init__.py",
        "tasks/a.py",
        "tasks/helper.py",
        "tasks/plugins/__init__.py",
    }
    assert folders == set()
    files, folders = stage_code(["tasks.b"])
    assert folders == {"tasks.plugins"} and fake / "plugins" / "one.py" in files
    files, folders = stage_code(["tasks.b"], {"tasks.plugins": set()})
    assert folders == set() and fake / "plugins" / "one.py" not in files


def test_the_deps_comparison_names_what_is_missing_and_what_is_extra(tmp_path, monkeypatch):
    fake = tmp_path / "tasks"
    (fake / "plugins").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "plugins" / "__init__.py").write_text(
        "import importlib\ndef get(n):\n    return importlib.import_module(f'tasks.plugins.{n}')\n"
    )
    (fake / "plugins" / "one.py").write_text("thing = 1\n")
    (fake / "helper.py").write_text("")
    (fake / "b.py").write_text("from tasks.plugins import get\n")
    (fake / "c.py").write_text("import tasks.plugins.one\n")
    monkeypatch.setitem(globals(), "TASKS", fake)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    b = {"cmd": "python -m tasks.b --x 1", "deps": ["tasks/b.py", "tasks/helper.py", "data"]}
    assert code_dep_mismatches("b", b) == [
        "b: runs tasks/__init__.py, not in its deps",
        "b: runs tasks/plugins/__init__.py, not in its deps",
        "b: runs tasks/plugins/one.py, not in its deps",
        "b: loads modules of tasks.plugins by name: needs the folder tasks/plugins",
        "b: lists tasks/helper.py, which it does not run",
    ]
    b["deps"] = ["tasks/__init__.py", "tasks/b.py", "tasks/plugins", "data"]
    assert code_dep_mismatches("b", b) == []
    (fake / "plugins" / "two.py").write_text("")
    c = {"cmd": "python -m tasks.c", "deps": ["tasks/__init__.py", "tasks/c.py", "tasks/plugins"]}
    assert code_dep_mismatches("c", c) == [
        "c: lists tasks/plugins/, but does not run tasks/plugins/two.py"
    ]


# --- dvc.yaml params are the params.yaml sections each stage's code reads --------------------
#
# The code reads params through the validated `Params` object: `ctx.params.<section>` (or a
# name bound to it, or an argument typed `Params`), in the stage's module and the modules it
# imports by name (a family module a loader may load gets a section's config, never `Params`).
# What this can check exactly: which *sections* a stage reads, and the keys it reads directly
# (`params.train.input_size`). What it cannot: which keys a section's config is used for once it
# is passed whole to another function (`fit(adapter, model, ctx.params.train)`). dvc.yaml lists
# such a section whole, or narrows it to the keys the callee reads; each narrowing is a claim
# made by hand, listed in NARROWED so that a new one (or a section newly passed whole) fails
# here until someone checks it. Not a DVC param on purpose: `project.mlflow_experiment`, which
# the harness (tasks/harness/stage.py) reads to choose where the MLflow run is logged, not what the
# stage
# computes. check_params depends on the whole file (`params.yaml:`), reading every section.

NARROWED = {  # stage -> sections it passes whole, of which dvc.yaml lists only some keys
    "label_qa": {"train"},  # the cross-fit's loop settings; label_qa.model has its own size
    "prune": {"build_engine"},  # how prune.engine's steps are built and timed
    "quantize": {"distill"},  # QAT's knowledge-distillation weights
    "build_engine": {"build_engine"},  # all but `targets`: the foreach item is the target
    "evaluate": {"build_engine"},  # ditto: how its own target's engine is built
    "variants": {"build_engine", "evaluate"},  # runtimes' threads/hint/precision; timing keys
}


def params_read(files: set[Path]) -> tuple[set[str], set[str]]:
    """(sections read whole, `section.key`s read directly) through `Params` in `files`."""
    from tasks.harness.config import Params

    sections = Params.model_fields
    whole, keys = set(), set()
    for path in files:
        # the harness: project.mlflow_experiment (see above)
        if path == TASKS / "harness" / "stage.py":
            continue
        tree = parse(path.read_text())
        holders = {"params"}
        for n in ast.walk(tree):
            value = getattr(n, "value", None)
            if isinstance(n, ast.Assign) and getattr(value, "attr", None) == "params":
                holders |= {t.id for t in n.targets if isinstance(t, ast.Name)}  # p = ctx.params
            if isinstance(n, ast.arg) and n.annotation and ast.unparse(n.annotation) == "Params":
                holders.add(n.arg)
        parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        for n in ast.walk(tree):
            if not (isinstance(n, ast.Attribute) and n.attr in sections):
                continue
            v = n.value
            if not (
                (isinstance(v, ast.Name) and v.id in holders)
                or (isinstance(v, ast.Attribute) and v.attr == "params")
            ):
                continue
            fields = getattr(sections[n.attr].annotation, "model_fields", {})
            up = parents.get(n)
            if isinstance(up, ast.Attribute) and up.attr in fields:
                keys.add(f"{n.attr}.{up.attr}")
            else:
                whole.add(n.attr)
    return whole, keys


def param_mismatches(name: str, stage: dict) -> list[str]:
    """Where `stage`'s dvc.yaml params and the params its code reads disagree."""
    from tasks.harness.config import Params
    from tasks.harness.stage import required_sections

    modules = entry_modules(stage["cmd"])
    declared = stage.get("params", [])
    if not modules or declared == [{"params.yaml": None}]:
        return []
    files, _ = stage_code(modules, narrowed(name), follow_loaders=False)
    whole, keys = params_read(files)
    read = whole | {k.split(".")[0] for k in keys}
    dwhole = {d for d in declared if "." not in d}
    dkeys = {d for d in declared if "." in d}
    dsections = dwhole | {k.split(".")[0] for k in dkeys}
    problems = []
    for s in sorted(read - dsections):
        problems.append(f"{name}: reads params section {s}, not in its dvc.yaml params")
    for s in sorted(dsections - read):
        problems.append(f"{name}: dvc.yaml params list section {s}, which it does not read")
    for k in sorted(keys):
        s = k.split(".")[0]
        if s not in dwhole and k not in dkeys:
            problems.append(f"{name}: reads {k}, not in its dvc.yaml params")
    for k in sorted(dkeys):
        s, key = k.split(".", 1)
        if key not in getattr(Params.model_fields[s].annotation, "model_fields", {}):
            problems.append(f"{name}: dvc.yaml params list {k}, which is no key of {s}")
    narrowed_here = {s for s in whole if s not in dwhole}
    if narrowed_here != NARROWED.get(name, set()):
        problems.append(
            f"{name}: passes sections {sorted(narrowed_here)} whole but dvc.yaml lists only "
            f"some keys; NARROWED (checked by hand) says {sorted(NARROWED.get(name, set()))}"
        )
    if set(required_sections(name)) != read:
        problems.append(
            f"{name}: tasks/harness/stage.py STAGE_SECTIONS requires "
            f"{sorted(required_sections(name))}, "
            f"the code reads {sorted(read)}"
        )
    return problems


def test_dvc_params_are_the_sections_each_stage_reads():
    stages = stage_definitions()
    problems = [p for name, s in stages.items() for p in param_mismatches(name, s)]
    assert not problems, "\n".join(problems)


def test_the_params_walk_tells_a_whole_section_from_a_key(tmp_path):
    code = (
        "def main(ctx, params: 'Params'):\n"
        "    p = ctx.params\n"
        "    fit(p.train)\n"
        "    size = params.export.opset\n"
        "    return ctx.params.model.family\n"
    )
    (tmp_path / "m.py").write_text(code.replace("'Params'", "Params"))
    assert params_read({tmp_path / "m.py"}) == ({"train"}, {"export.opset", "model.family"})


# --- the README's map of the code matches the tree ------------------------------------------


def readme_layout() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1]


def test_the_readme_layout_names_every_package_and_stage_module_and_nothing_else():
    block = readme_layout()
    tasks_dir = ROOT / "tasks"
    packages = {p.name for p in tasks_dir.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.name for p in tasks_dir.glob("*.py") if p.name != "__init__.py"}
    named = set(re.findall(r"\b(\w+)/", block)) - {
        "flows",
        "tasks",
        "tests",
        "artifacts",
        "profiles",
    }
    assert named - {"config"} == packages, (
        f"packages in the tree {sorted(packages)}, README {named}"
    )
    for module in modules:
        assert re.search(rf"\b{re.escape(module)}\b", block), f"README layout misses tasks/{module}"
    for name in re.findall(r"\b(\w+\.py)\b", block):  # every module it names exists
        assert any(tasks_dir.rglob(name)), f"README layout names {name}, which is not in tasks/"
