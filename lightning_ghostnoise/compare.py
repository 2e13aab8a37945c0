"""``ghostnoise compare``: the same model trained with plain normalization and with ghost noise, over seeds.

For a BatchNorm model the methods are ``plain`` (BN), ``gbn``, ``xbn``, ``gni`` and ``analytic``; for a
layer-normalized model (``resnet8_ln``: GroupNorm(1, C) + weight standardization; ``vit``: LayerNorm on
tokens) ``plain`` (LN), ``gni`` and ``analytic``. Every method runs from the same seeds: for a seed,
all runs start from the same weights and see the same data order and augmentation (the data module and
the ghost layers have their own generators), and differ only by the ``GhostNoise`` callback.

Each run evaluates the official test set every ``--eval-every`` epochs and after the last (the
curves; nothing is selected on it) and, at the end, the training images in eval mode without augmentation (the train accuracy). The
command prints one row per method (mean +- std over seeds of the test accuracy, the train accuracy
and their gap; training seconds per epoch; evaluation seconds per run) and writes into ``--out-dir``:

* ``results.json``: the configuration, the environment, every run (with its per-epoch curves) and
  the per-method summary;
* ``curves.png``: training loss, test loss and test accuracy per epoch (mean and std band over seeds);
* ``runs/*.json``: one file per finished run; ``--resume`` reuses those whose configuration matches,
  so an interrupted comparison loses at most the run in progress.

Example:
    >>> from lightning_ghostnoise.compare import main
    >>> main(["--epochs", "1", "--subset", "500", "--seeds", "1"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["MethodSpec", "main", "method_specs", "parse_args", "summarize"]

#: Methods ``--methods`` accepts; ``plain`` is the model's own normalization, without ghost noise.
COMPARE_METHODS = ("plain", "gbn", "xbn", "gni", "analytic")
_BN_ONLY = ("gbn", "xbn")
_NEEDS_TWO = ("xbn", "analytic")


@dataclass(frozen=True)
class MethodSpec:
    """One column of the comparison: a method and its ghost batch size (``None`` for ``plain``)."""

    method: str
    ghost_batch_size: Optional[int]
    label: str

    @property
    def key(self) -> str:
        """A file-name-safe key, e.g. ``gni16`` or ``plain``."""
        return self.method if self.ghost_batch_size is None else f"{self.method}{self.ghost_batch_size}"


# --------------------------------------------------------------------------- arguments
def _parser() -> argparse.ArgumentParser:
    from lightning_ghostnoise.cli import positive_int
    from lightning_ghostnoise.models import MODELS

    p = argparse.ArgumentParser(
        prog="ghostnoise compare",
        description=(
            "Train the same model with plain normalization and with ghost noise (GBN, XBN, GNI, analytic GNI) "
            "over several seeds on Fashion-MNIST; print a table (mean +- std over seeds), write results.json "
            "and curves.png."
        ),
        epilog=(
            "Ghost noise is a regularizer: it pays off where the plain model overfits (train accuracy near 100%, "
            "a large train/test gap). The defaults (a 2000-image subset, 20 epochs) finish in about 5 minutes on "
            "2 CPU cores; e.g. --subset 0 --epochs 15 trains on all 60k images."
        ),
    )
    p.add_argument("--model", default="resnet8", choices=sorted(MODELS),
                   help="bundled model; resnet8_ln and vit are layer-normalized (default: resnet8)")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help=f"from {', '.join(COMPARE_METHODS)}; plain is the model's own BN or LN "
                        "(default: plain gbn gni for a BatchNorm model, plain gni for a layer-normalized one)")
    p.add_argument("--ghost-batch-size", nargs="+", type=int, default=[16], metavar="N",
                   help="ghost batch size(s) N; every ghost method runs with each (default: 16)")
    p.add_argument("--strength", type=float, default=1.0, help="noise strength s, in [0, 1] (default: 1)")
    p.add_argument("--epochs", type=positive_int("--epochs"), default=20, help="epochs per run (default: 20)")
    p.add_argument("--eval-every", type=positive_int("--eval-every"), default=5, metavar="K",
                   help="evaluate the test set every K epochs for the curves, and always after the last (default: 5)")
    p.add_argument("--subset", type=positive_int("--subset", 0), default=2000,
                   help="class-balanced training subset; 0: all 60k images (default: 2000)")
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=128, help="training batch size (default: 128)")
    p.add_argument("--width", type=positive_int("--width"), default=None, help="model width (default: the model's own)")
    p.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate, cosine decay to 0 (default: 0.1)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (default: 5e-4)")
    p.add_argument("--augment", action="store_true", help="random crop (pad 2) and horizontal flip")
    p.add_argument("--seed", type=int, default=0, help="first seed (default: 0)")
    p.add_argument("--seeds", type=positive_int("--seeds"), default=3, help="seeds per method: seed .. seed+seeds-1 (default: 3)")
    p.add_argument("--data-dir", default=None,
                   help="Fashion-MNIST folder with the four idx.gz files (default: /usr/share/datasets/fashion-mnist; "
                        "when the default folder is absent, scikit-learn's digits stand in, said clearly)")
    p.add_argument("--out-dir", default="runs/compare", help="where results.json, curves.png and runs/ go (default: runs/compare)")
    p.add_argument("--resume", action="store_true",
                   help="reuse finished runs in OUT_DIR/runs whose configuration matches (an interrupted comparison loses nothing)")
    p.add_argument("--no-plot", action="store_true", help="skip curves.png (no matplotlib needed)")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu, gpu, auto (default: cpu)")
    p.add_argument("--precision", default=None, help="Lightning precision, e.g. bf16-mixed (default: 32-true)")
    p.add_argument("--num-workers", type=positive_int("--num-workers", 0), default=0, help="DataLoader workers (default: 0)")
    p.add_argument("--progress-bar", choices=("auto", "on", "off"), default="auto",
                   help="Lightning's progress bar: auto shows it on a terminal and prints a line per epoch otherwise")
    p.add_argument("--verbose", action="store_true", help="keep Lightning's own messages")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and validate every flag (before any data is read or any model trained).

    Example:
        >>> args = parse_args(["--methods", "plain", "gni", "--ghost-batch-size", "8", "32"])
        >>> [s.label for s in args.specs]
        ['BN', 'GNI(8)', 'GNI(32)']
    """
    p = _parser()
    args = p.parse_args(argv)
    if not (0 <= args.seed and args.seed + args.seeds - 1 < 2**32):
        p.error(f"--seed must be in [0, 2**32 - seeds], got {args.seed}.")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a positive number, got {args.lr}.")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        p.error(f"--weight-decay must be >= 0, got {args.weight_decay}.")
    if not (math.isfinite(args.strength) and 0 <= args.strength <= 1):
        p.error(
            f"--strength must be in [0, 1] (0: no noise, 1: the method exactly), got {args.strength}. Larger "
            "strengths amplify the noise beyond the method's and can make training diverge; use GhostNoise directly "
            "to explore them."
        )
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        p.error(f"--data-dir {args.data_dir!r} is not a folder (it needs the four Fashion-MNIST idx.gz files).")
    try:
        args.specs = method_specs(args.model, args.methods, args.ghost_batch_size, args.width)
    except ValueError as err:
        p.error(str(err))
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("curves.png needs matplotlib (pip install matplotlib, or the package's `plot` extra); "
                    "or pass --no-plot.")
    return args


