"""The random draws of ghost noise: ghost batch members (GNI) and the analytic law's variates.

Eager layers draw from their own ``torch.Generator``; under ``torch.compile`` (or with
``counter_rng=True``) they pass a ``key`` and the draws come from the counter-based generator
(:mod:`lightning_ghostnoise.functional.counter_rng`), a pure function of the key.

Example:
    >>> import torch
    >>> ghost_indices(8, 4, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([8, 4])
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lightning_ghostnoise.functional import counter_rng

__all__ = ["analytic_draws", "ghost_counts", "ghost_indices"]


def ghost_indices(
    batch_size: int,
    ghost_batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    num_rows: int | None = None,
    key: Tensor | None = None,
) -> Tensor:
    """Draw, for each sample, the ``N`` members of its ghost batch (uniform, with replacement).

    Args:
        batch_size: ``B``, the number of samples to draw from (the pool).
        ghost_batch_size: ``N``, members per ghost batch; any ``N >= 1`` (``N`` may exceed ``B``).
        generator: the random generator to draw from (on ``device``). ``None`` uses the global one.
        device: where to draw; defaults to the generator's device.
        num_rows: how many ghost batches to draw (defaults to ``batch_size``).
        key: draw from the counter-based generator (:mod:`~lightning_ghostnoise.functional.counter_rng`) with this
            int64 key tensor instead of ``generator`` (what the layers use under ``torch.compile``).

    Returns:
        Long tensor of shape ``(num_rows, N)`` with values in ``[0, B)``.

    Example:
        >>> ghost_indices(8, 4, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([8, 4])
    """
    if ghost_batch_size < 1:
        raise ValueError(f"ghost_batch_size must be >= 1, got {ghost_batch_size}.")
    rows = batch_size if num_rows is None else num_rows
    if key is not None:
        return counter_rng.uniform_ints(key, (rows, ghost_batch_size), batch_size, device=key.device)
    if device is None:
        device = generator.device if generator is not None else "cpu"
    return torch.randint(0, batch_size, (rows, ghost_batch_size), generator=generator, device=device)


def ghost_counts(indices: Tensor, pool_size: int) -> Tensor:
    """``counts[b, j]``: how often sample ``j`` is in the ghost batch of sample ``b`` (float32)."""
    counts = torch.zeros(indices.shape[0], pool_size, device=indices.device, dtype=torch.float32)
    return counts.scatter_add_(1, indices, torch.ones_like(indices, dtype=torch.float32))


def analytic_draws(
    batch_size: int,
    num_channels: int,
    ghost_batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    key: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The random draws behind :func:`analytic_noise`: per (sample, channel) a standard normal and a
    ``Gamma((N - 1) / 2, 1)`` variate (zero for ``N = 1``), float32 ``(batch_size, num_channels)`` each.

    With ``key`` they come from the counter-based generator (what the layers use under
    ``torch.compile``): ``Gamma(k / 2, 1)`` for ``k = N - 1`` as a sum of ``k // 2`` standard
    exponentials (``-log U``), plus ``Z**2 / 2`` for a normal ``Z`` when ``k`` is odd: the exact law
    with about a third of the random numbers of ``k`` squared normals.

    Example:
        >>> z, g = analytic_draws(4, 3, 16, generator=torch.Generator().manual_seed(0))
        >>> z.shape, bool((g > 0).all())
        (torch.Size([4, 3]), True)
    """
    if ghost_batch_size < 1:
        raise ValueError(f"ghost_batch_size must be >= 1, got {ghost_batch_size}.")
    n = ghost_batch_size
    shape = (batch_size, num_channels)
    if key is not None:
        normal = counter_rng.normal(key, shape, salt=0)  # uniform streams 1 and 2
        k = n - 1
        gamma = torch.zeros_like(normal)
        if k // 2:
            gamma = -torch.log(counter_rng.uniform(key, (k // 2,) + shape, salt=5)).sum(0)
        if k % 2:
            gamma = gamma + counter_rng.normal(key, shape, salt=1).square() / 2  # uniform streams 3 and 4
        return normal, gamma
    if device is None:
        device = generator.device if generator is not None else "cpu"
    normal = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    if n == 1:
        return normal, torch.zeros_like(normal)
    if _STANDARD_GAMMA is None:  # no private Gamma sampler in this torch: the same law from public draws
        return normal, _gamma_from_uniforms(n - 1, shape, generator, torch.device(device))
    # a cached 0-dim shape parameter, broadcast: the same draws as a full tensor, no fill launch per call
    alpha = _gamma_shape(n, torch.device(device)).expand(shape)
    return normal, _STANDARD_GAMMA(alpha, generator=generator)


#: PyTorch's Gamma sampler (private, the only one that takes a generator); tests/functional check it.
_STANDARD_GAMMA = getattr(torch, "_standard_gamma", None)


def _gamma_from_uniforms(
    k: int, shape: tuple[int, int], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """``Gamma(k / 2, 1)`` from public draws: ``k // 2`` standard exponentials plus ``Z**2 / 2`` for odd ``k``."""
    gamma = torch.zeros(shape, device=device)
    if k // 2:
        u = torch.rand((k // 2,) + tuple(shape), generator=generator, device=device).clamp_min_(1e-38)
        gamma = -torch.log(u).sum(0)
    if k % 2:
        gamma = gamma + torch.randn(shape, generator=generator, device=device).square() / 2
    return gamma


@functools.lru_cache(maxsize=16)
def _gamma_shape(ghost_batch_size: int, device: torch.device) -> Tensor:
    """``(N - 1) / 2`` as a float32 0-dim tensor on ``device`` (read-only, shared)."""
    return torch.tensor((ghost_batch_size - 1) / 2.0, dtype=torch.float32, device=device)
