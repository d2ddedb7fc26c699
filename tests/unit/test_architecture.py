"""The folders are the architecture: imports point down the floors, and docs/architecture.md names every room."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "linewatch"
DOC = ROOT / "docs" / "architecture.md"

# floor of each top-level room (linewatch.<room>); a module may import its own floor and the floors below
FLOORS = {
    "__init__": 0, "errors": 0, "messages": 0, "security": 0, "logsetup": 0, "wheels": 0, "imaging": 0, "backoff": 0,
    "model": 1,
    "station": 2, "service": 2, "client": 2,
    "bridges": 3, "view": 3,
    "tools": 4,
    "cli": 5,
}
# rooms that must stay lighter than their floor allows
ONLY = {
    "messages": set(),  # the wire schema: the standard library only (a subscriber needs nothing else)
    "client": {"messages", "security", "errors"},  # pyzmq + the schema, no torch, no service
}
FORBIDDEN = {
    "service": {"station"},  # the daemon never depends on training or evaluation code
    "model": {"service", "station"},  # pure torch: no cameras, no config (ground helpers such as imaging are fine)
}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in PKG.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Every linewatch module a file imports, at any depth (lazy imports inside functions count too)."""
    out = set()
    pkg_parts = path.relative_to(ROOT).with_suffix("").parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("linewatch")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg_parts[: len(pkg_parts) - node.level + 1])
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("linewatch"):
                out.add(mod)
                out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_room_has_a_floor() -> None:
    rooms = {_room(m) for m in _modules()}
    assert rooms <= set(FLOORS), f"rooms without a floor (add them here and to docs/architecture.md): " \
                                 f"{sorted(rooms - set(FLOORS))}"


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_point_down(module: str) -> None:
    here = _room(module)
    bad = []
    for target in _imports(_modules()[module]):
        there = _room(target)
        if there not in FLOORS or there == here:
            continue
        if FLOORS[there] > FLOORS[here]:
            bad.append(f"{target} (floor {FLOORS[there]} above {here}'s {FLOORS[here]})")
        if here in ONLY and there not in ONLY[here]:
            bad.append(f"{target} ({here} may import only {sorted(ONLY[here]) or 'the standard library'})")
        if there in FORBIDDEN.get(here, ()):
            bad.append(f"{target} ({here} must not depend on {there})")
    assert not bad, f"{module} imports upward or sideways: {bad}"


def test_the_wire_schema_imports_no_third_party_package() -> None:
    tree = ast.parse((PKG / "messages.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & {"torch", "numpy", "cv2", "zmq", "yaml", "pydantic"}, names


def test_architecture_page_names_every_room() -> None:
    """Every package, every top-level module and every module of model/, station/ and service/ is on the page."""
    text = DOC.read_text()
    missing = []
    for path in PKG.rglob("*"):
        rel = path.relative_to(PKG)
        if "__pycache__" in rel.parts or path.name == "__init__.py" or path.name == "__main__.py":
            continue
        if path.is_dir() and any(path.glob("*.py")):
            if not re.search(rf"\b{re.escape(path.name)}/", text):
                missing.append(f"{rel}/")
        elif path.suffix == ".py" and (len(rel.parts) == 1 or rel.parts[0] in {"model", "station", "service"}
                                       and len(rel.parts) == 2):
            if not re.search(rf"\b{re.escape(path.stem)}\b", text):
                missing.append(str(rel))
    assert not missing, f"docs/architecture.md does not mention: {missing}"