def _norm_family(model_name: str, width: Optional[int]) -> str:
    """``"bn"`` when the bundled model normalizes with BatchNorm, ``"ln"`` for LayerNorm/GroupNorm."""
    from torch import nn

    from lightning_ghostnoise.models import build_model

    model = build_model(model_name, **({} if width is None else _width_kwargs(model_name, width)))
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return "bn" if has_bn else "ln"


def _width_kwargs(model_name: str, width: int) -> Dict[str, int]:
    return {"dim": width} if model_name in ("vit", "tiny_transformer") else {"width": width}


def method_specs(
    model: str, methods: Optional[Sequence[str]], ghost_batch_sizes: Sequence[int], width: Optional[int] = None
) -> List[MethodSpec]:
    """The comparison's columns, validated against the model's normalization.

    Args:
        model: a bundled model name.
        methods: from :data:`COMPARE_METHODS`; ``None`` for the default of the model's family.
        ghost_batch_sizes: every ghost method runs with each of these ``N``.
        width: the model width (only used to build the model and look at its layers).

    Raises:
        ValueError: an unknown method, GBN/XBN on a model without BatchNorm, or an ``N`` a method cannot use.

    Example:
        >>> [s.label for s in method_specs("resnet8_ln", None, [16])]
        ['LN', 'LN+GNI(16)']
    """
    family = _norm_family(model, width)
    if methods is None:
        methods = ("plain", "gbn", "gni") if family == "bn" else ("plain", "gni")
    seen: List[str] = []
    for m in methods:
        m = m.lower()
        if m not in COMPARE_METHODS:
            raise ValueError(f"unknown method {m!r} in --methods: choose from {', '.join(COMPARE_METHODS)}.")
        if m in _BN_ONLY and family != "bn":
            raise ValueError(
                f"method {m!r} needs BatchNorm layers, and model {model!r} is layer-normalized: use gni or analytic "
                "(they work on LayerNorm/GroupNorm), or a BatchNorm model such as resnet8."
            )
        if m not in seen:
            seen.append(m)
    if not ghost_batch_sizes:
        raise ValueError("--ghost-batch-size needs at least one value.")
    for n in ghost_batch_sizes:
        if n < 1:
            raise ValueError(f"--ghost-batch-size values must be >= 1, got {n}.")
        if n < 2 and any(m in _NEEDS_TWO for m in seen):
            raise ValueError(f"xbn and analytic need a ghost batch size >= 2 (N - 1 >= 1 other samples), got {n}.")
    plain = "BN" if family == "bn" else "LN"
    names = {"gbn": "GBN", "xbn": "XBN", "gni": "GNI", "analytic": "analytic GNI"}
    specs: List[MethodSpec] = []
    for m in seen:
        if m == "plain":
            specs.append(MethodSpec("plain", None, plain))
            continue
        for n in dict.fromkeys(ghost_batch_sizes):
            prefix = "" if family == "bn" else "LN+"
            specs.append(MethodSpec(m, n, f"{prefix}{names[m]}({n})"))
    return specs


# --------------------------------------------------------------------------- one run
def _run_config(args: argparse.Namespace, spec: MethodSpec, seed: int, dataset: str) -> Dict[str, Any]:
    """What determines a run's result (the ``--resume`` key)."""
    return {
        "model": args.model,
        "width": args.width,
        "method": spec.method,
        "ghost_batch_size": spec.ghost_batch_size,
        "strength": args.strength if spec.method != "plain" else None,
        "epochs": args.epochs,
        "eval_every": args.eval_every,
        "subset": args.subset,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "augment": args.augment,
        "seed": seed,
        "dataset": dataset,
        "data_dir": os.path.abspath(args.data_dir) if args.data_dir else None,
        "accelerator": args.accelerator,
        "precision": args.precision,
    }


def _config_hash(config: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def _make_record(show_bar: bool, total_runs: int, index: int, label: str, seed: int) -> Any:
    import lightning.pytorch as pl
    from typing_extensions import override

    class _Record(pl.Callback):
        """Per-epoch curves and timings (training seconds exclude the per-epoch test evaluation)."""

        def __init__(self) -> None:
            self.curves: Dict[str, List[float]] = {
                "train_loss": [], "train_acc": [], "test_epoch": [], "test_loss": [], "test_acc": []
            }
            self.train_seconds: List[float] = []
            self.eval_seconds = 0.0
            self._t0 = 0.0
            self._v0 = 0.0
            self._epoch_done = False
            self.active = True  # off after fit: the final train-set pass is no test-curve point

        @override
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self._t0 = time.perf_counter()
            self._epoch_done = False

        def _close_epoch(self) -> None:
            if not self._epoch_done:
                self.train_seconds.append(time.perf_counter() - self._t0)
                self._epoch_done = True

        @override
        def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.sanity_checking or not self.active:
                return
            self._close_epoch()
            self._v0 = time.perf_counter()

        @override
        def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.sanity_checking or not self.active:
                return
            self.eval_seconds += time.perf_counter() - self._v0
            metrics = trainer.callback_metrics
            self.curves["test_epoch"].append(len(self.curves["train_loss"]) + (0 if trainer.state.fn == "validate" else 1))
            self.curves["test_loss"].append(float(metrics["val_loss"]))
            self.curves["test_acc"].append(float(metrics["val_acc"]))

        @override
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self._close_epoch()
            metrics = trainer.callback_metrics
            self.curves["train_loss"].append(float(metrics["train_loss"]))
            self.curves["train_acc"].append(float(metrics["train_acc"]))
            if not show_bar:
                c = self.curves
                epoch = len(c["train_loss"])
                test = f", test acc {c['test_acc'][-1]:.2%}" if c["test_epoch"] and c["test_epoch"][-1] == epoch else ""
                print(
                    f"  [{index}/{total_runs}] {label} seed {seed} epoch {epoch}: "
                    f"train loss {c['train_loss'][-1]:.4f}{test} ({self.train_seconds[-1]:.1f} s)",
                    flush=True,
                )

    return _Record()


def _fit_once(args: argparse.Namespace, spec: MethodSpec, seed: int, show_bar: bool, index: int, total: int) -> Dict[str, Any]:
    import lightning.pytorch as pl

    from lightning_ghostnoise.callback import GhostNoise
    from lightning_ghostnoise.data import DEFAULT_DATA_DIR, FashionMNISTDataModule
    from lightning_ghostnoise.models import Classifier

    pl.seed_everything(seed, workers=True, verbose=False)
    dm = FashionMNISTDataModule(
        data_dir=args.data_dir or DEFAULT_DATA_DIR,
        batch_size=args.batch_size,
        train_subset=args.subset or None,
        augment=args.augment,
        num_workers=args.num_workers,
        seed=seed,
    )
    dm.setup("fit")
    model = Classifier(
        args.model,
        num_classes=dm.num_classes,
        in_channels=dm.in_channels,
        model_kwargs=None if args.width is None else _width_kwargs(args.model, args.width),
        lr=args.lr,
        weight_decay=args.weight_decay,
    )
    record = _make_record(show_bar, total, index, spec.label, seed)
    callbacks: List[pl.Callback] = [record]
    ghost: Optional[GhostNoise] = None
    if spec.method != "plain":
        ghost = GhostNoise(
            ghost_batch_size=spec.ghost_batch_size or 16,
            strength=args.strength,
            method=spec.method,  # type: ignore[arg-type]
            seed=seed,
            log_values=False,
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
        num_sanity_val_steps=0,
        check_val_every_n_epoch=args.eval_every,
        deterministic=False,
    )
    start = time.perf_counter()
    # the official test set every --eval-every epochs draws the curves (no model selection uses it)
    trainer.fit(model, train_dataloaders=dm.train_dataloader(), val_dataloaders=dm.test_dataloader())
    if not record.curves["test_epoch"] or record.curves["test_epoch"][-1] != args.epochs:
        # the last epoch is always evaluated (in eval mode the ghost layers are the plain layers)
        trainer.validate(model, dataloaders=dm.test_dataloader(), verbose=False)
    fit_seconds = time.perf_counter() - start
    record.active = False
    t_eval = time.perf_counter()
    train_eval = trainer.validate(model, dataloaders=dm.train_eval_dataloader(), verbose=False)[0]
    eval_seconds = record.eval_seconds + time.perf_counter() - t_eval
    curves = record.curves
    return {
        "label": spec.label,
        "method": spec.method,
        "ghost_batch_size": spec.ghost_batch_size,
        "seed": seed,
        "test_acc": curves["test_acc"][-1],
        "test_loss": curves["test_loss"][-1],
        "train_acc": float(train_eval["val_acc"]),
        "train_loss": float(train_eval["val_loss"]),
        "fit_train_acc": curves["train_acc"][-1],
        "gap": float(train_eval["val_acc"]) - curves["test_acc"][-1],
        "train_seconds_per_epoch": sum(record.train_seconds) / max(len(record.train_seconds), 1),
        "eval_seconds": eval_seconds,
        "fit_seconds": fit_seconds,
        "curves": curves,
        "rewritten": ghost.report.summary() if ghost is not None else "",
        "dataset": dm.dataset_name,
        "n_train": int(len(dm.train_indices)) if dm.train_indices is not None else 0,
        "n_test": len(dm.test_dataloader().dataset),  # type: ignore[arg-type]
        "device": str(trainer.strategy.root_device),
    }


# --------------------------------------------------------------------------- results
def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: Sequence[Dict[str, Any]], specs: Sequence[MethodSpec]) -> List[Dict[str, Any]]:
    """Per method: mean and sample std over seeds of the accuracies and the gap; mean timings.

    Example:
        >>> runs = [{"label": "BN", "test_acc": a, "train_acc": 1.0, "gap": 1.0 - a, "train_seconds_per_epoch": 2.0,
        ...          "eval_seconds": 1.0} for a in (0.8, 0.9)]
        >>> row = summarize(runs, [MethodSpec("plain", None, "BN")])[0]
        >>> round(row["test_acc_mean"], 3), round(row["test_acc_std"], 4)
        (0.85, 0.0707)
    """
    rows = []
    for spec in specs:
        group = [r for r in runs if r["label"] == spec.label]
        if not group:
            continue
        row: Dict[str, Any] = {"label": spec.label, "method": spec.method, "ghost_batch_size": spec.ghost_batch_size,
                               "seeds": [r.get("seed") for r in group]}
        for key in ("test_acc", "train_acc", "gap"):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([float(r[key]) for r in group])
        row["train_seconds_per_epoch"] = _mean_std([float(r["train_seconds_per_epoch"]) for r in group])[0]
        row["eval_seconds"] = _mean_std([float(r["eval_seconds"]) for r in group])[0]
        rows.append(row)
    return rows


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """A Markdown table: accuracies in percent, ``mean +- std`` over seeds; the gap in percentage points."""
    head = ("method", "test acc", "train acc", "gap (pp)", "train s/epoch", "eval s/run")
    body = [
        (
            r["label"],
            f"{r['test_acc_mean']:.2%} +- {r['test_acc_std'] * 100:.2f}",
            f"{r['train_acc_mean']:.2%} +- {r['train_acc_std'] * 100:.2f}",
            f"{r['gap_mean'] * 100:.2f} +- {r['gap_std'] * 100:.2f}",
            f"{r['train_seconds_per_epoch']:.2f}",
            f"{r['eval_seconds']:.1f}",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), sep] + [line(b) for b in body])


