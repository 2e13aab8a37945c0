#!/usr/bin/env python3
"""Version matrix: the fast unit suite against the installed package, one fresh virtual environment per cell.

Each cell is a Python version, an exact torch and a constraints file for everything else (Lightning,
torchmetrics, lightning-utilities, jsonargparse, NumPy/SciPy, ...). A cell builds ``.matrix/<cell>/venv``
with its Python, installs torch first, then the package's wheel (built once from a snapshot of the
tree) with its ``test`` extra, checks that ``lightning_ghostnoise`` imports from the venv (not from the
source tree) and that ``ghostnoise --help`` runs, then runs ``pytest -m "not slow and not ddp and not gpu"``
on the snapshot's tests against the installed package. Results merge into ``--out`` (JSON) and a
Markdown table beside it. Standard library only; run it with any Python 3::

    python3 scripts/matrix.py                          # the default cells
    python3 scripts/matrix.py --cells oldest,newest    # some cells (--list shows them all)
    python3 scripts/matrix.py --cells all --keep       # every cell, keep the venvs

Every pip command of a cell takes the cell's constraints file through ``PIP_CONSTRAINT``, which replaces
a ``constraint`` set in a pip configuration file for that command only: the cell decides every pin.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from matrix_report import NOTES, write_markdown  # scripts/ is on sys.path when this file runs

ROOT = Path(__file__).resolve().parents[1]
FAST = "not slow and not ddp and not gpu"
#: The newest releases on PyPI when the matrix was last updated (torch aside).
NEWEST = (
    "lightning==2.6.6",
    "pytorch-lightning==2.6.6",
    "torchmetrics==1.9.0",
    "lightning-utilities==0.15.3",
    "jsonargparse==4.53.0",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "matplotlib==3.11.2",
    "scikit-learn==1.9.1",
    "pytest==9.2.0",
    "build==1.6.1",
    "ruff==0.17.6",
    "mypy==2.4.1",
)
#: Distributions whose versions the report shows (the full ``pip freeze`` is kept in the JSON too).
SHOWN = (
    "torch",
    "triton",
    "lightning",
    "torchmetrics",
    "lightning-utilities",
    "jsonargparse",
    "numpy",
    "scipy",
    "matplotlib",
    "scikit-learn",
    "pytest",
    "sympy",
    "typing-extensions",
    "pip",
)


@dataclass(frozen=True)
class Cell:
    """One environment: a Python minor version, an exact torch, and pins for everything else."""

    name: str
    python: str
    torch: str
    pins: tuple[str, ...]
    about: str
    default: bool = True
    #: What a cell below a floor checks (it is expected to fail; the report keeps why).
    probe: str = ""
    #: Versions installed with ``--no-deps`` after the package, past its metadata (for the probes).
    force: tuple[str, ...] = ()


# fmt: off
#: The floors of pyproject.toml (and of the test extra's tools) on the oldest Python it allows.
OLDEST = (
    "lightning==2.4.0", "pytorch-lightning==2.4.0", "torchmetrics==1.0.0", "lightning-utilities==0.10.0",
    "jsonargparse==4.27.7", "numpy==1.24.4", "scipy==1.9.0", "matplotlib==3.5.0", "scikit-learn==1.0",
    "pytest==7.0.1", "build==1.2.1", "ruff==0.6.0", "mypy==1.10.0",
)


CELLS = (
    Cell("oldest", "3.9", "2.4.0", OLDEST, "the floors pyproject.toml promises"),
    Cell("middle", "3.10", "2.6.0",
         ("lightning==2.5.0.post0", "pytorch-lightning==2.5.0.post0", "torchmetrics==1.6.1",
          "lightning-utilities==0.11.9", "jsonargparse==4.35.0", "numpy==1.26.4", "scipy==1.14.1",
          "matplotlib==3.9.4", "scikit-learn==1.6.0", "pytest==8.3.4", "build==1.2.2.post1", "ruff==0.8.4",
          "mypy==1.14.1"),
         "releases of early 2025 (torch 2.6, Triton 3.2, Lightning 2.5, NumPy 1.x)"),
    Cell("default", "3.11", "2.13.0", (*NEWEST, "triton==3.9.0"), "what scripts/setup.sh installs (torch CPU wheel)"),
    Cell("newest", "3.13", "2.14.1", NEWEST, "the newest releases the machine's pip constraint allows"),
    Cell("torch215", "3.12", "2.15.0", NEWEST, "the newest torch on PyPI (above the machine's pip cap)"),
    Cell("lightning-2.3", "3.9", "2.4.0", OLDEST, "oldest, then Lightning 2.3.3 forced in", default=False,
         probe="Lightning below the floor 2.4", force=("lightning==2.3.3", "pytorch-lightning==2.3.3")),
    Cell("jsonargparse-4.27.0", "3.9", "2.4.0", OLDEST, "oldest, then jsonargparse 4.27.0 forced in",
         default=False, probe="jsonargparse below the floor 4.27.7", force=("jsonargparse==4.27.0",)),
)
# fmt: on

#: pytest plugin loaded into each cell's run: records every outcome and where lightning_ghostnoise came from.
PROBE = """
import json, os, sys
_out = {"passed": [], "failed": [], "skipped": [], "xfailed": [], "xpassed": [], "errors": [], "messages": {}}

