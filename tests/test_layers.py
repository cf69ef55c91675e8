"""The package's layers (docs/architecture.md): no import cycle among taskd's modules,
type-only imports (``if TYPE_CHECKING:``) and imports inside functions included, and no
import that runs back up a layer. The core (taskd minus ``web``, ``cli``, ``client``,
``asgi``) never imports aiohttp or any of them; ``web`` and ``client`` never import
``cli`` nor each other; ``asgi`` (the ASGI adapter of ``web``'s handlers) imports
``web`` and nothing else of theirs.

Read from the source with ``ast`` (nothing is imported), so a cycle Python would
tolerate at run time — the type-only ones — fails here too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import taskd

ROOT = Path(taskd.__file__).resolve().parent

#: Cycles the core still has: none (issue 24 took the last one apart). This list may
#: only stay empty: any cycle fails at once.
KNOWN_CORE_CYCLES: list[list[str]] = []

#: The layers above the core, and what each may not import (besides the rule that the
#: core imports none of them).
UPPER = ("taskd.web", "taskd.cli", "taskd.client", "taskd.asgi")
FORBIDDEN_ABOVE: dict[str, tuple[str, ...]] = {
    "taskd.web": ("taskd.cli", "taskd.client", "taskd.asgi"),
    "taskd.client": ("taskd.cli", "taskd.web", "taskd.asgi"),
    # the ASGI adapter serves taskd.web's handlers: it may import taskd.web
    "taskd.asgi": ("taskd.cli", "taskd.client"),
    "taskd.cli": (),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imported(path: Path) -> set[str]:
    """Every module name an import statement in the file names (absolute, resolved
    from relative imports), ``from X import y`` as both ``X`` and ``X.y``."""
    me = _module_name(path)
    package = me if _is_package(path) else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)
    return out


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between taskd's own modules, every name each module imports)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    names = {m: _imported(p) for m, p in files.items()}
    edges: dict[str, set[str]] = {}
    for me, imported in names.items():
        targets: set[str] = set()
        for name in imported:
            # ``from taskd.web import setup`` names taskd.web.setup: the nearest module.
            while name and name not in files:
                name = name.rpartition(".")[0]
            # A module importing its own package's __init__ is how Python loads it.
            if name and name != me and not me.startswith(name + "."):
                targets.add(name)
        edges[me] = targets
    return edges, names


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of two or more modules (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def _layer(module: str) -> str:
    if module == "taskd.__main__":
        return "taskd.cli"  # ``python -m taskd``: the command, by another name
    for upper in UPPER:
        if module == upper or module.startswith(upper + "."):
            return upper
    return "core"


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_analysis_sees_a_cycle_and_a_type_only_import() -> None:
    # The checker itself: a type-only import closes a cycle as any other does.
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]
    web_errors = ROOT / "web" / "_errors.py"
    assert "taskd.web._context" in _imported(web_errors)  # a relative import, resolved


def test_no_import_cycle_in_web_or_cli() -> None:
    edges, _ = _graph()
    ours = [c for c in _cycles(edges) if any(_layer(m) != "core" for m in c)]
    assert ours == []


def test_no_new_import_cycle_anywhere() -> None:
    # Until the core's last cycle is gone, KNOWN_CORE_CYCLES holds it (see above); then
    # this asserts that the package has no cycle at all.
    edges, _ = _graph()
    assert _cycles(edges) == KNOWN_CORE_CYCLES


@pytest.mark.parametrize("forbidden", ["aiohttp", *UPPER])
def test_the_core_never_imports_the_layers_above_it(forbidden: str) -> None:
    _, names = _graph()
    offenders = sorted(
        module
        for module, imported in names.items()
        if _layer(module) == "core" and any(_in(name, forbidden) for name in imported)
    )
    assert offenders == []


def test_web_and_client_never_import_upwards_or_sideways() -> None:
    _, names = _graph()
    offenders = sorted(
        (module, name)
        for module, imported in names.items()
        for name in imported
        for banned in FORBIDDEN_ABOVE.get(_layer(module), ())
        if _in(name, banned)
    )
    assert offenders == []


#: The core's own layers, bottom first (docs/architecture.md): a module imports from
#: its own layer or below, never above. Records and rules know nothing of asyncio's
#: actor; the actor drives engines through its protocol (``taskd.actor.engine``); the
#: engines implement it; what callers hold sits on top.
CORE_LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "taskd._models",
        "taskd._args",
        "taskd._errors",
        "taskd._retention",
        "taskd._redact",
        "taskd._counters",
        "taskd._metrics",
        "taskd._openapi",
        "taskd._webhooks",
        "taskd._tracing",
        "taskd._checks",
        "taskd._openapi_schemas",
    ),
    (
        "taskd.engine.state",
        "taskd.engine.forest",
        "taskd.engine.ids",
        "taskd.engine.store",
        "taskd.engine.sqlite",
        "taskd.engine.rules",
        "taskd.engine.codec",
        "taskd.engine.redis.space",
        "taskd.engine.redis.keys",
        "taskd.engine.redis.wire",
        "taskd.engine.redis.cluster",
        "taskd.engine.redis.shards",
        "taskd.engine.redis.decoder",
    ),
    ("taskd.actor",),
    (
        "taskd.engine.local",
        "taskd.engine.pipeline",
        "taskd.engine.trees",
        "taskd.engine.redis.engine",
        "taskd.engine.redis.background",
        "taskd.engine.redis.pages",
        "taskd.engine.redis.notes",
        "taskd.engine.redis.follow",
        "taskd.engine.redis.tally",
        "taskd.engine.redis.routing",
        "taskd.engine.choice",
        "taskd.engine.bulk",
    ),
    ("taskd.handle", "taskd.tracker", "taskd._demo", "taskd.testing", "taskd._listing"),
)


def _core_layer(module: str) -> int | None:
    for i, layer in enumerate(CORE_LAYERS):
        if any(_in(module, name) for name in layer):
            return i
    return None


def test_no_core_import_runs_back_up_a_layer() -> None:
    edges, _ = _graph()
    offenders = sorted(
        (module, target)
        for module, targets in edges.items()
        for target in targets
        if (mine := _core_layer(module)) is not None
        and (theirs := _core_layer(target)) is not None
        and theirs > mine
    )
    assert offenders == []


def test_every_core_module_has_a_layer() -> None:
    """A new core module must be placed in ``CORE_LAYERS``, or its imports go unchecked."""
    edges, _ = _graph()
    unplaced = sorted(
        m
        for m in edges
        if _layer(m) == "core"
        and _core_layer(m) is None
        and m not in ("taskd", "taskd.engine", "taskd.engine.redis")  # the packages
    )
    assert unplaced == []
