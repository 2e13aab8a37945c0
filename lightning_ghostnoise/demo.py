"""Demo: the same model fitted with plain BatchNorm and with ghost noise, side by side.

Run::

    python -m lightning_ghostnoise.demo [--method gni] [--ghost-batch-size 16] [--epochs 3] [--subset 6000]
                                        [--seed 0] [--seeds 3] [--accelerator auto]

For each seed both runs start alike (same initial weights, same data order and augmentation: the
data module has its own generators), and differ only by ``Trainer(callbacks=[GhostNoise(...)])``.
Accuracies are reported as mean +- std over the seeds.
The table shows the accuracy on the training images (eval mode, no augmentation), the running
accuracy of the last training epoch (train mode, with the noise), the test accuracy and the fit time.

A short demo shows that the callback works, not that it helps: a regularizer pays off only where the
baseline overfits (training accuracy near 100%), which takes many more epochs (see ``--help``).
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from typing import Dict, List, Optional, Sequence

__all__ = ["main", "parse_args"]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from lightning_ghostnoise.layers import METHODS
    from lightning_ghostnoise.models import MODELS

    p = argparse.ArgumentParser(
        prog="python -m lightning_ghostnoise.demo",
        description="Fit a small CNN on Fashion-MNIST with plain BatchNorm and with ghost noise; print a table.",
        epilog="Ghost noise shows its value only where the baseline overfits: try e.g. --epochs 30 --subset 2000.",
    )
    p.add_argument("--method", default="gni", choices=METHODS, help="ghost noise method (default: gni)")
    p.add_argument("--ghost-batch-size", type=int, default=16, help="N, the ghost batch size (default: 16)")
    p.add_argument("--strength", type=float, default=1.0, help="noise strength s (default: 1)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (default: 3)")
    p.add_argument("--subset", type=int, default=6000, help="class-balanced training subset; 0: all 60k (default: 6000)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size (default: 128)")
    p.add_argument("--model", default="small_cnn", choices=sorted(MODELS), help="model (default: small_cnn)")
    p.add_argument("--width", type=int, default=None, help="model width (default: the model's own)")
    p.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate, cosine decay (default: 0.1)")
    p.add_argument("--augment", action="store_true", help="random crop (pad 2) and horizontal flip")
    p.add_argument("--seed", type=int, default=0, help="first seed; both methods use the same seeds (default: 0)")
    p.add_argument("--seeds", type=int, default=3, help="runs per method, seeds seed..seed+seeds-1; mean +- std (default: 3)")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu (default: auto)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: /usr/share/datasets/fashion-mnist)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default: 0)")
    p.add_argument("--verbose", action="store_true", help="keep Lightning's own messages")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    if args.subset < 0:
        p.error("--subset must be >= 0 (0: the full training set)")
    if args.ghost_batch_size < 1:
        p.error("--ghost-batch-size must be >= 1")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    return args


def _fit_once(args: argparse.Namespace, ghost: bool) -> Dict[str, object]:
    import lightning.pytorch as pl

    from lightning_ghostnoise.callback import GhostNoise  # lazy: keeps `import demo` light
    from lightning_ghostnoise.data import DEFAULT_DATA_DIR, FashionMNISTDataModule
    from lightning_ghostnoise.models import Classifier

    pl.seed_everything(args.seed, workers=True, verbose=False)
    dm = FashionMNISTDataModule(
        data_dir=args.data_dir or DEFAULT_DATA_DIR,
        batch_size=args.batch_size,
        train_subset=args.subset or None,
        augment=args.augment,
        num_workers=args.num_workers,
        seed=args.seed,
    )
    dm.setup("fit")
    model = Classifier(
        args.model,
        num_classes=dm.num_classes,
        in_channels=dm.in_channels,
        model_kwargs=None if args.width is None else {"width": args.width},
        lr=args.lr,
    )
    callbacks: List[pl.Callback] = []
    cb = None
    if ghost:
        cb = GhostNoise(
            ghost_batch_size=args.ghost_batch_size,
            strength=args.strength,
            method=args.method,
            seed=args.seed,
        )
        callbacks.append(cb)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    fit_acc = float(trainer.callback_metrics["train_acc"])
    train_eval = trainer.validate(model, dataloaders=dm.train_eval_dataloader(), verbose=False)[0]["val_acc"]
    test = trainer.test(model, datamodule=dm, verbose=False)[0]["test_acc"]
    if ghost:
        assert cb is not None
        label = f"{args.method}(N={args.ghost_batch_size}" + (f", s={args.strength:g})" if args.strength != 1 else ")")
        rewritten = cb.report.summary()
    else:
        label, rewritten = "plain BN", ""
    return {
        "method": label,
        "train": float(train_eval),
        "fit": fit_acc,
        "test": float(test),
        "seconds": seconds,
        "rewritten": rewritten,
        "dataset": dm.dataset_name,
        "n_train": len(dm.train_indices) if dm.train_indices is not None else 0,
        "n_test": len(dm.test_dataloader().dataset),  # type: ignore[arg-type]
        "device": str(trainer.strategy.root_device),
    }


def _mean_std(values: Sequence[float]) -> str:
    """``mean +- std`` in percent (sample standard deviation; ``+- 0.00`` for one run)."""
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return f"{mean:.2%} +- {std * 100:.2f}"


def _table(groups: List[List[Dict[str, object]]]) -> str:
    """One row per method: accuracies as mean +- std over its runs (seeds), mean seconds per run."""
    head = ("method", "train acc", "fit acc", "test acc", "seconds/run")
    body = [
        (
            str(runs[0]["method"]),
            _mean_std([float(r["train"]) for r in runs]),  # type: ignore[arg-type]
            _mean_std([float(r["fit"]) for r in runs]),  # type: ignore[arg-type]
            _mean_std([float(r["test"]) for r in runs]),  # type: ignore[arg-type]
            f"{sum(float(r['seconds']) for r in runs) / len(runs):.1f}",  # type: ignore[arg-type]
        )
        for runs in groups
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), sep] + [line(b) for b in body])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo; returns the exit code."""
    args = parse_args(argv)
    # Lightning 2.6 + torch 2.13 warn about a private pytree API on every fit; the demo has 0 workers and
    # no validation split by design
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")
    import lightning.pytorch  # noqa: F401  (it sets its loggers' level on import: import first, then quiet them)

    if not args.verbose:
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        logging.getLogger("lightning.fabric").setLevel(logging.WARNING)

    seeds = list(range(args.seed, args.seed + args.seeds))
    groups: List[List[Dict[str, object]]] = [[], []]
    for seed in seeds:
        for index, ghost in enumerate((False, True)):
            print(f"seed {seed}: fitting {'with GhostNoise' if ghost else 'plain BN'} ...", flush=True)
            groups[index].append(_fit_once(argparse.Namespace(**{**vars(args), "seed": seed}), ghost))
    first = groups[0][0]
    print()
    print(
        f"{args.model} on {first['dataset']} ({first['n_train']} training / {first['n_test']} test images), "
        f"{args.epochs} epoch(s), batch {args.batch_size}, seeds {seeds[0]}..{seeds[-1]}, device {first['device']}"
        + (", crop+flip" if args.augment else "")
    )
    print(f"GhostNoise rewrote: {groups[1][0]['rewritten']}")
    print()
    print(_table(groups))
    print()
    print(
        f"mean +- std (percentage points) over {len(seeds)} seed(s); train acc: eval mode on the training images; "
        "fit acc: last epoch, train mode (with the noise)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