def plot_curves(runs: Sequence[Dict[str, Any]], specs: Sequence[MethodSpec], path: str, title: str = "") -> None:
    """Training loss, test loss and test accuracy per epoch; mean over seeds with a +- std band."""
    import numpy as np

    from lightning_ghostnoise.outputs import new_figure, save_figure

    panels = (("train_loss", "training loss (train mode)"), ("test_loss", "test loss"), ("test_acc", "test accuracy (%)"))
    fig = new_figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    for spec in specs:
        group = [r for r in runs if r["label"] == spec.label]
        if not group:
            continue
        for ax, (key, name) in zip(axes, panels):
            values = np.array([r["curves"][key] for r in group], dtype=float)
            if key == "test_acc":
                values = values * 100
            if key.startswith("test"):
                epochs = np.array(group[0]["curves"].get("test_epoch") or range(1, values.shape[1] + 1))
            else:
                epochs = np.arange(1, values.shape[1] + 1)
            mean = values.mean(0)
            std = values.std(0, ddof=1) if len(group) > 1 else np.zeros_like(mean)
            (line,) = ax.plot(epochs, mean, marker="o", ms=3, label=spec.label)
            ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
            ax.set_title(name)
            ax.set_xlabel("epoch")
    axes[0].set_yscale("log")
    axes[2].legend()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def _environment(device: str) -> Dict[str, Any]:
    import lightning
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": device,
    }


