"""Fake Fashion-MNIST folders in the real idx(.gz) format, for the data module and the ``ghostnoise`` commands.

The images carry a bright bar whose row encodes the class, so a tiny model learns them in one epoch.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def write_idx(
    path: Path,
    array: np.ndarray,
    code: int = 0x08,
    compress: bool = True,
    magic: Optional[bytes] = None,
    shape: Optional[Sequence[int]] = None,
) -> None:
    """Write ``array`` as an idx file (gzipped by default); ``magic``/``shape`` override the header to make bad files."""
    shape = array.shape if shape is None else shape
    header = (magic if magic is not None else struct.pack(">HBB", 0, code, len(shape))) + struct.pack(
        f">{len(shape)}I", *shape
    )
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[code]
    raw = header + array.astype(dtype).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(raw)


def write_fake_fashion(folder: Path, n_train: int = 200, n_test: int = 50, test_noise: int = 0) -> Path:
    """A Fashion-MNIST folder: ``n_train`` training and ``n_test`` test images with learnable labels.

    ``test_noise`` (a seed) replaces the test images by noise, so test accuracy is chance whatever the
    training did. Returns ``folder``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, size=(n, 28, 28))
        for i, y in enumerate(labels):  # a bright bar whose row encodes the class
            images[i, 2 + 2 * y : 4 + 2 * y, :] = 250
        if split == "test" and test_noise:
            images = np.random.default_rng(test_noise).integers(0, 256, size=images.shape)
        prefix = "train" if split == "train" else "t10k"
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder
