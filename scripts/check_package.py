#!/usr/bin/env python
"""Build the wheel and the sdist with ``python -m build`` and check what they hold and that the wheel works.

Usage (from anywhere; needs the ``build`` frontend, which the ``test`` extra installs)::

    python scripts/check_package.py                    # build into a temporary folder, all checks
    python scripts/check_package.py --skip-install     # the content checks only
    python scripts/check_package.py --out-dir dist     # keep the wheel and sdist in dist/

What is checked:

* **wheel**: every module of ``lightning_ghostnoise/`` (the source tree's ``*.py`` files) and
  ``py.typed``, nothing else of the repository (no ``tests/``, ``docs/``, ``runs/``, ``benchmarks/``,
  ``scripts/``, ``.venv``), no ``__pycache__`` or ``*.pyc``; ``entry_points.txt`` has the console
  scripts of ``[project.scripts]`` (``ghostnoise``); ``METADATA`` has the name, version,
  ``Requires-Python``, the dependencies and every extra of ``pyproject.toml``, the license
  expression and the ``LICENSE`` file.
* **sdist**: ``pyproject.toml``, ``README.md``, ``LICENSE`` and the package, and nothing that is not
  needed to build it: no ``runs/``, ``.venv``, ``.matrix/``, ``site/``, ``docs/``, build artefacts,
  compiled files or large result files. The sdist has **no tests**: the suite needs the checkout's
  ``configs/``, ``benchmarks/`` and ``scripts/``, so it runs from the git repository, and
  ``MANIFEST.in`` prunes ``tests/`` (setuptools would otherwise ship a partial copy).
* **installed wheel** (skipped with ``--skip-install``): a fresh virtual environment in a temporary
  folder gets torch (``--torch``, default ``torch==2.13.0``, the CPU wheel the tests run on, held by a
  constraint while the rest installs; ``--torch ''`` lets pip pick; where no local CPU wheel is
  configured, ``PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu`` with
  ``--torch torch==2.13.0+cpu`` avoids the large CUDA download) and then the wheel with the
  extras ``cli,data`` (the comparison's statistics and its scikit-learn fallback data). From a
  folder outside the repository, ``ghostnoise --help`` and ``ghostnoise compare --help`` exit 0,
  ``import lightning_ghostnoise`` comes from that environment's site-packages, and a tiny
  ``ghostnoise compare`` job (one epoch of a narrow CNN on 40 images) writes its ``results.json``.

Builds are isolated by default (``python -m build`` installs ``[build-system] requires`` into a
temporary environment), as a release build and ``pip install`` from source do: this checks the
declared build requirements and does not depend on the developer's own setuptools or on plugins
installed in it, for a few seconds more than ``--no-isolation`` (which needs setuptools >= 77 in
the running environment).

Exits 0 when every check passes; otherwise prints each problem and exits 1 (2 when the build itself
fails).
"""

from __future__ import annotations

import argparse
import email.parser
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lightning_ghostnoise"
DEFAULT_TORCH = os.environ.get("GHOSTNOISE_TORCH", "torch==2.13.0")
DEFAULT_EXTRAS = "cli,data"
# repository folders and local clutter that must never be in a wheel or an sdist
FORBIDDEN_DIRS = frozenset(
    {
        "tests",
        "docs",
        "runs",
        "benchmarks",
        "scripts",
        "configs",
        ".venv",
        ".matrix",
        "site",
        "build",
        "dist",
        "outputs",
        "lightning_logs",
        "__pycache__",
        ".git",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
    }
)
FORBIDDEN_SUFFIXES = (".pyc", ".pyo", ".so", ".whl", ".tar.gz", ".ckpt", ".pt", ".pth", ".npz", ".png")
MAX_FILE_BYTES = 256 * 1024  # a larger file in either archive is a result or data file, not source
# the tiny comparison: one epoch of a narrow CNN on 40 training images, one seed, GNI only
COMPARE_ARGS = (
    "compare --model small_cnn --width 4 --methods gni@4 --epochs 1 --subset 40 --batch-size 20 "
    "--seeds 1 --no-plot --progress-bar off"
).split()


class BuildError(RuntimeError):
    """``python -m build`` failed; the message holds the end of its output."""


