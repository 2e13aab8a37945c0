"""The ``ghostnoise`` command: ``fit`` (and the other LightningCLI subcommands), ``compare``, ``analyze``.

Run ``ghostnoise --help`` for the list, ``ghostnoise <subcommand> --help`` for the options of each.

* ``ghostnoise fit``, ``validate``, ``test``, ``predict``: a LightningCLI over
  :class:`~lightning_ghostnoise.experiments.models.Classifier` and
  :class:`~lightning_ghostnoise.experiments.data.FashionMNISTDataModule`; any ``GhostNoise`` and ``Trainer``
  option can be set from YAML (``--config configs/resnet_gni.yaml``) or flags.
* ``ghostnoise compare``: the same model with BN, GBN(N), GNI(N) (or LN, LN+GNI), several seeds, a
  table, a JSON and a PNG of the curves (:mod:`lightning_ghostnoise.experiments.compare`).
* ``ghostnoise analyze``: measure the noise of live ghost layers and compare it with theory
  (:mod:`lightning_ghostnoise.experiments.analyze`).

Example:
    >>> from lightning_ghostnoise.experiments.cli import main
    >>> main(["--help"])  # doctest: +SKIP
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, List, Optional, Sequence

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningCLI

__all__ = ["LIGHTNING_SUBCOMMANDS", "build_lightning_cli", "main", "run_lightning_cli"]

#: Subcommands handed to LightningCLI.
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

_USAGE = """\
usage: ghostnoise <subcommand> [options]

Ghost noise regularization (GBN, XBN, GNI) for PyTorch Lightning.

subcommands:
  fit, validate, test, predict
             LightningCLI over the bundled Classifier and FashionMNISTDataModule; e.g.
             ghostnoise fit --config configs/resnet_gni.yaml
  compare    train the same model with BN, GBN(N), GNI(N) (or LN, LN+GNI) over several seeds;
             print a table, write a JSON of the results and a PNG of the curves
  analyze    measure ghost noise on live layers, compare it with theory, write plots and JSON

Run `ghostnoise <subcommand> --help` for the options of each.
"""


def build_lightning_cli(argv: Sequence[str], run: bool = True) -> "LightningCLI":
    """The LightningCLI of ``ghostnoise fit`` (and ``validate``, ``test``, ``predict``).

    Over :class:`~lightning_ghostnoise.experiments.models.Classifier` and
    :class:`~lightning_ghostnoise.experiments.data.FashionMNISTDataModule`, with ``seed_everything`` 0 by default;
    the resolved configuration is saved next to the logs (overwriting an earlier one).

    Args:
        argv: the subcommand and its options (with ``run=False``: the options only).
        run: run the subcommand; ``False`` only parses and instantiates.

    Returns:
        The ``LightningCLI`` (its ``trainer``, ``model`` and ``datamodule`` are there to inspect).

    Example:
        >>> cli = build_lightning_cli(["fit", "--config", "configs/resnet_gni.yaml"])  # doctest: +SKIP
        >>> cli.trainer.callbacks  # doctest: +SKIP
    """
    from lightning.pytorch.cli import LightningCLI

    from lightning_ghostnoise.experiments.data import FashionMNISTDataModule
    from lightning_ghostnoise.experiments.models import Classifier

    return LightningCLI(
        Classifier,
        FashionMNISTDataModule,
        args=list(argv),
        run=run,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
    )


def run_lightning_cli(argv: Sequence[str]) -> int:
    """Run ``ghostnoise fit``/``validate``/``test``/``predict``; returns the exit code (0)."""
    build_lightning_cli(argv)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``ghostnoise`` console command; returns the exit code."""
    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command in LIGHTNING_SUBCOMMANDS:
        return run_lightning_cli(args)
    if command == "compare":
        from lightning_ghostnoise.experiments.compare import main as compare_main

        return compare_main(rest)
    if command == "analyze":
        from lightning_ghostnoise.experiments.analyze import main as analyze_main

        return analyze_main(rest)
    print(f"ghostnoise: unknown subcommand {command!r}.\n", file=sys.stderr)
    print(_USAGE, end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
