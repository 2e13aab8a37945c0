"""The bundled Classifier's learning-rate factor: a linear warm-up, then a cosine decay to 0.

Example:
    >>> f = WarmupCosine(warmup=2, total=10)
    >>> [round(f(step), 3) for step in (0, 1, 2, 10)]
    [0.333, 0.667, 1.0, 0.0]
"""

from __future__ import annotations

import math

__all__ = ["WarmupCosine"]


class WarmupCosine:
    """The learning-rate factor at a step: linear from 0 to 1 over ``warmup`` steps, then cosine to 0 at ``total``."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        span = max(self.total - self.warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - self.warmup, span) / span))
