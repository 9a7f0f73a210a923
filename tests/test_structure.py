"""The tree is the diagram: spattn's imports form a DAG in layer order, every module states its job in
its first line, no function takes more than 8 parameters, and ``import spattn`` loads nothing optional."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parent.parent / "spattn"

# Layer of each module (by longest matching prefix): a module may import only its own layer or lower.
LAYERS = [
    ("spattn._C", 0), ("spattn.kernels", 0), ("spattn.config", 0),
    ("spattn.backends", 1), ("spattn._ext", 1), ("spattn.ops", 2), ("spattn.comm", 3), ("spattn.check", 3),
    ("spattn.mesh", 4), ("spattn.layout", 5), ("spattn.call", 6), ("spattn.parallel", 7),
    ("spattn.attention", 8), ("spattn", 9),  # the package: public names
]
ABOVE_PUBLIC = 10  # integrations, cli, engine, launch, demo: anything below them

# Signatures fixed by someone else's interface, not ours to shorten.
PARAM_EXEMPT = {
    ("spattn.attention", "attention"),  # the public API (flash-attn's style: every option a keyword)
    ("spattn.integrations.transformers", "spattn_attention_forward"),  # transformers' AttentionInterface
    ("spattn.engine.engine", "__init__"),  # Engine(model, *, ...): vLLM-style keyword options (issue 18's API)
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _layer(mod: str) -> int:
    best, layer = -1, ABOVE_PUBLIC
    for prefix, n in LAYERS:
        if (mod == prefix or mod.startswith(prefix + ".")) and len(prefix) > best:
            best, layer = len(prefix), n
    return layer


def _imports(mod: str, path: Path, known: Set[str]) -> Set[str]:
    """spattn modules ``mod`` imports anywhere in its body (function-level imports included)."""
    is_pkg = path.name == "__init__.py"
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            pkg = base[:len(base) - node.level + 1] if node.level else []
            root = ".".join(pkg + ([node.module] if node.module else []))
            names = [f"{root}.{a.name}" for a in node.names] + [root]
        else:
            continue
        for n in names:
            while n and n not in known:  # "from .comm.ring_comm import RingComm": the module, not the name
                n = n.rpartition(".")[0]
            if n and n.startswith("spattn") and n != mod:
                out.add(n)
    return out


def _graph() -> Dict[str, Set[str]]:
    mods = _modules()
    known = set(mods)
    # "from . import ops" in spattn/__init__ resolves to spattn.ops; plain "spattn" imports are the package
    return {m: {i for i in _imports(m, p, known) if not (i == "spattn" and m.startswith("spattn."))}
            for m, p in mods.items()}


def test_imports_form_a_dag_in_layer_order():
    graph = _graph()
    upward = [(m, i) for m, deps in graph.items() for i in deps
              if _layer(m) < ABOVE_PUBLIC and _layer(i) > _layer(m)]
    assert not upward, f"modules importing a layer above their own: {upward}"
    # No cycle: depth-first search with colours.
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for i in sorted(graph.get(m, ())):
            if state.get(i) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(i):] + [i])}")
            if i in graph and not state.get(i):
                visit(i)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m)


def test_every_module_states_its_job_in_its_first_line():
    missing = [m for m, p in _modules().items()
               if not (ast.get_docstring(ast.parse(p.read_text())) or "").strip().splitlines()[:1]]
    assert not missing, f"modules without a one-line job at the top: {missing}"


def _is_backend_class(cls: ast.ClassDef) -> bool:
    """A class implementing the Backend protocol (it has ``available``): its forward/backward are
    the kernel-facing signatures, exempt like spattn/backends."""
    return any(isinstance(n, ast.FunctionDef) and n.name == "available" for n in cls.body)


def test_no_function_takes_more_than_8_parameters():
    too_many = []
    for m, p in _modules().items():
        if m.startswith(("spattn.backends", "spattn.kernels")):
            continue
        tree = ast.parse(p.read_text())
        exempt_nodes = {id(f) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and _is_backend_class(c)
                        for f in c.body if isinstance(f, ast.FunctionDef) and f.name in ("forward", "backward")}
        for n in ast.walk(tree):
            if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) or id(n) in exempt_nodes:
                continue
            a = n.args
            names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
            if names and names[0] in ("self", "cls", "ctx"):
                names = names[1:]
            count = len(names) + (a.vararg is not None) + (a.kwarg is not None)
            if count > 8 and (m, n.name) not in PARAM_EXEMPT:
                too_many.append(f"{m}.{n.name} ({count})")
    assert not too_many, f"functions with more than 8 parameters: {too_many}"


def test_import_spattn_loads_nothing_optional():
    code = ("import sys, spattn; bad = [m for m in ('spattn._C', 'spattn._ext', 'triton', 'diffusers', "
            "'transformers', 'fastapi') if m in sys.modules]; print(bad)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=str(ROOT.parent))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", res.stdout


def test_every_package_directory_is_a_package():
    """setup.py's find_packages installs only directories with an __init__.py: one without would be
    missing from a non-editable install (``pip wheel .``) while the editable one still imports."""
    loose = sorted(str(d.relative_to(ROOT.parent)) for d in {p.parent for p in ROOT.rglob("*.py")}
                   if not (d / "__init__.py").is_file() and "__pycache__" not in d.parts)
    assert not loose, f"directories with modules but no __init__.py: {loose}"
