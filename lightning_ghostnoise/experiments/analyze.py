"""``ghostnoise analyze``: measure the ghost noise of a model's live layers on real data, plot it, save the numbers.

By default: the bundled pre-activation ResNet-8 (BatchNorm), trained for ``--train-steps`` plain SGD
steps on Fashion-MNIST (a freshly initialized network's features, hence its noise, differ from a
trained one's), then for every method and ghost batch size the noise each layer injects on
``--batches`` training batches (:func:`lightning_ghostnoise.analysis.analyze_noise`). Or any
checkpoint of :class:`~lightning_ghostnoise.experiments.models.Classifier` (``--checkpoint``, used as
it is). List flags take space-separated values (``--ghost-batch-size 4 16 64``, ``--methods gni gbn``).

Writes to ``--out-dir``:

* ``noise_analysis.json``: per mode, method, ``N`` and layer the moments, ``N_eff`` and KS tests;
* ``histograms_N<n>.png``: shift and scale histograms per layer with the law overlaid;
* ``shift_std_vs_n.png`` and ``log_scale_std_vs_n.png``: noise strength against ``N`` per layer;
* the same three with ``_isolated`` for the isolated mode (each layer on the plain network's input,
  see :func:`~lightning_ghostnoise.analysis.analyze_noise`).

Example:
    >>> from lightning_ghostnoise.experiments.analyze import main
    >>> main(["--train-steps", "100", "--out-dir", "analysis"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_ghostnoise import METHODS
from lightning_ghostnoise.analysis.outputs import write_json
from lightning_ghostnoise.experiments.flags import (
    DeprecatedSwitch,
    ListFlag,
    positive_int,
)

__all__ = ["build_parser", "load_model", "main"]

_JSON = "noise_analysis.json"
_MODES = ("live", "isolated")


def _ghost_n(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers such as 4 16 64, got {text!r}") from None


def _method(text: str) -> str:
    if text.lower() not in METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}: choose from {' '.join(METHODS)}")
    return text.lower()


def _mode(text: str) -> str:
    if text.lower() not in _MODES:
        raise argparse.ArgumentTypeError(f"modes are {' and '.join(_MODES)}, got {text!r}")
    return text.lower()


def _json_dict(text: str) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(
            f"expected a JSON object such as '{{\"width\": 16}}', got {text!r} ({err})"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ghostnoise analyze``."""
    from lightning_ghostnoise.experiments.data import DEFAULT_DATA_DIR

    p = argparse.ArgumentParser(
        prog="ghostnoise analyze",
        description=(
            "Measure the shift and scale noise that ghost noise layers (GNI, GBN, XBN, analytic GNI) inject into each "
            "normalization layer of a model on real data, compare it with the law shift ~ Normal(0, 1/N), "
            "scale^2 ~ chi2(N-1)/N and with the law at the effective ghost batch size, and write PNG plots and a JSON."
        ),
    )
    p.add_argument(
        "--model",
        default=None,
        help="model name of lightning_ghostnoise.experiments.models.MODELS (default: resnet8, or the checkpoint's)",
    )
    p.add_argument(
        "--model-kwargs",
        type=_json_dict,
        default=None,
        help="JSON object of model constructor arguments, e.g. '{\"width\": 16}' (default: the checkpoint's, or none)",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="a Lightning checkpoint of lightning_ghostnoise.experiments.models.Classifier, or a saved state_dict of the model",
    )
    p.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help="Fashion-MNIST folder (default: %(default)s; without it: scikit-learn's digits, with a warning)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int("--batch-size", 2),
        default=256,
        help="samples per analyzed batch (default: %(default)s)",
    )
    p.add_argument(
        "--batches", type=positive_int("--batches"), default=4, help="batches to analyze (default: %(default)s)"
    )
    p.add_argument(
        "--modes",
        action=ListFlag,
        item=_mode,
        default=["live", "isolated"],
        metavar="MODE",
        help="live (ghost noise in every layer), isolated (each layer on the plain network's input), or both "
        "(default: live isolated)",
    )
    p.add_argument(
        "--ghost-batch-size",
        action=ListFlag,
        item=_ghost_n,
        default=[4, 8, 16, 32, 64],
        metavar="N",
        help="ghost batch size(s) N, each >= 2 (default: 4 8 16 32 64)",
    )
    p.add_argument(
        "--ghost-batch-sizes",
        dest="ghost_batch_size",
        action=ListFlag,
        item=_ghost_n,
        replaced_by="--ghost-batch-size",
        help=argparse.SUPPRESS,
    )
    p.add_argument(
        "--methods",
        action=ListFlag,
        item=_method,
        default=list(METHODS),
        metavar="METHOD",
        help=f"methods among {' '.join(METHODS)} (default: all)",
    )
    p.add_argument(
        "--out-dir", default="ghostnoise_analysis", help="where the PNGs and the JSON go (default: %(default)s)"
    )
    p.add_argument(
        "--seed", type=positive_int("--seed", 0), default=0, help="seed of data order, training and noise (default: 0)"
    )
    p.add_argument(
        "--train-steps",
        type=positive_int("--train-steps", 0),
        default=None,
        help="plain-BN SGD steps before the analysis (default: 200 without --checkpoint, 0 with one)",
    )
    p.add_argument(
        "--train-batch-size",
        type=positive_int("--train-batch-size", 2),
        default=128,
        help="batch size of those steps (default: %(default)s)",
    )
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate of those steps (default: %(default)s)")
    p.add_argument(
        "--hist-ghost-batch-size",
        type=positive_int("--hist-ghost-batch-size", 2),
        default=None,
        help="the N of the histogram figure (default: 16 if analyzed, else the middle one)",
    )
    p.add_argument("--dpi", type=positive_int("--dpi", 20), default=100, help="PNG resolution (default: %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only (no matplotlib needed)")
    p.add_argument("--no-plots", dest="no_plot", action=DeprecatedSwitch, replaced_by="--no-plot")
    return p


