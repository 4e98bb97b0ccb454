"""Guardrails on the package's shape: no import cycles, no private names across modules, short modules, docstrings.

Everything here reads the source with ``ast``; nothing is imported, so a broken module fails its own tests,
not these.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "datapruning"
MAX_LINES = 400
MAX_SUMMARY = 120

# Files owned by work in progress elsewhere, with the rule they still break; remove an entry once it is fixed.
KNOWN_DOCSTRINGS: set = set()  # modules allowed a multi-line summary (none)
KNOWN_ANCHORS: set = set()  # files allowed to cite a missing docs/methods.md anchor (none)


# ---------------------------------------------------------------- reading the package
def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its ``__init__.py``)."""
    return {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def from_target(node: ast.ImportFrom, path: Path, name: str) -> str:
    """The absolute module a ``from ... import`` reads from, for a file ``path`` named ``name``."""
    if not node.level:
        return node.module or ""
    here = name if is_package(path) else name.rpartition(".")[0]
    base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
    return f"{base}.{node.module}" if node.module else base


def imports(path: Path, name: str, modules: dict[str, Path]):
    """Yield (imported module, names taken from it, line) for every import in the file, at any depth
    (inside functions too), relative or absolute, limited to the package's own modules. ``from a import b``
    where ``b`` is a submodule yields ``a.b``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = from_target(node, path, name)
            if target not in modules:
                continue
            names = []
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:
                    yield f"{target}.{alias.name}", [], node.lineno
                else:
                    names.append(alias.name)
            yield target, names, node.lineno


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> modules it imports. Importing ``a.b.c`` runs ``a.b``'s ``__init__`` too, so the packages
    above a target count as edges, except the importer's own packages (already being imported)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        own = {name.rsplit(".", i)[0] for i in range(name.count(".") + 1)}
        for target, _, _ in imports(path, name, modules):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                dep = ".".join(parts[:i])
                if dep in modules and dep not in own:
                    graph[name].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), plus modules importing themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def cycle_report(graph: dict[str, set[str]], comp: list[str]) -> str:
    inside = set(comp)
    edges = [f"{a} -> {b}" for a in comp for b in sorted(graph[a]) if b in inside]
    return "import cycle among " + ", ".join(comp) + ":\n    " + "\n    ".join(edges)


def private_imports(modules: dict[str, Path]) -> list[str]:
    """``from x import _name`` and ``module._name`` where x / module is another module of the package."""
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        bound: dict[str, str] = {}  # local name -> package module it stands for
        for target, names, line in imports(path, name, modules):
            for n in names:
                if n.startswith("_") and not n.startswith("__") and target != name:
                    found.append(f"{path.relative_to(ROOT)}:{line}: {n} from {target}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules and alias.asname:
                        bound[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                target = from_target(node, path, name)
                for alias in node.names:
                    if f"{target}.{alias.name}" in modules:
                        bound[alias.asname or alias.name] = f"{target}.{alias.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and bound[node.value.id] != name):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr} "
                             f"({bound[node.value.id]})")
    return found


def long_modules(modules: dict[str, Path]) -> list[str]:
    lengths = {p: len(p.read_text().splitlines()) for p in modules.values()}
    return [f"{p.relative_to(ROOT)}: {n} lines" for p, n in lengths.items() if n > MAX_LINES]


def docstring_problem(path: Path) -> str | None:
    """None when the module opens with a docstring whose first line is a whole summary (PEP 257): non-empty,
    at most MAX_SUMMARY characters, and followed by nothing or a blank line."""
    doc = ast.get_docstring(ast.parse(path.read_text(), str(path)), clean=False)
    if not doc or not doc.strip():
        return "no module docstring"
    lines = doc.strip("\n").split("\n")
    if not lines[0].strip():
        return "the docstring's first line is empty"
    if len(lines) > 1 and lines[1].strip():
        return f"the summary runs onto a second line: {lines[0][:60]!r}..."
    if len(lines[0]) > MAX_SUMMARY:
        return f"the summary line has {len(lines[0])} characters (at most {MAX_SUMMARY})"
    return None


def docstring_problems(modules: dict[str, Path], known=frozenset()) -> list[str]:
    out = []
    for path in modules.values():
        rel = path.relative_to(ROOT).as_posix()
        problem = docstring_problem(path)
        if problem and rel not in known:
            out.append(f"{rel}: {problem}")
    return out


# ---------------------------------------------------------------- the guardrails
@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return package_modules()


def test_no_import_cycles(modules):
    graph = import_graph(modules)
    found = cycles(graph)
    for comp in found:
        print(cycle_report(graph, comp))
    assert not found, "\n".join(cycle_report(graph, c) for c in found)


def test_no_private_names_across_modules(modules):
    found = private_imports(modules)
    assert not found, "private names used from another module (make them public or move them):\n" + "\n".join(found)


def test_no_module_over_400_lines(modules):
    found = long_modules(modules)
    assert not found, f"modules over {MAX_LINES} lines (split them by job):\n" + "\n".join(found)


def bare_raises(modules: dict[str, Path]) -> list[str]:
    """``raise ValueError/RuntimeError/KeyError(...)`` in the package: errors raised on purpose derive from
    ``errors.DataPruningError`` (which the CLI prints as one line); anything else is a bug with a traceback."""
    found = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name) \
                    and node.exc.func.id in ("ValueError", "RuntimeError", "KeyError", "Exception"):
                found.append(f"{name}:{node.lineno} raises {node.exc.func.id}")
    return found


def test_errors_raised_on_purpose_derive_from_the_package_base(modules):
    found = bare_raises(modules)
    assert not found, "raise a datapruning.errors class instead:\n" + "\n".join(found)


def test_cli_catches_only_the_package_errors_and_os_errors():
    from datapruning.cli import EXPECTED_ERRORS
    from datapruning.errors import DataPruningError

    assert set(EXPECTED_ERRORS) == {DataPruningError, OSError}


def test_every_module_has_a_one_line_docstring(modules):
    found = docstring_problems(modules, KNOWN_DOCSTRINGS)
    assert not found, "module docstrings need a one-line summary:\n" + "\n".join(found)


def test_methods_citations_name_existing_anchors():
    """Every ``methods.md#<anchor>`` cited in code, configs and docs is a heading of docs/methods.md, and
    nothing cites the old METHODS.md, which never existed."""
    headings = re.findall(r"^#+ (.+)$", (ROOT / "docs" / "methods.md").read_text(), re.M)
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}
    old = "METHODS.md"
    bad = []
    for folder in ("datapruning", "configs", "pipelines", "scripts", "tests", "docs"):
        for path in sorted((ROOT / folder).rglob("*")):
            rel = path.relative_to(ROOT).as_posix()
            if path.suffix not in (".py", ".yaml", ".yml", ".md") or rel in KNOWN_ANCHORS or path == Path(__file__):
                continue
            text = path.read_text()
            bad += [f"{rel}: #{a}" for a in re.findall(r"methods\.md#([\w-]+)", text) if a not in anchors]
            bad += [f"{rel}: cites {old}"] if old in text else []
    assert not bad, "citations of docs/methods.md sections that do not exist:\n" + "\n".join(bad)


def test_tests_and_tools_import_modules_of_this_checkout():
    """``from datapruning import x`` must name a module or a name of this tree: an editable install elsewhere
    would otherwise answer an old path with old code, and the test would pass against the wrong source."""
    modules = package_modules()
    defined = {name: package_names(path) for name, path in modules.items()}
    bad = []
    for folder in ("tests", "scripts", "pipelines"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    wanted = [(a.name, None) for a in node.names if a.name.split(".")[0] == PACKAGE]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module.split(".")[0] == PACKAGE:
                    wanted = [(node.module, a.name) for a in node.names]
                else:
                    continue
                for mod, attr in wanted:
                    if mod not in modules:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: no module {mod}")
                    elif attr and attr != "*" and f"{mod}.{attr}" not in modules and attr not in defined[mod]:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {mod} has no {attr}")
    assert not bad, "imports that this checkout cannot answer:\n" + "\n".join(bad)


def package_names(path: Path) -> set[str]:
    """Names a module defines or imports at its top level."""
    names = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.If, ast.Try)):  # optional imports
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    names.update((a.asname or a.name).split(".")[0] for a in sub.names)
                elif isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                    names.add(sub.name)
    return names