# --------------------------------------------------------------------------- project facts
def load_pyproject(root: Path = ROOT) -> Dict[str, Any]:
    """The parsed ``pyproject.toml`` of ``root``.

    Example:
        >>> load_pyproject()["project"]["name"]
        'lightning-ghostnoise'
    """
    try:
        import tomllib  # type: ignore[import-not-found,unused-ignore]
    except ModuleNotFoundError:  # Python < 3.11: tomli comes with the build frontend
        import tomli as tomllib  # type: ignore[import-not-found,no-redef,unused-ignore]
    with open(root / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f))


def source_files(root: Path = ROOT) -> Set[str]:
    """The package's files as a wheel should hold them: every ``*.py`` of the source tree, and ``py.typed``.

    Example:
        >>> "lightning_ghostnoise/__init__.py" in source_files()
        True
    """
    files = {p.relative_to(root).as_posix() for p in (root / PACKAGE).rglob("*.py") if "__pycache__" not in p.parts}
    files.add(f"{PACKAGE}/py.typed")
    return files


def _dist_name(project: Dict[str, Any]) -> str:
    return re.sub(r"[-_.]+", "_", project["name"]).lower()


# --------------------------------------------------------------------------- build
def build_dists(out_dir: Path, isolation: bool = True, root: Path = ROOT) -> Tuple[Path, Path]:
    """Run ``python -m build`` on ``root`` into ``out_dir``; return the paths of the wheel and the sdist.

    Raises:
        BuildError: the build frontend is missing, or the build failed (with the end of its output).

    Example:
        >>> wheel, sdist = build_dists(Path("dist"))  # doctest: +SKIP
    """
    try:
        import build  # noqa: F401
    except ImportError as err:
        raise BuildError(
            "the PyPA build frontend is not installed in this environment: pip install build "
            "(or the package's test extra: pip install -e '.[test]')"
        ) from err
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in list(out_dir.glob("*.whl")) + list(out_dir.glob("*.tar.gz")):
        old.unlink()
    cmd = [sys.executable, "-m", "build", "--outdir", str(out_dir)]
    if not isolation:
        cmd.append("--no-isolation")
    proc = subprocess.run(cmd + [str(root)], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    wheels, sdists = sorted(out_dir.glob("*.whl")), sorted(out_dir.glob("*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        raise BuildError(f"expected one wheel and one sdist in {out_dir}, found {[p.name for p in out_dir.iterdir()]}")
    return wheels[0], sdists[0]


# --------------------------------------------------------------------------- content checks
def _clutter(path: str) -> Optional[str]:
    """Why ``path`` (inside an archive, relative to its top) must not be shipped, or None."""
    parts = path.split("/")
    bad_dirs = [p for p in parts[:-1] if p in FORBIDDEN_DIRS]
    if bad_dirs:
        return f"{path}: inside {bad_dirs[0]}/"
    if path.endswith(FORBIDDEN_SUFFIXES):
        return f"{path}: a compiled, data or result file"
    return None


def _requirement_key(text: str, extra: str) -> Tuple[str, str, Tuple[str, ...], bool]:
    """A requirement reduced to (name, specifiers, extras, does its marker hold here for ``extra``)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    req = Requirement(text)
    holds = req.marker.evaluate({"extra": extra}) if req.marker is not None else True
    spec = ",".join(sorted(str(s) for s in req.specifier))
    return canonicalize_name(req.name), spec, tuple(sorted(req.extras)), holds


def check_metadata(metadata_text: str, pyproject: Dict[str, Any]) -> List[str]:
    """Problems of a wheel's ``METADATA`` against ``pyproject.toml``'s ``[project]`` table (empty: none).

    Example:
        >>> check_metadata("Metadata-Version: 2.4\\nName: other\\n", load_pyproject())[0]
        "METADATA Name is 'other', pyproject.toml says 'lightning-ghostnoise'"
    """
    project = pyproject["project"]
    meta = email.parser.Parser().parsestr(metadata_text)
    problems = []
    for field, expected in (
        ("Name", project["name"]),
        ("Version", project["version"]),
        ("Requires-Python", project.get("requires-python")),
    ):
        if expected is not None and meta.get(field) != expected:
            problems.append(f"METADATA {field} is {meta.get(field)!r}, pyproject.toml says {expected!r}")
    license_expr = project.get("license")
    if isinstance(license_expr, str) and meta.get("License-Expression") != license_expr:
        problems.append(f"METADATA License-Expression is {meta.get('License-Expression')!r}, expected {license_expr!r}")
    for name in project.get("license-files", []):
        if name not in (meta.get_all("License-File") or []):
            problems.append(f"METADATA has no License-File: {name}")
    extras = dict(project.get("optional-dependencies", {}))
    declared = set(meta.get_all("Provides-Extra") or [])
    if declared != set(extras):
        problems.append(f"METADATA Provides-Extra {sorted(declared)} differs from pyproject's extras {sorted(extras)}")
    shipped: Dict[str, Set[Tuple[str, str, Tuple[str, ...], bool]]] = {}
    for line in meta.get_all("Requires-Dist") or []:
        m = re.search(r"""extra\s*==\s*["']([^"']+)["']""", line)
        extra = m.group(1) if m else ""
        shipped.setdefault(extra, set()).add(_requirement_key(line, extra))
    for extra, reqs in [("", project.get("dependencies", []))] + sorted(extras.items()):
        expected_keys = {_requirement_key(r, extra) for r in reqs}
        missing = expected_keys - shipped.get(extra, set())
        extra_keys = shipped.get(extra, set()) - expected_keys
        where = f"extra {extra!r}" if extra else "dependencies"
        if missing:
            problems.append(f"METADATA Requires-Dist lacks {where}: {sorted(k[0] + k[1] for k in missing)}")
        if extra_keys:
            problems.append(
                f"METADATA Requires-Dist has more than pyproject's {where}: {sorted(k[0] for k in extra_keys)}"
            )
    return problems


def check_entry_points(entry_points_text: str, pyproject: Dict[str, Any]) -> List[str]:
    """Problems of a wheel's ``entry_points.txt`` against ``[project.scripts]`` (empty: none).

    Example:
        >>> check_entry_points("[console_scripts]\\nghostnoise = lightning_ghostnoise.experiments.cli:main\\n",
        ...                    load_pyproject())
        []
    """
    import configparser

    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(entry_points_text)
    found = dict(parser["console_scripts"]) if parser.has_section("console_scripts") else {}
    problems = []
    for name, target in pyproject["project"].get("scripts", {}).items():
        if found.get(name, "").strip() != target:
            problems.append(f"entry_points.txt: console script {name!r} is {found.get(name)!r}, expected {target!r}")
    return problems


def check_wheel(wheel: Path, root: Path = ROOT) -> List[str]:
    """Problems of a built wheel (empty: none): package files, clutter, entry points, metadata, license.

    Example:
        >>> check_wheel(Path("dist/lightning_ghostnoise-0.1.0-py3-none-any.whl"))  # doctest: +SKIP
        []
    """
    pyproject = load_pyproject(root)
    project = pyproject["project"]
    dist_info = f"{_dist_name(project)}-{project['version']}.dist-info"
    with zipfile.ZipFile(wheel) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        names = {i.filename for i in infos}
        problems = [p for p in map(_clutter, sorted(names)) if p]
        for info in infos:
            if info.file_size > MAX_FILE_BYTES and not info.filename.startswith(dist_info):
                problems.append(f"{info.filename}: {info.file_size} bytes, over {MAX_FILE_BYTES} (a data file?)")
        package_files = {n for n in names if not n.startswith(dist_info + "/")}
        expected = source_files(root)
        for name in sorted(expected - package_files):
            problems.append(f"wheel lacks {name}")
        for name in sorted(package_files - expected):
            problems.append(f"wheel has {name}, which is not a module of {PACKAGE}/ or py.typed")

        def read(member: str) -> Optional[str]:
            return zf.read(member).decode("utf-8") if member in names else None

        metadata = read(f"{dist_info}/METADATA")
        entry_points = read(f"{dist_info}/entry_points.txt")
        for name in project.get("license-files", []):
            if f"{dist_info}/licenses/{name}" not in names:
                problems.append(f"wheel lacks {dist_info}/licenses/{name}")
    if metadata is None:
        problems.append(f"wheel lacks {dist_info}/METADATA")
    else:
        problems += check_metadata(metadata, pyproject)
    if entry_points is None:
        if project.get("scripts"):
            problems.append(f"wheel lacks {dist_info}/entry_points.txt")
    else:
        problems += check_entry_points(entry_points, pyproject)
    return problems


def check_sdist(sdist: Path, root: Path = ROOT) -> List[str]:
    """Problems of a built sdist (empty: none): required files present, no tests, clutter or large files.

    Example:
        >>> check_sdist(Path("dist/lightning_ghostnoise-0.1.0.tar.gz"))  # doctest: +SKIP
        []
    """
    project = load_pyproject(root)["project"]
    top = f"{_dist_name(project)}-{project['version']}"
    with tarfile.open(sdist) as tf:
        members = [m for m in tf.getmembers() if m.isfile()]
    problems = []
    names = set()
    for m in members:
        if not m.name.startswith(top + "/"):
            problems.append(f"{m.name}: outside the sdist's top folder {top}/")
            continue
        name = m.name[len(top) + 1 :]
        names.add(name)
        why = _clutter(name)
        if why:
            problems.append(why)
        elif name.split("/")[0].endswith(".egg-info") and name.split("/")[0] != f"{_dist_name(project)}.egg-info":
            problems.append(f"{name}: a stray egg-info")
        if m.size > MAX_FILE_BYTES:
            problems.append(f"{name}: {m.size} bytes, over {MAX_FILE_BYTES} (a result or data file?)")
    required = {"pyproject.toml", "PKG-INFO", project.get("readme", "README.md")}
    required |= set(project.get("license-files", []))
    required |= source_files(root)
    for name in sorted(required - names):
        problems.append(f"sdist lacks {name}")
    return problems


# --------------------------------------------------------------------------- installed-wheel check
def _run(cmd: Sequence[str], cwd: Path, env: Dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd``; a timeout comes back as exit status 124 with a line that says so."""
    try:
        return subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        return subprocess.CompletedProcess(list(cmd), 124, out, f"\ntimed out after {timeout:.0f} s\n")


def _tail(proc: subprocess.CompletedProcess, n: int = 3000) -> str:
    return (proc.stdout + proc.stderr)[-n:]


def check_installed_wheel(
    wheel: Path,
    torch: str = DEFAULT_TORCH,
    extras: str = DEFAULT_EXTRAS,
    run_compare: bool = True,
    python: str = sys.executable,
    log: Any = print,
) -> List[str]:
    """Install ``wheel`` in a fresh venv and run it from outside the repository; return the problems.

    Args:
        wheel: the built wheel.
        torch: a requirement installed first and held by a constraint (``""``: pip resolves torch itself).
        extras: the wheel's extras to install with it (comma-separated; ``""``: none).
        run_compare: also run the tiny ``ghostnoise compare`` job.
        python: the interpreter that creates the venv.
        log: called with one line per step.

    Example:
        >>> check_installed_wheel(Path("dist/lightning_ghostnoise-0.1.0-py3-none-any.whl"))  # doctest: +SKIP
        []
    """
    wheel = Path(wheel).resolve()
    version = load_pyproject()["project"]["version"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    with tempfile.TemporaryDirectory(prefix="ghostnoise-wheel-") as tmp:
        tmp_path = Path(tmp)
        venv, work = tmp_path / "venv", tmp_path / "work"
        work.mkdir()
        bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
        vpy = bin_dir / ("python.exe" if os.name == "nt" else "python")
        steps: List[Tuple[str, List[str], float]] = [("venv", [python, "-m", "venv", str(venv)], 300)]
        pip = [str(vpy), "-m", "pip", "install", "-q", "--no-compile"]
        constraint: List[str] = []
        if torch:
            (tmp_path / "constraints.txt").write_text(torch + "\n")
            constraint = ["-c", str(tmp_path / "constraints.txt")]
            steps.append((f"pip install {torch}", pip + [torch], 900))
        target = f"{wheel}[{extras}]" if extras else str(wheel)
        steps.append((f"pip install {wheel.name}[{extras}]", pip + constraint + [target], 900))
        for label, cmd, timeout in steps:
            t0 = time.perf_counter()
            proc = _run(cmd, work, env, timeout)
            if proc.returncode != 0:
                return [f"{label} failed (exit {proc.returncode}):\n{_tail(proc)}"]
            log(f"  {label}: ok ({time.perf_counter() - t0:.1f} s)")
        problems = []
        ghostnoise = str(bin_dir / "ghostnoise")
        for args in (["--help"], ["compare", "--help"]):
            proc = _run([ghostnoise] + args, work, env, 300)
            if proc.returncode != 0 or "usage:" not in proc.stdout:
                problems.append(f"ghostnoise {' '.join(args)} exited {proc.returncode}:\n{_tail(proc)}")
            else:
                log(f"  ghostnoise {' '.join(args)}: ok")
        code = (
            "import json, pathlib, sysconfig, lightning_ghostnoise as g; "
            "print(json.dumps({'file': g.__file__, 'purelib': sysconfig.get_paths()['purelib'], "
            "'version': g.__version__, 'typed': (pathlib.Path(g.__file__).parent / 'py.typed').is_file()}))"
        )
        proc = _run([str(vpy), "-c", code], work, env, 300)
        if proc.returncode != 0:
            problems.append(f"import lightning_ghostnoise failed in the fresh venv:\n{_tail(proc)}")
        else:
            info = json.loads(proc.stdout.strip().splitlines()[-1])
            where = Path(info["file"]).resolve()
            purelib = Path(info["purelib"]).resolve()
            if purelib not in where.parents or not str(purelib).startswith(str(venv.resolve())):
                problems.append(f"lightning_ghostnoise imported from {where}, not from the venv's {purelib}")
            elif ROOT in where.parents:
                problems.append(f"lightning_ghostnoise imported from the repository ({where})")
            else:
                log(f"  import lightning_ghostnoise: ok ({where.relative_to(venv.resolve())})")
            if info["version"] != version:
                problems.append(f"installed __version__ is {info['version']!r}, pyproject.toml says {version!r}")
            if not info["typed"]:
                problems.append("the installed package has no py.typed")
        if run_compare:
            out = work / "compare"
            t0 = time.perf_counter()
            proc = _run([ghostnoise] + COMPARE_ARGS + ["--out-dir", str(out)], work, env, 600)
            results = out / "results.json"
            if proc.returncode != 0 or not results.is_file():
                problems.append(f"ghostnoise {' '.join(COMPARE_ARGS)} exited {proc.returncode}:\n{_tail(proc)}")
            else:
                runs = json.loads(results.read_text()).get("runs", [])
                if len(runs) != 1:
                    problems.append(f"ghostnoise compare wrote {len(runs)} runs in {results}, expected 1")
                else:
                    log(f"  ghostnoise compare (tiny job): ok ({time.perf_counter() - t0:.1f} s)")
        return problems


# --------------------------------------------------------------------------- command line
def _summarize(sizes: Iterable[Tuple[str, Path, int]]) -> None:
    for kind, path, count in sizes:
        print(f"  {kind}: {path.name}, {path.stat().st_size / 1024:.0f} KiB, {count} files")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Build, check, and report; the exit status says whether every check passed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--out-dir", type=Path, help="where the wheel and sdist go (default: a temporary folder)")
    p.add_argument("--skip-install", action="store_true", help="only the content checks (no fresh venv)")
    p.add_argument("--no-isolation", action="store_true", help="build with this environment's setuptools (>= 77)")
    p.add_argument(
        "--torch",
        default=DEFAULT_TORCH,
        help="torch requirement installed first in the fresh venv and held there; '' lets pip resolve it "
        "(default: $GHOSTNOISE_TORCH or %(default)s)",
    )
    p.add_argument("--extras", default=DEFAULT_EXTRAS, help="extras installed with the wheel (default: %(default)s)")
    p.add_argument("--no-compare", action="store_true", help="skip the tiny ghostnoise compare job")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ghostnoise-dist-") as tmp:
        out_dir = args.out_dir or Path(tmp)
        print(f"python -m build{' --no-isolation' if args.no_isolation else ''} --outdir {out_dir} ...")
        try:
            wheel, sdist = build_dists(out_dir, isolation=not args.no_isolation)
        except BuildError as err:
            print(f"check_package: {err}", file=sys.stderr)
            return 2
        with zipfile.ZipFile(wheel) as zf:
            n_wheel = sum(not i.is_dir() for i in zf.infolist())
        with tarfile.open(sdist) as tf:
            n_sdist = sum(m.isfile() for m in tf.getmembers())
        _summarize([("wheel", wheel, n_wheel), ("sdist", sdist, n_sdist)])
        problems = [f"wheel: {x}" for x in check_wheel(wheel)] + [f"sdist: {x}" for x in check_sdist(sdist)]
        print(f"content checks: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        if not args.skip_install:
            print("installed-wheel check (fresh venv, run from outside the repository) ...")
            problems += [
                f"installed wheel: {x}"
                for x in check_installed_wheel(
                    wheel, torch=args.torch, extras=args.extras, run_compare=not args.no_compare
                )
            ]
    if problems:
        print(f"check_package: {len(problems)} problem(s):", file=sys.stderr)
        for x in problems:
            print(f"  - {x}", file=sys.stderr)
        return 1
    print(f"check_package: all checks passed ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
