"""Moved to :mod:`lightning_ghostnoise.experiments.data`; this path keeps working (e.g. as a LightningCLI class path).

Example:
    >>> from lightning_ghostnoise.data import FashionMNISTDataModule  # same class as the new path
"""

from lightning_ghostnoise.experiments.data import *  # noqa: F401,F403
from lightning_ghostnoise.experiments.data import __all__  # noqa: F401
