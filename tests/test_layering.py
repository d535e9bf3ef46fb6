"""The seams, checked on the source: who imports whom, where Flower is allowed, that the generic code names no
method, that functions stay short, and that the one Flower internal we touch is still there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("fedlowrank", "strategies", "clients", "simulations")


def _modules(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at any depth (lazy imports inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _roots(path: Path) -> set[str]:
    return {name.split(".")[0] for name in _imports(path)}


@pytest.mark.parametrize(("folder", "forbidden"), [("clients", "strategies"), ("strategies", "clients")])
def test_clients_and_strategies_never_import_each_other(folder, forbidden):
    offenders = [str(path.relative_to(REPO)) for path in _modules(folder) if forbidden in _roots(path)]
    assert not offenders, f"{folder}/ imports {forbidden}/ in {offenders}: speak through fedlowrank.protocol"


def test_the_core_library_imports_flower_only_in_the_protocol_codec():
    codec = REPO / "fedlowrank" / "protocol" / "flower.py"
    offenders = [str(p.relative_to(REPO)) for p in _modules("fedlowrank") if "flwr" in _roots(p) and p != codec]
    assert not offenders, offenders


def test_the_core_library_does_not_reach_up_into_the_apps():
    """Only the command line (the composition root) may import the Flower side, inside its commands."""
    cli = REPO / "fedlowrank" / "cli.py"
    upward = {"strategies", "clients", "simulations"}
    offenders = [str(p.relative_to(REPO)) for p in _modules("fedlowrank") if _roots(p) & upward and p != cli]
    assert not offenders, offenders
    top_level = {
        node.module.split(".")[0]
        for node in ast.parse(cli.read_text()).body
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not top_level & upward, "fedlowrank/cli.py imports the apps at module level"


def _method_names() -> list[str]:
    from strategies.registry import get_method, method_names

    names = set()
    for name in method_names():
        names.add(name)
        names.update(get_method(name).aliases)
    return sorted(names)


GENERIC_CODE = [
    "strategies/server_app.py",
    "strategies/strategy.py",
    "strategies/user_dp.py",
    "strategies/registry.py",
    "clients/client_app.py",
    "clients/node.py",
    "clients/trainers.py",
    "clients/state.py",
    "fedlowrank/engine/batched.py",
    "fedlowrank/config.py",
    "fedlowrank/protocol/messages.py",
    "fedlowrank/protocol/flower.py",
]


@pytest.mark.parametrize("relative", GENERIC_CODE)
def test_generic_code_names_no_method(relative):
    text = (REPO / relative).read_text().lower()
    found = [name for name in _method_names() if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)]
    assert not found, f"{relative} names method(s) {found}: a method's behaviour belongs in its own module"


MAX_LINES = 60


@pytest.mark.parametrize("folder", ["strategies", "clients", "simulations", "fedlowrank/engine"])
def test_functions_are_short(folder):
    """No function over ~60 lines unless a comment on its first line says why (``# long: <reason>``)."""
    long = []
    for path in _modules(folder):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_LINES and "# long:" not in lines[node.lineno - 1]:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def test_the_flower_internal_the_simulator_sets_still_exists():
    """The in-process grids set Flower's task identity (Flower's runtimes do it before a ServerApp runs). If Flower
    renames it, this fails here, not in the middle of a simulation."""
    from flwr.app import Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from simulations.grids import adopt_server_identity

    adopt_server_identity(run_id=7)
    assert TaskIdentity.run_id == 7
    assert Message(RecordDict(), dst_node_id=1, message_type="train").metadata.run_id == 7


def test_no_private_flower_attribute_is_touched():
    """Nothing reaches into Flower objects' private attributes (``metadata.__dict__``, ``_check_...``)."""
    pattern = re.compile(r"__dict__\[\"_|\._check_and_log_replies|metadata\.__dict__")
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for package in PACKAGES
        for path in _modules(package)
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders
