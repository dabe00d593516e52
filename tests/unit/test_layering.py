"""The layering: ``unlearning`` (the library) imports none of the pipeline stack, ``tasks``
(the steps) never imports ``flows`` (the orchestration and CLI).

- Every module under ``unlearning/`` (found by walking the folder, so a new one is covered
  without editing this file) is imported in a fresh interpreter, which must end without
  prefect, mlflow, great_expectations or dvc in ``sys.modules``; the message names the
  module and line that pulled one in.
- Every ``tasks/`` module is parsed with ``ast``: no ``import flows...`` / ``from flows...``
  at any depth (inside functions, ``if TYPE_CHECKING:``, try blocks), nor
  ``importlib.import_module("flows...")`` / ``__import__("flows...")``; likewise no
  ``tasks``/``flows`` import anywhere in ``unlearning/``.

Each checker is also run once on a planted violation, so neither can pass vacuously.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("prefect", "mlflow", "great_expectations", "dvc")

# Run as ``python -c CHECKER PACKAGE_DIR``: imports the package and every module below it
# (sorted, package before its modules) with a meta-path hook that records, for the first
# import of each forbidden top-level package, the innermost frame of the walked package
# that caused it. Prints one JSON object.
CHECKER = textwrap.dedent(
    """
    import importlib, json, sys, traceback
    from pathlib import Path

    FORBIDDEN = %r
    pkg_dir = Path(sys.argv[1]).resolve()
    sys.path.insert(0, str(pkg_dir.parent))
    pkg = pkg_dir.name

    def forbidden(name):
        top = name.partition(".")[0]
        return any(top == f or top.startswith(f + "_") for f in FORBIDDEN)

    culprits = {}

    class Spy:
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if forbidden(name) and top not in culprits:
                frames = [f for f in traceback.extract_stack()
                          if f.filename.startswith(str(pkg_dir))]
                where = frames[-1] if frames else None
                culprits[top] = (f"{Path(where.filename).relative_to(pkg_dir.parent)}:"
                                 f"{where.lineno}: {(where.line or '').strip()}"
                                 if where else "outside " + pkg)
            return None

    sys.meta_path.insert(0, Spy())
    modules = []
    for p in pkg_dir.rglob("*.py"):
        parts = p.relative_to(pkg_dir.parent).with_suffix("").parts
        if "__pycache__" not in parts:
            modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    modules.sort()
    errors = {}
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    loaded = sorted({m.partition(".")[0] for m in sys.modules if forbidden(m)})
    print(json.dumps({"modules": modules, "errors": errors,
                      "loaded": {top: culprits.get(top, "?") for top in loaded}}))
    """
) % (FORBIDDEN,)


def import_in_fresh_interpreter(package_dir: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHECKER, str(package_dir)], check=False,
                          capture_output=True, text=True, timeout=300, cwd=package_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_unlearning_imports_no_pipeline_stack():
    result = import_in_fresh_interpreter(ROOT / "unlearning")
    assert {"unlearning", "unlearning.methods"} <= set(result["modules"])
    assert len(result["modules"]) >= 10, result["modules"]  # the walk found the package
    assert not result["errors"], f"modules under unlearning/ fail to import: {result['errors']}"
    assert not result["loaded"], (
        "unlearning/ must not import the pipeline stack; imported (first cause): "
        + "; ".join(f"{top} <- {where}" for top, where in result["loaded"].items()))


def test_import_checker_catches_a_planted_violation(tmp_path: Path):
    pkg = tmp_path / "planted"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    pass\n\nimport dvc  # planted\n")
    result = import_in_fresh_interpreter(pkg)
    assert result["modules"] == ["planted", "planted.sub", "planted.sub.leaf"]
    assert result["loaded"] == {"dvc": "planted/sub/leaf.py:4: import dvc  # planted"}


def imports_of(source: str, filename: str, banned: tuple[str, ...]) -> list[str]:
    """``file:line: statement`` for every import of a ``banned`` top-level package, at any
    depth, including ``importlib.import_module("x")`` and ``__import__("x")``."""

    def hit(module: str | None) -> bool:
        return module is not None and module.partition(".")[0] in banned

    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if hit(a.name)]
        elif isinstance(node, ast.ImportFrom):
            bad = [node.module] if node.level == 0 and hit(node.module) else []
        elif isinstance(node, ast.Call):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[0] if node.args else None
            bad = ([arg.value] if fname in ("import_module", "__import__")
                   and isinstance(arg, ast.Constant) and isinstance(arg.value, str)
                   and hit(arg.value) else [])
        else:
            continue
        if bad:
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


def scan(folder: str, banned: tuple[str, ...]) -> tuple[int, list[str]]:
    files = sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)
    found = []
    for path in files:
        found += imports_of(path.read_text(), str(path.relative_to(ROOT)), banned)
    return len(files), found


def test_tasks_never_import_flows():
    count, found = scan("tasks", ("flows",))
    assert count >= 5, "tasks/ not found"
    assert not found, "tasks/ must not import flows/ (move the code down a layer):\n" + \
        "\n".join(found)


def test_unlearning_never_imports_tasks_or_flows():
    count, found = scan("unlearning", ("tasks", "flows"))
    assert count >= 10, "unlearning/ not found"
    assert not found, "unlearning/ must not import tasks/ or flows/:\n" + "\n".join(found)


@pytest.mark.parametrize("source", [
    "import flows",
    "import os, flows.cli as c",
    "from flows import pipeline",
    "from flows.cli.ui import port_free",
    "def f():\n    if True:\n        from flows.report import render\n",
    "try:\n    pass\nexcept ImportError:\n    import flows.report\n",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from flows import cli\n",
    "import importlib\nm = importlib.import_module('flows.pipeline')",
    "class A:\n    def m(self):\n        return __import__('flows')",
])
def test_ast_checker_finds_imports_at_any_depth(source):
    assert len(imports_of(source, "t.py", ("flows",))) == 1


@pytest.mark.parametrize("source", [
    "import flowsy", "from tasks import flows", "from .flows import x", "x = 'import flows'",
    "import workflows.flows",
])
def test_ast_checker_ignores_lookalikes(source):
    assert imports_of(source, "t.py", ("flows",)) == []
