"""The layout's rules, as docs/architecture.md's map states them ("The map").

The event bus is a package of folders, one per role, and each may import only the folders below
it: the two sides of the flow (``outbox/``, ``consumer/``) never import each other, nothing
imports the reports (``ops/``), and the broker client (``nats/``) knows nothing of the flow. The
development tools (``onboarding.dev``) are imported by no production module, a bounded context
uses only the package's public API (``onboarding.eventbus``), and only ``nats/compat.py`` reads
nats-py's private attributes. Every module is parsed, imports inside functions included: a
forbidden import hidden in a function is still one.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings

ROOT = Path(__file__).resolve().parents[1]
EVENTBUS = ROOT / "onboarding" / "eventbus"
PACKAGE = "onboarding.eventbus"

# The event bus's parts, and the parts each may import (besides itself). "kernel" is the
# package's top-level modules that every part shares; the entry points (the package's
# __init__, apps, checks, admin/, management/) may import anything.
KERNEL = {"models", "registry", "subjects", "ids", "rows", "erasing", "announcing"}
MAY_IMPORT = {
    "kernel": set(),
    "nats": {"kernel"},
    "runtime": {"kernel"},
    "deadletters": {"kernel", "nats"},
    "outbox": {"kernel", "nats", "runtime"},
    "consumer": {"kernel", "nats", "runtime", "deadletters"},
    "ops": {"kernel", "nats", "deadletters", "outbox"},
}
ENTRY_POINTS = {"__init__", "apps", "checks", "admin", "management", "migrations"}
# Attributes of nats-py's objects that are private to it (read only through nats/compat.py).
NATS_PY_PRIVATE = {"_sub", "_nms", "_deliver", "_pending_queue", "_pending_size",
                   "_publish_async_futures", "_conn", "_nc"}


def part_of(module: str) -> str:
    """The part of the event bus a dotted module name (below ``onboarding.eventbus``) is in."""
    first = module.split(".")[0]
    if first in KERNEL:
        return "kernel"
    return first


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names), at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def eventbus_modules() -> dict[str, Path]:
    """Every module of the event bus, by its name below the package (``outbox.relay``)."""
    return {
        ".".join(path.relative_to(EVENTBUS).with_suffix("").parts): path
        for path in EVENTBUS.rglob("*.py")
    }


def eventbus_imports(path: Path) -> set[str]:
    """The event bus modules (names below the package) ``path`` imports."""
    known = set(eventbus_modules())
    names = set()
    for module in imported_modules(path):
        if module.startswith(PACKAGE + "."):
            name = module[len(PACKAGE) + 1:]
            while name and name not in known:
                name = name.rpartition(".")[0]  # ``from x.y import function``: module x.y
            if name:
                names.add(name)
    return names


def test_each_part_of_the_event_bus_imports_only_the_parts_the_map_allows():
    broken = []
    for name, path in eventbus_modules().items():
        part = part_of(name)
        if part in ENTRY_POINTS or name.split(".")[0] in ENTRY_POINTS:
            continue
        assert part in MAY_IMPORT, f"{name}: a part the map does not name ({part}/)"
        for other in sorted(eventbus_imports(path)):
            target = part_of(other)
            if target == part:
                continue
            if target in ENTRY_POINTS or target not in MAY_IMPORT[part]:
                broken.append(f"{name} imports {other} ({part}/ may import "
                              f"{', '.join(sorted(MAY_IMPORT[part])) or 'nothing else'})")
    assert not broken, "\n".join(broken)


def test_the_map_in_the_architecture_doc_names_every_part():
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert "## The map" in text
    for part in MAY_IMPORT:
        if part != "kernel":
            assert f"`{part}/`" in text, f"docs/architecture.md's map does not describe {part}/"
    folders = {p.name for p in EVENTBUS.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders - {"templates"} <= set(MAY_IMPORT) | ENTRY_POINTS, folders


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for other in sorted(graph.get(node, ())):
            if state.get(other) == "open":
                return stack[stack.index(other):] + [other]
            if other not in state and (cycle := visit(other)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_event_bus_modules_import_one_another_without_a_cycle():
    graph = {name: eventbus_imports(path) - {name} for name, path in eventbus_modules().items()}
    graph = {name: {o for o in others if not o.endswith("__init__")}
             for name, others in graph.items() if not name.endswith("__init__")}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # The outbox's storage knows nothing of who publishes its rows.
    assert not graph["outbox.store"] & {"outbox.write", "outbox.publisher", "outbox.relay",
                                        "nats.connection"}
    assert "outbox.write" not in graph["outbox.publisher"]


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"outbox": {"publisher"}, "publisher": {"outbox"}}) == [
        "outbox", "publisher", "outbox"
    ]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def project_modules() -> list[Path]:
    """The production code: every module but the tests', the benchmarks' and deploy's, and
    nothing in a hidden folder (the virtualenvs: .venv, .venv-nats-newest)."""
    skip = {"tests", "bench", "deploy", "var", "docs", "conftest.py"}
    return [path for path in ROOT.rglob("*.py")
            if not (set(parts := path.relative_to(ROOT).parts) & skip)
            and not any(part.startswith(".") for part in parts)]


def test_no_production_module_imports_the_development_tools():
    dev = ROOT / "onboarding" / "dev"
    offenders = [
        str(path.relative_to(ROOT)) for path in project_modules()
        if dev not in path.parents
        and any(m == "onboarding.dev" or m.startswith("onboarding.dev.")
                for m in imported_modules(path))
    ]
    assert not offenders, offenders


@pytest.mark.parametrize("context", settings.BOUNDED_CONTEXTS)
def test_a_context_uses_only_the_event_bus_public_api(context):
    public = {"onboarding.eventbus", *(f"onboarding.eventbus.{name}" for name in
                                       __import__("onboarding.eventbus").eventbus.__all__)}
    offenders = []
    for path in (ROOT / context).rglob("*.py"):
        if "migrations" in path.parts:
            continue
        for module in imported_modules(path):
            if module.startswith(PACKAGE) and module not in public:
                offenders.append(f"{path.relative_to(ROOT)}: {module}")
    assert not offenders, offenders


def test_only_the_compat_module_reads_nats_py_private_attributes():
    compat = EVENTBUS / "nats" / "compat.py"
    offenders = []
    for path in project_modules():
        if path == compat:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in NATS_PY_PRIVATE
                    and not (isinstance(node.value, ast.Name) and node.value.id == "self")):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert not offenders, offenders


def test_the_system_checks_build_no_publisher():
    """A process that only checks its settings (``manage.py check``, every command's start)
    builds no on-commit publisher: it used to be built when checks.py imported a constant."""
    script = (
        "import sys, threading, django\n"
        "django.setup()\n"
        "from django.core.checks import run_checks\n"
        "import onboarding.eventbus.checks\n"
        "run_checks()\n"
        "module = sys.modules.get('onboarding.eventbus.outbox.publisher')\n"
        "built = module is not None and module._publisher is not None\n"
        "threads = [t.name for t in threading.enumerate() if t.name.startswith('outbox-')]\n"
        "print('built' if built else 'not built', threads)\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "onboarding.settings_test"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=settings.BASE_DIR, env=env,
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "not built []", result.stdout + result.stderr
