"""The library's layering (docs/architecture.md): which part may import which, no import circles (lazy imports
inside functions count), no private names taken across modules, model files that import nothing of the toolkit, and
nothing of the library that imports a script. Read from the source with ``ast``: nothing is imported or run."""

import ast
import os

import pytest

from testing_utils import ROOT

PKG = "diffusability_hf"

# part -> the module names (dotted, under the package) that belong to it
PARTS = {
    "errors": ["errors"],
    "files": ["files", "cpu"],
    "math": ["spectral", "flow"],
    "figures": ["figures"],
    "autoencoders": ["autoencoders", "latent_normalization"],
    "objectives": ["losses"],
    "data": ["data"],
    "models": ["models"],
    "pipelines": ["pipelines"],
    "training": ["training"],
    "measures": ["metrics", "hub", "tracking"],
    "bench": ["bench"],
    "package": [""],  # diffusability_hf/__init__.py (the version)
}
# part -> the parts it may import (besides itself); docs/architecture.md explains each row
BASE = {"errors", "files", "package"}
MAY_IMPORT = {
    "errors": set(),
    "files": {"errors"},
    "math": BASE,
    "figures": BASE | {"math"},
    "autoencoders": BASE | {"math"},
    "objectives": BASE | {"math", "autoencoders"},
    "data": BASE | {"math", "autoencoders"},
    "models": BASE | {"autoencoders"},
    "pipelines": BASE | {"models", "figures"},
    "training": BASE | {"math", "figures", "autoencoders", "objectives", "data", "models", "pipelines"},
    "measures": BASE | {"math", "figures", "autoencoders", "objectives", "data", "models", "pipelines"},
    "bench": {"errors", "files", "math", "figures", "autoencoders", "objectives", "data", "models", "pipelines"}
    | {"training", "measures", "package"},
    "package": set(),
}
# shipped as a saved pipeline's remote code: torch, diffusers and the standard library only
MODEL_FILES = ["models/selfcond_dit.py", "models/video_dit.py"]


def library_files():
    for folder, _, files in os.walk(os.path.join(ROOT, PKG)):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(folder, name), os.path.join(ROOT, PKG))


def module_of(rel):
    """``data/images.py`` -> ``data.images``; ``data/__init__.py`` -> ``data``; ``__init__.py`` -> ``""``."""
    name = rel[:-3].replace(os.sep, ".")
    return "" if name == "__init__" else name.removesuffix(".__init__")


def part_of(module):
    return next(p for p, prefixes in PARTS.items() for x in prefixes if module == x or module.startswith(x + "."))


def exists(module):
    path = os.path.join(ROOT, PKG, *module.split(".")) if module else os.path.join(ROOT, PKG)
    return os.path.isfile(path + ".py") or os.path.isdir(path)


