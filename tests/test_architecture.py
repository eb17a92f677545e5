"""The layout rules of docs/architecture.md, checked on the source (issue 13)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = sorted([*(ROOT / "dsnot_deploy").rglob("*.py"), *(ROOT / "converters").rglob("*.py")])
BASE = {"dsnot_deploy", "dsnot_deploy.errors", "dsnot_deploy.atomic", "dsnot_deploy.progress"}


def _imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names; relative imports resolved), lazy ones included."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base]) if base else ".".join(parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_no_product_module_over_400_lines() -> None:
    long = {_rel(p): n for p in PRODUCT if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_only_the_progress_module_imports_tqdm() -> None:
    users = [_rel(p) for p in PRODUCT if any(m == "tqdm" or m.startswith("tqdm.") for m in _imports(p))]
    assert users == ["dsnot_deploy/progress.py"]


def test_converters_need_only_the_shared_base() -> None:
    """converters/ reads and writes files; of dsnot_deploy it uses errors, atomic writes and progress."""
    bad = {}
    for path in (ROOT / "converters").rglob("*.py"):
        ours = {m for m in _imports(path) if m.startswith("dsnot_deploy")}
        extra = {m for m in ours if m not in BASE and not any(m.startswith(b + ".") for b in BASE - {"dsnot_deploy"})
                 and m != "dsnot_deploy.__version__"}
        if extra:
            bad[_rel(path)] = sorted(extra)
    assert not bad, bad


def test_the_math_does_no_io_and_knows_no_other_stage() -> None:
    allowed = ("torch", "numpy", "math", "dataclasses", "enum", "typing", "__future__", "collections",
               "dsnot_deploy.algorithms", "dsnot_deploy.errors")
    bad = {}
    for path in (ROOT / "dsnot_deploy" / "algorithms").rglob("*.py"):
        extra = sorted(m for m in _imports(path) if not m.startswith(allowed) and m not in ("time", "logging"))
        if extra:
            bad[_rel(path)] = extra
    assert not bad, bad


def test_command_modules_do_not_import_the_entry_module() -> None:
    """`dsnot_deploy.cli` (main and the registry) imports the commands, never the other way round."""
    bad = [_rel(p) for p in (ROOT / "dsnot_deploy" / "cli").glob("*.py")
           if p.name not in ("__init__.py", "__main__.py")
           and any(m == "dsnot_deploy.cli" or m.startswith("dsnot_deploy.cli.") and m.split(".")[2] in
                   ("main", "build_parser", "COMMANDS", "COMMAND_MODULES") for m in _imports(p))]
    assert not bad, bad
