"""Import layers that follow the trust boundaries (DESIGN.md sections 6, 7 and 13).

Read from the source (AST, every import statement including those inside functions), so a
forbidden import is named with its file and line without importing anything:

- code that runs inside the sandbox (the notebook client, the Ray helper) reaches only other
  sandbox-side modules: never settings, the database, tokens, the audit log or the data store;
- the lowest layers (``spe.db``, ``spe.errors``, ``spe.audit``) depend on nothing above them;
- permits (the access bodies' side) and the DP engine do not depend on the researchers' enclave
  or the operator CLI.

Run by CI (pytest) and by pre-commit (.pre-commit-config.yaml).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ("spe", "permits", "workspaces")

#: Modules importable inside a workspace sandbox, and what they may import from the project.
SANDBOX_SIDE = ("spe.client", "workspaces.ray_head", "permits.terms")

#: (importer prefix, allowed project prefixes) for the lowest layers.
LOWEST = {
    "spe.db": ("spe.db", "spe.errors"),
    "spe.errors": ("spe.errors",),
    "spe.audit": ("spe.audit", "spe.db", "spe.errors"),
}

#: (importer prefix, forbidden prefixes).
FORBIDDEN = {
    "permits": ("workspaces", "spe.dp", "spe.cli"),
    "spe.dp": ("workspaces", "spe.cli"),
    "spe.budget": ("workspaces", "spe.cli", "spe.api"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> list[tuple[str, str, str]]:
    """(importer module, imported project module, "file:line") for every project import."""
    found = []
    for package in PROJECT:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            module = _module_name(path)
            is_pkg = path.name == "__init__.py"
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                targets: list[str] = []
                if isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        parts = module.split(".")
                        keep = len(parts) - node.level + (1 if is_pkg else 0)
                        base = ".".join([*parts[:keep], *([base] if base else [])])
                    targets = [f"{base}.{a.name}" if base else a.name for a in node.names]
                for target in targets:
                    if target.split(".")[0] in PROJECT:
                        where = f"{path.relative_to(ROOT)}:{node.lineno}"
                        found.append((module, target, where))
    return found


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


IMPORTS = _imports()


def test_the_import_graph_was_read() -> None:
    assert any(_under(m, "spe.client") for m, _, _ in IMPORTS)
    assert len(IMPORTS) > 50


def test_sandbox_side_code_imports_only_sandbox_side_modules() -> None:
    bad = [f"{where}: {module} imports {target}" for module, target, where in IMPORTS
           if any(_under(module, s) for s in SANDBOX_SIDE)
           and target not in ("spe", "permits", "workspaces")  # package roots: no code
           and not any(_under(target, s) for s in SANDBOX_SIDE)]
    assert not bad, "code that runs in the sandbox reaches server-side code:\n" + "\n".join(bad)


@pytest.mark.parametrize("importer", sorted(LOWEST))
def test_lowest_layers_depend_on_nothing_above(importer: str) -> None:
    allowed = LOWEST[importer]
    bad = [f"{where}: {module} imports {target}" for module, target, where in IMPORTS
           if _under(module, importer) and not any(_under(target, a) for a in allowed)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("importer", sorted(FORBIDDEN))
def test_forbidden_layer_imports(importer: str) -> None:
    bad = [f"{where}: {module} imports {target}" for module, target, where in IMPORTS
           if _under(module, importer) and any(_under(target, f) for f in FORBIDDEN[importer])]
    assert not bad, "\n".join(bad)


def test_package_roots_import_no_server_code() -> None:
    """``import spe.client`` runs ``spe/__init__.py`` inside the sandbox first."""
    for package in PROJECT:
        tree = ast.parse((ROOT / package / "__init__.py").read_text())
        top_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        names = [getattr(n, "module", None) or n.names[0].name for n in top_level]
        assert not [n for n in names if n and n.split(".")[0] in PROJECT], package
