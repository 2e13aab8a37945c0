"""Seeds for the ghost-noise generators: a pure function of (base seed, rank, step, layer index).

Lightning keeps no RNG state in checkpoints and gives every rank the same global seed, so the noise
has generators of its own (one per layer, see :meth:`GhostNoiseMixin.reseed`), reseeded from
:func:`derive_seed` at every training batch. The result is reproducible, exact on resume, different
per rank, and never touches the global RNG.

Example:
    >>> derive_seed(42, 0, 0, 3) == derive_seed(42, 0, 0, 3)
    True
    >>> derive_seed(42, 0, 0, 3) != derive_seed(42, 1, 0, 3)
    True
"""

from __future__ import annotations

__all__ = ["MAX_SEED", "derive_seed", "validate_seed"]

_MASK64 = (1 << 64) - 1
#: Largest accepted base seed (the uint32 range, as ``seed_everything``).
MAX_SEED = 2**32 - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(base: int, *parts: int) -> int:
    """Mix a base seed with any number of integers (rank, step, layer, ...) into a 63-bit seed.

    A stable, platform-independent hash (SplitMix64 chained over the parts): the same inputs give
    the same seed in every process and Python version; any change of a part changes the seed.
    """
    h = _splitmix64(int(base) & _MASK64)
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1


def validate_seed(seed: int) -> int:
    """Return ``seed`` as an int if it lies in ``[0, 2**32 - 1]``, else raise a clear ``ValueError``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}.")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in the uint32 range [0, {MAX_SEED}], got {seed}.")
    return seed
