"""The Lightning callbacks: :class:`GhostNoise` puts ghost noise into a model for ``fit``,
:class:`GhostNoiseMonitor` logs the noise it injects.

Both need ``lightning``; the layers and :func:`~lightning_ghostnoise.apply_ghost_noise` do not.

Example:
    >>> from lightning_ghostnoise.callbacks import GhostNoise, GhostNoiseMonitor
    >>> callbacks = [GhostNoise(ghost_batch_size=16), GhostNoiseMonitor(every_n_steps=50)]
"""

from lightning_ghostnoise.callbacks.ghost_noise import GhostNoise
from lightning_ghostnoise.callbacks.monitor import STATISTICS, GhostNoiseMonitor, NoiseStatistics

__all__ = ["GhostNoise", "GhostNoiseMonitor", "NoiseStatistics", "STATISTICS"]
