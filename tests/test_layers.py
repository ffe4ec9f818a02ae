"""The package's folders are its layers: data flows one way, and nothing imports upward or in a circle.

Read from the source (every import, at module level or inside a function), so a lazy import that hides a cycle
fails here too.
"""

from __future__ import annotations

import ast

import pytest
from pathlib import Path

import lightning_parablock

PACKAGE = Path(lightning_parablock.__file__).parent
LAYERS = [
    "core", "aggregation", "comm", "telemetry", "fault_tolerance", "strategies", "methods", "callbacks", "flower", "cli",
]  # fmt: skip
FOUNDATION = {"_compat", "argument_checks", "files"}  # used by every layer; import no other part of the package
DEPRECATED = {"_moved"}  # the module paths of before the layers, built from the new ones; only __init__ imports it
APPLICATION = {"module", "pretrained", "data", "eval"}  # model and its loading, data, evaluation: any layer but cli


def room(module: str) -> str:
    """``lightning_parablock.core.blocks`` -> ``core``; the package root -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def package_imports() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(relative.parts[:-1] if relative.name == "__init__" else relative.parts)
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_parablock"):
                imported.add(node.module)
                imported |= {f"{node.module}.{a.name}" for a in node.names}  # `from lightning_parablock.cli import x`
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if a.name.startswith("lightning_parablock")}
        graph[name] = imported
    return {name: {i for i in imports if i in graph and i != name} for name, imports in graph.items()}


def upward(importer: str, imported: str) -> bool:
    mine, theirs = room(importer), room(imported)
    if mine == theirs or mine == "__init__":
        return False
    if theirs in DEPRECATED:
        return True
    if mine in FOUNDATION:
        return True
    if theirs in FOUNDATION:
        return False
    if theirs == "__init__" or theirs == "cli":
        return mine != "cli"
    if theirs in APPLICATION:
        return mine not in APPLICATION and mine != "cli"
    if mine in APPLICATION:
        return False
    return LAYERS.index(theirs) > LAYERS.index(mine)


def test_every_module_lives_in_a_known_room():
    rooms = {room(name) for name in package_imports()}
    assert rooms <= {*LAYERS, *FOUNDATION, *APPLICATION, *DEPRECATED, "__init__"}, rooms


def test_nothing_imports_upward():
    offenders = [
        f"{importer} imports {imported}"
        for importer, imports in package_imports().items()
        for imported in imports
        if upward(importer, imported)
    ]
    assert not offenders, "\n".join(sorted(offenders))


def test_no_module_imports_itself_in_a_circle():
    graph = package_imports()
    packages = {name for name in graph if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()}
    edges = {name: {i for i in imports if i not in packages} for name, imports in graph.items()}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in edges.get(node, ()):
            if nxt == path[0]:
                cycles.append(" -> ".join([*path, nxt]))
            elif nxt not in path and nxt > path[0]:  # each cycle once, from its smallest module
                visit(nxt, [*path, nxt])

    for start in edges:
        visit(start, [start])
    assert not cycles, "\n".join(cycles)


def test_the_core_runs_without_lightning():
    for path in (PACKAGE / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not any((n or "").split(".")[0] in ("lightning", "pytorch_lightning") for n in names), path


def test_no_module_imports_an_old_module_path():
    from lightning_parablock._moved import MOVED

    old = {f"lightning_parablock.{name}" for name in MOVED}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.relative_to(PACKAGE)} imports {n}" for n in names if n in old]
    assert not offenders, offenders


def test_at_most_ten_modules_at_the_top():
    assert len(list(PACKAGE.glob("*.py"))) <= 10


def test_core_and_aggregation_import_without_lightning_transformers_peft_or_datasets():
    """``core`` and ``aggregation`` are torch only: a Flower server, a benchmark or a notebook that aggregates
    deltas does not pay for the training stack. Every module of both, in a fresh interpreter."""
    import subprocess
    import sys

    modules = sorted(
        name for name in package_imports() if room(name) in {"core", "aggregation"} or name == "lightning_parablock"
    )
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in ('lightning', 'transformers', 'peft', 'datasets') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def _fresh(script: str) -> str:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_parablock_help_loads_no_data_or_adapter_stack():
    """``parablock --help`` costs what Lightning costs (benchmarks/startup.py measures the seconds): no datasets,
    pandas, pyarrow, peft or Flower before a command needs them."""
    script = (
        "import contextlib, io, sys\n"
        "from lightning_parablock.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit): main(['--help'])\n"
        "print(sorted(m for m in ('datasets', 'pandas', 'pyarrow', 'peft', 'flwr') if m in sys.modules))\n"
    )
    assert _fresh(script) == "[]"


@pytest.mark.parametrize("lightning_first", [False, True], ids=["package_first", "lightning_first"])
def test_the_strategy_is_known_by_name_once_the_package_and_lightning_are_imported(lightning_first):
    imports = ["import lightning_parablock", "from lightning import Trainer"]
    script = "\n".join(reversed(imports) if lightning_first else imports) + (
        "\nfrom lightning.pytorch.strategies import StrategyRegistry\n"
        "print('federated_block' in StrategyRegistry)\n"
    )
    assert _fresh(script) == "True"
