"""The package's shape (issue 13): imports only point down, no import circles, files small enough to read in one
sitting, and no test scaffolding in the product. Read from the source with `ast`, not by importing it.

Layers: cli -> train -> {models, diffusion, mtl, data}; sample -> {models, diffusion, data}; the top-level
modules (config/, checkpoint_format, metrics, inception, distributed, fileio, errors, compat, hf) may be used by
every package but use none of them except models/data where stated below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dtr_scale"
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 60

# package -> the sibling packages it may import from (a package may always import itself and the top level).
ALLOWED = {
    "train": {"models", "diffusion", "mtl", "data"},
    "sample": {"models", "diffusion", "data"},
    "models": set(),
    "diffusion": set(),
    "mtl": set(),
    "data": set(),
    "config": set(),
}
# Top-level modules that may reach into a package (the entry points, and the libraries named here).
TOP_LEVEL_USES = {
    "cli": {"train", "sample", "data", "mtl", "models", "diffusion", "config"},
    "demo": {"train", "sample", "data", "models", "diffusion", "config"},
    "checkpoint_format": set(),
    "metrics": {"data"},  # data/images.py reads the image files it scores
    "inception": set(),
    "distributed": set(),
    "fileio": set(),
    "errors": set(),
    "compat": set(),
    "config_docs": {"config"},
    "hf": {"models", "data"},  # diffusers classes wrapping the DiT and the pixel codec
    "repa_encoder": set(),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The dtr_scale modules `name` imports (a `from pkg import mod` counts as the module mod)."""
    found = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "dtr_scale")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "dtr_scale":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return found


def layer(name: str) -> str:
    """dtr_scale.train.step -> train; dtr_scale.metrics -> metrics; dtr_scale.config.schema -> config."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_imports_only_point_down() -> None:
    mods = modules()
    known = set(mods)
    # config/ is a package but a foundation like the top-level modules: every layer reads the run config.
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} - {"config"}
    wrong = []
    for name, path in mods.items():
        source = layer(name)
        for target in imports_of(name, path, known):
            dest = layer(target)
            if dest == source or dest in ("", "__init__"):
                continue
            if source in packages or source == "config":
                ok = dest not in packages or dest in ALLOWED[source]
            else:
                ok = dest not in packages or dest in TOP_LEVEL_USES.get(source, set())
            if not ok:
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(sorted(wrong))


def test_no_import_circles() -> None:
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) & set(mods) for name, path in mods.items()}
    # A package's __init__ re-exporting its own submodules is not a circle of the code's logic.
    for name in graph:
        graph[name] = {t for t in graph[name] if not (name.startswith(t + ".") and t in mods)}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            pytest.fail("import circle: " + " -> ".join(cycle))


def long_functions(source: str) -> list[str]:
    """ "name (N lines)" for every function of `source` over MAX_FUNCTION_LINES."""
    return [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_and_function_sizes(name: str) -> None:
    path = modules()[name]
    source = path.read_text()
    assert source.count("\n") <= MAX_MODULE_LINES, f"{path} has {source.count(chr(10))} lines"
    long = long_functions(source)
    assert not long, f"{path}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


@pytest.mark.parametrize("path", sorted(PACKAGE.parent.joinpath("bench").glob("*.py")), ids=lambda p: p.name)
def test_bench_files_and_functions_stay_readable(path) -> None:
    """bench/ is read like the product: no file over ~400 lines, no function over the package's 60."""
    source = path.read_text()
    assert source.count("\n") <= 400, f"{path} has {source.count(chr(10))} lines"
    long = long_functions(source)
    assert not long, f"{path}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


def test_no_test_scaffolding_in_the_product() -> None:
    """Kill switches and checksums for tests live in tests/dtr_scale_testhooks.py, not in the product."""
    offenders = [
        str(p)
        for p in PACKAGE.rglob("*.py")
        if any(s in p.read_text() for s in ("DTR_SCALE_FAULT_AT_STEP", "DTR_TEST_", "PARAM_CHECKSUM"))
    ]
    assert not offenders, offenders
