"""Former path of :mod:`lightning_ghostnoise.callbacks.ghost_noise`, kept so that existing imports and
configs (``class_path: lightning_ghostnoise.callback.GhostNoise``) work.

Example:
    >>> from lightning_ghostnoise.callback import GhostNoise
    >>> from lightning_ghostnoise.callbacks import GhostNoise as New
    >>> GhostNoise is New
    True
"""

from lightning_ghostnoise.callbacks.ghost_noise import GhostNoise

__all__ = ["GhostNoise"]
