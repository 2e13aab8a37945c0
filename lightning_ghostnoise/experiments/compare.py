"""``ghostnoise compare``: the same model trained with plain normalization and with ghost noise, over seeds.

For a BatchNorm model the methods are ``plain`` (BN), ``gbn``, ``xbn``, ``gni`` and ``analytic``; for a
layer-normalized model (``resnet8_ln``: GroupNorm(1, C) + weight standardization; ``vit``: LayerNorm on
tokens) ``plain`` (LN), ``gni`` and ``analytic``. Variants: ``gni:shift`` / ``gni:scale`` (and the same
for ``analytic``) inject only the shift or only the scale noise; ``gbn:batch`` updates GBN's running
statistics from the full batch instead of the ghost batches. Every method runs from the same seeds:
for a seed, all runs start from the same weights and see the same data order and augmentation (the
data module and the ghost layers have their own generators), and differ only by the ``GhostNoise``
callback, so seeds are *paired*.

``--val-size K`` holds out ``K`` training images (the same images for every method and seed,
``--split-seed``). With several ``--ghost-batch-size`` values and a validation split, each method's
``N`` is selected on the mean validation accuracy (``--select val``) and the table reports that ``N``
only; every ``N`` stays in ``results.json`` and in ``val_vs_n.png``. The test set is never used to
choose anything. Each method is compared with the baseline seed by seed: the mean paired difference
in test accuracy, its 95% confidence interval, the paired t-test p-value and the wins.

Outputs in ``--out-dir``: ``results.json`` (configuration, environment, every run with its curves,
every summary row, the selection), ``curves.png``, ``val_vs_n.png`` (with several ``N``) and
``runs/*.json``, one file per finished run: ``--resume`` reuses those whose configuration matches, and
retrains (saying so) a run whose file is damaged.

Example:
    >>> from lightning_ghostnoise.experiments.compare import main
    >>> main(["--epochs", "1", "--subset", "500", "--seeds", "1"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

from lightning_ghostnoise.experiments.compare_methods import (
    COMPARE_METHODS,
    MethodSpec,
    method_specs,
)
from lightning_ghostnoise.experiments.compare_stats import (
    format_table,
    paired_difference,
    select_on_validation,
    summarize,
)
from lightning_ghostnoise.experiments.flags import ListFlag, positive_int

__all__ = ["MethodSpec", "main", "method_specs", "parse_args"]


# --------------------------------------------------------------------------- arguments
def _parser() -> argparse.ArgumentParser:
    from lightning_ghostnoise.experiments.models import MODELS

    p = argparse.ArgumentParser(
        prog="ghostnoise compare",
        description=(
            "Train the same model with plain normalization and with ghost noise (GBN, XBN, GNI, analytic GNI) "
            "over several paired seeds on Fashion-MNIST; select N on a validation split; print a table with paired "
            "differences to the baseline; write results.json and plots."
        ),
        epilog=(
            "Ghost noise is a regularizer: it pays off where the plain model overfits (train accuracy near 100%, "
            "a large train/test gap). The defaults (a 2000-image subset, 20 epochs) finish in a few minutes on "
            "2 CPU cores; e.g. --subset 0 --epochs 15 trains on all 60k images."
        ),
    )
    p.add_argument(
        "--model",
        default="resnet8",
        choices=sorted(MODELS),
        help="bundled model; resnet8_ln and vit are layer-normalized (default: resnet8)",
    )
    p.add_argument(
        "--methods",
        action=ListFlag,
        default=None,
        metavar="METHOD",
        help=f"from {', '.join(COMPARE_METHODS)}, and the variants gni:shift, gni:scale, analytic:shift, "
        "analytic:scale, gbn:batch; METHOD@N runs that method at N only (e.g. gni@16); plain is the "
        "model's own BN or LN "
        "(default: plain gbn gni for a BatchNorm model, plain gni for a layer-normalized one)",
    )
    p.add_argument(
        "--ghost-batch-size",
        action=ListFlag,
        item=positive_int("--ghost-batch-size"),
        default=[16],
        metavar="N",
        help="ghost batch size(s) N; every ghost method runs with each (default: 16)",
    )
    p.add_argument(
        "--select",
        choices=("val", "none"),
        default=None,
        help="val: per method, report the N with the best mean validation accuracy (needs --val-size); "
        "none: report every N (default: val with --val-size and several N, else none)",
    )
    p.add_argument("--strength", type=float, default=1.0, help="noise strength s, in [0, 1] (default: 1)")
    p.add_argument("--epochs", type=positive_int("--epochs"), default=20, help="epochs per run (default: 20)")
    p.add_argument(
        "--eval-every",
        type=positive_int("--eval-every"),
        default=5,
        metavar="K",
        help="evaluate validation and test sets every K epochs for the curves, and always after the last (default: 5)",
    )
    p.add_argument(
        "--subset",
        type=positive_int("--subset", 0),
        default=2000,
        help="class-balanced training subset (picked from what the validation split leaves); 0: all "
        "images (default: 2000)",
    )
    p.add_argument(
        "--val-size",
        type=positive_int("--val-size", 0),
        default=0,
        metavar="K",
        help="hold out K class-balanced training images for validation, the same for every method and "
        "seed; 0: none (default: 0)",
    )
    p.add_argument(
        "--split-seed",
        type=positive_int("--split-seed", 0),
        default=0,
        help="seed of the validation split (default: 0)",
    )
    p.add_argument(
        "--batch-size", type=positive_int("--batch-size"), default=128, help="training batch size (default: 128)"
    )
    p.add_argument("--width", type=positive_int("--width"), default=None, help="model width (default: the model's own)")
    p.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate, cosine decay to 0 (default: 0.1)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (default: 5e-4)")
    p.add_argument(
        "--warmup-epochs",
        type=float,
        default=0.0,
        help="linear learning-rate warm-up over this many epochs before the cosine decay (default: 0)",
    )
    p.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing (default: 0)")
    p.add_argument("--augment", action="store_true", help="random crop (pad 2) and horizontal flip")
    p.add_argument("--seed", type=int, default=0, help="first seed (default: 0)")
    p.add_argument(
        "--seeds", type=positive_int("--seeds"), default=3, help="seeds per method: seed .. seed+seeds-1 (default: 3)"
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="Fashion-MNIST folder with the four idx.gz files (default: /usr/share/datasets/fashion-mnist; "
        "when the default folder is absent, scikit-learn's digits stand in, said clearly)",
    )
    p.add_argument(
        "--out-dir", default="runs/compare", help="where results.json, the plots and runs/ go (default: runs/compare)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse finished runs in OUT_DIR/runs whose configuration matches (an interrupted comparison "
        "loses only the run in progress; a damaged run file is retrained)",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the plots (no matplotlib needed)")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu, gpu, auto (default: cpu)")
    p.add_argument("--precision", default=None, help="Lightning precision, e.g. bf16-mixed (default: 32-true)")
    p.add_argument(
        "--num-workers", type=positive_int("--num-workers", 0), default=0, help="DataLoader workers (default: 0)"
    )
    p.add_argument(
        "--progress-bar",
        choices=("auto", "on", "off"),
        default="auto",
        help="Lightning's progress bar: auto shows it on a terminal and prints a line per epoch otherwise",
    )
    p.add_argument("--verbose", action="store_true", help="keep Lightning's own messages")
    return p


def _check_number(
    p: argparse.ArgumentParser, flag: str, value: float, low: float, high: float, low_open: bool = False
) -> None:
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        p.error(f"{flag} must be in {bound}, got {value}.")


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
    _check_number(p, "--lr", args.lr, 0, math.inf, low_open=True)
    _check_number(p, "--momentum", args.momentum, 0, 1)
    _check_number(p, "--weight-decay", args.weight_decay, 0, math.inf)
    _check_number(p, "--warmup-epochs", args.warmup_epochs, 0, args.epochs)
    if not (math.isfinite(args.label_smoothing) and 0 <= args.label_smoothing < 1):
        p.error(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}.")
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
    sizes_per_method: Dict[Tuple[str, Optional[str]], int] = {}
    for spec in args.specs:
        sizes_per_method[(spec.method, spec.variant)] = sizes_per_method.get((spec.method, spec.variant), 0) + 1
    several_n = any(count > 1 for count in sizes_per_method.values())
    if args.select is None:
        args.select = "val" if args.val_size and several_n else "none"
    if args.select == "val" and not args.val_size:
        p.error("--select val chooses N on a validation split: give --val-size K (e.g. 2000), or --select none.")
    args.several_n = several_n
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error(
                "the plots need matplotlib (pip install matplotlib, or the package's `plot` extra); or pass --no-plot."
            )
    if len(args.specs) > 1 and any(s.method == "plain" for s in args.specs):
        try:
            import scipy  # noqa: F401
        except ImportError:
            p.error("the paired statistics need scipy (pip install scipy, or the package's `cli` extra).")
    return args


# --------------------------------------------------------------------------- runs
def _run_config(args: argparse.Namespace, spec: MethodSpec, seed: int, dataset: str) -> Dict[str, Any]:
    """What determines a run's result (the ``--resume`` key)."""
    return {
        "model": args.model,
        "width": args.width,
        "method": spec.method,
        "variant": spec.variant,
        "ghost_batch_size": spec.ghost_batch_size,
        "strength": args.strength if spec.method != "plain" else None,
        "epochs": args.epochs,
        "eval_every": args.eval_every,
        "subset": args.subset,
        "val_size": args.val_size,
        "split_seed": args.split_seed if args.val_size else None,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "warmup_epochs": args.warmup_epochs,
        "label_smoothing": args.label_smoothing,
        "augment": args.augment,
        "seed": seed,
        "dataset": dataset,
        "data_dir": os.path.abspath(args.data_dir) if args.data_dir else None,
        "accelerator": args.accelerator,
        "precision": args.precision,
    }


