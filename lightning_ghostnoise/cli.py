"""Moved to :mod:`lightning_ghostnoise.experiments.cli`; this path keeps working for console scripts installed before the move.

Example:
    >>> from lightning_ghostnoise.cli import main  # the ``ghostnoise`` command
"""

from lightning_ghostnoise.experiments.cli import *  # noqa: F401,F403
from lightning_ghostnoise.experiments.cli import __all__  # noqa: F401