def _short(report):
    text = getattr(report, "longreprtext", "") or str(report.longrepr)
    errors = [line for line in text.splitlines() if line.startswith("E ")][:8]
    return "\\n".join(errors + text.splitlines()[-1:])[-2000:]

def pytest_collectreport(report):
    if report.failed:
        _out["errors"].append(report.nodeid or "collection")
        _out["messages"][report.nodeid or "collection"] = _short(report)
    elif report.skipped:  # a module skipped as a whole (e.g. tests/gpu without CUDA)
        _out["skipped"].append(report.nodeid)
        _out["messages"][report.nodeid] = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else ""

def pytest_runtest_logreport(report):
    xfail = hasattr(report, "wasxfail")
    if report.when == "call":
        kind = ("xpassed" if xfail else "passed") if report.passed else (
            "failed" if report.failed else ("xfailed" if xfail else "skipped"))
    elif report.failed:
        kind = "errors"
    elif report.skipped:
        kind = "xfailed" if xfail else "skipped"
    else:
        return
    _out[kind].append(report.nodeid)
    if kind in ("failed", "errors"):
        _out["messages"][report.nodeid] = _short(report)
    elif kind == "skipped" and isinstance(report.longrepr, tuple):
        _out["messages"][report.nodeid] = str(report.longrepr[2])

def pytest_sessionfinish(session, exitstatus):
    mods = {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())
            if n == "lightning_ghostnoise" or n.startswith("lightning_ghostnoise.")}
    _out["exitstatus"] = int(exitstatus)
    _out["package_file"] = mods.get("lightning_ghostnoise")
    _out["modules_outside_venv"] = sorted(n for n, f in mods.items() if f and not f.startswith(sys.prefix))
    with open(os.environ["MATRIX_PROBE_OUT"], "w") as fh:
        json.dump(_out, fh, indent=1)
"""

CHECK = """
import json, sys
import lightning_ghostnoise, torch
print(json.dumps({"package_file": lightning_ghostnoise.__file__, "prefix": sys.prefix,
                  "in_venv": lightning_ghostnoise.__file__.startswith(sys.prefix),
                  "torch": torch.__version__, "python": sys.version.split()[0]}))
