"""The wheel and sdist that ``python -m build`` makes: what they hold, and the wheel installed in a fresh venv.

The rules live once, in ``scripts/check_package.py`` (loaded here from its path). These tests build
once into a temporary folder, assert the rules hold, show that each rule catches what it is there
for, and install the bare wheel in a fresh venv to run its entry point from outside the repository.
The tiny ``ghostnoise compare`` job (with the ``cli`` and ``data`` extras) runs in the script only:
``python scripts/check_package.py``.
"""

from __future__ import annotations

import importlib.util
import io
import tarfile
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, Optional, Tuple

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_package", ROOT / "scripts" / "check_package.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_package = _load_script()
DIST_INFO = "lightning_ghostnoise-0.1.0.dist-info"
SDIST_TOP = "lightning_ghostnoise-0.1.0"


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Path]:
    """The wheel and sdist built from this working tree (isolated build, as a release makes them)."""
    return check_package.build_dists(tmp_path_factory.mktemp("dist"))


def _rewrite_wheel(
    wheel: Path, out: Path, edit: Callable[[str, bytes], Optional[bytes]], add: Dict[str, bytes]
) -> Path:
    """A copy of ``wheel`` with each member passed through ``edit`` (None drops it) and ``add`` appended."""
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = edit(info.filename, src.read(info))
            if data is not None:
                dst.writestr(info.filename, data)
        for name, data in add.items():
            dst.writestr(name, data)
    return out


def _rewrite_sdist(sdist: Path, out: Path, drop: Tuple[str, ...], add: Dict[str, bytes]) -> Path:
    """A copy of ``sdist`` without the members named in ``drop`` (relative to its top) and with ``add``."""
    with tarfile.open(sdist) as src, tarfile.open(out, "w:gz") as dst:
        for member in src.getmembers():
            if member.name[len(SDIST_TOP) + 1 :] in drop:
                continue
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
        for name, data in add.items():
            info = tarfile.TarInfo(f"{SDIST_TOP}/{name}")
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    return out


def test_the_wheel_holds_every_module_and_nothing_else(dists: Tuple[Path, Path]) -> None:
    wheel, _ = dists
    assert check_package.check_wheel(wheel) == []
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert "lightning_ghostnoise/py.typed" in names
    assert {n for n in names if not n.startswith(DIST_INFO)} == check_package.source_files()


def test_the_sdist_holds_what_builds_the_package_and_no_tests(dists: Tuple[Path, Path]) -> None:
    _, sdist = dists
    assert check_package.check_sdist(sdist) == []
    with tarfile.open(sdist) as tf:
        names = {m.name[len(SDIST_TOP) + 1 :] for m in tf.getmembers() if m.isfile()}
    assert {"pyproject.toml", "README.md", "LICENSE", "lightning_ghostnoise/py.typed"} <= names
    assert not [n for n in names if n.startswith(("tests/", "docs/", "runs/"))]


def test_the_wheel_checks_catch_each_kind_of_mistake(dists: Tuple[Path, Path], tmp_path: Path) -> None:
    wheel, _ = dists

    def edit(name: str, data: bytes) -> Optional[bytes]:
        if name in ("lightning_ghostnoise/py.typed", "lightning_ghostnoise/seeding.py"):
            return None
        if name == f"{DIST_INFO}/entry_points.txt":
            return b"[console_scripts]\nghostnoise = lightning_ghostnoise.cli:other\n"
        if name == f"{DIST_INFO}/METADATA":
            lines = data.decode().split("\n")
            return "\n".join(
                x for x in lines if not x.startswith(("Requires-Python", "Requires-Dist: torch>"))
            ).encode()
        return data

    broken = _rewrite_wheel(
        wheel,
        tmp_path / wheel.name,
        edit,
        {
            "tests/test_x.py": b"",
            "lightning_ghostnoise/__pycache__/seeding.cpython-311.pyc": b"",
            "lightning_ghostnoise/results.json": b"0" * (check_package.MAX_FILE_BYTES + 1),
        },
    )
    problems = "\n".join(check_package.check_wheel(broken))
    for expected in (
        "wheel lacks lightning_ghostnoise/py.typed",
        "wheel lacks lightning_ghostnoise/seeding.py",
        "tests/test_x.py: inside tests/",
        "seeding.cpython-311.pyc: inside __pycache__/",
        "lightning_ghostnoise/results.json: ",
        "wheel has lightning_ghostnoise/results.json, which is not a module",
        "console script 'ghostnoise' is 'lightning_ghostnoise.cli:other'",
        "METADATA Requires-Python is None",
        "METADATA Requires-Dist lacks dependencies: ['torch>=2.4']",
    ):
        assert expected in problems


def test_the_sdist_checks_catch_each_kind_of_mistake(dists: Tuple[Path, Path], tmp_path: Path) -> None:
    _, sdist = dists
    broken = _rewrite_sdist(
        sdist,
        tmp_path / sdist.name,
        drop=("LICENSE", "lightning_ghostnoise/layers/__init__.py"),
        add={
            "runs/compare/results.json": b"{}",
            ".venv/bin/python": b"",
            "tests/test_seeding.py": b"",
            "build/lib/lightning_ghostnoise/__init__.py": b"",
            "lightning_ghostnoise/data.npz": b"0" * (check_package.MAX_FILE_BYTES + 1),
        },
    )
    problems = "\n".join(check_package.check_sdist(broken))
    for expected in (
        "sdist lacks LICENSE",
        "sdist lacks lightning_ghostnoise/layers/__init__.py",
        "runs/compare/results.json: inside runs/",
        ".venv/bin/python: inside .venv/",
        "tests/test_seeding.py: inside tests/",
        "build/lib/lightning_ghostnoise/__init__.py: inside build/",
        "lightning_ghostnoise/data.npz: a compiled, data or result file",
        f"lightning_ghostnoise/data.npz: {check_package.MAX_FILE_BYTES + 1} bytes",
    ):
        assert expected in problems


def test_the_installed_wheel_runs_from_outside_the_repository(dists: Tuple[Path, Path]) -> None:
    """A fresh venv, torch pinned first, the bare wheel: ``ghostnoise --help`` and the import from site-packages.

    The fresh venv gets the torch release this suite runs with (its Python may have no wheel of the script's
    default pin); the public version only (``2.4.0``, not ``2.4.0+cu121``), which pip matches to any build of it.
    """
    import torch

    wheel, _ = dists
    steps: list = []
    problems = check_package.check_installed_wheel(
        wheel, torch=f"torch=={torch.__version__.split('+')[0]}", extras="", run_compare=False, log=steps.append
    )
    assert problems == []
    assert any(s.startswith("  import lightning_ghostnoise: ok (lib") for s in steps), steps
