"""The layers, as the code's imports show them (every import, lazy ones inside functions included).

Bottom to top: ``common`` (version, device choice) ← ``models`` ← ``defense`` ← ``server``; ``clients``
speak HTTP to a server and never import it; ``measure`` (eval, fidelity, bench, reports, the launcher)
sits above them all; ``deepdefense`` (the command line) on top. docs/architecture.md draws the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OURS = ("common", "models", "defense", "server", "clients", "measure", "deepdefense")
#: What each package may import of ours (besides itself).
ALLOWED: dict[str, set[str]] = {
    "common": set(),
    "models": set(),
    "defense": {"common", "models"},
    "server": {"common", "models", "defense"},
    "clients": {"common", "models", "defense"},
    "measure": {"common", "models", "defense", "server", "clients"},
    "deepdefense": {"common", "models", "defense", "server", "clients", "measure"},
}


def imports_of(package: str) -> dict[str, set[str]]:
    """For every module of ``package``: the packages of ours it imports (absolute imports; relative ones stay
    inside the package)."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = {n for n in names if n in (*OURS, "tests") and n != package}
    return found


@pytest.mark.parametrize("package", OURS)
def test_imports_point_down(package: str) -> None:
    modules = imports_of(package)
    assert modules, f"no modules found under {package}/"
    wrong = {module: sorted(used - ALLOWED[package]) for module, used in modules.items() if used - ALLOWED[package]}
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package]) or 'nothing of ours'}; found {wrong}"


def test_the_check_sees_a_wrong_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan finds lazy imports inside functions, the way cycles used to creep in."""
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "bad.py").write_text(
        "def f():\n    from deepdefense.cli import main\n    import clients.load\n"
    )
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    assert imports_of("server") == {"server/bad.py": {"deepdefense", "clients"}}