def imports(rel):
    """``(module imported, names taken, line)`` for every toolkit import of a file, at any depth."""
    module = module_of(rel)
    package = module if rel.endswith("__init__.py") else module.rpartition(".")[0]
    tree = ast.parse(open(os.path.join(ROOT, PKG, rel), encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PKG or alias.name.startswith(PKG + "."):
                    yield alias.name[len(PKG) + 1 :], [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                base = parts[: len(parts) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module == PKG or (node.module or "").startswith(PKG + "."):
                target = node.module[len(PKG) + 1 :]
            else:
                continue
            for alias in node.names:  # `from pkg import submodule` imports that submodule
                sub = f"{target}.{alias.name}" if target else alias.name
                if exists(sub):
                    yield sub, [], node.lineno
                else:
                    yield target, [alias.name], node.lineno


def test_every_library_module_has_a_part():
    for rel in library_files():
        assert part_of(module_of(rel)) in MAY_IMPORT, rel


def test_parts_import_only_the_parts_below_them():
    wrong = []
    for rel in library_files():
        here = part_of(module_of(rel))
        for target, _, line in imports(rel):
            there = part_of(target)
            if there != here and there not in MAY_IMPORT[here]:
                wrong.append(f"{PKG}/{rel}:{line} ({here}) imports {target or PKG} ({there})")
    assert not wrong, "imports against docs/architecture.md:\n" + "\n".join(wrong)


def circles(graph):
    """The strongly connected components of more than one module (Tarjan), and modules that import themselves."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles_even_through_imports_inside_functions():
    graph = {}
    for rel in library_files():
        module = module_of(rel)
        targets = {t for t, _, _ in imports(rel)} - {module}
        if rel.endswith("__init__.py") and module:  # a package exposing its own submodules is not a circle
            targets = {t for t in targets if not t.startswith(module + ".")}
        graph[module] = targets
    assert circles(graph) == []


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_private_names_across_modules():
    taken = [
        f"{PKG}/{rel}:{line} takes {name} from {target or PKG}"
        for rel in library_files()
        for target, names, line in imports(rel)
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not taken, "\n".join(taken)


@pytest.mark.parametrize("rel", MODEL_FILES)
def test_model_files_import_nothing_of_the_toolkit(rel):
    assert list(imports(rel)) == []


def test_the_library_imports_no_script():
    for rel in library_files():
        source = open(os.path.join(ROOT, PKG, rel), encoding="utf-8").read()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and not node.level:
                assert not (node.module or "").startswith(("train_scripts", "benchmarks", "experiments")), rel
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith(("train_scripts", "benchmarks")) for a in node.names), rel


def test_a_layering_breach_is_caught(tmp_path):
    """The check reads what it is given: a math module importing training is reported."""
    fake = tmp_path / PKG
    (fake / "training").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "training" / "__init__.py").write_text("")
    (fake / "training" / "steps.py").write_text("X = 1\n")
    (fake / "flow.py").write_text("def f():\n    from .training.steps import X\n    return X\n")
    globals()["ROOT"], saved = str(tmp_path), ROOT
    try:
        with pytest.raises(AssertionError, match=r"flow.py:2 \(math\) imports training.steps \(training\)"):
            test_parts_import_only_the_parts_below_them()
    finally:
        globals()["ROOT"] = saved


# the training scripts: `main` reads top to bottom, never rewrites the parsed flags, and leaves "dataset or
# stream" to the library's TrainingData (issue: scripts that stay thin as features arrive)
SCRIPTS = ["train_ae_se.py", "train_dit_flow.py", "extract_latents.py"]


def rewrites_of_args(func):
    """``(line, what)`` for every assignment to ``args.X``, ``vars(args).update`` or ``setattr(args, ...)``."""
    found = []
    for node in ast.walk(func):
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
        )
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "args":
                    found.append((node.lineno, f"args.{t.attr} assigned"))
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id == "setattr" and getattr(node.args[0], "id", None) == "args":
                found.append((node.lineno, "setattr(args, ...)"))
            if isinstance(f, ast.Attribute) and f.attr == "update" and isinstance(f.value, ast.Call):
                inner = f.value
                if getattr(inner.func, "id", None) == "vars" and getattr(inner.args[0], "id", None) == "args":
                    found.append((node.lineno, "vars(args).update"))
    return found


def script_main(name):
    tree = ast.parse(open(os.path.join(ROOT, "train_scripts", name), encoding="utf-8").read())
    return next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_main_never_rewrites_args_and_stays_short(name):
    main = script_main(name)
    assert rewrites_of_args(main) == [], f"{name}: main rewrites the parsed flags"
    assert main.end_lineno - main.lineno + 1 <= 300, f"{name}: main is {main.end_lineno - main.lineno + 1} lines"


@pytest.mark.parametrize(
    "name, hidden",
    [
        ("train_ae_se.py", {"streaming", "train_dataset", "train_dataloader", "streams"}),  # data/training.py
        ("extract_latents.py", {"streaming", "dataset", "source", "is_stream"}),  # data/extraction.py
    ],
)
def test_scripts_main_does_not_branch_on_streaming(name, hidden):
    names = {n.id for n in ast.walk(script_main(name)) if isinstance(n, ast.Name)}
    assert not names & hidden


def test_an_args_rewrite_is_caught():
    func = ast.parse(
        "def main(args):\n    args.lr = 1\n    args.lr *= 2\n    vars(args).update(a=1)\n    setattr(args, 'b', 2)\n"
    ).body[0]
    assert [line for line, _ in rewrites_of_args(func)] == [2, 3, 4, 5]
