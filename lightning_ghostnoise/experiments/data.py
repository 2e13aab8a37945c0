"""Fashion-MNIST as a ``LightningDataModule`` (the files are read by :mod:`lightning_ghostnoise.experiments.fashion_mnist`).

Without the four idx files (and ``fallback=True``) the module uses scikit-learn's 8x8 ``digits``,
upsampled to 28x28, and warns how to install the real data.

Every random choice (validation split, training subset, shuffling, augmentation) has its own seeded
generator: the global RNG is never touched, so data order and augmentation are the same whether ghost
noise is on or off.

Example:
    >>> dm = FashionMNISTDataModule(train_subset=1000, batch_size=64)  # doctest: +SKIP
    >>> dm.setup("fit")  # doctest: +SKIP
    >>> x, y = next(iter(dm.train_dataloader()))  # doctest: +SKIP
    >>> x.shape, y.shape  # doctest: +SKIP
    (torch.Size([64, 1, 28, 28]), torch.Size([64]))
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import lightning.pytorch as pl
import numpy as np
import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, get_worker_info

from lightning_ghostnoise.experiments.fashion_mnist import (
    DEFAULT_DATA_DIR,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    _balanced_quota,
    _fraction_quota,
    _load_digits,
    _pixel_stats,
    _stratified_pick,
    load_fashion_mnist,
    load_idx,
    resolve_dataset,
)
from lightning_ghostnoise.seeding import derive_seed, validate_seed

__all__ = [
    "DEFAULT_DATA_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "FashionMNISTDataModule",
    "load_fashion_mnist",
    "load_idx",
    "resolve_dataset",
]


# --------------------------------------------------------------------------- batches
class _ImageDataset(Dataset):
    """uint8 images ``(n, H, W)`` and labels; ``__getitems__`` fetches a whole batch at once."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> List[Tuple[Tensor, Tensor]]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return [(self.images[idx], self.labels[idx])]  # one pre-batched item: see _Collate