def _validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from lightning_ghostnoise.experiments.models import MODELS

    bad = [n for n in args.ghost_batch_size if n < 2]
    if bad:
        p.error(f"--ghost-batch-size: every N must be >= 2 (the scale's law has N - 1 degrees of freedom), got {bad}")
    args.ghost_batch_size = sorted(set(args.ghost_batch_size))
    args.methods = list(dict.fromkeys(args.methods))
    args.modes = list(dict.fromkeys(args.modes))
    if args.model is not None and args.model.lower().replace("-", "_") not in MODELS:
        p.error(f"--model: unknown model {args.model!r}; choose from {', '.join(MODELS)}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a positive number, got {args.lr}")
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        p.error(f"--checkpoint: no such file: {args.checkpoint!r}")
    if args.train_steps is None:
        args.train_steps = 0 if args.checkpoint is not None else 200
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        p.error(f"--out-dir: {args.out_dir!r} exists and is not a folder")
    if args.hist_ghost_batch_size is None:
        sizes = args.ghost_batch_size
        args.hist_ghost_batch_size = 16 if 16 in sizes else sizes[len(sizes) // 2]
    elif args.hist_ghost_batch_size not in args.ghost_batch_size:
        p.error(
            f"--hist-ghost-batch-size {args.hist_ghost_batch_size} is not among --ghost-batch-size {args.ghost_batch_size}"
        )
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error(
                "the plots need matplotlib: pip install 'lightning-ghostnoise[plot]', or pass --no-plot for the JSON only"
            )


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why and what to do."""


def load_model(
    checkpoint: Optional[str], model: Optional[str] = None, model_kwargs: Optional[Dict[str, Any]] = None
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build the model to analyze: from ``checkpoint`` (a Lightning checkpoint of
    :class:`~lightning_ghostnoise.experiments.models.Classifier` or a ``state_dict``), or freshly initialized.

    The checkpoint's hyperparameters choose the model unless ``model``/``model_kwargs`` are given.
    Checkpoints trained with ghost noise load as they are (their keys are the plain layers').

    Returns:
        ``(model, info)``: the model and what was used (``name``, ``kwargs``, ``source``).

    Raises:
        CheckpointError: unreadable file, or weights that do not fit the model (the message lists the
            first mismatching keys and suggests ``--model`` / ``--model-kwargs``).

    Example:
        >>> net, info = load_model(None, "resnet8", {"width": 4})
        >>> info["name"], info["source"]
        ('resnet8', 'fresh')
    """
    from lightning_ghostnoise.experiments.models import build_model

    state: Optional[Dict[str, Any]] = None
    hparams: Dict[str, Any] = {}
    if checkpoint is not None:
        try:
            raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as err:  # corrupt, truncated, not a torch file, or pickled Python objects
            raise CheckpointError(
                f"cannot read checkpoint {checkpoint!r}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
                "Expected a Lightning checkpoint of lightning_ghostnoise.experiments.models.Classifier or torch.save(model.state_dict()). "
                "Files holding arbitrary Python objects are not loaded (torch.load weights_only=True): save the state_dict."
            ) from None
        if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
            state = raw["state_dict"]
            hp = raw.get("hyper_parameters")
            hparams = hp if isinstance(hp, dict) else {}
        elif isinstance(raw, dict) and raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
            state = raw
        else:
            raise CheckpointError(
                f"checkpoint {checkpoint!r} holds a {type(raw).__name__} that is neither a Lightning checkpoint (a dict with "
                "'state_dict') nor a state_dict (a dict of tensors)."
            )
        if state and all(k.startswith("model.") for k in state):
            state = {k[len("model.") :]: v for k, v in state.items()}  # Classifier keeps the network as .model
    name = model or (hparams.get("model") if isinstance(hparams.get("model"), str) else None) or "resnet8"
    kwargs = dict(model_kwargs if model_kwargs is not None else (hparams.get("model_kwargs") or {}))
    extra = {k: hparams[k] for k in ("num_classes", "in_channels") if isinstance(hparams.get(k), int)}
    try:
        net = build_model(name, **extra, **kwargs)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"cannot build model {name!r} with {kwargs}: {err}") from None
    if state is not None:
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError:
            own = net.state_dict()
            missing = [k for k in own if k not in state]
            unexpected = [k for k in state if k not in own]
            shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
            raise CheckpointError(
                f"the weights in {checkpoint!r} do not fit model {name!r} with {kwargs}: "
                f"{len(missing)} missing keys {missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}, "
                f"{len(shapes)} shape mismatches {shapes[:4]}. Pass the matching --model and --model-kwargs."
            ) from None
    return net, {"name": name, "kwargs": kwargs, "source": checkpoint or "fresh"}


