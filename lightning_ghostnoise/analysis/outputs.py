"""Result files of the commands: written atomically, readable like any file the user writes, PNGs small.

The noise analysis and the ``ghostnoise`` command write JSON and PNG files through these
functions, so a reader (or a crash) never sees a half-written file, and figures need no pyplot state.

Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "r.json")
    >>> write_json(path, {"acc": 0.9})
    >>> open(path).read()
    '{\\n  "acc": 0.9\\n}\\n'
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any, Union

__all__ = ["new_figure", "save_figure", "write_atomic", "write_json"]

PathLike = Union[str, "os.PathLike[str]"]


def write_atomic(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename it into place.

    The file gets the permissions a plain ``open`` would give it (``0o666`` less the umask), not the
    temporary file's ``0o600``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: PathLike, data: Any, indent: int = 2, allow_nan: bool = True) -> None:
    """``json.dump`` ``data`` to ``path`` atomically (see :func:`write_atomic`), with a final newline."""
    write_atomic(path, (json.dumps(data, indent=indent, allow_nan=allow_nan) + "\n").encode())


def new_figure(**kwargs: Any) -> Any:
    """A matplotlib ``Figure`` (object API: no pyplot state, no backend change); a clear error without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Plotting needs matplotlib: pip install 'lightning-ghostnoise[plot]' (or pip install matplotlib)."
        ) from err
    return Figure(**kwargs)


def save_figure(fig: Any, path: PathLike, dpi: int = 100) -> None:
    """Save ``fig`` atomically; a PNG is reduced to a 128-colour palette (about a quarter of the bytes, same look)."""
    buffer = io.BytesIO()
    if not str(path).lower().endswith(".png"):
        fig.savefig(buffer, dpi=dpi, format=os.path.splitext(str(path))[1][1:] or None)
        write_atomic(path, buffer.getvalue())
        return
    from PIL import Image  # a dependency of matplotlib

    fig.savefig(buffer, dpi=dpi, format="png", facecolor="white")
    buffer.seek(0)
    out = io.BytesIO()
    Image.open(buffer).convert("RGB").quantize(colors=128).save(out, format="png", optimize=True)
    write_atomic(path, out.getvalue())
