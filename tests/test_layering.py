"""Imports flow one way: the layer order of docs/architecture.md, checked from the source.

Every ``import`` / ``from ... import`` in every module (function-local ones included,
relative ones resolved) is parsed with ``ast``; an import of a module in a later layer of
the documented order fails the test. The checker itself is tested on a synthetic package.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "scm_lightning"
PURE_LAYERS = ("trigflow", "nets", "teachers", "student", "jvp", "losses", "sampling", "metrics")
FRAMEWORKS = ("lightning", "pytorch_lightning", "hydra", "omegaconf")


def layer_order(doc: Path = ROOT / "docs" / "architecture.md") -> list[str]:
    """The numbered list under ``## Layer order``: ``1. `name` — ...``, lowest layer first."""
    text = doc.read_text()
    section = text.split("## Layer order", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\d+\. `([\w.]+)`", section, flags=re.M)


def package_modules(src: Path) -> dict[str, Path]:
    """Dotted module name (``scm_lightning.teachers.base``) -> file, for ``src/<package>``."""
    mods = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def imports_of(name: str, path: Path) -> list[tuple[str, int]]:
    """``(absolute imported name, line)`` for every import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                up = parts[: len(parts) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import mod` imports the submodule when there is one
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
            found.append((base, node.lineno))
    return found


def resolve(target: str, mods: dict[str, Path]) -> str | None:
    """The package module an imported name lives in (longest existing prefix)."""
    while target and target not in mods:
        target = target.rpartition(".")[0]
    return target or None


def layer_of(module: str, order: list[str]) -> int | None:
    """Index in ``order`` of the entry that is the module or one of its packages."""
    rel = module.removeprefix(PACKAGE + ".")
    for i, entry in enumerate(order):
        if rel == entry or rel.startswith(entry + "."):
            return i
    return None


def upward_imports(src: Path, order: list[str]) -> list[str]:
    """``file:line: a (layer i) imports b (layer j > i)`` for each import up the order."""
    mods = package_modules(src)
    bad = []
    for name, path in mods.items():
        if name == PACKAGE:
            continue  # the package root: checked to import nothing of its own below
        own = layer_of(name, order)
        for target, line in imports_of(name, path):
            if not target.startswith(PACKAGE):
                continue
            dep = resolve(target, mods)
            if dep is None or dep in (name, PACKAGE):
                continue
            dep_layer = layer_of(dep, order)
            if own is not None and dep_layer is not None and dep_layer > own:
                bad.append(
                    f"{path.relative_to(src)}:{line}: {name} ({order[own]}) imports {dep} "
                    f"({order[dep_layer]}, a higher layer)"
                )
    return sorted(set(bad))  # `from a import b` is checked as `a` and as `a.b`


def unlisted_modules(src: Path, order: list[str]) -> list[str]:
    return [m for m in package_modules(src) if m != PACKAGE and layer_of(m, order) is None]


def framework_imports(src: Path, layers: tuple[str, ...]) -> list[str]:
    """Imports of Lightning / Hydra / OmegaConf from modules of ``layers``."""
    order = list(layers)
    bad = []
    for name, path in package_modules(src).items():
        if layer_of(name, order) is None:
            continue
        for target, line in imports_of(name, path):
            if target.split(".")[0] in FRAMEWORKS:
                bad.append(f"{path.relative_to(src)}:{line}: {name} imports {target}")
    return sorted(set(bad))


# --- the package -----------------------------------------------------------------------------


def test_layer_order_is_documented() -> None:
    order = layer_order()
    assert order[:2] == ["assets", "trigflow"] and order[-1] == "__main__"
    assert len(order) == len(set(order)), "a layer is listed twice"
    for pure in PURE_LAYERS:
        assert pure in order


def test_every_module_has_a_layer() -> None:
    assert unlisted_modules(ROOT / "src", layer_order()) == []


def test_no_import_goes_up_the_layer_order() -> None:
    assert upward_imports(ROOT / "src", layer_order()) == []


def test_pure_layers_import_no_lightning_or_hydra() -> None:
    assert framework_imports(ROOT / "src", PURE_LAYERS) == []


def test_package_root_imports_nothing_of_its_own() -> None:
    root = ROOT / "src" / PACKAGE / "__init__.py"
    assert [t for t, _ in imports_of(PACKAGE, root) if t.startswith(PACKAGE)] == []


# --- the checker on a synthetic package ------------------------------------------------------


def _write(src: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = src / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    "statement",
    [
        "from scm_lightning.training import run",
        "import scm_lightning.training",
        "from scm_lightning import training",
        "from ..training import run",  # relative, from inside a subpackage
    ],
)
def test_checker_finds_a_function_local_upward_import(tmp_path: Path, statement: str) -> None:
    order = ["trigflow", "teachers", "training"]
    _write(
        tmp_path,
        {
            "__init__.py": "",
            "trigflow.py": "X = 1\n",
            "teachers/__init__.py": "",
            "teachers/base.py": f"def load():\n    {statement}\n    return 1\n",
            "training.py": "from scm_lightning.teachers.base import load\n",
        },
    )
    bad = upward_imports(tmp_path, order)
    assert len(bad) == 1 and "scm_lightning.teachers.base (teachers) imports" in bad[0]
    assert "scm_lightning.training (training, a higher layer)" in bad[0]


def test_checker_accepts_downward_and_same_layer_imports(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "__init__.py": "",
            "trigflow.py": "X = 1\n",
            "teachers/__init__.py": "from scm_lightning.teachers.base import load\n",
            "teachers/base.py": "from scm_lightning import trigflow\nfrom . import edm\n",
            "teachers/edm.py": "from ..trigflow import X\n",
            "training.py": "import scm_lightning.teachers\n",
        },
    )
    order = ["trigflow", "teachers", "training"]
    assert upward_imports(tmp_path, order) == []
    assert unlisted_modules(tmp_path, ["trigflow", "teachers"]) == ["scm_lightning.training"]


def test_checker_finds_framework_imports_in_pure_layers(tmp_path: Path) -> None:
    _write(tmp_path, {"__init__.py": "", "trigflow.py": "def f():\n    import lightning as L\n"})
    assert framework_imports(tmp_path, ("trigflow",)) == [
        "scm_lightning/trigflow.py:2: scm_lightning.trigflow imports lightning"
    ]
