"""scripts/setup.sh keeps a venv's torch inside the tested range and installs the pinned one otherwise.

Run in its dry-run mode against a stand-in venv whose ``bin/python`` reports a torch version: nothing is
installed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "scripts" / "setup.sh"
INSTALL_PIN = "pip install -q --disable-pip-version-check torch==2.13.0"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _dry_run(tmp_path: Path, torch_version: str | None) -> str:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    # stands in for the venv's interpreter: answers the torch version query, or fails (no torch)
    reply = f'echo "{torch_version}"' if torch_version else "exit 1"
    python.write_text(f"#!/bin/sh\n{reply}\n")
    python.chmod(0o755)
    env = dict(os.environ, GHOSTNOISE_VENV=str(venv), GHOSTNOISE_SETUP_DRY_RUN="1")
    proc = subprocess.run(["bash", str(SETUP)], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (venv / ".ghostnoise-installed").exists()
    return proc.stdout


@pytest.mark.parametrize("version", ["2.4.0", "2.6.0+cu124", "2.14.1", "2.15.0"])
def test_a_supported_torch_is_kept_and_held_during_the_install(tmp_path: Path, version: str) -> None:
    out = _dry_run(tmp_path, version)
    assert f"keeping the venv's torch {version}" in out
    assert INSTALL_PIN not in out and "install -q --disable-pip-version-check torch==" not in out
    assert "-e " in out and "[test,plot,cli,docs]" in out


@pytest.mark.parametrize("version", [None, "2.3.1", "2.16.0"])
def test_no_torch_or_one_outside_the_tested_range_gets_the_pinned_wheel(tmp_path: Path, version: str | None) -> None:
    out = _dry_run(tmp_path, version)
    assert INSTALL_PIN in out
    if version:
        assert f"torch {version} is outside the tested range" in out


def test_the_pinned_release_itself_is_not_reinstalled(tmp_path: Path) -> None:
    out = _dry_run(tmp_path, "2.13.0+cpu")
    assert "install -q --disable-pip-version-check torch==" not in out and "keeping" not in out