# --------------------------------------------------------------------------- main
def _quiet(verbose: bool) -> None:
    # Lightning 2.6 + torch 2.13 warn about a private pytree API on every fit; the data module loads in
    # the main process by design
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    import logging

    import lightning.pytorch  # noqa: F401  (sets its loggers' level on import: import first, then quiet them)

    if not verbose:
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        logging.getLogger("lightning.fabric").setLevel(logging.WARNING)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``ghostnoise compare``; returns the exit code (2: bad flags or data, nothing written)."""
    args = parse_args(argv)
    _quiet(args.verbose)
    from lightning_ghostnoise.data import DEFAULT_DATA_DIR, resolve_dataset
    from lightning_ghostnoise.outputs import write_json

    data_dir = args.data_dir or DEFAULT_DATA_DIR
    try:
        # an explicit --data-dir must hold the real data; only the default folder may fall back
        dataset = resolve_dataset(data_dir, fallback=args.data_dir is None)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"ghostnoise compare: {err}", file=sys.stderr)
        return 2
    if dataset == "digits":
        print(
            f"ghostnoise compare: Fashion-MNIST is not installed ({DEFAULT_DATA_DIR} is missing): using scikit-learn's "
            "8x8 digits (1797 images, upsampled) instead; accuracies are NOT Fashion-MNIST's. "
            "Install the data with `apt-get install dataset-fashion-mnist`.",
            file=sys.stderr,
            flush=True,
        )
    os.makedirs(os.path.join(args.out_dir, "runs"), exist_ok=True)
    show_bar = args.progress_bar == "on" or (args.progress_bar == "auto" and sys.stdout.isatty())
    seeds = list(range(args.seed, args.seed + args.seeds))
    plan = [(spec, seed) for seed in seeds for spec in args.specs]
    runs: List[Dict[str, Any]] = []
    started = time.perf_counter()
    for index, (spec, seed) in enumerate(plan, start=1):
        config = _run_config(args, spec, seed, dataset)
        path = os.path.join(args.out_dir, "runs", f"{spec.key}_seed{seed}_{_config_hash(config)}.json")
        if args.resume and os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            if saved.get("config") == config:
                print(f"[{index}/{len(plan)}] {spec.label}, seed {seed}: reusing {path}", flush=True)
                runs.append(saved["result"])
                continue
        print(f"[{index}/{len(plan)}] {spec.label}, seed {seed}: fitting {args.epochs} epoch(s) ...", flush=True)
        result = _fit_once(args, spec, seed, show_bar, index, len(plan))
        print(
            f"[{index}/{len(plan)}] {spec.label}, seed {seed}: test {result['test_acc']:.2%}, train "
            f"{result['train_acc']:.2%} ({result['fit_seconds']:.0f} s fit, {result['eval_seconds']:.0f} s of it and "
            "after it evaluating)",
            flush=True,
        )
        write_json(path, {"config": config, "result": result})
        runs.append(result)
    rows = summarize(runs, args.specs)
    first = runs[0]
    header = (
        f"{args.model} on {first['dataset']} ({first['n_train']} training / {first['n_test']} test images), "
        f"{args.epochs} epoch(s), batch {args.batch_size}, lr {args.lr:g}, seeds {seeds[0]}..{seeds[-1]}, "
        f"device {first['device']}" + (", crop+flip" if args.augment else "")
        + (f", strength {args.strength:g}" if args.strength != 1 else "")
    )
    ghost_runs = [r for r in runs if r["rewritten"]]
    table = format_table(rows)
    print()
    print(header)
    if ghost_runs:
        print(f"GhostNoise rewrote: {ghost_runs[0]['rewritten']}")
    print()
    print(table)
    print()
    print(
        f"mean +- std over {len(seeds)} seed(s). test acc: the official test set after the last epoch; train acc: the "
        "training images in eval mode without augmentation; gap = train - test. train s/epoch excludes evaluation; "
        "eval s/run: the test passes and the final train-set pass."
    )
    out = {
        "command": "ghostnoise compare " + " ".join(sys.argv[2:] if argv is None else list(argv)),
        "config": {k: v for k, v in vars(args).items() if k != "specs"},
        "header": header,
        "environment": _environment(first["device"]),
        "total_seconds": time.perf_counter() - started,
        "summary": rows,
        "table": table,
        "runs": runs,
    }
    json_path = os.path.join(args.out_dir, "results.json")
    write_json(json_path, out)
    written = [json_path]
    if not args.no_plot:
        png = os.path.join(args.out_dir, "curves.png")
        plot_curves(runs, args.specs, png, title=header)
        written.append(png)
    print(f"wrote {', '.join(written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
