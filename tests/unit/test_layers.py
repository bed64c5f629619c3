"""Layers: each service depends on libs/common only, never on another service.

Parses every module's imports (ast, so nothing is imported or run) under services/*/src,
services/*/scripts and libs/common/src, and each service's pyproject dependencies. What two
services both need belongs in libs/common (for example conveyor.common.enqueue, which the
producer's Enqueue and the worker's scheduler loop share).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = sorted(p.name for p in (ROOT / "services").iterdir() if (p / "pyproject.toml").exists())


def _imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``tree``; relative imports resolved."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join([*parts[:keep], *([base] if base else [])])
            found.append((node.lineno, base))
            # `from conveyor import producer` names the package in the alias, not the module.
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
    return found


def _modules(top: Path) -> list[tuple[Path, str, bool]]:
    out = []
    for path in sorted(top.rglob("*.py")):
        rel = path.relative_to(top).with_suffix("")
        is_package = rel.name == "__init__"
        parts = rel.parts[:-1] if is_package else rel.parts
        out.append((path, ".".join(parts), is_package))
    return out


def _violations(top: Path, forbidden: set[str], root: Path = ROOT) -> list[str]:
    bad = []
    for path, module, is_package in _modules(top):
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, name in _imported(tree, module, is_package):
            for package in forbidden:
                if name == package or name.startswith(package + "."):
                    bad.append(f"{path.relative_to(root)}:{line} imports {name}")
    return sorted(set(bad))


def test_there_are_services_to_check() -> None:
    assert set(SERVICES) >= {"producer", "worker", "results"}


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_imports_no_other_service(service: str) -> None:
    forbidden = {f"conveyor.{other}" for other in SERVICES if other != service}
    checked = [
        ROOT / "services" / service / d for d in ("src", "scripts") if (ROOT / "services" / service / d).is_dir()
    ]
    assert checked
    bad = [v for top in checked for v in _violations(top, forbidden)]
    assert not bad, "move what both need into libs/common:\n" + "\n".join(bad)


def test_libs_common_imports_no_service() -> None:
    bad = _violations(ROOT / "libs" / "common" / "src", {f"conveyor.{s}" for s in SERVICES})
    assert not bad, "libs/common is below every service:\n" + "\n".join(bad)


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_depends_on_conveyor_common_only(service: str) -> None:
    project = tomllib.loads((ROOT / "services" / service / "pyproject.toml").read_text())
    deps = project["project"].get("dependencies", [])
    members = {d for d in deps if d.startswith("conveyor-")}
    assert members == {"conveyor-common"}, f"services/{service}/pyproject.toml depends on {sorted(members)}"
    sources = project.get("tool", {}).get("uv", {}).get("sources", {})
    assert set(sources) <= {"conveyor-common"}


def test_the_check_sees_an_import_of_another_service(tmp_path: Path) -> None:
    """The checker itself: absolute, from-, aliased and relative forms are all caught."""
    pkg = tmp_path / "conveyor" / "worker"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import conveyor.producer.enqueue\n")
    (pkg / "b.py").write_text("from conveyor.producer.enqueue import Enqueuer\n")
    (pkg / "c.py").write_text("from conveyor import producer\n")
    (pkg / "d.py").write_text("from ..producer import enqueue\n")
    (pkg / "e.py").write_text("from conveyor.common.enqueue import Enqueuer\nfrom . import a\n")
    bad = _violations(tmp_path, {"conveyor.producer"}, root=tmp_path)
    assert sorted({b.split(":")[0] for b in bad}) == [f"conveyor/worker/{n}.py" for n in "abcd"], bad