class _Collate:
    """Stack uint8 images, augment (random crop with zero padding + horizontal flip), normalize.

    The augmentation generator is explicit: in the main process it is seeded once from ``seed`` and
    runs on across epochs; in a worker process it is seeded from the worker's own seed (which the
    DataLoader derives per epoch and per worker from its base seed).
    """

    def __init__(self, mean: float, std: float, augment: bool, pad: int, seed: int) -> None:
        self.mean = float(mean)
        self.std = float(std)
        self.augment = augment
        self.pad = pad
        self.seed = seed
        self._generator: Optional[torch.Generator] = None
        self._generator_key: Optional[int] = None

    def _gen(self) -> torch.Generator:
        info = get_worker_info()
        key = -1 if info is None else int(info.seed)
        if self._generator is None or self._generator_key != key:
            self._generator = torch.Generator().manual_seed(self.seed if info is None else derive_seed(self.seed, key))
            self._generator_key = key
        return self._generator

    def __call__(self, items: List[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
        if len(items) == 1 and items[0][0].dim() == 3:  # from __getitems__
            images, labels = items[0]
        else:
            images = torch.stack([i for i, _ in items])
            labels = torch.stack([t for _, t in items])
        if self.augment and images.shape[0] > 0:
            images = self._augment(images, self._gen())
        x = images.to(torch.float32).sub_(self.mean).div_(self.std).unsqueeze_(1)
        return x, labels.long()

    def _augment(self, images: Tensor, gen: torch.Generator) -> Tensor:
        b, h, w = images.shape
        p = self.pad
        padded = torch.nn.functional.pad(images, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
        ox = torch.randint(0, 2 * p + 1, (b,), generator=gen)
        flip = torch.rand(b, generator=gen) < 0.5
        rows = (oy[:, None] + torch.arange(h))[:, :, None]
        cols = ox[:, None] + torch.arange(w)
        cols = torch.where(flip[:, None], cols.flip(-1), cols)[:, None, :]
        return padded[torch.arange(b)[:, None, None], rows, cols]


# --------------------------------------------------------------------------- the data module
class FashionMNISTDataModule(pl.LightningDataModule):
    """Fashion-MNIST (60k train, 10k test, 28x28 grey, 10 classes) from the local idx files.

    Batches are ``(x, y)``: ``x`` float32 ``(B, 1, 28, 28)`` normalized with the training set's mean and
    std, ``y`` int64 in ``[0, num_classes)``.

    Args:
        data_dir: folder with the four ``*-ubyte.gz`` files.
        batch_size: training batch size (evaluation uses ``eval_batch_size``).
        train_subset: train on a fixed, class-balanced subset of this many images (seeded by
            ``seed``; picked from what the validation split leaves). ``None``: all of it.
        val_fraction: hold out this stratified fraction of the training set for validation
            (``0``: no validation loop; the test set stays untouched either way).
        val_size: hold out exactly this many training images (class-balanced) for validation
            instead of a fraction; ``None``: use ``val_fraction``. Give one of the two.
        split_seed: seed of the validation split alone; ``None``: ``seed``. A fixed ``split_seed``
            keeps the same validation images whatever ``seed`` is (compare runs use this, so every
            method and seed is validated on the same images).
        augment: random crop (zero padding ``pad``) and horizontal flip of training batches.
        num_workers: DataLoader workers (0: load in the main process, fast enough here).
        seed: seed of the subset, shuffling, augmentation and (unless ``split_seed``) the validation
            split; never the global RNG.
        fallback: without the files, use scikit-learn's digits (upsampled to 28x28) with a warning;
            ``False`` raises ``FileNotFoundError`` instead.
        eval_batch_size: batch size of the validation and test loaders.
        pad: zero padding of the random crop.
        drop_last: drop the last incomplete training batch.

    Attributes:
        dataset_name: ``"fashion-mnist"`` or ``"digits"`` (known after :meth:`setup`).
        image_size, in_channels, num_classes: 28, 1, 10 for both datasets.
        mean, std: the normalization constants (in ``[0, 255]`` pixel units, after :meth:`setup`).
        train_indices, val_indices: indices into the full training set (after :meth:`setup`).
    """

    image_size: int = 28
    in_channels: int = 1
    num_classes: int = 10

    def __init__(
        self,
        data_dir: str = DEFAULT_DATA_DIR,
        batch_size: int = 128,
        train_subset: Optional[int] = None,
        val_fraction: float = 0.0,
        augment: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        fallback: bool = True,
        eval_batch_size: int = 1000,
        pad: int = 2,
        drop_last: bool = False,
        val_size: Optional[int] = None,
        split_seed: Optional[int] = None,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if isinstance(eval_batch_size, bool) or not isinstance(eval_batch_size, int) or eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be a positive integer, got {eval_batch_size!r}.")
        if train_subset is not None and (
            isinstance(train_subset, bool) or not isinstance(train_subset, int) or train_subset < 1
        ):
            raise ValueError(f"train_subset must be a positive integer or None, got {train_subset!r}.")
        if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}.")
        if val_size is not None:
            if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 1:
                raise ValueError(f"val_size must be a positive integer or None, got {val_size!r}.")
            if val_fraction:
                raise ValueError(
                    f"give val_size ({val_size}) or val_fraction ({val_fraction}), not both: val_size holds out a "
                    "number of images, val_fraction a fraction of them."
                )
        if split_seed is not None:
            validate_seed(split_seed)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}.")
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise ValueError(f"pad must be an integer >= 0, got {pad!r}.")
        validate_seed(seed)
        self.save_hyperparameters()
        self.data_dir = os.fspath(data_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.train_subset = train_subset
        self.val_fraction = float(val_fraction)
        self.val_size = val_size
        self.split_seed = seed if split_seed is None else split_seed
        self.augment = augment
        self.num_workers = num_workers
        self.seed = seed
        self.fallback = fallback
        self.pad = pad
        self.drop_last = drop_last
        self.dataset_name: Optional[str] = None
        self.mean: float = 0.0
        self.std: float = 1.0
        self.train_indices: Optional[np.ndarray] = None
        self.val_indices: Optional[np.ndarray] = None
        self._arrays: Optional[Dict[str, np.ndarray]] = None
        self._datasets: Dict[str, _ImageDataset] = {}

    # ------------------------------------------------------------------ loading
    def _load(self) -> Dict[str, np.ndarray]:
        name = resolve_dataset(self.data_dir, self.fallback, warn=True)
        self.dataset_name = name
        return load_fashion_mnist(self.data_dir) if name == "fashion-mnist" else _load_digits(self.image_size)

    def prepare_data(self) -> None:
        """Nothing to download: the data is read from ``data_dir`` (or the scikit-learn fallback)."""

    def setup(self, stage: Optional[str] = None) -> None:
        """Load the arrays (cached per process) and make the splits; idempotent."""
        if self._arrays is not None:
            return
        arrays = self._load()
        train_images, train_labels = arrays["train_images"], arrays["train_labels"]
        if train_images.shape[1:] != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {train_images.shape[1:]}.")
        self.mean, self.std = _pixel_stats(train_images)
        everything = np.arange(len(train_labels))
        if self.val_fraction > 0 or self.val_size is not None:
            rng = np.random.default_rng(derive_seed(self.split_seed, 1))
            if self.val_size is not None:
                if self.val_size >= len(everything):
                    raise ValueError(
                        f"val_size={self.val_size} leaves no training images: {self.dataset_name} has "
                        f"{len(everything)}. Use a smaller val_size."
                    )
                quota = _balanced_quota(train_labels, self.val_size, rng)
            else:
                quota = _fraction_quota(train_labels, self.val_fraction)
            val = _stratified_pick(train_labels, everything, quota, rng)
            pool = np.setdiff1d(everything, val, assume_unique=True)
        else:
            val = np.zeros(0, dtype=np.int64)
            pool = everything
        train = pool
        if self.train_subset is not None:
            n = self.train_subset
            if n > len(pool):
                rank_zero_warn(
                    f"train_subset={n} exceeds the {len(pool)} training images available ({self.dataset_name}"
                    + (", after the validation split" if len(val) else "")
                    + f"): using all {len(pool)}."
                )
            else:
                rng = np.random.default_rng(derive_seed(self.seed, 2))
                train = _stratified_pick(train_labels, pool, _balanced_quota(train_labels[pool], n, rng), rng)
        self.train_indices, self.val_indices = train, val

        def dataset(images: np.ndarray, labels: np.ndarray, idx: Optional[np.ndarray] = None) -> _ImageDataset:
            # fancy indexing copies; the cached arrays are read-only, so copy them when taken whole
            images = images[idx] if idx is not None else images.copy()
            labels = labels[idx] if idx is not None else labels
            return _ImageDataset(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))

        self._datasets = {
            "train": dataset(train_images, train_labels, train),
            "val": dataset(train_images, train_labels, val),
            "test": dataset(arrays["test_images"], arrays["test_labels"]),
        }
        self._arrays = arrays

    # ------------------------------------------------------------------ loaders
    def _dataset(self, split: str) -> _ImageDataset:
        if not self._datasets:
            self.setup()
        return self._datasets[split]

    def _rank(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(getattr(trainer, "global_rank", 0) or 0) if trainer is not None else 0

    def _loader(self, split: str, batch_size: int, shuffle: bool, augment: bool, drop_last: bool = False) -> DataLoader:
        rank = self._rank()
        collate = _Collate(self.mean, self.std, augment, self.pad, derive_seed(self.seed, 3, rank))
        generator = torch.Generator().manual_seed(derive_seed(self.seed, 4, rank)) if shuffle else None
        return DataLoader(
            self._dataset(split),
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            generator=generator,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) training batches, augmented if ``augment``."""
        return self._loader("train", self.batch_size, True, self.augment, self.drop_last)

    def val_dataloader(self) -> Any:
        """The held-out validation split; an empty list (no validation loop) when ``val_fraction == 0``."""
        if len(self._dataset("val")) == 0:
            return []
        return self._loader("val", self.eval_batch_size, False, False)

    def test_dataloader(self) -> DataLoader:
        """The test set (10k images), never augmented."""
        return self._loader("test", self.eval_batch_size, False, False)

    def train_eval_dataloader(self) -> DataLoader:
        """The training images in order, without augmentation: for a clean training accuracy."""
        return self._loader("train", self.eval_batch_size, False, False)

    def class_counts(self, split: str = "train") -> np.ndarray:
        """How many images of each class a split (``"train"``, ``"val"``, ``"test"``) holds."""
        labels = self._dataset(split).labels.numpy()
        return np.bincount(labels, minlength=self.num_classes)
