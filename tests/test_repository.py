"""The repository as a newcomer gets it: a fresh clone carries everything its tests read, the wheel and the image
carry none of the test data, and every package the code imports is declared (with the Ray it was built on)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from tests import _scan_factory
from tests.conftest import EXAMPLE_DIR, REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _tracked(path: Path) -> bool:
    done = subprocess.run(
        ["git", "ls-files", "--error-unmatch", str(path.relative_to(REPO))], cwd=REPO, capture_output=True, check=False
    )
    return done.returncode == 0


def test_the_example_data_the_tests_read_are_part_of_the_repository():
    files = [
        EXAMPLE_DIR / "README.md",
        _scan_factory.CT_SM,
        _scan_factory.SEG_FAST,
        _scan_factory.STATS_FAST,
        EXAMPLE_DIR / "example_ct.nii.gz",
        *sorted(_scan_factory.DICOM_DIR.iterdir()),
    ]
    assert len(files) > 6
    for path in files:
        assert path.resolve().is_relative_to(REPO), f"{path} is outside the repository: a fresh clone lacks it"
        assert _tracked(path), f"{path} is not committed"
    readme = (EXAMPLE_DIR / "README.md").read_text()
    assert "CC BY 4.0" in readme and "Apache-2.0" in readme and "TotalSegmentator" in readme


def test_the_image_and_the_package_data_leave_the_test_data_out():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert "tests" in ignored
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["ray_app*"]
    for patterns in PYPROJECT["tool"]["setuptools"]["package-data"].values():
        assert not any("tests" in p or ".." in p for p in patterns), patterns


@pytest.mark.slow
def test_the_wheel_carries_no_test_data(tmp_path):
    # Offline (no build isolation: the build backend must be here already), from a copy of the checkout so the
    # build's own folders stay out of it.
    pytest.importorskip("setuptools", minversion="68")
    source = tmp_path / "src"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "demo-output"),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("ray_app-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("ray_app/demo/phantom_weights/") for n in names)
    assert not [n for n in names if n.startswith("tests/") or "totalseg-example" in n or n.endswith(".dcm")]


def _imported_distributions() -> set[str]:
    modules = set()
    for path in (REPO / "ray_app").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    owners = metadata.packages_distributions()
    return {
        owners[m][0].lower() for m in modules if m not in sys.stdlib_module_names and m != "ray_app" and m in owners
    }


def _declared() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    return {r.name.lower(): r for r in reqs}


def test_every_imported_package_is_declared():
    missing = _imported_distributions() - set(_declared())
    assert not missing, f"imported by ray_app but not in pyproject's dependencies: {sorted(missing)}"


def test_ray_is_pinned_to_the_minor_version_the_code_and_tests_rely_on():
    """Serve's ``backpressure_config`` (alpha), Ray Data's DataContext retry settings and the tests' private
    ``ray._private`` modules change between minor versions: a lower bound alone lets pip pick one that breaks."""
    ray = _declared()["ray"]
    assert {"data", "serve"} <= ray.extras
    assert ray.specifier.contains(metadata.version("ray"))
    assert not ray.specifier.contains("2.61.0") and not ray.specifier.contains("2.59.0"), ray
    torch = _declared()["torch"]
    assert not any(s.operator in ("==", "<", "<=", "~=") for s in torch.specifier), "do not pin an older torch"


def test_ci_runs_lint_format_and_type_checks_before_the_tests_and_stops_on_failure():
    """``.ci/run`` fails on a lint, format or type error: the checks run under ``set -e`` before pytest, with the
    tools the ``test`` extra installs and mypy strict on the core."""
    script = (REPO / ".ci" / "run").read_text()
    assert "set -euo pipefail" in script
    steps = [line.strip() for line in script.splitlines() if line.strip().startswith(".venv/bin/")]
    checks = [
        ".venv/bin/ruff check ray_app tests bench jobs scripts",
        ".venv/bin/ruff format --check ray_app tests bench jobs scripts",
        ".venv/bin/mypy",
    ]
    pytest_at = steps.index(".venv/bin/python -m pytest -q")
    assert all(c in steps and steps.index(c) < pytest_at for c in checks), steps
    assert not any(c + " ||" in script or c + " || true" in script for c in checks)
    test_extra = " ".join(PYPROJECT["project"]["optional-dependencies"]["test"])
    assert "ruff" in test_extra and "mypy" in test_extra
    strict = [o for o in PYPROJECT["tool"]["mypy"]["overrides"] if "ray_app.core.*" in o["module"]]
    assert strict and strict[0]["disallow_untyped_defs"] and strict[0]["disallow_any_generics"]