"""


def log_run(cmd: list[str], log: Path, *, env: dict[str, str], cwd: Path, timeout: float) -> tuple[int, str]:
    """Run ``cmd``, streaming its output into ``log``; return (exit code, the last 60 lines)."""
    tail: deque[str] = deque(maxlen=60)
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            tail.append(line.rstrip("\n"))
            if time.monotonic() > deadline:
                proc.kill()
                tail.append(f"matrix: killed after {timeout:.0f} s")
                break
        code = proc.wait()
    return code, "\n".join(tail)


def find_python(minor: str, overrides: dict[str, str]) -> str | None:
    """An interpreter for ``minor`` ("3.11"): ``--python`` first, then pyenv's versions, then PATH."""
    candidates = [overrides[minor]] if minor in overrides else []
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"

    def patch(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parts[-3])[:3])

    found = [p for p in pyenv.glob(f"{minor}.*/bin/python") if re.fullmatch(rf"{minor}\.\d+", p.parts[-3])]
    candidates += [str(p) for p in sorted(found, key=patch, reverse=True)]
    candidates += [w for w in (shutil.which(f"python{minor}"),) if w and "shims" not in w]
    for cand in candidates:
        got = subprocess.run(
            [cand, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=False,
        )
        if got.returncode == 0 and got.stdout.strip() == minor:
            return cand
    return None


def snapshot(rev: str | None, dest: Path) -> str:
    """Copy the tree (``rev`` from git, or the working tree's tracked and unignored files) to ``dest``."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    git = ["git", "-C", str(ROOT)]
    if rev:
        data = subprocess.run([*git, "archive", "--format=tar", rev], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:
                tar.extractall(dest)
        return subprocess.run([*git, "rev-parse", rev], capture_output=True, text=True, check=True).stdout.strip()
    files = subprocess.run([*git, "ls-files", "-z", "-co", "--exclude-standard"], capture_output=True, check=True)
    for name in files.stdout.decode().split("\0"):
        src = ROOT / name
        if name and src.is_file() and not name.startswith(".matrix/"):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return subprocess.run([*git, "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()


def build_wheel(work: Path, src: Path, log: Path) -> Path:
    """Build the package's wheel once, in its own venv, from the snapshot."""
    venv, dist = work / "_build", work / "_dist"
    shutil.rmtree(dist, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    code, tail = log_run(
        [str(venv / "bin/python"), "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(src)],
        log,
        env=env,
        cwd=work,
        timeout=900,
    )
    wheels = sorted(dist.glob("lightning_ghostnoise-*.whl"))
    if code or not wheels:
        raise SystemExit(f"matrix: building the wheel failed (see {log}):\n{tail}")
    return wheels[0]


def freeze(python: Path, env: dict[str, str], cwd: Path) -> list[str]:
    out = subprocess.run(
        [str(python), "-m", "pip", "freeze", "--all"], capture_output=True, text=True, env=env, cwd=cwd
    )
    return sorted(line for line in out.stdout.splitlines() if line and not line.startswith("#"))


def versions_of(frozen: list[str]) -> dict[str, str]:
    """``{canonical name: version}`` from ``pip freeze`` lines (``name==version``)."""
    out = {}
    for line in frozen:
        if "==" in line:
            name, version = line.split("==", 1)
            out[re.sub(r"[-_.]+", "-", name).lower()] = version
    return out


def run_cell(cell: Cell, args: argparse.Namespace, wheel: Path, src: Path, work: Path) -> dict[str, Any]:
    """Build the cell's venv, install, check, run the fast suite; return its record."""
    record: dict[str, Any] = {
        "cell": cell.name,
        "about": cell.about,
        "python_minor": cell.python,
        "torch_pin": cell.torch,
        "constraints": [f"torch=={cell.torch}", *cell.pins],
        "forced": list(cell.force),
        "probe": cell.probe,
        "status": "error",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    start = time.monotonic()
    cdir, log = work / cell.name, work / f"{cell.name}.log"
    log.write_text(f"matrix cell {cell.name}: {cell.about}\n")
    record["log"] = str(log.relative_to(ROOT)) if log.is_relative_to(ROOT) else str(log)
    python = find_python(cell.python, args.python)
    if python is None:
        record.update(status="skipped", error=f"no Python {cell.python} found (pass --python {cell.python}=PATH)")
        return record
    free_gb = shutil.disk_usage(work).free / 2**30
    if free_gb < args.min_free_gb:
        record.update(status="skipped", error=f"{free_gb:.1f} GB free, below --min-free-gb {args.min_free_gb}")
        return record
    shutil.rmtree(cdir, ignore_errors=True)
    (cdir / "cwd").mkdir(parents=True)
    constraints = cdir / "constraints.txt"
    constraints.write_text("\n".join(record["constraints"]) + "\n")
    venv = cdir / "venv"
    py, cwd = venv / "bin" / "python", cdir / "cwd"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(
        PIP_CONSTRAINT=str(constraints),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_PROGRESS_BAR="off",
        VIRTUAL_ENV=str(venv),
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        MPLBACKEND="Agg",
    )
    try:
        steps = [
            ("venv", [python, "-m", "venv", str(venv)]),
            ("pip", [str(py), "-m", "pip", "install", "-U", "pip"]),
            ("torch", [str(py), "-m", "pip", "install", f"torch=={cell.torch}"]),
            ("package", [str(py), "-m", "pip", "install", f"{wheel}[test]"]),
        ]
        if cell.force:
            forced = cdir / "forced.txt"
            forced.write_text("\n".join(cell.force) + "\n")
            steps.append(("force", [str(py), "-m", "pip", "install", "--no-deps", "-c", str(forced), *cell.force]))
        for step, cmd in steps:
            t0 = time.monotonic()
            step_env = dict(env, PIP_CONSTRAINT=str(forced)) if step == "force" else env
            code, tail = log_run(cmd, log, env=step_env, cwd=cwd, timeout=3600)
            record.setdefault("seconds", {})[step] = round(time.monotonic() - t0, 1)
            if code:
                record["error"] = f"step '{step}' failed:\n{tail[-4000:]}"
                return record
        frozen = freeze(py, env, cwd)
        record["freeze"] = frozen
        have = versions_of(frozen)
        record["versions"] = {"python": "", **{k: have[k] for k in SHOWN if k in have}}
        wanted = {p.split("==")[0]: p for p in record["constraints"]}
        wanted.update({p.split("==")[0]: p for p in cell.force})
        drift = [
            p
            for p in wanted.values()
            if have.get(re.sub(r"[-_.]+", "-", p.split("==")[0]).lower(), "").split("+")[0] != p.split("==")[1]
        ]
        if drift:
            record["error"] = f"installed versions differ from the pins: {drift}"
            return record
        check = subprocess.run([str(py), "-c", CHECK], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
        if check.returncode:
            record["error"] = f"import failed:\n{check.stderr[-4000:]}"
            return record
        installed = json.loads(check.stdout.strip().splitlines()[-1])
        record["versions"]["python"] = installed["python"]
        record["package_file"] = installed["package_file"]
        if not installed["in_venv"]:
            record["error"] = f"lightning_ghostnoise imported from {installed['package_file']}, not from the venv"
            return record
        cli = subprocess.run(
            [str(venv / "bin" / "ghostnoise"), "--help"], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
        )
        record["cli_help"] = {"returncode": cli.returncode, "first_line": (cli.stdout or cli.stderr).split("\n")[0]}
        probe_dir, probe_out = cdir / "probe", cdir / "probe.json"
        probe_dir.mkdir(exist_ok=True)
        (probe_dir / "ghostnoise_matrix_probe.py").write_text(PROBE)
        test_env = dict(env, PYTHONPATH=str(probe_dir), PYTHONSAFEPATH="1", MATRIX_PROBE_OUT=str(probe_out))
        cmd = [
            str(venv / "bin" / "pytest"),
            "-c",
            str(src / "pyproject.toml"),
            "--rootdir",
            str(src),
            "-p",
            "ghostnoise_matrix_probe",
            "-p",
            "no:cacheprovider",
            "-q",
            "-m",
            args.marker,
            str(src / "tests"),
        ]
        t0 = time.monotonic()
        code, tail = log_run(cmd, log, env=test_env, cwd=cwd, timeout=args.test_timeout)
        record["seconds"]["tests"] = round(time.monotonic() - t0, 1)
        record["pytest_exit"] = code
        if not probe_out.exists():
            record["error"] = f"pytest ended without a report (exit {code}):\n{tail[-4000:]}"
            return record
        probe = json.loads(probe_out.read_text())
        record["counts"] = {k: len(probe[k]) for k in ("passed", "failed", "errors", "skipped", "xfailed", "xpassed")}
        record["failures"] = {n: probe["messages"].get(n, "") for n in probe["failed"] + probe["errors"]}
        record["skips"] = {n: probe["messages"].get(n, "") for n in probe["skipped"]}
        record["tests_imported"] = probe["package_file"]
        bad = []
        if probe["modules_outside_venv"]:
            bad.append(f"modules imported from outside the venv: {probe['modules_outside_venv']}")
        if cli.returncode:
            bad.append(f"ghostnoise --help exited {cli.returncode}")
        if code or record["counts"]["failed"] or record["counts"]["errors"] or not record["counts"]["passed"]:
            bad.append(f"pytest exit {code}")
        record["status"] = "fail" if bad else "pass"
        if bad:
            record["error"] = "; ".join(bad)
        return record
    finally:
        record.setdefault("seconds", {})["total"] = round(time.monotonic() - start, 1)
        if not args.keep:
            shutil.rmtree(venv, ignore_errors=True)


def prune_pip_cache(limit_gb: float) -> None:
    """Delete pip's cached downloads of 50 MB or more when its cache is larger than ``limit_gb``."""
    cache = Path(
        os.environ.get("PIP_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pip"
    )
    if not cache.is_dir():
        return
    files = [p for p in cache.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files) / 2**30
    if total <= limit_gb:
        return
    big = [p for p in files if p.stat().st_size >= 50 * 2**20]
    freed = sum(p.stat().st_size for p in big) / 2**30
    for p in big:
        p.unlink()
    print(f"matrix: pip cache {cache} was {total:.1f} GB: removed {len(big)} large downloads ({freed:.1f} GB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", default="", help="comma-separated names, or 'all' (default: the default cells)")
    parser.add_argument("--list", action="store_true", help="print the cells and exit")
    parser.add_argument("--keep", action="store_true", help="keep each cell's venv under .matrix/<cell>/venv")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "docs/results/version_matrix.json",
        help="JSON results (merged by cell with what is there); the Markdown table goes beside it",
    )
    parser.add_argument("--rev", default=None, help="test this git revision (default: the working tree's files)")
    parser.add_argument("--python", action="append", default=[], metavar="X.Y=PATH", help="interpreter for X.Y")
    parser.add_argument("--marker", default=FAST, help=f"pytest -m expression (default: {FAST!r})")
    parser.add_argument("--test-timeout", type=float, default=3600, help="seconds for one cell's pytest run")
    parser.add_argument("--work", type=Path, default=ROOT / ".matrix", help="where the venvs and logs go")
    parser.add_argument("--min-free-gb", type=float, default=12, help="skip a cell with less free disk")
    parser.add_argument("--report", action="store_true", help="rewrite the notes and Markdown from --out; run nothing")
    parser.add_argument("--prune-cache-gb", type=float, default=15, help="prune pip's large downloads above this")
    args = parser.parse_args()
    args.python = dict(item.split("=", 1) for item in args.python)
    if args.list:
        for c in CELLS:
            print(f"{c.name:20} python {c.python:5} torch {c.torch:7} {'(default) ' if c.default else ''}{c.about}")
            print(f"{'':20} {' '.join(c.pins + c.force)}")
        return
    if args.report:
        data = json.loads(args.out.read_text())
        data["notes"] = NOTES
        args.out.write_text(json.dumps(data, indent=1) + "\n")
        write_markdown(data, args.out.with_suffix(".md"))
        return
    names = [c.name for c in CELLS if c.default] if not args.cells else args.cells.split(",")
    if names == ["all"]:
        names = [c.name for c in CELLS]
    chosen = [c for c in CELLS if c.name in names]
    if len(chosen) != len(names):
        parser.error(f"unknown cell(s) {sorted(set(names) - {c.name for c in CELLS})}; --list shows the cells")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    src = work / "_src"
    tree = snapshot(args.rev, src)
    wheel = build_wheel(work, src, work / "_build.log")
    print(f"matrix: tree {tree}, wheel {wheel.name}, cells {', '.join(c.name for c in chosen)}", flush=True)
    out = args.out.resolve()
    data = json.loads(out.read_text()) if out.exists() else {}
    done = {rec["cell"]: rec for rec in data.get("cells", [])}
    command = " ".join(["python3 scripts/matrix.py", *map(shlex.quote, sys.argv[1:])])
    for cell in chosen:
        print(f"matrix: {cell.name}: python {cell.python}, torch {cell.torch} ...", flush=True)
        rec = run_cell(cell, args, wheel, src, work)
        rec["tree"] = tree
        done[cell.name] = rec
        cnt = rec.get("counts", {})
        print(
            f"matrix: {cell.name}: {rec['status']} {cnt} in {rec['seconds'].get('total', 0) / 60:.1f} min"
            + (f"\n  {rec['error'].strip().splitlines()[-1][:300]}" if rec.get("error") else ""),
            flush=True,
        )
        data = {
            "command": command,
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
            "marker": args.marker,
            "notes": NOTES,
            "cells": [done[c.name] for c in CELLS if c.name in done],
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1) + "\n")
        write_markdown(data, out.with_suffix(".md"))
    prune_pip_cache(args.prune_cache_gb)
    failed = [rec["cell"] for rec in data["cells"] if rec["cell"] in names and rec["status"] != "pass"]
    print(f"matrix: wrote {out} and {out.with_suffix('.md')}" + (f"; not passing: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
