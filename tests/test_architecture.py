"""The layers of ``ray_app`` (see its ``__init__``) hold: each module imports only its own layer and those
below it, and the core imports no Ray, no HTTP framework and no cloud SDK."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ray_app"

#: Layer of each part of the package, lowest first; a module may import from its own layer or a lower one.
LAYERS = {
    "ray_app.settings": 0,
    "ray_app.core": 1,
    "ray_app.storage": 2,
    "ray_app.adapters.batch": 3,
    "ray_app.adapters.plan": 3,
    "ray_app.adapters.metrics": 3,
    "ray_app.adapters.serve": 3,
    "ray_app.ops": 4,
    "ray_app.demo": 4,
    "ray_app.adapters.cli": 5,
    "ray_app.adapters": 5,
    "ray_app": 6,
}
#: Third-party packages the core must never import: it runs the same in a notebook, a Ray task and a test.
CORE_FORBIDDEN = ("ray", "fastapi", "starlette", "uvicorn", "boto3", "botocore", "pyarrow")


def layer(module: str) -> int:
    part = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[part]


def imports(path: Path, module: str) -> list[str]:
    """Every module ``path`` imports, anywhere in it (functions included), relative imports resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            found += [f"{base}.{a.name}" for a in node.names] if base.startswith("ray_app") else [base]
    return found


def violations(root: Path) -> list[str]:
    """``importer -> imported`` for every import that points up the layers or takes the core off its ground."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for name in imports(path, module):
            if name.startswith("ray_app"):
                target = name if _is_module(root, name) else name.rsplit(".", 1)[0]
                if layer(target) > layer(module):
                    problems.append(f"{module} -> {target}")
            elif layer(module) == LAYERS["ray_app.core"] and name.split(".")[0] in CORE_FORBIDDEN:
                problems.append(f"{module} -> {name}")
    return sorted(set(problems))


def _is_module(root: Path, name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (root / rel).with_suffix(".py").exists() or (root / rel / "__init__.py").exists()


def test_dependencies_point_one_way_and_the_core_has_no_ray_http_or_cloud():
    assert violations(PACKAGE) == []


@pytest.mark.parametrize(
    ("where", "line", "expected"),
    [
        ("core/segmenter.py", "import ray", "ray_app.core.segmenter -> ray"),
        ("core/scan.py", "from boto3.session import Session", "ray_app.core.scan -> boto3.session"),
        ("core/outputs.py", "from fastapi import FastAPI", "ray_app.core.outputs -> fastapi"),
        ("core/passport.py", "from ray_app.storage import objects", "ray_app.core.passport -> ray_app.storage.objects"),
        ("storage/sinks.py", "from ray_app.adapters import batch", "ray_app.storage.sinks -> ray_app.adapters.batch"),
    ],
)
def test_the_check_catches_an_import_against_the_layers(tmp_path, where, line, expected):
    """The check is not vacuous: the real package with one bad import added fails it, naming the import."""
    import shutil

    copy = tmp_path / "ray_app"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("phantom_weights", "__pycache__"))
    target = copy / where
    target.write_text(target.read_text() + f"\n{line}\n")
    assert violations(copy) == [expected]


def test_the_public_surface_is_what_a_notebook_needs_and_imports_nothing_heavy():
    import subprocess
    import sys

    code = (
        "import sys, ray_app; "
        "heavy = {'ray', 'torch', 'boto3'} & set(sys.modules); "
        "assert not heavy, sorted(heavy); "
        "print(' '.join(ray_app.__all__)); "
        "[getattr(ray_app, n) for n in ray_app.__all__]"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert {"load_scan", "Segmenter", "build_passport", "run_batch", "BatchConfig", "Settings"} <= set(out)


def test_the_core_takes_its_settings_as_arguments_and_never_reads_them_itself():
    """Configuration is passed explicitly (one ``Settings`` from the adapter that was started): no core module
    calls ``get_settings()``, so a notebook, a Ray worker and a test configure it the same way."""
    readers = [
        str(path.relative_to(PACKAGE.parent))
        for path in sorted((PACKAGE / "core").rglob("*.py"))
        if "get_settings" in _names(path)
    ]
    assert readers == []


def _names(path: Path) -> set[str]:
    """Every name ``path`` uses, imports or reads as an attribute."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, ast.alias):
            out.add(node.name.rsplit(".", 1)[-1])
    return out
