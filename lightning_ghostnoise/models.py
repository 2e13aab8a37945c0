"""Moved to :mod:`lightning_ghostnoise.experiments.models`; this path keeps working (e.g. as a LightningCLI class path).

Example:
    >>> from lightning_ghostnoise.models import Classifier  # same class as the new path
"""

from lightning_ghostnoise.experiments.models import *  # noqa: F401,F403
from lightning_ghostnoise.experiments.models import __all__  # noqa: F401
