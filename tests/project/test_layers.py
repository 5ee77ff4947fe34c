"""The layers, as the code's imports show them (every import, lazy ones inside functions included).

Bottom to top: ``common`` (version, device choice) ← ``models`` ← ``defense`` ← ``server``; ``clients``
speak HTTP to a server and never import it; ``measure`` (eval, fidelity, bench, reports, the launcher)
sits above them all; ``deepdefense`` (the command line) on top. docs/architecture.md draws the same.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
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


def layer_of(name: str) -> str:
    """The package of ours a dotted import name belongs to: ``deepdefense.<layer>…`` is that layer, anything else of
    ``deepdefense`` is the command line; a bare layer name (``models…``) is itself, which
    :func:`test_layers_are_imported_by_one_name` refuses."""
    head, _, rest = name.partition(".")
    if head == "deepdefense" and rest.split(".")[0] in OURS:
        return rest.split(".")[0]
    return head


def imports_of(package: str) -> dict[str, set[str]]:
    """For every module of ``package``: the packages of ours it imports (absolute imports; relative ones stay
    inside the package)."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(layer_of(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(layer_of(node.module))
        found[str(path.relative_to(REPO))] = {n for n in names if n in (*OURS, "tests") and n != package}
    return found


def tracked(root: Path) -> list[Path]:
    """The files git tracks under ``root`` (a folder outside git: all of them)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True, check=False)
    if listed.returncode:
        return sorted(p for p in root.rglob("*") if p.is_file())
    return [root / name for name in sorted(listed.stdout.split("\0")) if name]


def bare_layer_imports(root: Path) -> dict[str, list[str]]:
    """Imports of a layer by its folder's name (``from models…``) in every Python file of ours under ``root``."""
    found: dict[str, list[str]] = {}
    for path in tracked(root):
        if path.suffix != ".py" or path.is_symlink():
            continue
        names: list[str] = []
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names += [a.name for a in node.names if a.name.split(".")[0] in OURS[:-1]]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names += [node.module] if node.module.split(".")[0] in OURS[:-1] else []
        if names:
            found[str(path.relative_to(root))] = names
    return found


def test_layers_are_imported_by_one_name(tmp_path: Path) -> None:
    """Installed, the project is one package, ``deepdefense``: a layer imported by its folder's name works only in
    a checkout (and loads a second copy of the module there), so nothing of ours — tests and examples included —
    does it. The scan sees one."""
    assert bare_layer_imports(REPO) == {}
    (tmp_path / "bad.py").write_text("def f():\n    from models.lenet import LeNet\n    import server.app\n")
    assert bare_layer_imports(tmp_path) == {"bad.py": ["models.lenet", "server.app"]}


def test_the_wheel_has_one_top_level_package(tmp_path: Path) -> None:
    """The wheel built from the checkout holds ``deepdefense`` alone, with every layer, the shipped checkpoints and
    the playground inside it. Built from a copy of the tracked files (links kept as links), as from a clean clone."""
    source = tmp_path / "source"
    for path in tracked(REPO):
        copy = source / path.relative_to(REPO)
        copy.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            copy.symlink_to(path.readlink())
        elif path.is_file():
            shutil.copy2(path, copy)
    wheel_command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w"]
    subprocess.run([*wheel_command, str(tmp_path), str(source)], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("deepdefense-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"deepdefense"}
    packages = {n.rpartition("/")[0] for n in names if n.endswith("/__init__.py")}
    on_disk = {
        import_name(p.parent.relative_to(REPO)).replace(".", "/")
        for package in OURS
        for p in (REPO / package).rglob("__init__.py")
    }
    assert packages == on_disk, sorted(packages ^ on_disk)
    assert any(n.startswith("deepdefense/models/checkpoints/") and n.endswith(".safetensors") for n in names)
    assert "deepdefense/server/playground/index.html" in names


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
        "def f():\n    from deepdefense.cli import main\n    import deepdefense.clients.load\n"
    )
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    assert imports_of("server") == {"server/bad.py": {"deepdefense", "clients"}}


def import_name(relative: Path) -> str:
    """A module's name when imported: ``deepdefense.`` and its path in the repository (a layer's folder sits at the
    top of the repository, the command line's in ``deepdefense/``)."""
    dotted = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
    return dotted if dotted.split(".")[0] == "deepdefense" else f"deepdefense.{dotted}"


def module_graph(root: Path = REPO) -> dict[str, set[str]]:
    """Every module of ours → the modules of ours it imports (lazy and relative imports included; ``from p import
    m`` counts module ``p.m`` when there is one, else ``p``)."""
    files = {
        import_name(path.relative_to(root)): path for package in OURS for path in sorted((root / package).rglob("*.py"))
    }
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                parts = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                base = ".".join([*parts, *([node.module] if node.module else [])])
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names)
        graph[module] = set()
        for target in targets:
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != module:
                graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: every set of two or more modules that reach each other (a strongly connected component)."""
    reach = {m: set() for m in graph}
    for start in graph:
        todo = list(graph[start])
        while todo:
            m = todo.pop()
            if m not in reach[start]:
                reach[start].add(m)
                todo.extend(graph.get(m, ()))
    found = {tuple(sorted(m for m in reach[a] if a in reach[m])) for a in graph if a in reach[a]}
    return sorted(list(c) for c in found)


def test_no_module_imports_itself_back() -> None:
    assert cycles(module_graph()) == []


def test_the_cycle_check_sees_a_cycle(tmp_path: Path) -> None:
    (tmp_path / "defense" / "fitting").mkdir(parents=True)
    (tmp_path / "defense" / "__init__.py").write_text("")
    (tmp_path / "defense" / "engine.py").write_text("def f():\n    from .fitting import warm\n")
    (tmp_path / "defense" / "fitting" / "warm.py").write_text("from ..engine import f\n")
    assert cycles(module_graph(tmp_path)) == [["deepdefense.defense.engine", "deepdefense.defense.fitting.warm"]]


def test_serving_never_imports_fitting() -> None:
    """What is learnt offline (``defense/fitting/``) may use what serves; nothing that serves imports it."""
    serving = {
        m: used for m, used in module_graph().items() if m.startswith("deepdefense.defense") and ".fitting" not in m
    }
    wrong = {m: sorted(u for u in used if u.startswith("deepdefense.defense.fitting")) for m, used in serving.items()}
    assert not {m: u for m, u in wrong.items() if u}
