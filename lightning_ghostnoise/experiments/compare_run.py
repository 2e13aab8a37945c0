"""One run of ``ghostnoise compare``: a model, a method, a seed; its curves, accuracies and timings.

Evaluation (validation split, test set, and at the end the training images without augmentation)
runs in eval mode, where every ghost layer is the plain layer, and reads no random stream, so how
often it runs (``--eval-every``) does not change the training.

Example:
    >>> from lightning_ghostnoise.experiments.compare import parse_args
    >>> args = parse_args(["--epochs", "1", "--subset", "200", "--methods", "gni"])  # doctest: +SKIP
    >>> fit_once(args, args.specs[0], seed=0, show_bar=False, prefix="[1/1]")["test_acc"]  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from typing_extensions import override

if TYPE_CHECKING:
    from lightning_ghostnoise.experiments.compare_methods import MethodSpec

__all__ = ["evaluate", "fit_once"]


@torch.no_grad()
def evaluate(trainer: pl.Trainer, module: pl.LightningModule, loader: DataLoader) -> Tuple[float, float]:
    """Mean cross-entropy (without label smoothing) and accuracy of ``module`` in eval mode over ``loader``.

    The module's train/eval mode is restored afterwards.
    """
    was_training = module.training
    module.eval()
    loss, correct, count = 0.0, 0, 0
    try:
        for x, y in loader:
            x, y = x.to(module.device), y.to(module.device)
            with trainer.precision_plugin.forward_context():
                logits = module(x)
            loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            count += len(y)
    finally:
        module.train(was_training)
    return loss / max(count, 1), correct / max(count, 1)


class _Record(pl.Callback):
    """Per-epoch curves and timings (training seconds exclude evaluation)."""

    def __init__(self, loaders: Dict[str, DataLoader], eval_every: int, show_bar: bool, prefix: str) -> None:
        self.loaders = loaders
        self.eval_every = eval_every
        self.show_bar = show_bar
        self.prefix = prefix
        self.curves: Dict[str, List[float]] = {"train_loss": [], "train_acc": [], "eval_epoch": []}
        for split in loaders:
            self.curves[f"{split}_loss"] = []
            self.curves[f"{split}_acc"] = []
        self.train_seconds: List[float] = []
        self.eval_seconds = 0.0
        self._t0 = 0.0

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_seconds.append(time.perf_counter() - self._t0)
        metrics = trainer.callback_metrics
        c = self.curves
        c["train_loss"].append(float(metrics["train_loss"]))
        c["train_acc"].append(float(metrics["train_acc"]))
        epoch = len(c["train_loss"])
        line = ""
        if epoch % self.eval_every == 0 or epoch == trainer.max_epochs:
            t = time.perf_counter()
            c["eval_epoch"].append(epoch)
            for split, loader in self.loaders.items():
                loss, acc = evaluate(trainer, pl_module, loader)
                c[f"{split}_loss"].append(loss)
                c[f"{split}_acc"].append(acc)
                line += f", {split} acc {acc:.2%}"
            self.eval_seconds += time.perf_counter() - t
        if not self.show_bar:
            print(
                f"  {self.prefix} epoch {epoch}: train loss {c['train_loss'][-1]:.4f}{line} "
                f"({self.train_seconds[-1]:.1f} s)",
                flush=True,
            )


def fit_once(args: argparse.Namespace, spec: "MethodSpec", seed: int, show_bar: bool, prefix: str) -> Dict[str, Any]:
    """Train one (method, seed) of a comparison and measure it; see :mod:`lightning_ghostnoise.experiments.compare`."""
    from lightning_ghostnoise import GhostNoise
    from lightning_ghostnoise.experiments.compare_methods import width_kwargs
    from lightning_ghostnoise.experiments.data import (
        DEFAULT_DATA_DIR,
        FashionMNISTDataModule,
    )
    from lightning_ghostnoise.experiments.models import Classifier

    pl.seed_everything(seed, workers=True, verbose=False)
    dm = FashionMNISTDataModule(
        data_dir=args.data_dir or DEFAULT_DATA_DIR,
        batch_size=args.batch_size,
        train_subset=args.subset or None,
        val_size=args.val_size or None,
        split_seed=args.split_seed,
        augment=args.augment,
        num_workers=args.num_workers,
        seed=seed,
    )
    dm.setup("fit")
    model = Classifier(
        args.model,
        num_classes=dm.num_classes,
        in_channels=dm.in_channels,
        model_kwargs=None if args.width is None else width_kwargs(args.model, args.width),
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing,
    )
    loaders: Dict[str, DataLoader] = {}
    if args.val_size:
        loaders["val"] = dm.val_dataloader()
    loaders["test"] = dm.test_dataloader()
    record = _Record(loaders, args.eval_every, show_bar, f"{prefix} {spec.label} seed {seed}")
    callbacks: List[pl.Callback] = [record]
    ghost: Optional[GhostNoise] = None
    if spec.method != "plain":
        options: Dict[str, Any] = {}
        if spec.variant in ("shift", "scale"):
            options = {"shift_noise": spec.variant == "shift", "scale_noise": spec.variant == "scale"}
        elif spec.variant == "batch":
            options = {"running_stats": "batch"}
        ghost = GhostNoise(
            ghost_batch_size=spec.ghost_batch_size or 16,
            strength=args.strength,
            method=spec.method,  # type: ignore[arg-type]  # a str checked against METHODS by method_specs
            seed=seed,
            log_values=False,
            **options,
        )
        callbacks.append(ghost)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=show_bar,
        enable_model_summary=False,
        limit_val_batches=0,
        deterministic=False,
    )
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=dm.train_dataloader())
    fit_seconds = time.perf_counter() - start
    t_eval = time.perf_counter()
    train_loss, train_acc = evaluate(trainer, model, dm.train_eval_dataloader())
    eval_seconds = record.eval_seconds + time.perf_counter() - t_eval
    curves = record.curves
    last = {key: values[-1] for key, values in curves.items() if key.startswith(("val_", "test_")) and values}
    return {
        "label": spec.label,
        "method": spec.method,
        "variant": spec.variant,
        "ghost_batch_size": spec.ghost_batch_size,
        "seed": seed,
        "val_acc": last.get("val_acc"),
        "val_loss": last.get("val_loss"),
        "test_acc": last["test_acc"],
        "test_loss": last["test_loss"],
        "train_acc": train_acc,
        "train_loss": train_loss,
        "fit_train_acc": curves["train_acc"][-1],
        "gap": train_acc - last["test_acc"],
        "train_seconds_per_epoch": sum(record.train_seconds) / max(len(record.train_seconds), 1),
        "eval_seconds": eval_seconds,
        "fit_seconds": fit_seconds,
        "curves": curves,
        "rewritten": ghost.report.summary() if ghost is not None else "",
        "dataset": dm.dataset_name,
        "n_train": int(len(dm.train_indices)) if dm.train_indices is not None else 0,
        "n_val": int(len(dm.val_indices)) if dm.val_indices is not None else 0,
        "n_test": len(dm.test_dataloader().dataset),  # type: ignore[arg-type]  # a map-style dataset: it has a length
        "device": str(trainer.strategy.root_device),
    }
