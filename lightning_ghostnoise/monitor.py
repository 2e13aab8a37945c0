"""Former path of :mod:`lightning_ghostnoise.callbacks.monitor`, kept so that existing imports and
configs (``class_path: lightning_ghostnoise.monitor.GhostNoiseMonitor``) work.

Example:
    >>> from lightning_ghostnoise.monitor import GhostNoiseMonitor
    >>> from lightning_ghostnoise.callbacks import GhostNoiseMonitor as New
    >>> GhostNoiseMonitor is New
    True
"""

from lightning_ghostnoise.callbacks.monitor import STATISTICS, GhostNoiseMonitor, NoiseStatistics

__all__ = ["GhostNoiseMonitor", "NoiseStatistics", "STATISTICS"]