def _train(net: nn.Module, loader: Any, steps: int, lr: float) -> Tuple[float, float]:
    """``steps`` plain SGD steps (momentum 0.9, weight decay 5e-4 on weights); returns the first and last loss."""
    decay = [p for p in net.parameters() if p.ndim > 1]
    rest = [p for p in net.parameters() if p.ndim <= 1]
    groups: List[Dict[str, Any]] = [{"params": decay, "weight_decay": 5e-4}, {"params": rest}]
    opt = torch.optim.SGD(groups, lr=lr, momentum=0.9)
    net.train()
    first = last = math.nan
    done = 0
    t0 = time.time()
    while done < steps:
        for x, y in loader:
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            last = float(loss.detach())
            first = last if done == 1 else first
            if done % 50 == 0 or done == steps:
                print(f"  step {done}/{steps}: loss {last:.3f} ({time.time() - t0:.0f} s)", flush=True)
            if done >= steps:
                break
    return first, last


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``ghostnoise analyze``; returns the exit code (2: bad arguments or checkpoint)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        _validate(parser, args)
    except SystemExit as exit_:  # argparse: --help (0) or an error it has printed (2)
        return int(exit_.code or 0)
    torch.manual_seed(args.seed)  # the fresh model's initialization
    try:
        net, info = load_model(args.checkpoint, args.model, args.model_kwargs)
    except CheckpointError as err:
        print(f"ghostnoise analyze: error: {err}", file=sys.stderr)
        return 2

    from lightning_ghostnoise import analysis as A
    from lightning_ghostnoise.experiments.data import FashionMNISTDataModule
    from lightning_ghostnoise.seeding import derive_seed

    os.makedirs(args.out_dir, exist_ok=True)
    train_dm = FashionMNISTDataModule(args.data_dir, batch_size=args.train_batch_size, seed=args.seed, drop_last=True)
    train_dm.setup("fit")
    dataset = train_dm.dataset_name
    print(f"ghostnoise analyze: {info['name']} {info['kwargs'] or ''} ({info['source']}) on {dataset}")
    first = last = None
    if args.train_steps:
        print(f"Training {args.train_steps} plain SGD steps (batch {args.train_batch_size}, lr {args.lr}):", flush=True)
        first, last = _train(net, train_dm.train_dataloader(), args.train_steps, args.lr)
    data_dm = FashionMNISTDataModule(
        args.data_dir, batch_size=args.batch_size, seed=derive_seed(args.seed, 1) % 2**32, drop_last=True
    )
    data_dm.setup("fit")
    loader = data_dm.train_dataloader()
    if len(loader) < args.batches:
        print(
            f"ghostnoise analyze: error: {dataset} has {len(loader)} full batches of {args.batch_size} training images, "
            f"--batches asks for {args.batches}: lower --batch-size or --batches.",
            file=sys.stderr,
        )
        return 2
    batches = [batch for _, batch in zip(range(args.batches), loader)]  # the same batches for every mode
    t0 = time.time()
    results = {
        mode: A.analyze_noise(
            net, batches, args.ghost_batch_size, args.methods, num_batches=args.batches, seed=args.seed, mode=mode
        )
        for mode in args.modes
    }
    first_result = next(iter(results.values()))
    for method, why in first_result.skipped.items():
        rank_zero_warn(f"ghostnoise analyze: method {method!r} skipped: {why}.")
    meta = dict(
        command="ghostnoise analyze " + " ".join(list(sys.argv[1:] if argv is None else argv)),
        model=info["name"],
        model_kwargs=info["kwargs"],
        source=info["source"],
        dataset=dataset,
        data_dir=args.data_dir,
        train_steps=args.train_steps,
        train_batch_size=args.train_batch_size,
        lr=args.lr,
        train_loss_first=first,
        train_loss_last=last,
        batch_size=args.batch_size,
        batches=args.batches,
        seed=args.seed,
        torch=torch.__version__,
        seconds=round(time.time() - t0, 1),
    )
    json_path = os.path.join(args.out_dir, _JSON)
    write_json(
        json_path, {"meta": meta, **{mode: r.to_dict() for mode, r in results.items()}}, indent=1, allow_nan=False
    )
    written = [json_path]
    n = args.hist_ghost_batch_size
    for mode, result in results.items():
        suffix = "" if mode == "live" else f"_{mode}"
        if not args.no_plot:
            hist = os.path.join(args.out_dir, f"histograms_N{n}{suffix}.png")
            A.plot_histograms(result, hist, n, dpi=args.dpi, title=f"{mode} mode")
            written.append(hist)
            for quantity in ("shift_std", "log_scale_std"):
                path = os.path.join(args.out_dir, f"{quantity}_vs_n{suffix}.png")
                A.plot_noise_vs_n(result, path, quantity, dpi=args.dpi, title=f"{mode} mode")
                written.append(path)
        print(f"\n{mode} mode, N = {n}:")
        print(result.format_table(n))
    print("\nWrote " + ", ".join(written))
    rank_zero_info(f"ghostnoise analyze: done in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
