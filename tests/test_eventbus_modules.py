"""The event bus's module structure: storage, publishing on commit, the publisher and the relay
import each other in one direction only, and looking at the settings builds no publisher."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from django.conf import settings

EVENTBUS = Path(__file__).resolve().parents[1] / "onboarding" / "eventbus"
PACKAGE = "onboarding.eventbus"


def eventbus_imports(path: Path) -> set[str]:
    """The eventbus modules ``path`` imports, at its top or inside a function alike: a cycle
    hidden in a function-level import is still a cycle."""
    modules = {p.stem for p in EVENTBUS.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == PACKAGE:  # from onboarding.eventbus import outbox
                found |= {alias.name for alias in node.names if alias.name in modules}
            elif node.module.startswith(PACKAGE + "."):
                found.add(node.module[len(PACKAGE) + 1:].split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    found.add(alias.name[len(PACKAGE) + 1:].split(".")[0])
    return found & modules - {path.stem}


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


def test_the_eventbus_modules_import_one_another_without_a_cycle():
    graph = {path.stem: eventbus_imports(path) for path in EVENTBUS.glob("*.py")}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # The outbox is storage: it knows nothing of who publishes its rows.
    assert not graph["outbox"] & {"oncommit", "publisher", "relay", "connection"}
    assert "oncommit" not in graph["publisher"]


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"outbox": {"publisher"}, "publisher": {"outbox"}}) == [
        "outbox", "publisher", "outbox"
    ]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_system_checks_build_no_publisher():
    """A process that only checks its settings (``manage.py check``, every command's start)
    builds no on-commit publisher: it used to be built when checks.py imported a constant."""
    script = (
        "import sys, threading, django\n"
        "django.setup()\n"
        "from django.core.checks import run_checks\n"
        "import onboarding.eventbus.checks\n"
        "run_checks()\n"
        "module = sys.modules.get('onboarding.eventbus.publisher')\n"
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