def _config_hash(config: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


_RESULT_KEYS = ("label", "method", "seed", "test_acc", "train_acc", "gap", "curves", "train_seconds_per_epoch")


def _load_run(path: str, config: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The saved result at ``path`` if it is whole and was made with ``config``; ``None`` (said on stderr
    when the file is damaged) means: train this run again."""
    try:
        with open(path) as f:
            saved = json.load(f)
        if not isinstance(saved, dict) or saved.get("config") != config:
            return None
        result = saved["result"]
        missing = [k for k in _RESULT_KEYS if k not in result]
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
        return result
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(
            f"ghostnoise compare: {path} is damaged ({type(err).__name__}: {err}); training this run again.",
            file=sys.stderr,
            flush=True,
        )
        return None


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


def _report(args: argparse.Namespace, runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Summaries, the selection on validation and the paired statistics (nothing here reads test numbers to choose)."""
    all_rows = summarize(runs, [s.label for s in args.specs])
    selection: Dict[str, str] = {}
    shown = all_rows
    if args.select == "val":
        chosen = set(select_on_validation(all_rows).values())
        for row in all_rows:
            row["selected"] = row["method"] == "plain" or row["label"] in chosen
        selection = {r["label"].split("(")[0]: r["label"] for r in all_rows if r["method"] != "plain" and r["selected"]}
        shown = [r for r in all_rows if r["selected"]]
    baseline = next((r["label"] for r in all_rows if r["method"] == "plain"), None)
    if baseline is not None:
        for row in all_rows:
            if row["method"] != "plain":
                row["paired"] = paired_difference(runs, row["label"], baseline)
    return {"rows": all_rows, "shown": shown, "selection": selection, "baseline": baseline}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``ghostnoise compare``; returns the exit code (2: bad flags or data, nothing written)."""
    args = parse_args(argv)
    _quiet(args.verbose)
    from lightning_ghostnoise.analysis.outputs import write_json
    from lightning_ghostnoise.experiments.compare_run import fit_once
    from lightning_ghostnoise.experiments.data import DEFAULT_DATA_DIR, resolve_dataset

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
            saved = _load_run(path, config)
            if saved is not None:
                print(f"[{index}/{len(plan)}] {spec.label}, seed {seed}: reusing {path}", flush=True)
                runs.append(saved)
                continue
        print(f"[{index}/{len(plan)}] {spec.label}, seed {seed}: fitting {args.epochs} epoch(s) ...", flush=True)
        try:
            result = fit_once(args, spec, seed, show_bar, f"[{index}/{len(plan)}]")
        except ValueError as err:  # e.g. a subset larger than what the validation split leaves
            print(f"ghostnoise compare: {err}", file=sys.stderr)
            return 2
        val = f"val {result['val_acc']:.2%}, " if result.get("val_acc") is not None else ""
        print(
            f"[{index}/{len(plan)}] {spec.label}, seed {seed}: {val}test {result['test_acc']:.2%}, train "
            f"{result['train_acc']:.2%} ({result['fit_seconds']:.0f} s fit, {result['eval_seconds']:.0f} s of it and "
            "after it evaluating)",
            flush=True,
        )
        write_json(path, {"config": config, "result": result})
        runs.append(result)
    report = _report(args, runs)
    first = runs[0]
    header = (
        f"{args.model} on {first['dataset']} ({first['n_train']} training / {first['n_val']} validation / "
        f"{first['n_test']} test images), {args.epochs} epoch(s), batch {args.batch_size}, lr {args.lr:g}, "
        f"wd {args.weight_decay:g}, seeds {seeds[0]}..{seeds[-1]}, device {first['device']}"
        + (f", warm-up {args.warmup_epochs:g} epochs" if args.warmup_epochs else "")
        + (f", label smoothing {args.label_smoothing:g}" if args.label_smoothing else "")
        + (", crop+flip" if args.augment else "")
        + (f", strength {args.strength:g}" if args.strength != 1 else "")
    )
    table = format_table(report["shown"], report["baseline"])
    print()
    print(header)
    ghost_runs = [r for r in runs if r["rewritten"]]
    if ghost_runs:
        print(f"GhostNoise rewrote: {ghost_runs[0]['rewritten']}")
    if report["selection"]:
        print("N selected on validation accuracy: " + ", ".join(report["selection"].values()))
    print()
    print(table)
    print()
    print(
        f"mean +- std over {len(seeds)} seed(s). val/test acc: after the last epoch; train acc: the training images "
        "in eval mode without augmentation; gap = train - test. The paired columns compare each method with "
        f"{report['baseline'] or 'the baseline'} seed by seed: mean test-accuracy difference with its 95% CI "
        "(Student's t), the paired t-test p-value and the seeds won. train s/epoch excludes evaluation."
    )
    out = {
        "command": "ghostnoise compare " + " ".join(sys.argv[2:] if argv is None else list(argv)),
        "config": {k: v for k, v in vars(args).items() if k not in ("specs", "several_n")},
        "header": header,
        "environment": _environment(first["device"]),
        "total_seconds": time.perf_counter() - started,
        "baseline": report["baseline"],
        "selection": report["selection"],
        "summary": report["rows"],
        "table": table,
        "runs": runs,
    }
    json_path = os.path.join(args.out_dir, "results.json")
    write_json(json_path, out)
    written = [json_path]
    if not args.no_plot:
        from lightning_ghostnoise.experiments.compare_plots import (
            plot_curves,
            plot_validation_vs_n,
        )

        png = os.path.join(args.out_dir, "curves.png")
        plot_curves(runs, [r["label"] for r in report["shown"]], png, title=header)
        written.append(png)
        if args.several_n and args.val_size:
            png = os.path.join(args.out_dir, "val_vs_n.png")
            plot_validation_vs_n(report["rows"], png, title=f"{args.model}: validation accuracy against N")
            written.append(png)
    print(f"wrote {', '.join(written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
