"""Result files: atomic, readable, nothing left behind on failure; figures without pyplot."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lightning_ghostnoise.analysis.outputs import (
    new_figure,
    save_figure,
    write_atomic,
    write_json,
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_json_is_readable_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2}, indent=1)
    assert json.loads(path.read_text()) == {"a": 2} and path.read_text().endswith("\n")
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert sorted(os.listdir(tmp_path)) == ["r.json"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_json(path, {"a": 1})
    with pytest.raises(ValueError):
        write_json(path, {"a": float("nan")}, allow_nan=False)
    with pytest.raises(TypeError):
        write_atomic(path, "not bytes")  # type: ignore[arg-type]
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(os.listdir(tmp_path)) == ["r.json"]


@pytest.mark.parametrize("name, magic", [("f.png", b"\x89PNG"), ("f.svg", b"<?xml")])
def test_save_figure(tmp_path: Path, name: str, magic: bytes) -> None:
    pytest.importorskip("matplotlib")
    fig = new_figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [1, 0])
    save_figure(fig, tmp_path / name, dpi=30)
    assert (tmp_path / name).read_bytes().startswith(magic)
    assert sorted(os.listdir(tmp_path)) == [name]
