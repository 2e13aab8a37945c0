"""Fashion-MNIST read straight from its idx files (no download), and the scikit-learn digits fallback.

The four ``*-ubyte.gz`` files of Fashion-MNIST are decoded with ``gzip`` + ``numpy`` (cached in memory
per process). Without them (and ``fallback=True``, see :func:`resolve_dataset`) scikit-learn's 8x8
``digits`` stand in, upsampled to 28x28. The seeded, class-stratified picks here serve both the
digits' fixed test split and :class:`~lightning_ghostnoise.experiments.data.FashionMNISTDataModule`'s
subsets and validation split.

Example:
    >>> FASHION_MNIST_FILES["train_images"]
    'train-images-idx3-ubyte.gz'
    >>> resolve_dataset("/nonexistent", fallback=True)  # digits stand in when scikit-learn is there  # doctest: +SKIP
    'digits'
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
import threading
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from lightning_utilities.core.rank_zero import rank_zero_warn

__all__ = [
    "DEFAULT_DATA_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "load_fashion_mnist",
    "load_idx",
    "resolve_dataset",
]

#: Where Debian's ``dataset-fashion-mnist`` package puts the files.
DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"

#: The four files, by split and kind.
FASHION_MNIST_FILES: Dict[str, str] = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

FASHION_MNIST_CLASSES: Tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_INSTALL_HINT = (
    "Install the real data with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files land in "
    f"{DEFAULT_DATA_DIR}), or put the four files {', '.join(FASHION_MNIST_FILES.values())} in `data_dir`."
)

# idx type codes (third header byte) -> big-endian numpy dtype
_IDX_DTYPES: Dict[int, str] = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_CACHE: Dict[Tuple[str, int, int], np.ndarray] = {}
_STATS: Dict[Tuple[int, Tuple[int, ...]], Tuple[np.ndarray, Tuple[float, float]]] = {}
_CACHE_LOCK = threading.Lock()


# --------------------------------------------------------------------------- idx parsing
def _parse_idx(raw: bytes, path: str) -> np.ndarray:
    if len(raw) < 4:
        raise ValueError(f"{path}: not an idx file (only {len(raw)} bytes, the header alone has 4+).")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: bad idx magic number 0x{raw[:4].hex()} (expected 0x0000 followed by a type code in "
            f"{{{', '.join(hex(c) for c in _IDX_DTYPES)}}} and the number of dimensions). "
            "Is this really an idx file (gzipped if its name ends in .gz)?"
        )
    if ndim == 0:
        raise ValueError(f"{path}: idx header declares 0 dimensions.")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header ({len(raw)} bytes, {header} expected for {ndim} dimensions).")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: idx size mismatch: header says shape {tuple(shape)} of {dtype.name} ({expected} bytes of data), "
            f"file has {len(raw) - header} bytes after the header (truncated or corrupt download?)."
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def load_idx(path: str) -> np.ndarray:
    """Read an idx file (gzipped if the name ends in ``.gz``) into a numpy array.

    The header (two zero bytes, a type code, the number of dimensions, then one big-endian uint32 per
    dimension) is validated against the data size. The result is cached in memory per process
    (keyed by path, size and modification time) and returned **read-only**; copy it to modify it.

    Args:
        path: the file.

    Returns:
        An array of the file's shape and type (native byte order).

    Raises:
        FileNotFoundError: no such file.
        ValueError: bad magic number, truncated header or a data size that does not match the header.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "x.idx")
        >>> with open(p, "wb") as f:
        ...     _ = f.write(bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6]))
        >>> load_idx(p)
        array([[1, 2, 3],
               [4, 5, 6]], dtype=uint8)
    """
    path = os.fspath(path)
    st = os.stat(path)  # raises FileNotFoundError with the path
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    opener: Any = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot decompress/read idx file: {err}") from err
    arr = _parse_idx(raw, path)
    arr.setflags(write=False)
    with _CACHE_LOCK:
        _CACHE[key] = arr
    return arr


def load_fashion_mnist(data_dir: str = DEFAULT_DATA_DIR) -> Dict[str, np.ndarray]:
    """The four Fashion-MNIST arrays (``train_images`` (60000, 28, 28) uint8, ``train_labels`` (60000,), ...).

    Raises:
        FileNotFoundError: a file is missing (the message says how to install the data).
        ValueError: a file is corrupt or has unexpected shapes.
    """
    out: Dict[str, np.ndarray] = {}
    for key, name in FASHION_MNIST_FILES.items():
        path = os.path.join(data_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Fashion-MNIST file {path} not found. {_INSTALL_HINT}")
        out[key] = load_idx(path)
    for split in ("train", "test"):
        images, labels = out[f"{split}_images"], out[f"{split}_labels"]
        if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1 or labels.dtype != np.uint8:
            raise ValueError(
                f"{data_dir}: {split} files have unexpected layout: images {images.shape} {images.dtype}, labels "
                f"{labels.shape} {labels.dtype} (expected (n, rows, cols) uint8 and (n,) uint8)."
            )
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{data_dir}: {split} has {images.shape[0]} images but {labels.shape[0]} labels.")
        if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise ValueError(f"{data_dir}: {split} labels go up to {int(labels.max())}, expected 0..9.")
    return out


def resolve_dataset(data_dir: str = DEFAULT_DATA_DIR, fallback: bool = True, warn: bool = False) -> str:
    """Which dataset a :class:`FashionMNISTDataModule` would load from ``data_dir``, checked before any work.

    Fashion-MNIST when its four files are in ``data_dir`` (they are read and validated, then cached).
    When *none* of them is there, scikit-learn's digits if ``fallback`` (and scikit-learn is
    installed). A folder with only some of the files, or a corrupt file, is an error, never a
    silent fallback.

    Args:
        data_dir: the Fashion-MNIST folder.
        fallback: allow the digits fallback.
        warn: warn (``rank_zero_warn``) when falling back.

    Returns:
        ``"fashion-mnist"`` or ``"digits"``.

    Raises:
        FileNotFoundError: no files and ``fallback=False``, or some of the four files missing.
        ValueError: a corrupt file (the message names it).
        ImportError: no files and the fallback needs scikit-learn, which is not installed.

    Example:
        >>> resolve_dataset("/nonexistent", fallback=False)
        Traceback (most recent call last):
        ...
        FileNotFoundError: Fashion-MNIST not found in '/nonexistent' (no such folder). Install the real data ...
    """
    data_dir = os.fspath(data_dir)
    present = [name for name in FASHION_MNIST_FILES.values() if os.path.isfile(os.path.join(data_dir, name))]
    if len(present) == len(FASHION_MNIST_FILES):
        load_fashion_mnist(data_dir)  # raises ValueError naming a corrupt file
        return "fashion-mnist"
    if present:
        missing = [name for name in FASHION_MNIST_FILES.values() if name not in present]
        raise FileNotFoundError(
            f"Fashion-MNIST in {data_dir!r} is incomplete: {', '.join(missing)} missing (found {', '.join(present)}). "
            f"{_INSTALL_HINT}"
        )
    where = "no such folder" if not os.path.isdir(data_dir) else "none of its four files is there"
    if not fallback:
        raise FileNotFoundError(f"Fashion-MNIST not found in {data_dir!r} ({where}). {_INSTALL_HINT}")
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"Fashion-MNIST not found in {data_dir!r} ({where}), and the fallback dataset needs scikit-learn, which "
            f"is not installed (pip install scikit-learn). {_INSTALL_HINT}"
        ) from err
    if warn:
        rank_zero_warn(
            f"Fashion-MNIST not found in {data_dir!r} ({where}): falling back to scikit-learn's 8x8 digits upsampled "
            "to 28x28 (1797 images), so accuracies are not Fashion-MNIST's. " + _INSTALL_HINT
        )
    return "digits"


def _pixel_stats(images: np.ndarray) -> Tuple[float, float]:
    """Exact mean and std of all pixels (in pixel units), from a histogram for uint8; cached."""
    key = (id(images), images.shape)
    with _CACHE_LOCK:
        hit = _STATS.get(key)
    if hit is not None and hit[0] is images:
        return hit[1]
    if images.dtype == np.uint8:
        counts = np.bincount(images.reshape(-1), minlength=256).astype(np.float64)
        values = np.arange(256, dtype=np.float64)
        n = counts.sum()
        mean = float(counts @ values / n)
        std = float(np.sqrt(max(counts @ (values - mean) ** 2 / n, 0.0)))
    else:
        mean, std = float(images.mean(dtype=np.float64)), float(images.std(dtype=np.float64))
    std = std if std > 0 else 1.0
    with _CACHE_LOCK:
        _STATS[key] = (images, (mean, std))
    return mean, std


@functools.lru_cache(maxsize=4)
def _load_digits(image_size: int) -> Dict[str, np.ndarray]:
    """scikit-learn's 8x8 digits as uint8 images of ``image_size``, split 80/20 (fixed, stratified)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - sklearn is a test/data extra
        raise ImportError(
            f"Fashion-MNIST is missing and the fallback needs scikit-learn (pip install scikit-learn). {_INSTALL_HINT}"
        ) from err
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) * (255.0 / 16.0))[:, None]
    factor = max(image_size // 8, 1)
    images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
    pad = image_size - images.shape[-1]
    if pad > 0:
        images = torch.nn.functional.pad(images, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    images_np = images[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()
    labels = digits.target.astype(np.uint8)
    rng = np.random.default_rng(0)  # the split is part of the dataset: fixed whatever the seed
    test = _stratified_pick(labels, np.arange(len(labels)), _fraction_quota(labels, 0.2), rng)
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test] = True
    out = {
        "train_images": images_np[~is_test],
        "train_labels": labels[~is_test],
        "test_images": images_np[is_test],
        "test_labels": labels[is_test],
    }
    for arr in out.values():
        arr.setflags(write=False)
    return out


# --------------------------------------------------------------------------- seeded, stratified picks
def _fraction_quota(labels: np.ndarray, fraction: float) -> Dict[int, int]:
    classes, counts = np.unique(labels, return_counts=True)
    return {int(c): int(round(n * fraction)) for c, n in zip(classes, counts)}


def _balanced_quota(labels: np.ndarray, total: int, rng: np.random.Generator) -> Dict[int, int]:
    """Split ``total`` over the classes as evenly as their sizes allow (ties broken by ``rng``)."""
    classes, counts = np.unique(labels, return_counts=True)
    caps = {int(c): int(n) for c, n in zip(classes, counts)}
    quota = {c: 0 for c in caps}
    order = [int(classes[i]) for i in rng.permutation(len(classes))]
    remaining = total
    while remaining > 0:
        active = [c for c in order if quota[c] < caps[c]]
        share = max(remaining // len(active), 1)
        for c in active:
            add = min(share, caps[c] - quota[c], remaining)
            quota[c] += add
            remaining -= add
            if remaining == 0:
                break
    return quota


def _stratified_pick(
    labels: np.ndarray, pool: np.ndarray, quota: Dict[int, int], rng: np.random.Generator
) -> np.ndarray:
    """Sorted indices (from ``pool``) with ``quota[c]`` random members of each class ``c``."""
    picked: List[np.ndarray] = []
    for c in sorted(quota):
        members = pool[labels[pool] == c]
        picked.append(rng.permutation(members)[: quota[c]])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)
